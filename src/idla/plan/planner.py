"""The share planner: per-worker step-time fits, their noise, and the re-plan decision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from idla.errors import ConfigError
from idla.plan.controller import ControllerConfig, RebalanceController
from idla.plan.shares import allocate_shares, proportional_shares
from idla.profile.perf_model import StepModel, StepTimeFit


@dataclass(kw_only=True, slots=True)
class PlannerConfig:
    """How measurements become a plan."""

    forget: float = 0.9
    """Forgetting factor of each worker's step-time fit (0.9: about 10 steps of memory)."""
    change_ratio: float = 0.6
    """A compute time this far off the prediction is an outlier (throttled CPUs time the same
    work ±30 % from step to step: 10 ms scheduler periods)..."""
    change_steps: int = 2
    """...and this many outliers in a row, in the same direction, a change of speed that
    restarts the worker's fit; fewer are held back and dropped (a passing burst)."""
    noise_factor: float = 3.0
    """A new plan must gain more than this many standard errors of the fits..."""
    max_noise_gain: float = 0.15
    """...but never more than this fraction, so a real imbalance is always acted on."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """Hysteresis: minimum gain and patience."""

    def __post_init__(self) -> None:
        if not 0.0 < self.forget <= 1.0:
            raise ConfigError(f"planner.forget must be in (0, 1], got {self.forget}")
        if self.noise_factor < 0 or not 0 <= self.max_noise_gain < 1:
            raise ConfigError("planner.noise_factor must be >= 0 and max_noise_gain in [0, 1)")
        if self.change_steps < 1:
            raise ConfigError(f"planner.change_steps must be at least 1, got {self.change_steps}")


class SharePlanner:
    """Learns every worker's step time and decides when to apply which shares.

    Deterministic: every rank feeds it the same measurements and gets the same plan.
    """

    def __init__(
        self, world_size: int, config: PlannerConfig | None = None, min_share: int = 1
    ) -> None:
        self.config = config or PlannerConfig()
        self.min_share = min_share  # fewest samples of a worker that gets any
        self.fits = [
            StepTimeFit(forget=self.config.forget, change_ratio=self.config.change_ratio,
                        change_steps=self.config.change_steps)
            for _ in range(world_size)
        ]
        self.controller = RebalanceController(self.config.controller)

    def observe(self, rank: int, local_batch: int, compute_s: float, comm_s: float | None) -> None:
        self.fits[rank].observe(local_batch, compute_s, comm_s)

    def models(self) -> list[StepModel | None]:
        return [fit.model() for fit in self.fits]

    def noise_gain(self) -> float:
        """The gain that noise alone could fake: noise_factor × the median worker's standard
        error, capped at max_noise_gain."""
        errors = sorted(fit.standard_error() for fit in self.fits)
        median = errors[len(errors) // 2]
        return min(self.config.noise_factor * median, self.config.max_noise_gain)

    def decide(
        self, step: int, current: Sequence[int], global_batch_size: int,
        caps: Sequence[int] | None = None,
    ) -> list[int] | None:
        """New shares for `global_batch_size`, or None to keep `current`."""
        # the controller's threshold is max(min_gain, 2 × noise)
        return self.controller.decide(
            step, current, self.models(), global_batch_size, caps, self.noise_gain() / 2.0,
            self.min_share,
        )

    def plan_now(
        self, batch_size: int, fallback: Sequence[int], caps: Sequence[int] | None = None,
        measured: bool = True,
    ) -> list[int]:
        """Shares for a one-off batch (an epoch's short last batch), without hysteresis: from
        the models when `measured` and all exist, else in proportion to `fallback`; either way
        every share is 0 or at least `min_share` (the whole batch, if smaller)."""
        models = self.models()
        if measured and all(m is not None for m in models):
            return allocate_shares(batch_size, models, caps,  # type: ignore[arg-type]
                                   self.min_share)
        return proportional_shares(batch_size, [float(s) for s in fallback], self.min_share)
