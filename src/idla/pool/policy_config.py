"""The settings of `idla.pool.policy.allocate`: what a job's utility means and how the
re-plan trades gains against resizes and guarantees (each field's docstring gives its unit)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from idla.errors import ConfigError


class Utility(str, enum.Enum):
    """What Uᵢ means (module docstring)."""

    WORK_FRACTION = "work_fraction"
    LOG_SPEEDUP = "log_speedup"


@dataclass(kw_only=True, slots=True)
class PolicyConfig:
    """Settings of `allocate`."""

    horizon_s: float = 600.0
    """H: seconds over which a re-plan must pay for its resizes (about the re-plan interval)."""
    margin: float = 0.02
    """Relative gain of Σ pᵢ·Uᵢ a re-plan must add beyond its resize costs to be applied."""
    work_exponent: float = 0.4
    """γ in Uᵢ = rateᵢ·H / workᵢ · (workᵢ / W)^(1−γ), W = ``unknown_work_s`` on one best device:
    1 is Smith's rule, smaller values favour long jobs (0: maximum throughput). 0.4 cut the
    makespan on the Sia workloads by 3-4 % at equal or better average JCT than 1."""
    unknown_work_s: float = 3600.0
    """Work assumed left, in seconds on one device of its best kind, for a job that does not
    report its remaining work."""
    utility: Utility = Utility.WORK_FRACTION
    """The utility of a job (module docstring)."""
    serve_weight: float = 1000.0
    """Utility of a serving job that meets its latency target, in units of a training job
    doing all its remaining work within the horizon: large, so that latency targets are met
    before any training job is sped up (a target is a promise, not a trade-off)."""
    one_kind_per_job: bool = False
    """Keep each job on one device kind (as Pollux, Sia and Gavel do); idla need not."""
    guarantee_priority: float = 4.0
    """Jobs of at least this priority are guaranteed first (``math.inf``: nobody)."""
    guarantee_slowdown: float = 1.1
    """A guaranteed job gets, before any other job gains a device, the devices that give it at
    least 1/guarantee_slowdown of its rate alone on the whole pool (rounds, resizes and epochs
    eat the rest of the 1.2x the issue allows)."""
    guarantee_max_s: float = 3600.0
    """A job is guaranteed only while its remaining work takes at most this long alone: a
    guarantee holds devices from every other job for that long, so a long urgent job relies on
    its weight pᵢ alone until its tail is this short."""

    def __post_init__(self) -> None:
        if not self.horizon_s > 0:
            raise ConfigError(f"policy.horizon_s must be positive, got {self.horizon_s}")
        if self.margin < 0:
            raise ConfigError(f"policy.margin must be >= 0, got {self.margin}")
        if not self.guarantee_slowdown >= 1:
            raise ConfigError("policy.guarantee_slowdown must be >= 1, got "
                              f"{self.guarantee_slowdown}")
        if not 0 <= self.work_exponent <= 1:
            raise ConfigError(f"policy.work_exponent must be in [0, 1], got {self.work_exponent}")
        if not self.unknown_work_s > 0:
            raise ConfigError(f"policy.unknown_work_s must be positive, got {self.unknown_work_s}")
