"""`idla profile`: probe every local worker and fit its step time against batch size."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from idla.demo import DigitsCNN
from idla.profile.perf_model import StepTimeFit
from idla.profile.probe import probe_all
from idla.runtime.group import Group
from idla.runtime.launch import launch_local

PROBE_BATCHES = (32, 64, 128, 256)  # local batch sizes timed for the step-time fit


def _time_compute(batch: int, repeats: int = 3) -> float:
    """Median seconds of forward + backward of the demo CNN on `batch` random images."""
    model = DigitsCNN()
    images, labels = torch.rand(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def survey_worker() -> dict[str, Any]:
    torch.set_num_threads(1)
    group = Group()
    profiles = probe_all(group.rank, group.control)
    fit = StepTimeFit(forget=1.0)
    timings = {}
    for batch in PROBE_BATCHES:
        timings[batch] = _time_compute(batch)
        fit.observe(batch, timings[batch])
    model = fit.model()
    assert model is not None  # observed above
    mine = profiles[group.rank].to_dict()
    group.close()
    mine.update(
        compute_fixed_s=model.compute_fixed_s,
        compute_per_sample_s=model.compute_per_sample_s,
        samples_per_s=PROBE_BATCHES[-1] / timings[PROBE_BATCHES[-1]],
    )
    return mine


def survey_workers(
    workers: int, speeds: Sequence[float] | None, base_cores: float
) -> list[dict[str, Any]]:
    return list(launch_local(survey_worker, (), workers, speeds, base_cores))


def print_profiles(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="idla profile: local workers (compute = forward+backward of the demo CNN)")
    columns = (
        "rank",
        "host",
        "cpus",
        "cpu %",
        "mem avail GiB",
        "gpus",
        "link MB/s",
        "α ms",
        "β µs/sample",
        f"samples/s @{PROBE_BATCHES[-1]}",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        link = row["link_bandwidth_bytes_per_s"]
        table.add_row(
            str(row["rank"]),
            row["hostname"],
            str(row["cpu_count"]),
            f"{row['cpu_percent']:.0f}",
            f"{row['mem_available_bytes'] / 2**30:.1f}",
            ", ".join(g["name"] for g in row["gpus"]) or "-",
            "-" if link is None else f"{link / 1e6:.0f}",
            f"{1e3 * row['compute_fixed_s']:.2f}",
            f"{1e6 * row['compute_per_sample_s']:.1f}",
            f"{row['samples_per_s']:.0f}",
        )
    Console().print(table)
