"""What `idla fl simulate` shows: a progress bar per round, a one-screen summary, and the
report directory (report.json and fl.png: accuracy and emulated seconds per round, trust per
client)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from idla.report import atomic_target, write_json_atomic


class RoundProgress:
    """A rich progress bar advanced once per federated round."""

    def __init__(self, total_rounds: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]fl"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
            TimeElapsedColumn(), TextColumn("{task.description}"),
        )
        self._task = self._progress.add_task("starting client workers", total=total_rounds)

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, row: dict[str, Any]) -> None:
        self._progress.update(
            self._task, completed=row["round"],
            description=f"acc {100 * row['accuracy']:.1f}%  {row['accepted']} accepted  "
            f"{row['rejected']} rejected  {row['late']} late  {row['round_s']:.3f} s emulated",
        )


def trust_split(report: dict[str, Any]) -> dict[str, float | None]:
    """Mean final trust of the malicious and of the honest clients (None when there are none)."""
    malicious = set(report["malicious_clients"])
    trust = {int(c): t for c, t in report["trust"].items()}
    bad = [t for c, t in trust.items() if c in malicious]
    good = [t for c, t in trust.items() if c not in malicious]
    return {"malicious": statistics.fmean(bad) if bad else None,
            "honest": statistics.fmean(good) if good else None}


def print_summary(report: dict[str, Any], out: Path | None) -> None:
    console = Console()
    settings = report["settings"]
    history = report["history"]
    table = Table(title=f"idla fl simulate: {settings['clients']} clients, "
                  f"{settings['aggregator']}, {settings['selection']} selection")
    for column in ("round", "accuracy", "emulated s", "accepted", "rejected", "late", "failed"):
        table.add_column(column, justify="right")
    rounds = len(history["round"])
    shown = sorted({0, rounds - 1, *range(0, rounds, max(1, rounds // 8))})
    for i in shown:
        table.add_row(str(history["round"][i]), f"{100 * history['accuracy'][i]:.2f}%",
                      f"{history['round_s'][i]:.3f}", str(history["accepted"][i]),
                      str(history["rejected"][i]), str(history["late"][i]),
                      str(history["failed"][i]))
    console.print(table)
    totals = report["totals"]
    console.print(
        f"wall {report['wall_s']:.1f} s ({report['rounds_per_s']:.2f} rounds/s over the rounds, "
        f"{report['processes']} worker processes)  mean emulated round "
        f"{report['mean_round_s']:.3f} s  deadline {settings['deadline_s'] or 'none'}"
    )
    console.print(
        f"updates: {totals['accepted']} accepted, {totals['rejected']} rejected, "
        f"{totals['late']} late, {totals['failed']} failed, {totals['outlier']} flagged outliers; "
        f"{report['selection']['never_selected']} clients never selected"
    )
    split = trust_split(report)
    if split["malicious"] is not None:
        honest = "n/a" if split["honest"] is None else f"{split['honest']:.2f}"
        console.print(f"mean trust: malicious clients {split['malicious']:.2f}, honest {honest} "
                      f"({settings['attack']} by {len(report['malicious_clients'])} clients)")
    console.print(f"[bold]test accuracy {100 * report['final_accuracy']:.2f}%[/bold] "
                  f"(from {100 * report['initial_accuracy']:.2f}%)")
    if out is not None:
        console.print(f"report: {out / 'report.json'}  plot: {out / 'fl.png'}")


def write_outputs(report: dict[str, Any], out: str | Path) -> Path:
    """report.json and fl.png in ``out`` (created), each written atomically."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "report.json", report)
    plot_report(report, directory / "fl.png")
    return directory


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Three panels: test accuracy per round, emulated round seconds, final trust per client."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = report["history"]
    figure = Figure(figsize=(8, 8), constrained_layout=True)
    FigureCanvasAgg(figure)
    accuracy_ax, time_ax, trust_ax = figure.subplots(3, 1)
    accuracy_ax.plot(history["round"], [100 * a for a in history["accuracy"]], marker=".")
    accuracy_ax.set_ylabel("test accuracy (%)")
    accuracy_ax.set_xlabel("round")
    time_ax.plot(history["round"], history["round_s"], marker=".")
    time_ax.set_ylabel("emulated round (s)")
    time_ax.set_xlabel("round")
    malicious = set(report["malicious_clients"])
    clients = sorted(int(c) for c in report["trust"])
    colors = ["tab:red" if c in malicious else "tab:blue" for c in clients]
    trust_ax.bar(clients, [report["trust"][str(c)] for c in clients], color=colors)
    trust_ax.set_ylabel("trust (red: malicious)")
    trust_ax.set_xlabel("client")
    trust_ax.set_ylim(0, 1.05)
    with atomic_target(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
