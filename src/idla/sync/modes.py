"""Synchronization modes: what `--sync` accepts, and which mode the agent suggests.

    allreduce   exact synchronous all-reduce every step (the core)
    local:H     local SGD: H local steps, then a sample-weighted parameter average
    diloco:H    DiLoCo: H inner steps, then an outer Nesterov step on the averaged pseudo-gradient
    async:S     parameter server, bounded staleness S (SSP), optional delay compensation
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from idla.errors import ConfigError

_FORMS = "allreduce, local:H, diloco:H (H ≥ 1 steps) or async:S (S ≥ 0 versions)"


class SyncMode(str, enum.Enum):
    ALLREDUCE = "allreduce"
    LOCAL = "local"
    DILOCO = "diloco"
    ASYNC = "async"


@dataclass(frozen=True, slots=True)
class SyncSpec:
    """A parsed `--sync` value."""

    mode: SyncMode
    period_steps: int = 1  # H for local and diloco
    staleness_bound: int = 0  # S for async

    def describe(self) -> str:
        if self.mode in (SyncMode.LOCAL, SyncMode.DILOCO):
            return f"{self.mode.value}:{self.period_steps}"
        if self.mode is SyncMode.ASYNC:
            return f"async:{self.staleness_bound}"
        return "allreduce"


def parse_sync(text: str) -> SyncSpec:
    """`allreduce`, `local:H`, `diloco:H` or `async:S`; anything else is a ConfigError."""
    name, _, argument = text.strip().lower().partition(":")
    try:
        mode = SyncMode(name)
    except ValueError:
        raise ConfigError(f"unknown sync mode '{text}'; use {_FORMS}") from None
    if mode is SyncMode.ALLREDUCE:
        if argument:
            raise ConfigError(f"sync mode 'allreduce' takes no argument; use {_FORMS}")
        return SyncSpec(mode)
    try:
        value = int(argument)
    except ValueError:
        raise ConfigError(f"sync mode '{text}' needs an integer argument; use {_FORMS}") from None
    if mode is SyncMode.ASYNC:
        if value < 0:
            raise ConfigError(f"async staleness bound S must be 0 or more, got {value}")
        return SyncSpec(mode, staleness_bound=value)
    if value < 1:
        raise ConfigError(f"{mode.value} period H must be at least 1 step, got {value}")
    return SyncSpec(mode, period_steps=value)


@dataclass(frozen=True, slots=True)
class ModeAdvice:
    spec: SyncSpec
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"mode": self.spec.describe(), "reason": self.reason}


def suggest_mode(
    step_time_cv: float, comm_fraction: float, jitter_threshold: float = 0.25,
    comm_threshold: float = 0.5, period_steps: int = 20, staleness_bound: int = 4,
) -> ModeAdvice:
    """What the measurements argue for.

    `step_time_cv`: coefficient of variation of a worker's step time over recent steps
    (the largest over workers): when speeds jitter, any barrier waits for the slowest draw, so
    asynchronous training (bounded staleness) wins. `comm_fraction`: communication over the
    whole step: when the link dominates, DiLoCo cuts the bytes by H. Otherwise stay exact.
    """
    if step_time_cv >= jitter_threshold:
        return ModeAdvice(
            SyncSpec(SyncMode.ASYNC, staleness_bound=staleness_bound),
            f"step times vary by {100 * step_time_cv:.0f}% (≥ {100 * jitter_threshold:.0f}%): "
            "a barrier waits for the slowest draw every step; asynchronous updates do not",
        )
    if comm_fraction >= comm_threshold:
        return ModeAdvice(
            SyncSpec(SyncMode.DILOCO, period_steps=period_steps),
            f"communication is {100 * comm_fraction:.0f}% of the step (≥ "
            f"{100 * comm_threshold:.0f}%): DiLoCo syncs once per {period_steps} steps",
        )
    return ModeAdvice(
        SyncSpec(SyncMode.ALLREDUCE),
        f"steady step times ({100 * step_time_cv:.0f}% variation) and communication at "
        f"{100 * comm_fraction:.0f}% of the step: exact synchronous all-reduce costs little",
    )


def advise_from_history(
    compute_s: Sequence[Sequence[float]], comm_s: Sequence[float], window_steps: int = 50
) -> ModeAdvice:
    """`suggest_mode` from a run's measurements: `compute_s` is one row per step of every
    worker's compute seconds, `comm_s` every worker's mean communication seconds per step."""
    recent = [row for row in compute_s[-window_steps:] if row]
    if len(recent) < 2 or not comm_s:
        return ModeAdvice(SyncSpec(SyncMode.ALLREDUCE), "too few steps measured to advise")
    variations = []
    for worker in range(len(recent[0])):
        times = [row[worker] for row in recent]
        mean = statistics.fmean(times)
        if mean > 0:
            variations.append(statistics.pstdev(times) / mean)
    step_s = statistics.fmean(max(row) for row in recent) + max(comm_s)
    cv = max(variations, default=0.0)  # one jittery worker is enough to stall every barrier
    return suggest_mode(cv, min(1.0, max(comm_s) / step_s) if step_s > 0 else 0.0)
