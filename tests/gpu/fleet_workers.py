"""Worker functions for the GPU tests: one launch of idla's own launcher runs several cases on
a fleet whose device is named per rank (a GPU rank beside CPU ranks, or two ranks on one GPU).

Each rank's device is set through ``IDLA_DEVICE`` before its first `Group`, so the fleet is
the one the test names whatever ``CUDA_VISIBLE_DEVICES`` says. A case that raises returns
``{"error": traceback}`` instead, so one broken case does not hide the others' results.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from idla import Agent, AgentConfig
from idla.agent.resume import restore_agent, save_agent
from idla.demo import DigitsCNN, load_digits_split
from idla.elastic.state_transfer import broadcast_module_, broadcast_optimizer_
from idla.runtime.checkpoint import load_checkpoint
from idla.runtime.devices import DEVICE_ENV
from idla.runtime.digest import tensor_digests
from idla.runtime.group import Group
from idla.runtime.launch import launch_local
from idla.runtime.stats import Stat

Case = tuple[Callable[..., Any], tuple[Any, ...]]

CPU_THREADS = 2
"""torch threads of a CPU rank (a GPU rank gets 1: it only launches kernels)."""

GROUP_TIMEOUT_S = 90.0
"""How long a collective waits for a peer: a case that fails on one rank only stops the
others' waits after this, not after the launch's timeout."""


def mixed_config(**settings: Any) -> AgentConfig:
    """An `AgentConfig` for replicas on different devices: the tolerance replica check (an
    exact one would stop a correct run: a GPU's and a CPU's optimizer arithmetic round
    differently)."""
    return AgentConfig(replica_check="tolerance", **settings)


def run_on_devices(devices: Sequence[str], cases: Sequence[Case]) -> list[Any]:
    """In a worker: this rank's device from `devices`, then every case in order under one
    process group that the cases' own groups join."""
    rank = int(os.environ["RANK"])
    os.environ[DEVICE_ENV] = devices[rank]
    torch.set_num_threads(1 if devices[rank].startswith("cuda") else CPU_THREADS)
    owner = Group(timeout_s=GROUP_TIMEOUT_S)
    results: list[Any] = []
    try:
        for fn, args in cases:
            try:
                results.append(fn(*args))
            except Exception:  # reported to the test, which fails naming it
                results.append({"error": f"rank {rank}: {traceback.format_exc()}"})
        return results
    finally:
        owner.close()


def launch_on_devices(devices: Sequence[str], cases: dict[str, Case],
                      timeout_s: float = 300.0) -> dict[str, list[Any]]:
    """Each case's per-rank results (rank order), from one launch of ``len(devices)`` workers."""
    per_rank = launch_local(run_on_devices, (list(devices), list(cases.values())), len(devices),
                            timeout_s=timeout_s)
    return {name: [results[i] for results in per_rank] for i, name in enumerate(cases)}


def synthetic(samples: int, features: int, seed: int = 0) -> TensorDataset:
    """Gaussian inputs (samples, features) and labels (samples,) in 0..9, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(samples, features, generator=generator),
                         torch.randint(0, 10, (samples,), generator=generator))


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """Every parameter, flattened into one float64 CPU tensor."""
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])


def max_difference_from_rank0(model: nn.Module, group: Group) -> float:
    """The largest |parameter − rank 0's parameter| over all ranks (collective)."""
    gathered = group.control_all_gather(flat_parameters(model))
    return max(float((t - gathered[0]).abs().max()) for t in gathered)


def _train(agent: Agent, steps: int, epoch: int = 0,
           loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> int:
    """`steps` optimizer steps over as many epochs as they need; returns the next epoch."""
    assert agent.optimizer is not None
    done = 0
    while done < steps:
        for x, y in agent.batches(epoch):
            out = agent.model(x)
            agent.backward(F.cross_entropy(out, y) if loss_fn is None else loss_fn(out, y))
            agent.optimizer.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    return epoch


# ---- the fleet and its planes ------------------------------------------------------------


def fleet_case() -> dict[str, Any]:
    """Each data-plane operation on this rank's device, and the control plane beside it."""
    group = Group()
    rank, world, device = group.rank, group.world_size, group.device
    before = group.staged_ops
    summed = torch.full((1 << 16,), float(rank + 1), device=device)
    work = group.all_reduce(summed)
    assert work is not None  # None only without peers
    group.wait(work)
    gathered = group.all_gather(torch.tensor([rank * 10], device=device))
    broadcast = torch.full((8,), float(rank + 100), device=device)
    group.broadcast(broadcast, src=0)
    sent = torch.full((4,), float(rank), device=device)
    received = torch.full((4,), -1.0, device=device)
    works = [group.isend(sent, (rank + 1) % world), group.irecv(received, (rank - 1) % world)]
    for work in works:
        group.wait(work)
    control = group.control_all_gather(torch.tensor([rank], dtype=torch.int64))
    refuses_device_tensor = None
    if device.type == "cuda":
        try:
            group.control_all_gather(torch.zeros(1, device=device))
            refuses_device_tensor = False
        except ValueError:
            refuses_device_tensor = True
    return {
        "fleet": group.describe_fleet(),
        "backend": group.backend,
        "device": str(device),
        "sum_ok": bool((summed == world * (world + 1) / 2).all()),
        "sum_device": str(summed.device),
        "gathered": [int(t.item()) for t in gathered],
        "gathered_devices": sorted({str(t.device) for t in gathered}),
        "broadcast": float(broadcast[0]),
        "received": float(received[0]),
        "control": [int(t.item()) for t in control],
        "staged_ops": group.staged_ops - before,
        "refuses_device_tensor": refuses_device_tensor,
    }


# ---- state transfer between a GPU rank and CPU ranks -------------------------------------


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    state = optimizer.state_dict()["state"]
    return [(f"{index}.{key}", value) for index in sorted(state)
            for key, value in sorted(state[index].items()) if isinstance(value, torch.Tensor)]


def broadcast_state_case() -> dict[str, Any]:
    """Replicas that differ (seeded by rank, one Adam step each) take rank `src`'s model and
    optimizer state with `broadcast_module_` / `broadcast_optimizer_`, first from the GPU
    rank 0, then from the CPU rank 1; then all step on one batch."""
    group = Group()
    device = group.device
    torch.manual_seed(group.rank)
    model = DigitsCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(16, 1, 8, 8, device=device)
    F.cross_entropy(model(x), torch.randint(0, 10, (16,), device=device)).backward()
    optimizer.step()
    out: dict[str, Any] = {"device": str(device)}
    for src in (0, 1):
        broadcast_module_(model, src, group)
        broadcast_optimizer_(optimizer, src, group)
        named = _state_tensors(optimizer)
        mine = [p.detach().cpu() for p in model.parameters()] + [t.cpu() for _, t in named]
        digests = torch.tensor([d - (1 << 64) if d >= 1 << 63 else d
                                for d in tensor_digests(mine)], dtype=torch.int64)
        table = [t.tolist() for t in group.control_all_gather(digests)]
        out[f"from_{src}"] = {
            "same_as_src": table[group.rank] == table[src],
            "state_devices": {name.split(".", 1)[1]: t.device.type for name, t in named},
            "param_device": str(next(model.parameters()).device),
        }
    # where this torch's Adam keeps its step count for a parameter on this device
    fresh = torch.optim.Adam([nn.Parameter(torch.zeros(1, device=device))])
    fresh.param_groups[0]["params"][0].grad = torch.zeros(1, device=device)
    fresh.step()
    out["own_step_device"] = next(iter(fresh.state.values()))["step"].device.type
    generator = torch.Generator().manual_seed(1234)  # the same batch on every rank
    x = torch.randn(64, 1, 8, 8, generator=generator).to(device)
    y = torch.randint(0, 10, (64,), generator=generator).to(device)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    out["max_difference_after_a_step"] = max_difference_from_rank0(model, group)
    return out


# ---- statistics of a bf16 model at uneven shares -----------------------------------------


def bf16_shares_case(shares: list[int], steps: int = 3) -> dict[str, Any]:
    """A bf16 MLP on every rank's device at fixed `shares` (sums a bf16 cannot hold); the
    statistics matrix of each step, as `Agent` received it from its exchange."""
    group = Group()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = synthetic(4 * sum(shares), 32)
    agent = Agent(model, optimizer, data, group=group, config=mixed_config(
        global_batch_size=sum(shares), initial_shares=shares, rebalance=False))
    matrices: list[torch.Tensor] = []
    finish = agent.sync.finish

    def recording_finish(stats_row: torch.Tensor) -> torch.Tensor:
        stats = finish(stats_row)
        matrices.append(stats.clone())
        return stats

    agent.sync.finish = recording_finish  # type: ignore[method-assign]
    losses = []
    for x, y in agent.batches(0):
        loss = F.cross_entropy(model(x.to(torch.bfloat16)), y)
        agent.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach().double()))
        if len(matrices) == steps:
            break
    agent.close()
    return {
        "device": str(group.device),
        "dtypes": sorted({str(m.dtype) for m in matrices}),
        "matrix_devices": sorted({str(m.device) for m in matrices}),
        "samples": [m[:, Stat.SAMPLES].tolist() for m in matrices],
        "loss_sums": [float(m[group.rank, Stat.LOSS_SUM]) for m in matrices],
        "local_losses": losses,
    }


# ---- training on the mixed fleet ---------------------------------------------------------


def mixed_training_case(steps: int) -> dict[str, Any]:
    """The demo CNN with Adam on the fleet as `examples/train_mixed_devices.py` trains it."""
    group = Group()
    train_set, _ = load_digits_split()
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    config = mixed_config(global_batch_size=512, check_every_steps=10)
    agent = Agent(model, optimizer, train_set, group=group, config=config)
    before = group.staged_ops
    _train(agent, steps)
    history = agent.report()["history"]
    agent.close()  # in tolerance mode: the last replica check
    return {
        "replica_check": config.replica_check,
        "fleet": group.describe_fleet(),
        "staged_ops": group.staged_ops - before,
        "loss": history["loss"],
        "shares": history["shares"],
        "compute_s": history["compute_s"],
        "max_difference": max_difference_from_rank0(model, group),
    }


class SlowOnRequest(nn.Module):
    """`inner`, with a host sleep of `sleep_s_per_sample` × batch before each forward: a rank
    made slower by a known amount, as a throttled or shared GPU would be."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sleep_s_per_sample = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sleep_s_per_sample:
            time.sleep(self.sleep_s_per_sample * x.shape[0])
        return self.inner(x)


def slowed_gpu_case(steps_each: int, sleep_s_per_sample: float) -> dict[str, Any]:
    """`steps_each` steps as they come, then as many with every GPU rank sleeping
    `sleep_s_per_sample` per sample in forward; the shares and compute seconds of both."""
    group = Group()
    train_set, _ = load_digits_split()
    torch.manual_seed(0)
    model = SlowOnRequest(DigitsCNN())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    agent = Agent(model, optimizer, train_set, group=group,
                  config=mixed_config(global_batch_size=512))
    epoch = _train(agent, steps_each)
    if group.device.type == "cuda":
        model.sleep_s_per_sample = sleep_s_per_sample
    _train(agent, steps_each, epoch)
    history = agent.report()["history"]
    agent.close()
    return {"device": str(group.device), "shares": history["shares"],
            "compute_s": history["compute_s"], "split_step": steps_each}


def median_per_rank(rows: Sequence[Sequence[float]]) -> list[float]:
    """The median of each column of `rows` (steps × ranks)."""
    return [statistics.median(column) for column in zip(*rows, strict=True)]


# ---- resume with dropout on CUDA ---------------------------------------------------------


def resume_with_dropout(directory: str) -> dict[str, Any]:
    """Run A: an epoch, a checkpoint, another epoch. Run B, in the same processes with their
    RNGs scrambled (what a fresh process holds): restore, the second epoch again. Each rank
    seeds its own CUDA generator first, so the ranks' dropout masks differ (as a user's
    per-rank seed or unequal shares make them). Equal parameters after both runs mean every
    RNG a step draws from was restored on every rank."""
    group = Group()
    rank = group.rank
    data = synthetic(960, 64)
    batch = 96
    shares = None if group.world_size == 1 else [64, 32] + [0] * (group.world_size - 2)

    def build() -> Agent:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return Agent(model, optimizer, data, group=group, config=AgentConfig(
            global_batch_size=batch, initial_shares=shares, rebalance=False))

    agent = build()
    torch.cuda.manual_seed(100 + rank)
    _train(agent, len(data) // batch)
    path = save_agent(directory, agent, epoch=1)
    _train(agent, len(data) // batch, epoch=1)
    straight = flat_parameters(agent.model)
    agent.close()

    agent = build()
    torch.manual_seed(999 + rank)  # every generator, the CUDA ones too
    start = restore_agent(agent, load_checkpoint(path))
    _train(agent, len(data) // batch, epoch=start[0])
    resumed = flat_parameters(agent.model)
    agent.close()
    difference = float((straight - resumed).abs().max())
    return {"device": str(group.device), "start": list(start), "equal": difference == 0.0,
            "max_difference": difference if math.isfinite(difference) else str(difference)}
