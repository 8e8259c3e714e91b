"""Worker functions for the local SGD and DiLoCo tests (real processes over gloo)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from idla.demo import DigitsCNN, load_digits_split
from idla.runtime.data import GlobalBatchSampler, local_slice
from idla.runtime.group import Group
from idla.sync.local_sgd import DiLoCo, PeriodicAveraging

TINY_LR = 0.1  # inner SGD learning rate of the tiny heterogeneous run


def state_hash(model: nn.Module) -> str:
    """sha256 of the trainable parameters and floating buffers, in order."""
    tensors = [p for p in model.parameters()] + [
        b for b in model.buffers() if b.is_floating_point()
    ]
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((p - q).detach().abs().max())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def _digits_setup(
    shares: list[int], steps: int
) -> tuple[Group, torch.Tensor, torch.Tensor, list[torch.Tensor], DigitsCNN]:
    """The group, the digits tensors, this rank's global batches (indices) and a seeded CNN."""
    torch.set_num_threads(1)
    group = Group()
    train_set, _ = load_digits_split()
    images, labels = train_set.tensors
    batches = GlobalBatchSampler(len(images), sum(shares), 0).epoch(0)[:steps]
    torch.manual_seed(0)
    return group, images, labels, [b.indices for b in batches], DigitsCNN()


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    """One step on the mean loss of this batch; an empty batch still steps (no gradient)."""
    optimizer.zero_grad()
    if labels.numel():
        F.cross_entropy(model(images), labels).backward()
    optimizer.step()


def period_one_vs_global_batch(shares: list[int], steps: int) -> dict[str, Any]:
    """Plain SGD on each rank's own mean loss, averaged every step with weights = samples;
    rank 0 also runs one process on the whole global batches and returns the difference."""
    group, images, labels, batches, model = _digits_setup(shares, steps)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = PeriodicAveraging(model, group, period_steps=1)
    for indices in batches:
        local = indices[local_slice(shares, group.rank)]
        _train_step(model, optimizer, images[local], labels[local])
        strategy.after_step(local.numel())
    result: dict[str, Any] = {"hash": state_hash(model), "syncs": strategy.syncs}
    if group.rank == 0:
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        for indices in batches:
            _train_step(reference, ref_optimizer, images[indices], labels[indices])
        result["max_abs_diff"] = max_abs_diff(model, reference)
    group.close()
    return result


def against_torch_averager(shares: list[int], period: int, steps: int) -> dict[str, Any]:
    """The same run (SGD with momentum) through `PeriodicAveraging` and through PyTorch's
    `PeriodicModelAverager`, on two model copies; a third copy never syncs. PyTorch's mean
    is unweighted, so the shares must be equal."""
    group, images, labels, batches, model = _digits_setup(shares, steps)
    twin, lone = copy.deepcopy(model), copy.deepcopy(model)
    runs = [
        (net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
        for net in (model, twin, lone)
    ]
    ours = PeriodicAveraging(model, group, period_steps=period)
    everyone = dist.new_group(ranks=list(range(group.world_size)))  # gloo needs it explicit
    theirs = PeriodicModelAverager(period=period, warmup_steps=0, process_group=everyone)
    for step, indices in enumerate(batches):
        local = indices[local_slice(shares, group.rank)]
        for net, optimizer in runs:
            _train_step(net, optimizer, images[local], labels[local])
        ours.after_step(local.numel())
        if step == 0:  # PyTorch's averager also averages on its first call, then every period
            ours.sync_now()
        theirs.average_parameters(twin.parameters())
    result = {
        "diff_vs_torch": max_abs_diff(model, twin),
        "diff_vs_lone": max_abs_diff(model, lone),
        "hash": state_hash(model),
        "syncs": ours.syncs,
    }
    group.close()
    return result


def diloco_vs_periodic(shares: list[int], inner_steps: int, rounds: int) -> dict[str, Any]:
    """Adam inner steps on three copies: PeriodicAveraging, DiLoCo(outer lr 1, momentum 0)
    and DiLoCo with its defaults; report how far the DiLoCo copies are from the first."""
    group, images, labels, batches, model = _digits_setup(shares, inner_steps * rounds)
    as_averaging, as_default = copy.deepcopy(model), copy.deepcopy(model)
    strategies = [
        PeriodicAveraging(model, group, period_steps=inner_steps),
        DiLoCo(as_averaging, group, inner_steps, outer_lr=1.0, outer_momentum=0.0),
        DiLoCo(as_default, group, inner_steps),
    ]
    runs = [(s, torch.optim.Adam(s.model.parameters(), lr=1e-3)) for s in strategies]
    for indices in batches:
        local = indices[local_slice(shares, group.rank)]
        for strategy, optimizer in runs:
            _train_step(strategy.model, optimizer, images[local], labels[local])
            strategy.after_step(local.numel())
    differing = sum(
        int((p != q).sum())
        for p, q in zip(model.parameters(), as_averaging.parameters(), strict=True)
    )
    result = {
        "diff_lr1": max_abs_diff(model, as_averaging),
        "differing_elements_lr1": differing,
        "diff_default": max_abs_diff(model, as_default),
        "hashes": [state_hash(s.model) for s in strategies],
        "syncs": [s.syncs for s in strategies],
    }
    group.close()
    return result


def tiny_model() -> nn.Linear:
    """nn.Linear(2, 1) from seed 0: the same start in every process."""
    torch.manual_seed(0)
    return nn.Linear(2, 1)


def tiny_batch(rank: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s batch at its local step `step`: x (size, 2), y (size, 1), both seeded."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(size, 2, generator=generator)
    return x, x @ torch.tensor([[1.5], [-2.0]]) + 0.5


def heterogeneous_diloco(
    inner_steps: list[int], batch_sizes: list[int], rounds: int
) -> dict[str, Any]:
    """DiLoCo (default outer optimizer) on nn.Linear(2, 1) with plain SGD and MSE; each rank
    has its own inner steps and batch size. Records the parameters after every sync."""
    torch.set_num_threads(1)
    group = Group()
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=TINY_LR)
    strategy = DiLoCo(model, group, inner_steps=1)
    strategy.set_inner_steps(inner_steps[group.rank])
    local_steps = 0
    snapshots: list[dict[str, Any]] = []
    while strategy.syncs < rounds:
        x, y = tiny_batch(group.rank, local_steps, batch_sizes[group.rank])
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        local_steps += 1
        if strategy.after_step(len(x)):
            snapshots.append(
                {
                    "hash": state_hash(model),
                    "weight": model.weight.detach().reshape(-1).tolist(),
                    "bias": model.bias.detach().tolist(),
                }
            )
    group.close()
    return {"snapshots": snapshots, "local_steps": local_steps}


def count_bytes(batchnorm: bool, period: int, steps: int) -> dict[str, Any]:
    """PeriodicAveraging and DiLoCo on two copies of a small model for `steps` steps, then a
    final sync_now; report bytes_sent, syncs and hashes (buffers included)."""
    torch.set_num_threads(1)
    group = Group()
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(3, 4), nn.BatchNorm1d(4)] if batchnorm else []
    model = nn.Sequential(*layers, nn.Linear(4 if batchnorm else 3, 2))
    twin = copy.deepcopy(model)
    strategies = [PeriodicAveraging(model, group, period), DiLoCo(twin, group, period)]
    runs = [(s, torch.optim.SGD(s.model.parameters(), lr=0.1)) for s in strategies]
    generator = torch.Generator().manual_seed(group.rank)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=generator)
        labels = torch.randint(0, 2, (8,), generator=generator)
        for strategy, optimizer in runs:
            _train_step(strategy.model, optimizer, x, labels)
            strategy.after_step(len(x))
    for strategy in strategies:
        strategy.sync_now()
    result = {
        "bytes_sent": [s.bytes_sent for s in strategies],
        "syncs": [s.syncs for s in strategies],
        "hashes": [state_hash(s.model) for s in strategies],
    }
    group.close()
    return result
