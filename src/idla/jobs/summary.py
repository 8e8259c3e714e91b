"""The one-screen summary printed at the end of `idla train`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


class TrainProgress:
    """A rich progress bar, drawn in the launcher, showing every worker's current share."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(), TextColumn("{task.description}"),
        )
        self._task = self._progress.add_task("starting workers", total=None)

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, message: dict[str, Any]) -> None:
        shares = "/".join(str(s) for s in message["shares"])
        self._progress.update(
            self._task, completed=message["step"], total=message["steps"],
            description=f"shares {shares}  loss {message['loss']:.3f}",
        )


def print_summary(report: dict[str, Any], out: Path | None) -> None:
    console = Console()
    table = Table(title="idla train: per-worker summary (moving averages)")
    for column in ("rank", "share", "compute ms", "comm ms", "wait ms", "samples/s"):
        table.add_column(column, justify="right")
    for worker in report["workers"]:
        table.add_row(
            str(worker["rank"]), str(worker["share"]), f"{1e3 * worker['compute_s']:.1f}",
            f"{1e3 * worker['comm_s']:.1f}", f"{1e3 * worker['wait_s']:.1f}",
            f"{worker['samples_per_s']:.0f}",
        )
    console.print(table)
    console.print(
        f"steps {report['steps']}  global batch {report['global_batch_size']}  "
        f"throughput {report['samples_per_s']:.0f} samples/s  "
        f"elapsed {report['elapsed_s']:.1f} s  topology: {report['topology']}"
    )
    console.print(f"re-planned at steps {report['replan_steps'] or 'none'}")
    for line in report["stragglers"] or ["no straggler: the workers are balanced"]:
        console.print(f"straggler: {line}")
    if "sync_advice" in report:
        advice = report["sync_advice"]
        console.print(f"sync mode advice: {advice['mode']} — {advice['reason']}")
    compression = report.get("compression", {})
    if compression.get("codec", "none") != "none":
        console.print(f"compression: {compression['codec']} — {compression['reason']}")
    console.print(f"[bold]test accuracy {100 * report['test_accuracy']:.2f}%[/bold]")
    if out is not None:
        console.print(f"report: {out / 'report.json'}  plot: {out / 'training.png'}")
