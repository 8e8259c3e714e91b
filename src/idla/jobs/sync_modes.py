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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.errors import ConfigError
from idla.jobs.async_loop import local_batches
from idla.runtime.group import Group
from idla.runtime.launch import report_progress
from idla.sync.async_ps import AsyncConfig, ParameterServer, async_worker
from idla.sync.local_sgd import DiLoCo, PeriodicAveraging
from idla.sync.modes import SyncMode, parse_sync

if TYPE_CHECKING:
    from idla.jobs.train import TrainConfig


def mode_worker(config: TrainConfig) -> dict[str, Any]:
    """One worker (or the server) of the demo job under `config.sync`."""
    spec = parse_sync(config.sync)
    torch.set_num_threads(config.threads)
    group = Group(timeout_s=300.0)
    train_set, test_set = load_digits_split(seed=config.agent.seed)
    torch.manual_seed(config.agent.seed)
    model = DigitsCNN()
    samples_total = config.epochs * len(train_set)
    start = time.perf_counter()
    if spec.mode is SyncMode.ASYNC:
        if group.world_size < 2:
            raise ConfigError("--sync async needs at least 2 workers (rank 0 is the server)")
        local = max(1, config.agent.global_batch_size // (group.world_size - 1))
        async_config = AsyncConfig(staleness_bound=spec.staleness_bound,
                                   delay_compensation=config.delay_compensation)
        if group.rank == 0:
            updates = max(1, samples_total // local)
            report = ParameterServer(
                model, group, async_config,
                lambda params: torch.optim.Adam(params, lr=config.lr), updates).run()
            mine: dict[str, Any] = {"role": "server", "staleness": report["staleness_summary"],
                                    "staleness_histogram": report["staleness_histogram"],
                                    "dead": report["dead"], "updates": report["version"]}
        else:
            batches = local_batches(train_set, local, config.agent.seed, group.rank)

            def compute(worker_model: torch.nn.Module) -> tuple[int, float]:
                x, y = next(batches)
                loss = F.cross_entropy(worker_model(x), y)
                loss.backward()
                return int(y.shape[0]), float(loss.detach())

            stats = async_worker(model, compute, group, async_config)
            mine = {"role": "worker", "compute_s": stats["compute_s"],
                    "wait_s": stats["wait_s"], "steps": stats["pushes"],
                    "samples": stats["pushes"] * local}
    else:
        mine = _local_rounds(config, spec.mode, spec.period_steps, group, model, train_set)
    elapsed_s = time.perf_counter() - start
    mine.update(rank=group.rank, elapsed_s=elapsed_s)
    if group.rank == 0:
        mine.update(test_accuracy=accuracy(model, test_set, torch.device("cpu")),
                    sync=spec.describe(), samples_total=samples_total)
    group.close()
    return mine


def _local_rounds(config: TrainConfig, mode: SyncMode, period_steps: int, group: Group,
                  model: torch.nn.Module, train_set: Any) -> dict[str, Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    strategy: PeriodicAveraging | DiLoCo
    if mode is SyncMode.LOCAL:
        strategy = PeriodicAveraging(model, group, period_steps)
    else:
        strategy = DiLoCo(model, group, period_steps)
    local = max(1, config.agent.global_batch_size // group.world_size)
    steps = max(1, config.epochs * len(train_set) // config.agent.global_batch_size)
    batches = local_batches(train_set, local, config.agent.seed, group.rank)
    compute_s = sync_s = 0.0
    for step in range(steps):
        begin = time.perf_counter()
        x, y = next(batches)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        middle = time.perf_counter()
        strategy.after_step(x.shape[0])
        compute_s += middle - begin
        sync_s += time.perf_counter() - middle
        if group.rank == 0:
            report_progress({"step": step + 1, "steps": steps, "shares": [local] * group.world_size,
                             "loss": float(loss.detach())})
    if steps % period_steps:
        strategy.sync_now()  # every rank did the same steps: close the last round everywhere
    return {"role": "worker", "compute_s": compute_s, "comm_s": sync_s, "steps": steps,
            "samples": steps * local, "rounds": strategy.syncs,
            "bytes_sent": strategy.bytes_sent}


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
