"""Worker functions for the compression tests (real processes over gloo)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from idla import Agent, AgentConfig
from idla.runtime.data import GlobalBatchSampler
from tests.distributed.workers import _digits_pair, _optimizer, param_hash


def compressed_steps(
    codec: str, shares: list[int], steps: int, error_feedback: bool, min_numel: int
) -> dict[str, Any]:
    """Train the demo CNN with fixed uneven shares through a codec; report the parameter
    hash, the compression report and whether the first step matched a single process."""
    train_set, model, reference, optimizer = _digits_pair("sgd")
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=sum(shares), initial_shares=shares, rebalance=False,
        compress=codec, error_feedback=error_feedback, min_compress_numel=min_numel,
        check_every_steps=2))
    first_grads: list[torch.Tensor] = []
    epoch = 0
    while agent.step < steps:
        for x, y in agent.batches(epoch):
            agent.backward(F.cross_entropy(model(x), y))
            if agent.step == 1:
                first_grads = [p.grad.detach().clone() for p in model.parameters()]
            optimizer.step()
            if agent.step == steps:
                break
        epoch += 1
    agent.close()
    result = {"hash": param_hash(model), "report": agent.report()["compression"]}
    if agent.rank == 0:
        batch = GlobalBatchSampler(len(train_set), sum(shares), 0).epoch(0)[0].indices
        images, labels = train_set.tensors
        _optimizer("sgd", reference)
        F.cross_entropy(reference(images[batch]), labels[batch]).backward()
        result["first_step_max_diff"] = max(
            float((g - p.grad).abs().max())
            for g, p in zip(first_grads, reference.parameters(), strict=True))
        result["grad_scale"] = max(float(p.grad.abs().max()) for p in reference.parameters())
    return result


def auto_choice(steps: int) -> dict[str, Any]:
    """`compress="auto"` over loopback: which codec it chose and why, identical everywhere."""
    train_set, model, _, optimizer = _digits_pair("adam")
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=128, compress="auto"))
    epoch = 0
    while agent.step < steps:
        for x, y in agent.batches(epoch):
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            if agent.step == steps:
                break
        epoch += 1
    agent.close()
    return {"hash": param_hash(model), "report": agent.report()["compression"]}
