"""Worker functions for the resume tests: train, checkpoint, restart, compare (gloo)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from idla import Agent, AgentConfig
from idla.agent.resume import restore_agent, save_agent
from idla.runtime.checkpoint import load_checkpoint
from idla.runtime.group import Group
from tests.distributed.workers import _digits_pair, param_hash


def _agent(compress: str) -> Agent:
    """A fresh DigitsCNN, Adam and agent with fixed uneven shares."""
    train_set, model, _, optimizer = _digits_pair("adam")
    return Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=128, initial_shares=[80, 48], rebalance=False, seed=0,
        compress=compress))


def _train(agent: Agent, epochs: range, start_batch: int = 0, stop_batch: int | None = None
           ) -> None:
    """Train `epochs`, the first from `start_batch`, the last up to `stop_batch` (exclusive)."""
    assert agent.optimizer is not None
    for epoch in epochs:
        start = start_batch if epoch == epochs.start else 0
        for index, (x, y) in enumerate(agent.batches(epoch, start), start=start):
            agent.backward(F.cross_entropy(agent.model(x), y))
            agent.optimizer.step()
            if epoch == epochs[-1] and stop_batch is not None and index + 1 == stop_batch:
                return


def straight_then_first_part(codecs: list[str], directory: str, mid_batches: int = 0
                             ) -> dict[str, Any]:
    """For each codec: run A (3 epochs straight) gives the reference hash; run B trains 2
    epochs and checkpoints to ``directory/<codec>``. One process group serves every agent
    (each agent's own Group sees it initialised and leaves it open)."""
    job = Group()
    hashes = {}
    for codec in codecs:
        agent = _agent(codec)
        _train(agent, range(3))
        agent.close()
        hashes[codec] = param_hash(agent.model)
        agent = _agent(codec)
        if mid_batches:
            _train(agent, range(3), stop_batch=mid_batches)  # stops inside epoch 2
        else:
            _train(agent, range(2))
        save_agent(f"{directory}/{codec.replace(':', '_')}", agent, epoch=2,
                   batch_in_epoch=mid_batches)
        agent.close()
    job.close()
    return {"hashes": hashes}


def resumed_second_part(codecs: list[str], directory: str) -> dict[str, Any]:
    """In fresh processes: every rank loads each checkpoint from disk into a fresh agent and
    trains the remaining epoch."""
    job = Group()
    hashes, steps = {}, {}
    for codec in codecs:
        agent = _agent(codec)
        checkpoint = load_checkpoint(f"{directory}/{codec.replace(':', '_')}")
        epoch, start_batch = restore_agent(agent, checkpoint)
        _train(agent, range(epoch, 3), start_batch)
        agent.close()
        hashes[codec], steps[codec] = param_hash(agent.model), agent.step
    job.close()
    return {"hashes": hashes, "steps": steps}
