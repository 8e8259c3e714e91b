"""Loader for the Pollux/Sia artifact traces (``shared/traces``; formats in its README).

Pollux: Qiao et al., "Pollux: Co-adaptive Cluster Scheduling for Goodput-Optimized Deep
Learning", OSDI 2021. Sia: Jayaram Subramanya et al., "Sia: Heterogeneity-aware, goodput-optimized
ML-cluster scheduling", SOSP 2023. The constants below (epochs, restart seconds, calibration
slowdowns, the 64-GPU cluster) are the ones those artifacts' simulator uses.

Loading one application reads its CSVs once (a few hundred rows each); nothing here is cached
across calls, so the caller keeps the loaded traces.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from idla.errors import ConfigError
from idla.pool.model import Device

FloatArray = npt.NDArray[np.float64]

EPOCHS = {"cifar10": 100, "imagenet": 90, "deepspeech2": 80, "yolov3": 50, "bert": 2}
"""Epochs a job of each application runs before it ends."""
RESTART_S = {"cifar10": 50.0, "deepspeech2": 25.0, "bert": 120.0, "yolov3": 80.0,
             "imagenet": 250.0}
"""Seconds a checkpoint-restart holds a job's GPUs without progress."""
CALIBRATION = {"cifar10": 1.8}
"""Slowdown dividing goodput (1.2 for applications not listed)."""
DEFAULT_CALIBRATION = 1.2

SIA_CLUSTER = (("aws", 4, 6, 16 * 2**30), ("dgx-ext", 8, 2, 40 * 2**30),
               ("rtx", 8, 3, 11 * 2**30))
"""(GPU kind, GPUs per node, nodes, memory bytes per GPU): 64 GPUs as in the Sia paper."""


@dataclass(frozen=True, slots=True)
class StepTable:
    """Measured step times of one application on one GPU kind at one (nodes, replicas)."""

    local_bsz: FloatArray  # (n,) increasing local batch sizes, samples
    step_s: FloatArray  # (n,) seconds per iteration, sync included
    sync_s: FloatArray  # (n,) seconds of gradient synchronisation per iteration


@dataclass(frozen=True, slots=True)
class KindTrace:
    """One application on one GPU kind."""

    tables: dict[tuple[int, int], StepTable]
    """(nodes, replicas) → measured step times."""
    max_local_bsz: int
    """The largest local batch measured: what fits in one GPU's memory."""


@dataclass(frozen=True, slots=True)
class AppTrace:
    """Everything the simulator knows about one application."""

    name: str
    kinds: dict[str, KindTrace]
    init_batch: int
    """The smallest validated global batch: progress is counted in its iterations."""
    max_batch: int
    """The largest validated global batch."""
    epoch_progress: FloatArray  # (epochs,) progress at the end of each epoch (min over files)
    grad_batch: FloatArray  # (batches,) the validated global batch sizes, increasing
    grad_sqr: FloatArray  # (batches, epochs) squared gradient norm per epoch, per batch size
    grad_var: FloatArray  # (batches, epochs) gradient variance per epoch, per batch size
    target_progress: float
    """Progress at which the job ends (its last epoch)."""
    restart_s: float
    calibration: float

    def grad_stats(self, batch: float, epoch: int) -> tuple[float, float]:
        """(squared norm, variance) of the gradient in ``epoch`` when training at ``batch``,
        interpolated linearly between the validated batch sizes (as the artifacts do)."""
        sqr = float(np.interp(batch, self.grad_batch, self.grad_sqr[:, epoch]))
        var = float(np.interp(batch, self.grad_batch, self.grad_var[:, epoch]))
        return sqr, var


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One row of a workload file."""

    name: str
    arrival_s: float
    application: str
    num_replicas: int
    batch_size: int


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _tables(rows: list[dict[str, str]]) -> dict[tuple[int, int], StepTable]:
    grouped: dict[tuple[int, int], dict[float, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for row in rows:
        if "placement" in row:
            digits = [int(c) for c in row["placement"].strip() if c.isdigit() and c != "0"]
            key = (len(digits), sum(digits))
        else:
            key = (int(row["num_nodes"]), int(row["num_replicas"]))
        grouped[key][float(row["local_bsz"])].append(
            (float(row["step_time"]), float(row["sync_time"])))
    tables = {}
    for key, by_bsz in grouped.items():
        sizes = sorted(by_bsz)
        step = [float(np.mean([s for s, _ in by_bsz[b]])) for b in sizes]
        sync = [float(np.mean([y for _, y in by_bsz[b]])) for b in sizes]
        tables[key] = StepTable(np.array(sizes), np.array(step), np.array(sync))
    return tables


def _kind(folder: Path, kind: str) -> KindTrace | None:
    placements = folder / f"placements-{kind}.csv"
    if not placements.exists():
        return None
    tables = _tables(_rows(placements))
    scalability = folder / f"scalability-{kind}.csv"
    if scalability.exists():
        for key, table in _tables(_rows(scalability)).items():
            tables.setdefault(key, table)
    if (1, 1) not in tables:
        raise ConfigError(f"{placements}: no single-GPU rows (placement 1)")
    max_bsz = int(max(t.local_bsz[-1] for t in tables.values()))
    return KindTrace(tables, max_bsz)


def load_application(models_dir: str | Path, name: str,
                     kinds: tuple[str, ...] = ("aws", "dgx-ext", "rtx")) -> AppTrace:
    """Read ``models_dir/name``: step times per GPU kind and the validation curves."""
    folder = Path(models_dir) / name
    if not folder.is_dir():
        raise ConfigError(f"no model traces for application {name!r} under {models_dir}")
    loaded = {kind: trace for kind in kinds if (trace := _kind(folder, kind)) is not None}
    curves = {int(p.stem.split("-")[1]): _rows(p) for p in folder.glob("validation-*.csv")}
    if not loaded or not curves:
        raise ConfigError(f"{folder}: needs placements-<gpu>.csv and validation-<batch>.csv")
    epochs = EPOCHS.get(name, min(len(rows) for rows in curves.values()))
    init = min(curves)
    ends = [float(rows[min(epochs, len(rows)) - 1]["progress"]) for rows in curves.values()]
    init_rows = curves[init][:epochs]
    progress = np.array([float(r["progress"]) for r in init_rows])
    batches = sorted(curves)
    # Files shorter than the epochs run repeat their last row.
    rows = [[curves[b][min(e, len(curves[b]) - 1)] for e in range(len(init_rows))]
            for b in batches]
    return AppTrace(
        name=name, kinds=loaded, init_batch=init, max_batch=max(curves),
        epoch_progress=progress, grad_batch=np.array(batches, dtype=float),
        grad_sqr=np.array([[float(r["grad_sqr"]) for r in per] for per in rows]),
        grad_var=np.array([[float(r["grad_var"]) for r in per] for per in rows]),
        target_progress=min(ends), restart_s=RESTART_S.get(name, 60.0),
        calibration=CALIBRATION.get(name, DEFAULT_CALIBRATION))


def load_workload(path: str | Path, jobs_limit: int | None = None) -> list[TraceJob]:
    """The jobs of one workload CSV in arrival order (the first ``jobs_limit`` if given)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"no workload file {file}")
    jobs = [TraceJob(row["name"], float(row["time"]), row["application"],
                     int(row["num_replicas"]), int(row["batch_size"])) for row in _rows(file)]
    jobs.sort(key=lambda job: (job.arrival_s, job.name))
    return jobs[:jobs_limit] if jobs_limit is not None else jobs


def cluster_devices(spec: tuple[tuple[str, int, int, int], ...] = SIA_CLUSTER) -> list[Device]:
    """Devices of a cluster given as (kind, GPUs per node, nodes, memory bytes) per GPU kind."""
    return [Device(f"{kind}/{node}/gpu{gpu}", kind, f"{kind}/{node}", memory)
            for kind, per_node, nodes, memory in spec
            for node in range(nodes) for gpu in range(per_node)]
