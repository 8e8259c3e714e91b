"""Worker functions for the asynchronous parameter server tests (spawned processes, gloo)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.jobs.async_loop import train_async
from idla.runtime.data import local_batches
from idla.runtime.group import Group
from idla.sync.async_ps import (
    AsyncConfig,
    ComputeGrad,
    ParameterServer,
    async_worker,
    gradient_from_batches,
)
from idla.sync.async_wire import flat_params

REPLAY_LR = 0.1
REPLAY_MOMENTUM = 0.9


def replay_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer both the server and the single-process replay use."""
    return torch.optim.SGD(params, lr=REPLAY_LR, momentum=REPLAY_MOMENTUM)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def grad_hash(flat: torch.Tensor) -> str:
    return hashlib.sha256(flat.contiguous().numpy().tobytes()).hexdigest()


def _recording(compute: ComputeGrad, hashes: list[str]) -> ComputeGrad:
    def wrapped(model: nn.Module) -> tuple[int, float] | None:
        result = compute(model)
        if result is not None:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
            hashes.append(grad_hash(torch.cat([g.reshape(-1) for g in grads])))
        return result

    return wrapped


def tiny_run(config: AsyncConfig, total_steps: int, batches_per_worker: int) -> dict[str, Any]:
    """A tiny model through the server with gradients recorded; the server returns its initial
    and final flat parameters and report, each worker the hashes of the gradients it pushed.
    A worker that used up its `batches_per_worker` batches tells the server it is done."""
    torch.set_num_threads(1)
    group = Group(timeout_s=60)
    try:
        model = tiny_model()
        if group.rank == config.server_rank:
            initial = flat_params(model)
            server = ParameterServer(
                model, group, config, replay_optimizer, total_steps, record_gradients=True
            )
            report = server.run()
            # Plain lists: a tensor would cross the result queue as a shared-memory handle,
            # which dies with this process.
            report["gradients"] = [g.tolist() for g in report["gradients"]]
            return {
                "initial": initial.tolist(),
                "final": flat_params(model).tolist(),
                "report": report,
            }
        generator = torch.Generator().manual_seed(100 + group.rank)
        batches = iter(
            [
                (
                    torch.randn(8, 6, generator=generator),
                    torch.randint(0, 3, (8,), generator=generator),
                )
                for _ in range(batches_per_worker)
            ]
        )
        hashes: list[str] = []
        compute = _recording(gradient_from_batches(batches, F.cross_entropy), hashes)
        stats = async_worker(model, compute, group, config)
        return {"hashes": hashes, **stats}
    finally:
        group.close()


def digits_async(
    config: AsyncConfig,
    total_steps: int,
    wrap_compute: Callable[[ComputeGrad], ComputeGrad] | None = None,
    group: Group | None = None,
) -> dict[str, Any]:
    """The demo CNN on digits through the shared async loop (jobs/async_loop.py) for
    `total_steps` pushes, each one SGD step of lr 0.05 with a worker's mean gradient over 32
    samples. The server returns its report plus the final `test_accuracy`, a worker {}. With
    `group` None a group is made (timeout 300 s) and closed; a group passed in stays open."""
    torch.set_num_threads(1)
    owned = group is None
    group = Group(timeout_s=300.0) if group is None else group
    try:
        train, test = load_digits_split()
        torch.manual_seed(0)
        model = DigitsCNN()
        result = train_async(model, group, config, local_batches(train, 32, 0, group.rank),
                             optimizer=0.05, total_steps=total_steps, wrap_compute=wrap_compute)
        if group.rank != config.server_rank:
            return {}
        return {**result, "test_accuracy": accuracy(model, test, torch.device("cpu"))}
    finally:
        if owned:
            group.close()


def _attach_to(cgroup_path: str) -> Callable[[ComputeGrad], ComputeGrad]:
    """Throttle this process from now on: move it into a cgroup made by the test's CpuThrottle
    (after imports and data loading, which would take ~25 s at a tenth of a core)."""

    def wrap(compute: ComputeGrad) -> ComputeGrad:
        Path(cgroup_path, "cgroup.procs").write_text(f"{os.getpid()}\n")
        return compute

    return wrap


def staleness_runs(
    configs: list[AsyncConfig], total_steps: int, cgroup_paths: dict[int, str]
) -> list[dict[str, Any]]:
    """Several digits_async runs back to back on one group, workers throttled by cgroup."""
    torch.set_num_threads(1)
    group = Group(timeout_s=300)
    wrap = _attach_to(cgroup_paths[group.rank]) if group.rank in cgroup_paths else None
    try:
        return [
            digits_async(config, total_steps, group=group, wrap_compute=wrap) for config in configs
        ]
    finally:
        group.close()


def _faulty(mode: str, after_pushes: int, hang_s: float) -> Callable[[ComputeGrad], ComputeGrad]:
    def wrap(compute: ComputeGrad) -> ComputeGrad:
        calls = 0

        def faulty(model: nn.Module) -> tuple[int, float] | None:
            nonlocal calls
            calls += 1
            if calls > after_pushes:
                if mode == "hang":  # alive and connected, but silent
                    time.sleep(hang_s)
                os._exit(1)
            return compute(model)

        return faulty

    return wrap


def faulty_job(
    config: AsyncConfig, total_steps: int, faults: dict[int, tuple[str, int]], hang_s: float
) -> dict[str, Any]:
    """digits_async on every rank; a rank in `faults` dies ("exit": os._exit(1)) or hangs
    ("hang": silent for hang_s, then os._exit(1)) after a number of pushes, without a result
    (launched with allow_lost, so the launcher gives it None and waits for the others)."""
    rank = int(os.environ["RANK"])
    if rank not in faults:
        return digits_async(config, total_steps)
    mode, after_pushes = faults[rank]
    digits_async(config, total_steps, wrap_compute=_faulty(mode, after_pushes, hang_s))
    raise AssertionError(f"rank {rank} outlived its {mode} fault")
