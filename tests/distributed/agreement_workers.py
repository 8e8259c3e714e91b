"""Worker functions for the agreement tests: ranks that build their agents from configs or
models that differ, each caught and reported, then one agent whose ranks agree."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from idla import Agent, AgentConfig
from idla.errors import ConfigError
from idla.runtime.group import Group

SCENARIOS = ["global_batch", "seed", "model_shape", "compress"]


def _model(outputs: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, outputs))


def _attempt(group: Group, config: AgentConfig, model: nn.Module) -> dict[str, Any]:
    data = [torch.randn(64, 6), torch.randint(0, 3, (64,))]
    start = time.perf_counter()
    try:
        agent = Agent(model, None, data, config=config, group=group)
    except ConfigError as error:
        return {"error": str(error), "elapsed_s": time.perf_counter() - start}
    return {"agent": agent, "elapsed_s": time.perf_counter() - start}


def disagreements() -> dict[str, Any]:
    """Each scenario makes rank 1 differ in one thing; then all agree (but for the per-rank
    memory cap) and one step runs."""
    torch.set_num_threads(1)
    group = Group(timeout_s=30.0)
    rank = group.rank
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        config = AgentConfig(
            global_batch_size=8 if scenario == "global_batch" and rank == 1 else 16,
            seed=1 if scenario == "seed" and rank == 1 else 0,
            compress="fp16" if scenario == "compress" and rank == 1 else "none",
        )
        model = _model(4 if scenario == "model_shape" and rank == 1 else 3)
        results[scenario] = _attempt(group, config, model)
    agreed = _attempt(group, AgentConfig(global_batch_size=16, max_local_batch=8 + 4 * rank),
                      _model())
    agent = agreed.pop("agent")
    for x, y in agent.batches(0):
        agent.backward(nn.functional.cross_entropy(agent.model(x), y))
        break
    agreed["shares"] = agent.shares
    agent.close()
    results["agreed"] = agreed
    return results
