"""Worker functions for the plane tests: what each rank sees of the control and data planes,
and a training run staged through host buffers against the same run unstaged."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from idla import Agent, AgentConfig
from idla.plan.topology import Topology
from idla.runtime.group import Group
from idla.runtime.staging import STAGE_ENV


def planes() -> dict[str, Any]:
    """The control plane is its own gloo group of all ranks; the fleet is every rank's report."""
    group = Group()
    control = group.control
    assert control is not None
    return {"control_backend": str(dist.get_backend(control)),
            "control_is_default": control is dist.group.WORLD,
            "control_size": dist.get_world_size(control), "backend": group.backend,
            "fleet": group.describe_fleet(), "device": str(group.device)}


def control_beside_pending_data() -> list[int]:
    """Rank 0 starts a data all-reduce and then a control all-gather; rank 1 joins the data
    all-reduce only after the all-gather: on one shared group this deadlocks (or mixes up the
    two collectives); on separate planes the all-gather completes first."""
    group = Group(timeout_s=20.0)
    data = torch.full((4,), float(group.rank + 1))
    work = group.all_reduce(data) if group.rank == 0 else None
    ranks = [int(t.item()) for t in group.control_all_gather(torch.tensor([group.rank]))]
    if group.rank != 0:
        time.sleep(0.2)
        work = group.all_reduce(data)
    assert work is not None
    group.wait(work)
    assert data.tolist() == [3.0] * 4
    return ranks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.body(x))))


def train(staged: bool, leaves: bool) -> tuple[list[float], int]:
    """A few steps at uneven shares (through a hub and a leaf when `leaves`), with buffers
    broadcast: every parameter and buffer, as float64 values, and how many data-plane
    operations went through a host copy."""
    os.environ[STAGE_ENV] = "1" if staged else "0"
    try:
        torch.manual_seed(0)
        model = Net().double()
        data = (torch.randn(48, 5, dtype=torch.float64), torch.randint(0, 3, (48,)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        config = AgentConfig(global_batch_size=12, initial_shares=[8, 4], rebalance=False)
        agent = Agent(model, optimizer, data, config=config)
        if leaves:
            agent.set_topology(Topology(2, (0,), {1: 0}))
        for epoch in range(2):
            for x, y in agent.batches(epoch):
                agent.backward(F.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
        agent.close()
    finally:
        os.environ.pop(STAGE_ENV, None)
    values = [float(v) for t in [*model.parameters(), *model.buffers()]
              for v in t.detach().double().reshape(-1)]
    return values, agent.group.staged_ops


def half_precision_weighting(dtype_name: str) -> dict[str, Any]:
    """One step of a bf16 or fp16 model at shares [341, 171] of 512: the statistics this
    rank saw, its own weighted gradient (computed beside the agent on a copy of the model,
    in the model's dtype) and the exchanged one."""
    import copy

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    data = (torch.randn(512, 6).to(dtype), torch.randint(0, 3, (512,)))
    config = AgentConfig(global_batch_size=512, initial_shares=[341, 171], rebalance=False)
    agent = Agent(model, None, data, config=config)
    twin = copy.deepcopy(model)
    for x, y in agent.batches(0):
        loss = F.cross_entropy(twin(x).float(), y).to(dtype)
        (loss * (x.shape[0] / 512)).backward()
        agent.backward(F.cross_entropy(model(x).float(), y).to(dtype))
        break
    table = agent.sync.stats.matrix.tolist()
    exchanged = [p.grad.detach().float().tolist() for p in model.parameters()]
    mine = [p.grad.detach().float().tolist() for p in twin.parameters()]
    agent.close()
    return {"table": table, "stats_dtype": str(agent.sync.stats.matrix.dtype),
            "exchanged": exchanged, "mine": mine, "loss": float(loss.float())}
