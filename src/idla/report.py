"""What a run tells its user: straggler diagnosis, the JSON report, and the history plot."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# A component under this fraction of the median step time is too small to blame for a slow step.
NEGLIGIBLE_FRACTION = 0.05
BUSY_RATIO = 1.2  # compute + communication above this × the median holds the others up


def _ratio_line(rank: int, what: str, value_s: float, median_s: float, note: str) -> str:
    if median_s > 0:
        return f"rank {rank}: {what} {value_s / median_s:.1f}× the median{note}"
    return f"rank {rank}: {what} {value_s:.3g} s while the median is 0 s{note}"


def diagnose_stragglers(
    compute_s: Sequence[float],
    comm_s: Sequence[float],
    wait_s: Sequence[float],
    ratio: float = 1.5,
) -> list[str]:
    """Name the ranks that slow a synchronous step down, and why; empty when balanced.

    Each argument holds one number per rank (seconds per step, e.g. moving averages): time
    computing, time in communication, and time idle waiting for peers. A rank whose busy time
    (compute + communication) exceeds ``BUSY_RATIO`` × the median holds the others up; it is
    named with the part that exceeds ``ratio`` × the median across ranks. Components below
    ``NEGLIGIBLE_FRACTION`` of the median step time are ignored, so near-zero medians do not turn
    noise into reports.
    """
    n_ranks = len(compute_s)
    if len(comm_s) != n_ranks or len(wait_s) != n_ranks:
        raise ValueError(
            f"diagnose_stragglers: {n_ranks} compute, {len(comm_s)} comm and {len(wait_s)} wait "
            "values; give one of each per rank"
        )
    if n_ranks < 2:
        return []
    step_s = [c + m + w for c, m, w in zip(compute_s, comm_s, wait_s, strict=True)]
    floor_s = NEGLIGIBLE_FRACTION * statistics.median(step_s)
    median_compute_s = statistics.median(compute_s)
    median_comm_s = statistics.median(comm_s)

    def exceeds(value_s: float, median_s: float) -> bool:
        return value_s > floor_s and value_s > ratio * max(median_s, floor_s)

    # A rank that is busy (computing or communicating) no longer than the others holds nobody
    # up, even if its compute is above the median: a plan gives fast ranks more samples and
    # slow ones time to send, on purpose.
    busy_s = [c + m for c, m in zip(compute_s, comm_s, strict=True)]
    median_busy_s = statistics.median(busy_s)
    lines: list[str] = []
    for rank in range(n_ranks):
        busy = busy_s[rank] > BUSY_RATIO * median_busy_s
        if busy and exceeds(compute_s[rank], median_compute_s):
            lines.append(_ratio_line(rank, "compute", compute_s[rank], median_compute_s, ""))
        if busy and exceeds(comm_s[rank], median_comm_s):
            note = " (its link)"
            lines.append(_ratio_line(rank, "communication", comm_s[rank], median_comm_s, note))
    return lines


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes the file private; a report is meant to be read
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    # Make the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def settings_dict(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict(config)``, each field under its ``metadata["json_key"]`` where it
    has one: a field renamed in code keeps the key that JSON outputs have always used."""
    values = dataclasses.asdict(config)
    return {field.metadata.get("json_key", field.name): values[field.name]
            for field in dataclasses.fields(config)}


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON so readers see the old file or the new one, never a partial one."""
    text = json.dumps(obj, indent=2, sort_keys=True)
    with atomic_target(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def _rank_series(shares: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per-step rows of per-rank shares -> per-rank series; ranks missing in a row count 0."""
    n_ranks = max((len(row) for row in shares), default=0)
    return [[row[r] if r < len(row) else 0 for row in shares] for r in range(n_ranks)]


def plot_history(history: dict[str, Any], path: str | Path) -> None:
    """Write a PNG with three panels over steps: per-rank batch shares, samples/s, loss.

    ``history`` holds ``step`` (list[int]), ``shares`` (per step, per rank local batch sizes),
    ``samples_per_s`` (global throughput per step) and ``loss`` (per step). Missing keys or
    an empty history give a figure with a note instead of an error; series shorter than
    ``step`` are drawn over their first steps.
    """
    # Imported here, not at the top: every worker imports this module, and matplotlib costs
    # about half a second of each one's start.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = list(history.get("step", []))
    shares = list(history.get("shares", []))[: len(steps)]
    samples_per_s = list(history.get("samples_per_s", []))[: len(steps)]
    loss = list(history.get("loss", []))[: len(steps)]

    figure = Figure(figsize=(8, 8), constrained_layout=True)
    FigureCanvasAgg(figure)
    share_ax, speed_ax, loss_ax = figure.subplots(3, 1, sharex=True)
    if not steps:
        share_ax.text(0.5, 0.5, "no steps recorded", ha="center", va="center")
    else:
        series = _rank_series(shares)
        if series:
            labels = [f"rank {r}" for r in range(len(series))]
            share_ax.stackplot(steps[: len(shares)], series, labels=labels)
            share_ax.legend(loc="upper left", fontsize="small", ncol=min(len(series), 4))
        speed_ax.plot(steps[: len(samples_per_s)], samples_per_s)
        loss_ax.plot(steps[: len(loss)], loss)
    share_ax.set_ylabel("local batch (samples)")
    share_ax.set_title("batch shares per rank")
    speed_ax.set_ylabel("samples/s (global)")
    loss_ax.set_ylabel("loss")
    loss_ax.set_xlabel("step")
    with atomic_target(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
