"""A worker's step time as a function of its local batch size, and its online fit.

The model is the compute/communication split of adaptdl's ``goodput.py`` ``PerfParams``
(Qiao et al., "Pollux", OSDI 2021), reduced to what a batch-share planner needs: compute time is
affine in the local batch and the worker's own communication cost is paid every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from idla.errors import ConfigError
from idla.profile.meters import EmaMeter

_MIN_BATCH_CV = 0.05
"""A slope is fitted only when the weighted std of the batch sizes exceeds this fraction of their
mean; below it, measurement noise would dominate the slope, so the proportional model is used."""

_MAX_FIXED_FRACTION = 0.5
"""The fitted constant term may explain at most this fraction of the mean compute time."""

_CHANGE_RATIO = 0.3
"""An observation off the model's prediction by more than this fraction is held back; a second
one in a row off in the same direction means the worker changed speed and restarts the fit."""

_CHANGE_NEAR = 0.25
"""Speed changes are judged only within this fraction of the mean batch size seen, where the
model interpolates; farther out a proportional model may be off merely by extrapolating."""


@dataclass(frozen=True, slots=True)
class StepModel:
    """Predicted step time of one worker as a function of its local batch size."""

    compute_fixed_s: float
    """α: constant compute time per step in seconds, paid only when the local batch is non-empty."""
    compute_per_sample_s: float
    """β: marginal compute time per sample in seconds (> 0)."""
    comm_s: float = 0.0
    """c: this worker's own communication time per step in seconds, paid even with no samples."""

    def predict_step_s(self, local_batch: int) -> float:
        """Predicted step time in seconds: ``c + (α + β·b)`` if ``b > 0``, else ``c``."""
        if local_batch <= 0:
            return self.comm_s
        return self.comm_s + (self.compute_fixed_s + self.compute_per_sample_s * local_batch)


class StepTimeFit:
    """Online fit of one worker's compute time ``compute_s ≈ α + β·local_batch``.

    Weighted least squares with exponential forgetting (recursive least squares with forgetting
    factor λ, Ljung & Söderström 1983): the observation ``k`` steps old has weight ``λ^k``. The
    weighted means, variance and covariance are kept in Welford's centred form (West 1979), which
    holds the same information as the sums (n, Σb, Σt, Σb², Σbt) without their cancellation. The
    communication cost is a bias-corrected EMA with the same decay.

    A worker that changes speed by more than 30 % is re-learned in two steps: an observation that
    far off the prediction (at a batch size within 25 % of the mean seen) is held back, and when
    the next one is off in the same direction the fit restarts from those two; a lone outlier (a
    GC pause, a noisy neighbour) is dropped. With ``change_steps`` k the fit restarts after k such
    observations in a row, so bursts shorter than k are dropped, at the price of following a
    real change later. Smaller drifts are followed by the forgetting.

    The default λ = 0.8 comes from the closed-loop simulation in ``tests/unit/test_controller.py``
    (±10 % timing noise, 200 seeds): more than two re-plans in 100 steady steps for 41 seeds with
    λ = 0.7, 4 with 0.8 and none with 0.9; but 0.9 takes twice as long as 0.8 to follow a 25 %
    slowdown.

    When the batch sizes seen barely vary (relative std below 5 %), or the fit gives ``α < 0`` or
    ``β ≤ 0``, the proportional model ``α = 0, β = mean(t) / mean(b)`` is used. ``α`` is clamped to
    half the mean compute time, keeping the line through the weighted means.

    Each observation costs O(1) time and memory; the arithmetic is a fixed sequence of IEEE
    operations, so identical inputs give bit-identical models on every rank.

    Args:
        forget: Forgetting factor λ in (0, 1]; 1 keeps all history with equal weight.
        change_ratio: Relative prediction error above which an observation counts as a change
            of speed (default 0.3); raise it where timings are noisier than that.
        change_steps: Observations in a row that far off, in the same direction, that restart
            the fit from them (default 2); fewer are held back and dropped. Raise it where
            contention comes in bursts of a few steps.
    """

    def __init__(
        self, forget: float = 0.8, change_ratio: float = _CHANGE_RATIO, change_steps: int = 2
    ) -> None:
        if not 0.0 < forget <= 1.0:
            raise ConfigError(f"forget must be in (0, 1], got {forget}")
        if change_steps < 1:
            raise ConfigError(f"change_steps must be at least 1, got {change_steps}")
        if not change_ratio > 0.0:
            raise ConfigError(f"change_ratio must be positive, got {change_ratio}")
        self._forget = forget
        self._change_ratio = change_ratio
        self._weight = 0.0  # Σ λ^k over compute observations, unitless
        self._mean_b = 0.0  # weighted mean local batch, samples
        self._mean_t = 0.0  # weighted mean compute time, seconds
        self._m2_b = 0.0  # Σ w (b - mean_b)², samples²
        self._c_bt = 0.0  # Σ w (b - mean_b)(t - mean_t), sample·seconds
        self._count = 0  # observations with local_batch > 0
        self._change_steps = change_steps
        self._held: list[tuple[int, float, bool]] = []  # (samples, seconds, slower) held back
        self._comm_s = EmaMeter(decay=forget)
        self._abs_error = EmaMeter(decay=forget)  # |relative prediction error| of compute

    def observe(self, local_batch: int, compute_s: float, comm_s: float | None = None) -> None:
        """Adds one step's measurements.

        Args:
            local_batch: Samples this worker processed in the step; 0 updates only the
                communication cost.
            compute_s: Compute time of the step in seconds; ignored unless finite and positive.
            comm_s: This worker's communication time in seconds, or None if not measured;
                ignored unless finite and non-negative.
        """
        if comm_s is not None and math.isfinite(comm_s) and comm_s >= 0.0:
            self._comm_s.update(comm_s)
        if local_batch <= 0 or not (math.isfinite(compute_s) and compute_s > 0.0):
            return
        self._count += 1
        model = self.model()
        held, self._held = self._held, []
        if model is None or abs(local_batch - self._mean_b) > _CHANGE_NEAR * self._mean_b:
            self._add(local_batch, compute_s)
            return
        predicted_s = model.compute_fixed_s + model.compute_per_sample_s * local_batch
        error = compute_s / predicted_s - 1.0
        self._abs_error.update(min(abs(error), 1.0))
        if abs(error) <= self._change_ratio:
            self._add(local_batch, compute_s)
            return
        slower = error > 0.0
        self._held = [h for h in held if h[2] == slower] + [(local_batch, compute_s, slower)]
        if len(self._held) >= self._change_steps:
            self._restart()
            for samples, seconds, _ in self._held:
                self._add(samples, seconds)
            self._held = []

    def _restart(self) -> None:
        self._weight = self._mean_b = self._mean_t = self._m2_b = self._c_bt = 0.0

    def _add(self, local_batch: int, compute_s: float) -> None:
        lam = self._forget
        self._weight = lam * self._weight + 1.0
        self._m2_b *= lam
        self._c_bt *= lam
        delta_b = local_batch - self._mean_b
        delta_t = compute_s - self._mean_t
        self._mean_b += delta_b / self._weight
        self._mean_t += delta_t / self._weight
        self._m2_b += delta_b * (local_batch - self._mean_b)
        self._c_bt += delta_b * (compute_s - self._mean_t)

    @property
    def relative_error(self) -> float:
        """Typical |relative error| of one compute prediction (0 before there is any)."""
        return self._abs_error.value if self._abs_error.count else 0.0

    def standard_error(self) -> float:
        """Relative standard error of the fitted mean: one error over √(effective samples)."""
        effective = min(float(self._count), 1.0 / (1.0 - self._forget + 1e-12))
        return self.relative_error / math.sqrt(max(effective, 1.0))

    @property
    def count(self) -> int:
        """Number of observations with ``local_batch > 0``."""
        return self._count

    def model(self) -> StepModel | None:
        """The current model, or None before the first observation with ``local_batch > 0``."""
        if self._weight == 0.0:
            return None
        comm_s = self._comm_s.value if self._comm_s.count > 0 else 0.0
        mean_b, mean_t = self._mean_b, self._mean_t
        var_b = self._m2_b / self._weight
        if var_b > (_MIN_BATCH_CV * mean_b) ** 2:
            per_sample_s = self._c_bt / self._m2_b
            fixed_s = mean_t - per_sample_s * mean_b
            if fixed_s > _MAX_FIXED_FRACTION * mean_t:
                fixed_s = _MAX_FIXED_FRACTION * mean_t
                per_sample_s = (mean_t - fixed_s) / mean_b
            if fixed_s >= 0.0 and per_sample_s > 0.0:
                return StepModel(fixed_s, per_sample_s, comm_s)
        return StepModel(0.0, mean_t / mean_b, comm_s)
