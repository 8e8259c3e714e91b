"""The per-process loops of `idla bench sync`, one per synchronization mode."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from idla.agent import Agent, AgentConfig
from idla.bench.sync_setup import Jitter, RunClock, SyncBenchConfig, dilated_loss
from idla.demo import DigitsCNN, load_digits_split
from idla.jobs.async_loop import local_batches
from idla.plan.shares import proportional_shares
from idla.runtime.data import GlobalBatchSampler, local_slice
from idla.runtime.group import Group
from idla.sync.async_ps import AsyncConfig, ParameterServer, async_worker
from idla.sync.async_wire import load_flat
from idla.sync.local_sgd import DiLoCo, PeriodicAveraging


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
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def synchronous(config: SyncBenchConfig, mode: str, jitter_on: bool, seed: int) -> dict[str, Any]:
    """`ddp` (equal shares, PyTorch DDP) or `allreduce` (idla's Agent): one global batch a step."""
    train_set, test_set, model = _setup(config, seed)
    optimizer = _adam(model, config)
    if mode == "allreduce":
        agent = Agent(model, optimizer, train_set, config=AgentConfig(
            global_batch_size=config.global_batch_size, seed=seed, check_every_steps=0))
        group = agent.group
    else:
        group = Group()
        ddp = DistributedDataParallel(model)
        sampler = GlobalBatchSampler(len(train_set), config.global_batch_size, seed)
        images, labels = train_set.tensors
    jitter = Jitter(jitter_on, group.rank, seed, config.jitter_every_steps)
    group.barrier()
    clock = RunClock(config, model, test_set)
    steps, epoch, stop = 0, 0, False
    while not stop:
        if mode == "allreduce":
            for x, y in agent.batches(epoch):
                agent.backward(dilated_loss(model, x, y, jitter))
                optimizer.step()
                steps += 1
                if steps % config.eval_every_steps == 0 and _stop_together(group, clock):
                    stop = True
                    break
        else:
            for batch in sampler.epoch(epoch):
                shares = proportional_shares(batch.size, [1.0] * group.world_size)
                mine = batch.indices[local_slice(shares, group.rank)]
                optimizer.zero_grad()
                dilated_loss(ddp, images[mine], labels[mine], jitter).backward()
                optimizer.step()
                steps += 1
                if steps % config.eval_every_steps == 0 and _stop_together(group, clock):
                    stop = True
                    break
        epoch += 1
    numel = sum(p.numel() for p in model.parameters())
    result = {**clock.result(), "steps": steps, "bytes_sent_per_worker": 4 * numel * steps}
    if mode == "allreduce":
        result["shares"] = agent.shares
        agent.close()
    else:
        del ddp  # its reducer holds the process group: release it before the group goes
        group.barrier()
        group.close()
    return result if group.rank == 0 else {}


def local(config: SyncBenchConfig, mode: str, jitter_on: bool, seed: int) -> dict[str, Any]:
    """`local` (periodic averaging every H steps) or `diloco` (H inner steps; with speeds, a
    faster worker does proportionally more inner steps in the same wall time)."""
    train_set, test_set, model = _setup(config, seed)
    optimizer = _adam(model, config)
    group = Group()
    strategy: PeriodicAveraging | DiLoCo
    if mode == "local":
        strategy = PeriodicAveraging(model, group, config.period_steps)
    else:
        strategy = DiLoCo(model, group, config.period_steps)
    jitter = Jitter(jitter_on, group.rank, seed, config.jitter_every_steps)
    batches = local_batches(train_set, config.local_batch, seed, group.rank)
    group.barrier()
    clock = RunClock(config, model, test_set)
    steps, round_steps, round_start = 0, 0, time.perf_counter()
    while True:
        x, y = next(batches)
        optimizer.zero_grad()
        dilated_loss(model, x, y, jitter).backward()
        optimizer.step()
        steps, round_steps = steps + 1, round_steps + 1
        step_s = (time.perf_counter() - round_start) / round_steps  # this round, before sync
        if not strategy.after_step(x.shape[0]):
            continue
        if isinstance(strategy, DiLoCo):
            _replan_inner_steps(strategy, group, config.period_steps, step_s)
        if _stop_together(group, clock):
            break
        round_steps, round_start = 0, time.perf_counter()
    result = {**clock.result(), "steps": steps, "rounds": strategy.syncs,
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
    """Rank 0 serves (Adam on the flat parameters, one step per push); the rest train."""
    train_set, test_set, model = _setup(config, seed)
    group = Group(timeout_s=120.0)
    async_config = AsyncConfig(staleness_bound=config.staleness_bound,
                               delay_compensation=lam, dead_after_s=60.0)
    if group.rank == 0:
        clock = RunClock(config, model, test_set)
        server = ParameterServer(
            model, group, async_config,
            lambda params: torch.optim.Adam(params, lr=config.lr), total_steps=10**6,
            should_stop=lambda version: _server_should_stop(server, clock, config, version))
        group.barrier()
        clock.start = time.perf_counter()
        report = server.run()
        clock.evaluate()
        group.close()
        numel = server.flat.numel()
        pushes = max(report["pushes"].values()) if report["pushes"] else 0
        return {**clock.result(), "steps": report["version"],
                "bytes_sent_per_worker": 4 * (numel + 4) * pushes,
                "staleness": report["staleness_summary"],
                "staleness_histogram": report["staleness_histogram"],
                "pushes": report["pushes"]}
    jitter = Jitter(jitter_on, group.rank, seed, config.jitter_every_steps)
    batches = local_batches(train_set, config.local_batch, seed, group.rank)

    def compute(worker_model: torch.nn.Module) -> tuple[int, float]:
        x, y = next(batches)
        loss = dilated_loss(worker_model, x, y, jitter)
        loss.backward()
        return int(y.shape[0]), float(loss.detach())

    group.barrier()
    async_worker(model, compute, group, async_config)
    group.close()
    return {}


def _server_should_stop(server: ParameterServer, clock: RunClock, config: SyncBenchConfig,
                        version: int) -> bool:
    if version % config.eval_every_steps == 0:
        load_flat(clock.model, server.flat.detach())
        clock.evaluate()
    return clock.over_budget()
