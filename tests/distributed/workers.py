"""Worker functions the distributed tests run in real processes (spawned, gloo)."""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from idla import Agent, AgentConfig
from idla.demo import DigitsCNN, load_digits_split
from idla.plan.topology import Topology
from idla.runtime.data import GlobalBatchSampler


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _digits_pair(
    optimizer_name: str,
) -> tuple[TensorDataset, torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """Digits, the demo CNN, an identical reference copy, and the optimizer of the first."""
    torch.set_num_threads(1)
    train_set, _ = load_digits_split()
    torch.manual_seed(0)
    model = DigitsCNN()
    return train_set, model, copy.deepcopy(model), _optimizer(optimizer_name, model)


def param_hash(model: torch.nn.Module) -> str:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def _topology(leaves: dict[int, int], world_size: int) -> Topology:
    core = tuple(r for r in range(world_size) if r not in leaves)
    return Topology(world_size, core, leaves)


def one_step_uneven(
    shares: list[int], optimizer_name: str, leaves: dict[int, int]
) -> dict[str, Any]:
    """One idla step with fixed uneven shares (and leaves sending to hubs); rank 0 also runs
    the single-process reference on the concatenated global batch and returns the largest
    difference."""
    train_set, model, reference, optimizer = _digits_pair(optimizer_name)
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=sum(shares), initial_shares=shares, rebalance=False,
        # several buckets, and no NaN guard (which holds them): all-reduces start mid-backward
        bucket_cap_bytes=64 * 1024, nan_guard=False))
    agent.set_topology(_topology(leaves, agent.world_size))
    for x, y in agent.batches(0):
        agent.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        break
    agent.close()
    if agent.rank != 0:
        return {}
    batch = GlobalBatchSampler(len(train_set), sum(shares), 0).epoch(0)[0].indices
    images, labels = train_set.tensors
    ref_optimizer = _optimizer(optimizer_name, reference)
    F.cross_entropy(reference(images[batch]), labels[batch]).backward()
    ref_optimizer.step()
    diff = max(float((p - q).abs().max())
               for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    return {"max_abs_diff": diff}


def changing_shares(
    plans: list[list[int]], epochs: int, seed: int, leaves: dict[int, int] | None = None
) -> dict[str, Any]:
    """Train with shares forced to change every step (cycling `plans`); record which samples
    this rank saw per epoch and the final parameter hash."""
    torch.set_num_threads(1)
    size = 300
    images = torch.arange(size, dtype=torch.float32).view(size, 1).repeat(1, 4)
    labels = torch.arange(size) % 3
    dataset = TensorDataset(images, labels)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    agent = Agent(model, optimizer, dataset, config=AgentConfig(
        global_batch_size=sum(plans[0]), seed=seed, rebalance=False, check_every_steps=3,
        bucket_cap_bytes=64, nan_guard=False))  # buckets start mid-backward
    agent.set_topology(_topology(leaves or {}, agent.world_size))
    seen: list[list[int]] = []
    for epoch in range(epochs):
        seen.append([])
        for x, y in agent.batches(epoch):
            seen[-1].extend(int(v) for v in x[:, 0].tolist())
            agent.backward(F.cross_entropy(model(x / size), y))
            optimizer.step()
            agent.shares = list(plans[agent.step % len(plans)])
    agent.close()
    return {"rank": int(os.environ["RANK"]), "seen": seen, "hash": param_hash(model)}


def diverge_then_check() -> dict[str, Any]:
    """Rank 1 nudges a parameter behind the agent's back; the replica check must catch it."""
    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 2)
    dataset = (torch.randn(64, 4), torch.randint(0, 2, (64,)))
    agent = Agent(model, None, dataset, config=AgentConfig(global_batch_size=16))
    if agent.rank == 1:
        with torch.no_grad():
            model.bias[0] += 1e-3
    agent.check_replicas()
    return {}


def heterogeneous_shares(steps: int) -> dict[str, Any]:
    """Train the demo CNN for `steps` steps; report the shares the agent settled on."""
    torch.set_num_threads(1)
    train_set, _ = load_digits_split()
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    agent = Agent(model, optimizer, train_set, global_batch_size=256)
    epoch = 0
    while agent.step < steps:
        for x, y in agent.batches(epoch):
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
        epoch += 1
    agent.close()
    return {"shares": agent.shares, "report": agent.report()}


def nan_step(shares: list[int], bad_ranks: list[int], optimizer_name: str) -> dict[str, Any]:
    """One step in which `bad_ranks` produce a NaN loss; rank 0 compares the result with a
    single process on the samples of the other ranks, and reports whether anything changed."""
    train_set, model, reference, optimizer = _digits_pair(optimizer_name)
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=sum(shares), initial_shares=shares, rebalance=False))
    for x, y in agent.batches(0):
        loss = F.cross_entropy(model(x), y)
        if agent.rank in bad_ranks:
            loss = loss * float("nan")
        agent.backward(loss)
        optimizer.step()
        break
    agent.close()
    if agent.rank != 0:
        return {}
    batch = GlobalBatchSampler(len(train_set), sum(shares), 0).epoch(0)[0].indices
    starts = [sum(shares[:r]) for r in range(len(shares))]
    kept = torch.cat([batch[starts[r]: starts[r] + shares[r]]
                      for r in range(len(shares)) if r not in bad_ranks] or [batch[:0]])
    images, labels = train_set.tensors
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(),
                                                       reference.parameters(), strict=True))
    if kept.numel():
        ref_optimizer = _optimizer(optimizer_name, reference)
        F.cross_entropy(reference(images[kept]), labels[kept]).backward()
        ref_optimizer.step()
    diff = max(float((p - q).detach().abs().max())
               for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"max_abs_diff": diff, "finite": finite, "unchanged": unchanged,
            "nonfinite_steps": agent.nonfinite_steps}


def nan_every_step_on_rank_1(steps: int) -> dict[str, Any]:
    """Rank 1's loss is NaN every step: after `nan_drop_after` steps it gets no samples."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    dataset = (torch.randn(400, 4), torch.randint(0, 3, (400,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(model, optimizer, dataset, config=AgentConfig(global_batch_size=40))
    epoch = 0
    while agent.step < steps:
        for x, y in agent.batches(epoch):
            loss = F.cross_entropy(model(x), y)
            agent.backward(loss * float("nan") if agent.rank == 1 else loss)
            optimizer.step()
            if agent.step == steps:
                break
        epoch += 1
    agent.close()
    report = agent.report()
    return {"shares": agent.shares, "dropped": report["dropped_ranks"],
            "nonfinite_steps": report["nonfinite_steps"],
            "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}
