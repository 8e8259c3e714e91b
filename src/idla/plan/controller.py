"""When to re-plan the batch shares: a hysteresis over the planner's predicted gain.

Re-planning on every step would chase measurement noise and move samples back and forth; the
controller applies a new plan only when the predicted slowest step improves by more than
``min_gain`` for ``patience_steps`` consecutive decisions (a Schmitt-trigger style dead band).
Each decision costs one ``allocate_shares`` call. Every rank holds its own controller and feeds
it identical inputs, so all ranks decide identically without communicating.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from idla.errors import ConfigError, PlanError
from idla.plan.shares import allocate_shares, predicted_step_s
from idla.profile.perf_model import StepModel

_EQUAL_MODEL = StepModel(compute_fixed_s=0.0, compute_per_sample_s=1.0)
"""Stand-in for every worker when a forced plan is needed before all workers are measured."""


@dataclass(kw_only=True, slots=True)
class ControllerConfig:
    """Hysteresis of the re-planning decision."""

    min_gain: float = 0.05
    """Re-plan only if the predicted slowest step shrinks by more than this fraction (0 to 1)."""
    patience_steps: int = 2
    """...for this many consecutive decisions (≥ 1)."""
    warmup_steps: int = 1
    """Decisions with every worker measured (one observation each) before the first plan (≥ 0)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_gain) and 0.0 <= self.min_gain < 1.0):
            raise ConfigError(f"controller.min_gain must be in [0, 1), got {self.min_gain}")
        if self.patience_steps < 1:
            raise ConfigError(f"controller.patience_steps must be >= 1, got {self.patience_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"controller.warmup_steps must be >= 0, got {self.warmup_steps}")


class RebalanceController:
    """Decides, step by step, whether to replace the current shares with a new plan.

    Args:
        config: Hysteresis settings; the defaults when None.
    """

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self._config = config if config is not None else ControllerConfig()
        self._measured_decisions = 0  # decisions seen with every model present
        self._streak = 0  # consecutive decisions whose predicted gain exceeded min_gain
        self._changes: list[int] = []
        self._forced: list[int] = []

    @property
    def config(self) -> ControllerConfig:
        """The hysteresis settings."""
        return self._config

    @property
    def changes(self) -> list[int]:
        """Steps at which a plan was applied, forced plans included, in order."""
        return list(self._changes)

    @property
    def forced(self) -> list[int]:
        """Steps at which a plan was forced because ``current`` did not fit the batch or caps."""
        return list(self._forced)

    def decide(
        self,
        step: int,
        current: Sequence[int],
        models: Sequence[StepModel | None],
        global_batch_size: int,
        caps: Sequence[int] | None = None,
        noise: float = 0.0,
        min_share: int = 1,
    ) -> list[int] | None:
        """New shares to apply now, or None to keep ``current``.

        A plan is forced, bypassing warm-up and hysteresis, when ``current`` does not sum to
        ``global_batch_size`` (e.g. the last, smaller batch of an epoch) or exceeds a cap; before
        every worker has a model it splits the batch evenly within the caps. Otherwise None is
        returned until every model is present for ``warmup_steps`` decisions, and then a plan is
        applied once its predicted gain has exceeded ``min_gain`` for ``patience_steps`` decisions
        in a row.

        Args:
            step: Training step this decision is made at; recorded in ``changes``.
            current: Local batch per worker now in force.
            models: Step-time model per worker, None where not yet measured.
            global_batch_size: Samples per step the shares must sum to.
            caps: Largest local batch per worker, or None for no limit.
            noise: Relative standard error of the models' predictions; a gain must also exceed
                twice this, so that noisy timings alone do not move the plan.
            min_share: Fewest samples a plan gives a worker that gets any (`allocate_shares`).

        Raises:
            PlanError: If ``current`` and ``models`` differ in length, or planning fails.
        """
        if len(current) != len(models):
            raise PlanError(f"current has {len(current)} shares but there are {len(models)} models")
        measured = [m for m in models if m is not None]
        complete = len(measured) == len(models)
        if complete:
            self._measured_decisions += 1
        if _needs_forced_plan(current, global_batch_size, caps):
            stand_in = measured if complete else [_EQUAL_MODEL] * len(models)
            self._forced.append(step)
            self._changes.append(step)
            return allocate_shares(global_batch_size, stand_in, caps, min_share)
        if not complete or self._measured_decisions < self._config.warmup_steps:
            return None
        candidate = allocate_shares(global_batch_size, measured, caps, min_share)
        now_s = predicted_step_s(current, measured)
        gain = (now_s - predicted_step_s(candidate, measured)) / now_s if now_s > 0.0 else 0.0
        if gain <= max(self._config.min_gain, 2.0 * noise):
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < self._config.patience_steps:
            return None
        self._streak = 0
        self._changes.append(step)
        return candidate


def _needs_forced_plan(
    current: Sequence[int], global_batch_size: int, caps: Sequence[int] | None
) -> bool:
    if sum(current) != global_batch_size or any(b < 0 for b in current):
        return True
    return caps is not None and any(b > cap for b, cap in zip(current, caps, strict=False))
