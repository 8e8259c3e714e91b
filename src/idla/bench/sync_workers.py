"""The per-process runs of `idla bench sync`, one per synchronization mode: the shared DDP
baseline (bench/ddp.py), idla's Agent, and the loops of jobs/ (local SGD, DiLoCo, async) with the
benchmark's jitter in the loss and its wall-clock budget in the stop decision."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from idla.agent import Agent, AgentConfig
from idla.bench.ddp import DDPBaseline
from idla.bench.sync_setup import Jitter, RunClock, SyncBenchConfig
from idla.demo import DigitsCNN, load_digits_split
from idla.jobs.async_loop import train_async
from idla.jobs.local_sgd import LocalProgress, round_strategy, train_local
from idla.runtime.data import local_batches
from idla.runtime.group import Group
from idla.sync.async_ps import AsyncConfig
from idla.sync.async_wire import load_flat
from idla.sync.local_sgd import DiLoCo
from idla.sync.modes import SyncMode


def _setup(config: SyncBenchConfig, seed: int) -> tuple[Any, Any, torch.nn.Module]:
    torch.set_num_threads(1)
    train_set, test_set = load_digits_split()
    torch.manual_seed(seed)
    return train_set, test_set, DigitsCNN()


def _adam(model: torch.nn.Module, config: SyncBenchConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def _stop_together(group: Group, clock: RunClock | None) -> bool:
    """Rank 0 evaluates and watches the budget; every rank learns its decision."""
    flag = torch.zeros(1)
    if group.rank == 0 and clock is not None:
        clock.evaluate()
        flag[0] = 1.0 if clock.over_budget() else 0.0
    group.control_broadcast(flag, src=0)
    return bool(flag.item())


def _every_eval(config: SyncBenchConfig, group: Group, clock: RunClock) -> Callable[[int], bool]:
    """The synchronous runs' stop predicate: decide together every few steps."""
    return lambda steps: steps % config.eval_every_steps == 0 and _stop_together(group, clock)


def ddp(config: SyncBenchConfig, jitter_on: bool, seed: int) -> dict[str, Any]:
    """PyTorch DDP with equal shares (bench/ddp.py): one global batch a step."""
    train_set, test_set, model = _setup(config, seed)
    optimizer = _adam(model, config)
    group = Group()
    baseline = DDPBaseline(model, optimizer, train_set, group, config.global_batch_size, seed)
    jitter = Jitter(jitter_on, group.rank, seed, config.jitter_every_steps)
    group.barrier()
    clock = RunClock(config, model, test_set)
    steps = baseline.train(_every_eval(config, group, clock), loss_fn=jitter.loss)
    numel = sum(p.numel() for p in model.parameters())
    result = {**clock.result(), "steps": steps, "bytes_sent_per_worker": 4 * numel * steps}
    baseline.close()
    group.barrier()
    group.close()
    return result if group.rank == 0 else {}


def allreduce(config: SyncBenchConfig, jitter_on: bool, seed: int) -> dict[str, Any]:
    """idla's Agent (planned shares, exact all-reduce): one global batch a step."""
    train_set, test_set, model = _setup(config, seed)
    optimizer = _adam(model, config)
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=config.global_batch_size, seed=seed, check_every_steps=0))
    group = agent.group
    jitter = Jitter(jitter_on, group.rank, seed, config.jitter_every_steps)
    group.barrier()
    clock = RunClock(config, model, test_set)
    should_stop = _every_eval(config, group, clock)
    steps, epoch, stop = 0, 0, False
    while not stop:
        for x, y in agent.batches(epoch):
            agent.backward(jitter.loss(model, x, y))
            optimizer.step()
            steps += 1
            if should_stop(steps):
                stop = True
                break
        epoch += 1
    numel = sum(p.numel() for p in model.parameters())
    result = {**clock.result(), "steps": steps, "bytes_sent_per_worker": 4 * numel * steps,
              "shares": agent.shares}
    agent.close()
    return result if group.rank == 0 else {}


def local(config: SyncBenchConfig, mode: str, jitter_on: bool, seed: int) -> dict[str, Any]:
    """`local` (periodic averaging every H steps) or `diloco` (H inner steps; with speeds, a
    faster worker does proportionally more inner steps in the same wall time): the loop of
    jobs/local_sgd.py."""
    train_set, test_set, model = _setup(config, seed)
    optimizer = _adam(model, config)
    group = Group()
    strategy = round_strategy(SyncMode(mode), model, group, config.period_steps)
    jitter = Jitter(jitter_on, group.rank, seed, config.jitter_every_steps)
    batches = local_batches(train_set, config.local_batch, seed, group.rank)
    group.barrier()
    clock = RunClock(config, model, test_set)

    def after_round(progress: LocalProgress) -> bool:
        if isinstance(strategy, DiLoCo):
            _replan_inner_steps(strategy, group, config.period_steps, progress.round_step_s())
        return _stop_together(group, clock)

    progress = train_local(model, optimizer, strategy, batches, loss_fn=jitter.loss,
                           after_round=after_round)
    result = {**clock.result(), "steps": progress.steps, "rounds": strategy.syncs,
              "bytes_sent_per_worker": strategy.bytes_sent}
    group.close()
    return result if group.rank == 0 else {}


def _replan_inner_steps(strategy: DiLoCo, group: Group, period_steps: int, step_s: float) -> None:
    """The fastest worker does H inner steps; the others as many as fit in the same time."""
    times = [float(t.item()) for t in group.all_gather(torch.tensor([step_s]))]
    fastest = min(times)
    strategy.set_inner_steps(max(1, round(period_steps * fastest / times[group.rank])))


def asynchronous(config: SyncBenchConfig, lam: float, jitter_on: bool,
                 seed: int) -> dict[str, Any]:
    """Rank 0 serves (Adam on the flat parameters, one step per push); the rest train: the
    loop of jobs/async_loop.py, stopped by the budget."""
    train_set, test_set, model = _setup(config, seed)
    group = Group(timeout_s=120.0)
    async_config = AsyncConfig(staleness_bound=config.staleness_bound,
                               delay_compensation=lam, dead_after_s=60.0)
    jitter = Jitter(jitter_on, group.rank, seed, config.jitter_every_steps)
    clock = RunClock(config, model, test_set)  # only the server's counts

    def should_stop(version: int, flat: torch.Tensor) -> bool:
        if version % config.eval_every_steps == 0:
            load_flat(clock.model, flat)
            clock.evaluate()
        return clock.over_budget()

    def start() -> None:
        group.barrier()
        clock.start = time.perf_counter()

    out = train_async(model, group, async_config,
                      local_batches(train_set, config.local_batch, seed, group.rank),
                      optimizer=lambda params: torch.optim.Adam(params, lr=config.lr),
                      total_steps=10**6, loss_fn=jitter.loss, should_stop=should_stop,
                      on_start=start)
    if group.rank != async_config.server_rank:
        group.close()
        return {}
    clock.evaluate()
    group.close()
    numel = sum(p.numel() for p in model.parameters())
    pushes = max(out["pushes"].values()) if out["pushes"] else 0
    return {**clock.result(), "steps": out["version"],
            "bytes_sent_per_worker": 4 * (numel + 4) * pushes,
            "staleness": out["staleness_summary"],
            "staleness_histogram": out["staleness_histogram"], "pushes": out["pushes"]}
