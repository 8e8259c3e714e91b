"""`idla bench pool`'s live settings: the jobs, their sizes and arrival times, the pool's
speeds and the serving load (`PoolLiveConfig`), shared by the runner (`idla.bench.pool_live`)
and the serving side (`idla.bench.pool_live_serving`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idla.errors import ConfigError

JOB_SCRIPT = Path(__file__).with_name("pool_live_job.py")
POLICIES = ("idla", "fifo", "static")
START_TIMEOUT_S = 60.0  # the agent's process until its API answers


@dataclass(kw_only=True, slots=True)
class LiveJob:
    """One training job of the live workload."""

    name: str
    """Its label in the table and the JSON."""
    priority: float
    """p in Σ pᵢ·Uᵢ."""
    arrival_s: float
    """Seconds after the run's start at which it is submitted."""
    epochs: int
    """Epochs of the workload's training set (digits: 12 steps each at a global batch of 128;
    resnet: 16 at 256)."""
    max_workers: int = 3
    """Devices it may use at most (its minimum is 1)."""


MODELS = {"digits": (128, (90, 45, 45)), "resnet": (256, (15, 8, 8))}
"""Per workload: its global batch and the three jobs' epochs. Digits: the p=1 job takes about
60 s alone on its best three devices and the others about 35 s, so that each is still running
when the next one arrives (at 30/15/15 epochs, 23 and 17 s, the jobs barely overlapped and a
worker's ~7 s start-up on a throttled slot was a third of a job)."""


def default_jobs(model: str = "digits") -> list[LiveJob]:
    """The issue's three training jobs (priorities 1, 4, 2 arriving at 0, 20 and 40 s)."""
    epochs = MODELS[model][1]
    return [LiveJob(name="sweep", priority=1, arrival_s=0.0, epochs=epochs[0]),
            LiveJob(name="finetune", priority=4, arrival_s=20.0, epochs=epochs[1]),
            LiveJob(name="eval-train", priority=2, arrival_s=40.0, epochs=epochs[2])]


@dataclass(kw_only=True, slots=True)
class PoolLiveConfig:
    """Settings of the live part of `idla bench pool`."""

    speeds: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.5, 0.25])
    """Relative CPU speed per emulated device."""
    base_cores: float = 0.5
    """CPU cores of a speed-1 device (the quotas sum to base_cores × Σ speeds)."""
    policies: Sequence[str] = POLICIES
    """Policies compared, each on a fresh agent."""
    model: str = "digits"
    """The training jobs' workload (`idla.demo.workloads`): digits (mostly fixed per-step
    costs, so more devices barely help) or resnet (mostly compute)."""
    jobs: list[LiveJob] | None = None
    """The training jobs, arriving at their times (None: `default_jobs` of the model)."""
    global_batch: int | None = None
    """Samples per step of every training job (None: the model's in `MODELS`)."""
    serve_p99_ms: float = 250.0
    """The serving job's latency target (p99 per window), milliseconds."""
    serve_requests_per_s: float = 10.0
    """Offered load of the serving job (Poisson), requests/s: well under its capacity."""
    serve_features: int = 32
    """Input features of the served MLP (one row per request)."""
    serve_hidden: int = 64
    """Width of the served MLP's two hidden layers."""
    window_s: float = 1.0
    """Seconds per latency window."""
    segment_s: float = 10.0
    """Seconds of arrivals per load-generator process (they run back to back)."""
    alone: bool = True
    """Also run each training job alone under idla's policy (alone_s)."""
    job_timeout_s: float = 900.0
    """A run whose jobs have not all ended by then is stopped (the figures say which)."""
    seed: int = 0
    """Seeds the arrivals of the load and the jobs' data order."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"--live-model: {self.model!r} is not one of {', '.join(MODELS)}")
        self.jobs = default_jobs(self.model) if self.jobs is None else self.jobs
        self.global_batch = self.global_batch or MODELS[self.model][0]
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ConfigError(f"--live-policies: unknown policy {unknown[0]!r}; choose from "
                              f"{', '.join(POLICIES)}")
        if not self.policies or not self.jobs:
            raise ConfigError("the live bench needs at least one policy and one job")
        if not self.base_cores > 0 or any(not s > 0 for s in self.speeds):
            raise ConfigError("--base-cores and every speed must be positive")
        if not 0 < self.window_s <= self.segment_s:
            raise ConfigError("window_s must be positive and at most segment_s")


def quick_config(**overrides: Any) -> PoolLiveConfig:
    """A short run for smoke tests: two devices, two short jobs, idla only, no alone runs."""
    settings: dict[str, Any] = {
        "speeds": [1.0, 1.0], "policies": ("idla",), "alone": False, "segment_s": 4.0,
        "jobs": [LiveJob(name="first", priority=1, arrival_s=0.0, epochs=2, max_workers=1),
                 LiveJob(name="urgent", priority=4, arrival_s=2.0, epochs=1, max_workers=1)],
        **overrides}
    return PoolLiveConfig(**settings)
