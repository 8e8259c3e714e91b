"""`idla train --sync local:H|diloco:H|async:S`: the demo job in a relaxed synchronization mode.

local / diloco: every worker trains on batches of global_batch / workers samples drawn from its
own seeded permutation, and the strategy averages (local SGD) or takes an outer step (DiLoCo)
every H steps; all workers do the same number of steps, so a final partial round is closed on
every rank. async: rank 0 is the parameter server (it does not train), the other ranks push
gradients of global_batch / (workers - 1) samples each; the run ends after as many updates as
the synchronous run would take samples, divided by the per-update batch.

Each rank returns its own timings (compute, communication or waiting), so the launcher can show
the same per-worker table as the synchronous trainer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.errors import ConfigError
from idla.jobs.async_loop import train_async
from idla.jobs.local_sgd import LocalProgress, round_strategy, train_local
from idla.plan.job_planner import lockstep_batch
from idla.runtime.data import local_batches
from idla.runtime.group import Group
from idla.runtime.launch import report_progress
from idla.runtime.tree import move_to
from idla.sync.async_ps import AsyncConfig
from idla.sync.modes import SyncMode, SyncSpec, parse_sync

if TYPE_CHECKING:
    from idla.jobs.train import TrainConfig


def mode_worker(config: TrainConfig) -> dict[str, Any]:
    """One worker (or the server) of the demo job under `config.sync`."""
    spec = parse_sync(config.sync)
    torch.set_num_threads(config.threads)
    group = Group(timeout_s=300.0)
    train_set, test_set = load_digits_split(seed=config.agent.seed)
    torch.manual_seed(config.agent.seed)
    model = DigitsCNN().to(group.device)
    samples_total = config.epochs * len(train_set)
    start = time.perf_counter()
    if spec.mode is SyncMode.ASYNC:
        mine = _async(config, spec, group, model, train_set, samples_total)
    else:
        mine = _local_rounds(config, spec, group, model, train_set)
    elapsed_s = time.perf_counter() - start
    mine.update(rank=group.rank, elapsed_s=elapsed_s)
    if group.rank == 0:
        mine.update(test_accuracy=accuracy(model, test_set, group.device),
                    sync=spec.describe(), samples_total=samples_total)
    group.close()
    return mine


def _async(config: TrainConfig, spec: SyncSpec, group: Group, model: torch.nn.Module,
           train_set: Any, samples_total: int) -> dict[str, Any]:
    if group.world_size < 2:
        raise ConfigError("--sync async needs at least 2 workers (rank 0 is the server)")
    local = lockstep_batch(config.agent.global_batch_size, group.world_size - 1)
    async_config = AsyncConfig(staleness_bound=spec.staleness_bound,
                               delay_compensation=config.delay_compensation)
    out = train_async(model, group, async_config,
                      _on(group.device, local_batches(train_set, local, config.agent.seed,
                                                      group.rank)),
                      optimizer=lambda params: torch.optim.Adam(params, lr=config.lr),
                      total_steps=max(1, samples_total // local))
    if group.rank == async_config.server_rank:
        return {"role": "server", "staleness": out["staleness_summary"],
                "staleness_histogram": out["staleness_histogram"], "dead": out["dead"],
                "updates": out["version"]}
    return {"role": "worker", "compute_s": out["compute_s"], "wait_s": out["wait_s"],
            "steps": out["pushes"], "samples": out["pushes"] * local}


def _local_rounds(config: TrainConfig, spec: SyncSpec, group: Group, model: torch.nn.Module,
                  train_set: Any) -> dict[str, Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    strategy = round_strategy(spec.mode, model, group, spec.period_steps)
    local = lockstep_batch(config.agent.global_batch_size, group.world_size)
    steps = max(1, config.epochs * len(train_set) // config.agent.global_batch_size)

    def progress_bar(progress: LocalProgress, loss: torch.Tensor) -> None:
        if group.rank == 0:
            report_progress({"step": progress.steps, "steps": steps,
                             "shares": [local] * group.world_size, "loss": float(loss.detach())})

    progress = train_local(model, optimizer, strategy,
                           _on(group.device, local_batches(train_set, local, config.agent.seed,
                                                           group.rank)),
                           steps=steps, after_step=progress_bar)
    return {"role": "worker", "compute_s": progress.compute_s, "comm_s": progress.sync_s,
            "steps": steps, "samples": steps * local, "rounds": strategy.syncs,
            "bytes_sent": strategy.bytes_sent}


def _on(device: torch.device, batches: Iterator[Any]) -> Iterator[Any]:
    """`batches` with their tensors moved to `device` (the model's)."""
    for batch in batches:
        yield move_to(batch, device, non_blocking=True)


def mode_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The launcher's report: rank 0's result plus every rank's timings."""
    report = dict(results[0])
    report["workers"] = [{k: v for k, v in r.items() if k not in ("staleness_histogram",)}
                         for r in results]
    elapsed = max(r["elapsed_s"] for r in results)
    report["samples_per_s"] = sum(r.get("samples", 0) for r in results) / max(elapsed, 1e-9)
    return report


def print_mode_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"idla train --sync {report['sync']}: per-worker summary")
    for column in ("rank", "role", "steps", "compute s", "comm / wait s"):
        table.add_column(column, justify="right")
    for worker in report["workers"]:
        waiting = worker.get("comm_s", worker.get("wait_s", 0.0))
        table.add_row(str(worker["rank"]), worker["role"], str(worker.get("steps", "")),
                      f"{worker.get('compute_s', 0.0):.1f}", f"{waiting:.1f}")
    console.print(table)
    console.print(f"throughput {report['samples_per_s']:.0f} samples/s  elapsed "
                  f"{report['elapsed_s']:.1f} s")
    if "staleness" in report:
        stale = report["staleness"]
        console.print(f"staleness: max {stale['max']}, mean {stale['mean']:.2f}, p90 "
                      f"{stale['p90']}; histogram {report['staleness_histogram']}")
    console.print(f"[bold]test accuracy {100 * report['test_accuracy']:.2f}%[/bold]")
