"""Worker functions for the buffer tests: a small model with BatchNorm (one of them with a
cumulative mean, so ``num_batches_tracked`` matters) and a registered buffer its forward reads,
trained under idla and replayed by one process.

The one-process reference holds one set of buffers per rank: every step starts all of them
from the same buffers, each rank's share of each micro-batch runs forward from its own set
(a rank with no samples runs nothing, nor one the NaN guard drops: the others' losses are
re-weighted to the samples kept), and the step ends with the source rank's set ("broadcast":
the lowest rank with the most samples in the step) or the share-weighted mean of the float
buffers with the source's integer buffers ("average").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from idla import Agent, AgentConfig
from idla.errors import ReplicaMismatchError
from idla.runtime.data import GlobalBatchSampler, local_slice
from idla.runtime.group import Group

GLOBAL_BATCH = 12
SAMPLES = 8 * GLOBAL_BATCH + 3  # nine batches an epoch, the last of 3 samples


@dataclass(frozen=True)
class Case:
    shares: list[int] | None  # initial shares (None: equal)
    rebalance: bool = False
    micro: int = 1  # micro-batches per step (no_sync accumulation)
    slow_rank_1: bool = False  # rank 1 sleeps per sample, so rebalancing moves samples
    epochs: int = 1
    nan_step: int | None = None  # rank 1's inputs are NaN in this step (the NaN guard drops it)


CASES = {
    "equal": Case(None),
    "uneven": Case([9, 3]),
    "zero": Case([12, 0]),
    "rebalance": Case(None, rebalance=True, slow_rank_1=True, epochs=2),
    "accumulate": Case([9, 3], micro=3),
    "nan_on_rank_1": Case(None, nan_step=1),
}
MODES = ("broadcast", "average")


class Centre(nn.Module):
    """Subtracts a running mean of its inputs (a registered buffer read in forward), then
    moves it towards this batch's mean; an empty batch makes it NaN."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x - self.centre
        if self.training:
            with torch.no_grad():
                self.centre.mul_(0.8).add_(0.2 * x.mean(0))
        return out


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.centre = Centre(6)
        self.body = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.out_bn = nn.BatchNorm1d(3, momentum=None, affine=False)  # cumulative mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_bn(self.head(torch.tanh(self.bn(self.body(self.centre(x))))))


def _fresh() -> tuple[BNNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = BNNet()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _dataset(samples: int = SAMPLES) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 6, generator=generator) * 2.0 + 1.0
    return TensorDataset(x, torch.randint(0, 3, (samples,), generator=generator))


def state(model: nn.Module) -> dict[str, list[float]]:
    """Parameters and buffers, flat, as float64 lists."""
    return {
        "parameters": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(),
        "buffers": torch.cat([b.detach().reshape(-1).double() for b in model.buffers()]).tolist(),
    }


def _train_idla(agent: Agent, model: BNNet, optimizer: torch.optim.Optimizer,
                case: Case) -> list[list[int]]:
    """The user's loop; returns the shares of every global batch, in order."""
    planned = []
    for epoch in range(case.epochs):
        batches = agent.sampler.epoch(epoch)
        for i, (x, y) in enumerate(agent.batches(epoch)):
            planned.append(agent.planner.shares_for(batches[i].size))
            if case.slow_rank_1 and agent.rank == 1:
                time.sleep(0.001 * len(x))
            if agent.rank == 1 and agent.step == case.nan_step:
                x = x * float("nan")  # makes rank 1's buffers NaN too
            loss = F.cross_entropy(model(x), y) / case.micro
            if (i + 1) % case.micro:
                with agent.no_sync():
                    agent.backward(loss)
                continue
            agent.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return planned


def _reference(case: Case, mode: str, dataset: TensorDataset,
               planned: list[list[int]]) -> BNNet:
    model, optimizer = _fresh()
    x, y = dataset.tensors
    batches = [b for e in range(case.epochs)
               for b in GlobalBatchSampler(len(dataset), GLOBAL_BATCH, 0).epoch(e)]
    ranks = len(planned[0])
    for first in range(0, len(batches), case.micro):
        start = [b.clone() for b in model.buffers()]
        sets = [[b.clone() for b in start] for _ in range(ranks)]
        samples = [0] * ranks
        dropped = {1} if first // case.micro == case.nan_step else set()
        for j in range(first, first + case.micro):
            batch, shares = batches[j], planned[j]
            kept = sum(n for rank, n in enumerate(shares) if rank not in dropped)  # (micro 1)
            for rank, n in enumerate(shares):
                if n == 0 or rank in dropped:
                    continue
                _load(model, sets[rank])
                part = batch.indices[local_slice(shares, rank)]
                loss = F.cross_entropy(model(x[part]), y[part]) * n / kept / case.micro
                loss.backward()
                sets[rank] = [b.clone() for b in model.buffers()]
                samples[rank] += n
        source = max(range(ranks), key=lambda r: (samples[r], -r))
        final = sets[source]
        if mode == "average":
            total = sum(samples)
            final = [sum(sets[r][i] * (samples[r] / total) for r in range(ranks))
                     if b.is_floating_point() else b for i, b in enumerate(final)]
        _load(model, final)
        optimizer.step()
        optimizer.zero_grad()
    return model


def _load(model: nn.Module, buffers: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b, value in zip(model.buffers(), buffers, strict=True):
            b.copy_(value)


def _max_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, float]:
    return {kind: float((torch.tensor(a[kind]) - torch.tensor(b[kind])).abs().max())
            for kind in a}


def run_cases() -> dict[str, Any]:
    """Every case × mode under idla (replicas checked every step), against the one-process
    reference (on rank 0); then idla against DDP at equal shares, and the replica check on
    perturbed tensors. Every rank returns its parameters and buffers per run."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    owner = Group()
    dataset = _dataset()
    out: dict[str, Any] = {}
    for name, case in CASES.items():
        for mode in MODES:
            model, optimizer = _fresh()
            agent = Agent(model, optimizer, dataset, group=Group(), config=AgentConfig(
                global_batch_size=GLOBAL_BATCH, initial_shares=case.shares,
                rebalance=case.rebalance, check_every_steps=1, buffers=mode))
            planned = _train_idla(agent, model, optimizer, case)
            agent.close()
            run: dict[str, Any] = {"state": state(model), "planned": planned,
                                   "min_local_batch": agent.min_local_batch,
                                   "nonfinite_steps": list(agent.nonfinite_steps)}
            if owner.rank == 0:
                reference = _reference(case, mode, dataset, planned)
                run["max_abs_diff"] = _max_diff(run["state"], state(reference))
            out[f"{name}/{mode}"] = run
    out["ddp"] = _against_ddp()
    out["perturbed"] = _perturbed()
    owner.close()
    return out


def _against_ddp() -> dict[str, Any]:
    """Equal shares, no short batch: idla's "broadcast" and DDP (broadcast_buffers=True)."""
    dataset = _dataset(8 * GLOBAL_BATCH)
    model, optimizer = _fresh()
    agent = Agent(model, optimizer, dataset, group=Group(), config=AgentConfig(
        global_batch_size=GLOBAL_BATCH, rebalance=False, buffers="broadcast"))
    _train_idla(agent, model, optimizer, Case(None))
    agent.close()
    plain, plain_optimizer = _fresh()
    ddp = DistributedDataParallel(plain)
    x, y = dataset.tensors
    world, rank = agent.world_size, agent.rank
    shares = [GLOBAL_BATCH // world] * world
    for batch in GlobalBatchSampler(len(dataset), GLOBAL_BATCH, 0).epoch(0):
        part = batch.indices[local_slice(shares, rank)]
        F.cross_entropy(ddp(x[part]), y[part]).backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()
    return {"idla": state(model), "ddp": state(plain)}


def _perturbed() -> dict[str, str]:
    """The replica check's message when rank 1's buffer or parameter differs ("" if none)."""
    dataset = _dataset(2 * GLOBAL_BATCH)
    messages = {}
    for mode, tensor in (("broadcast", "buffer"), ("broadcast", "parameter"),
                         ("none", "buffer")):
        model, optimizer = _fresh()
        agent = Agent(model, optimizer, dataset, group=Group(), config=AgentConfig(
            global_batch_size=GLOBAL_BATCH, rebalance=False, buffers=mode))
        _train_idla(agent, model, optimizer, Case(None))
        target = model.bn.running_mean if tensor == "buffer" else model.bn.weight
        saved = target.detach().clone()
        with torch.no_grad():
            if agent.rank == 1:
                target[0] += 1e-12
            try:
                agent.check_replicas()
                messages[f"{mode}/{tensor}"] = ""
            except ReplicaMismatchError as error:
                messages[f"{mode}/{tensor}"] = str(error)
            target.copy_(saved)
        agent.close()
    return messages
