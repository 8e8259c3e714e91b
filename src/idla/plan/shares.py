"""Splitting a global batch into per-worker local batches.

``allocate_shares`` solves the min-max problem

    minimize    max_i  c_i + [b_i > 0] (α_i + β_i b_i)
    subject to  Σ b_i = B,   0 ≤ b_i ≤ cap_i,   b_i integer,

which is water-filling (as in hivemind's ``averaging/load_balancing.py``, solved there with an LP):
every worker is filled up to a common time level. With ``n(T)`` the number of samples worker
``i`` can take while finishing by ``T``, the optimal level is the smallest float ``T*`` with
``Σ n_i(T*) ≥ B``. It is found by bisection on the bit patterns of non-negative floats, which
reaches two adjacent floats in at most 64 vectorized passes; the result is exact in floating
point, not just within a tolerance. Every worker is then given the samples it can take strictly
below ``T*`` and the few missing ones go to the workers at ``T*`` in index order, which is what
trimming the excess one sample at a time from the slowest workers gives. Cost: O(n) memory and
O(64 n) time; every rank computes the same list from the same models.

A minimum share ``m`` (BatchNorm needs 2 samples per replica in training) adds the constraint
``b_i = 0 or b_i ≥ m``. At a level ``T`` worker ``i`` can then take 0 or anything in
``[m, n_i(T)]`` when ``n_i(T) ≥ m``, so the batch fits by ``T`` exactly when the ``k = ⌊B/m⌋``
workers that can take the most hold ``B`` between them: the same bisection on that monotone
count finds the optimal level, and the batch is split among those ``k`` workers (ties to the
lower index) within ``[m, n_i(T*)]``. A batch smaller than ``m`` goes whole to the one worker
that finishes it first. Cost: a partial sort per pass, O(64 n) time still on average.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from operator import attrgetter

import numpy as np
import numpy.typing as npt

from idla.errors import PlanError
from idla.profile.perf_model import StepModel

_FloatArray = npt.NDArray[np.float64]
_Counter = Callable[[float], float]  # samples the workers take by a time level

_MIN_RESOLUTION = 1e-12
"""β must exceed this fraction of α + c, so that one more sample changes the predicted time by
many float ulps and the closed-form count below is off by at most one."""


def allocate_shares(
    global_batch_size: int, models: Sequence[StepModel], caps: Sequence[int] | None = None,
    min_share: int = 1,
) -> list[int]:
    """Local batch sizes that minimize the predicted slowest step.

    Args:
        global_batch_size: Samples per step across all workers (≥ 1).
        models: One step-time model per worker.
        caps: Largest local batch each worker's memory holds, or None for no limit.
        min_share: Fewest samples a worker may be given, unless it is given none (≥ 1); a batch
            smaller than this goes whole to one worker.

    Returns:
        Local batches, one per worker, each 0 or at least ``min(min_share, global_batch_size)``,
        summing exactly to ``global_batch_size``.

    Raises:
        PlanError: If the batch, the models, the caps or the minimum are invalid, or the caps
            cannot hold the global batch (in shares of at least the minimum).
    """
    if global_batch_size < 1:
        raise PlanError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if min_share < 1:
        raise PlanError(f"min_share must be >= 1, got {min_share}")
    fleet = _Fleet(models, caps, global_batch_size)
    level = fleet.water_level(global_batch_size)
    upper = fleet.counts(level)
    lower = fleet.counts(math.nextafter(level, -math.inf))
    extra = upper - lower
    before = np.cumsum(extra) - extra
    taken = np.clip(global_batch_size - lower.sum() - before, 0.0, extra)
    shares: list[int] = (lower + taken).astype(np.int64).tolist()
    least = min(min_share, global_batch_size)
    if least > 1 and not respects_min_share(shares, least):
        shares = _allocate_with_min(fleet, global_batch_size, least)
    return shares


def respects_min_share(shares: Sequence[int], min_share: int) -> bool:
    """Whether every share is 0 or at least ``min_share``."""
    return all(b == 0 or b >= min_share for b in shares)


def _allocate_with_min(fleet: _Fleet, global_batch_size: int, min_share: int) -> list[int]:
    """The min-max split with every share 0 or at least ``min_share`` (see the module
    docstring): the optimal level, the ``⌊B/m⌋`` workers that take the most at it, each
    first given what it takes strictly below the level (at least ``m``), then the rest added
    in index order, or the excess taken back in reverse index order down to ``m``."""
    active = global_batch_size // min_share

    def eligible(counts: _FloatArray) -> _FloatArray:
        return np.where(counts >= min_share, counts, 0.0)

    def top_total(counts: _FloatArray) -> float:
        counts = eligible(counts)
        if active >= len(counts):
            return float(counts.sum())
        return float(-np.partition(-counts, active - 1)[:active].sum())

    level = fleet.water_level(
        global_batch_size, lambda t: top_total(fleet.counts(t)),
        lambda t: top_total(fleet.estimate_counts(t)), min_share)
    upper = eligible(fleet.counts(level))
    order = np.lexsort((np.arange(len(upper)), -upper))[:active]
    chosen = np.zeros(len(upper), dtype=bool)
    chosen[order[upper[order] > 0.0]] = True
    upper = np.where(chosen, upper, 0.0)
    below = fleet.counts(math.nextafter(level, -math.inf))
    base = np.where(chosen, np.clip(below, min_share, upper), 0.0)
    missing = global_batch_size - base.sum()
    if missing >= 0:
        room = upper - base
        before = np.cumsum(room) - room
        base += np.clip(missing - before, 0.0, room)
    else:
        spare = np.where(chosen, base - min_share, 0.0)[::-1]
        before = np.cumsum(spare) - spare
        base -= np.clip(-missing - before, 0.0, spare)[::-1]
    shares: list[int] = base.astype(np.int64).tolist()
    return shares


def predicted_step_s(shares: Sequence[int], models: Sequence[StepModel]) -> float:
    """Predicted time of the slowest worker, in seconds, when worker ``i`` gets ``shares[i]``."""
    if len(shares) != len(models) or not models:
        raise PlanError(f"shares has {len(shares)} entries but there are {len(models)} models")
    return max(model.predict_step_s(int(b)) for b, model in zip(shares, models, strict=True))


def proportional_shares(
    total: int, weights: Sequence[float], min_share: int = 1
) -> list[int]:
    """Splits ``total`` in proportion to ``weights`` by the largest-remainder method.

    Every worker gets the floor of its quota; the remaining samples go to the largest fractional
    parts, ties to the lower index. The result sums exactly to ``total``. Where that gives a
    worker fewer than ``min_share`` samples but not none, the split is instead the one that
    would finish first if each worker's time were its samples over its weight, with every
    share 0 or at least ``min(min_share, total)`` (`allocate_shares`).

    Raises:
        PlanError: If ``total`` is negative, ``weights`` is empty, a weight is negative or not
            finite, or all weights are zero while ``total`` is positive.
    """
    if total < 0:
        raise PlanError(f"total must be >= 0, got {total}")
    if not weights:
        raise PlanError("weights is empty: at least one worker is needed")
    for i, w in enumerate(weights):
        if not (math.isfinite(w) and w >= 0.0):
            raise PlanError(f"weights[{i}] must be finite and >= 0, got {w}")
    weight_sum = math.fsum(weights)
    if weight_sum <= 0.0:
        if total == 0:
            return [0] * len(weights)
        raise PlanError("weights are all zero, so no worker can take a share")
    quotas = [total * w / weight_sum for w in weights]
    shares = [math.floor(q) for q in quotas]
    missing = total - sum(shares)
    order = sorted(range(len(quotas)), key=lambda i: (shares[i] - quotas[i], i))
    for i in order[:missing]:
        shares[i] += 1
    least = min(min_share, total)
    if least > 1 and not respects_min_share(shares, least):
        models = [StepModel(0.0, weight_sum / w if w > 0.0 else 1.0) for w in weights]
        caps = [total if w > 0.0 else 0 for w in weights]
        return allocate_shares(total, models, caps, least)
    return shares


class _Fleet:
    """The workers' models and caps as arrays, with the counting passes of the bisection."""

    def __init__(
        self, models: Sequence[StepModel], caps: Sequence[int] | None, global_batch_size: int
    ) -> None:
        if not models:
            raise PlanError("models is empty: at least one worker is needed")
        self.comm_s = _field(models, "comm_s")  # c, seconds
        self.fixed_s = _field(models, "compute_fixed_s")  # α, seconds
        self.per_sample_s = _field(models, "compute_per_sample_s")  # β, seconds per sample
        _check_models(self.comm_s, self.fixed_s, self.per_sample_s)
        self.base_s: _FloatArray = self.comm_s + self.fixed_s  # c + α, seconds
        self.cap: _FloatArray = _cap_array(caps, len(models), global_batch_size)  # samples

    def estimate_counts(self, level_s: float) -> _FloatArray:
        """Samples each worker takes by ``level_s`` from the closed form, within ±1."""
        k = np.floor((level_s - self.base_s) / self.per_sample_s)
        return np.minimum(np.maximum(k, 0.0, out=k), self.cap, out=k)

    def estimate(self, level_s: float) -> float:
        return float(self.estimate_counts(level_s).sum())

    def counts(self, level_s: float) -> _FloatArray:
        """Largest ``k ≤ cap`` per worker with ``c + (α + β·k) ≤ level_s``, exactly as
        ``StepModel.predict_step_s`` evaluates it; 0 if even one sample is too slow."""
        k = np.floor((level_s - self.base_s) / self.per_sample_s)
        np.minimum(np.maximum(k, 0.0, out=k), self.cap, out=k)
        k += (k < self.cap) & (self._step_s(k + 1.0) <= level_s)
        k -= (k > 0.0) & (self._step_s(k) > level_s)
        return k

    def _step_s(self, k: _FloatArray) -> _FloatArray:
        return self.comm_s + (self.fixed_s + self.per_sample_s * k)

    def total(self, level_s: float) -> float:
        return float(self.counts(level_s).sum())

    def water_level(
        self, global_batch_size: int, total: _Counter | None = None,
        estimate: _Counter | None = None, min_share: int = 1,
    ) -> float:
        """The smallest float ``T`` at which the workers can take ``global_batch_size`` samples,
        counted by `total` (monotone in ``T``; the plain sum of `counts` by default) with the
        cheaper `estimate` of it for the first bisection."""
        total = total or self.total
        estimate = estimate or self.estimate
        inverse_sum = float(np.sum(1.0 / self.per_sample_s))
        lo = float(self.base_s.min()) + 0.5 * global_batch_size / inverse_sum
        if total(lo) >= global_batch_size:
            lo = 0.0  # no sample finishes by 0 s because β > 0
        hi = float(self.base_s.max()) + (global_batch_size + 2.0 * len(self.cap)) / inverse_sum
        if total(hi) < global_batch_size:
            hi = float(self._step_s(self.cap).max())  # every worker full
            if total(hi) < global_batch_size:
                raise PlanError(f"memory caps cannot hold the global batch {global_batch_size} "
                                f"in shares of at least {min_share}")
        # The closed-form estimate is cheaper; it may disagree with the exact count within a
        # few ulps of a breakpoint, so its bracket is checked and widened before finishing.
        lo_est, hi_est = _bisect(lo, hi, global_batch_size, estimate)
        lo_est = _widen(lo_est, lo, global_batch_size, total, below=True)
        hi_est = _widen(hi_est, hi, global_batch_size, total, below=False)
        return _bisect(lo_est, hi_est, global_batch_size, total)[1]


def _field(models: Sequence[StepModel], name: str) -> _FloatArray:
    return np.fromiter(map(attrgetter(name), models), dtype=np.float64, count=len(models))


def _check_models(comm_s: _FloatArray, fixed_s: _FloatArray, per_sample_s: _FloatArray) -> None:
    for name, values, positive in (
        ("comm_s", comm_s, False),
        ("compute_fixed_s", fixed_s, False),
        ("compute_per_sample_s", per_sample_s, True),
    ):
        bad = ~np.isfinite(values) | ((values <= 0.0) if positive else (values < 0.0))
        if bad.any():
            i = int(np.argmax(bad))
            bound = "> 0" if positive else ">= 0"
            raise PlanError(f"models[{i}].{name} must be finite and {bound}, got {values[i]}")
    coarse = per_sample_s <= _MIN_RESOLUTION * (comm_s + fixed_s)
    if coarse.any():
        i = int(np.argmax(coarse))
        raise PlanError(
            f"models[{i}].compute_per_sample_s is below {_MIN_RESOLUTION:g} of its fixed costs"
        )


def _cap_array(caps: Sequence[int] | None, n_workers: int, global_batch_size: int) -> _FloatArray:
    """Per-worker caps as floats, lowered to ``global_batch_size`` (no worker needs more)."""
    if caps is None:
        return np.full(n_workers, float(global_batch_size))
    if len(caps) != n_workers:
        raise PlanError(f"caps has {len(caps)} entries but there are {n_workers} workers")
    cap = np.asarray(caps, dtype=np.int64)
    if (cap < 0).any():
        i = int(np.argmax(cap < 0))
        raise PlanError(f"caps[{i}] must be >= 0, got {cap[i]}")
    total = int(cap.sum())
    if total < global_batch_size:
        raise PlanError(
            f"memory caps hold at most {total} samples but the global batch is {global_batch_size}"
        )
    return np.minimum(cap, global_batch_size).astype(np.float64)


def _bits(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _from_bits(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def _bisect(lo: float, hi: float, target: int, total: _Counter) -> tuple[float, float]:
    """Adjacent non-negative floats ``lo < hi`` with ``total(lo) < target <= total(hi)``,
    given a monotone ``total`` and a bracket that satisfies it."""
    lo_bits, hi_bits = _bits(lo), _bits(hi)
    while hi_bits - lo_bits > 1:
        mid_bits = (lo_bits + hi_bits) // 2
        if total(_from_bits(mid_bits)) >= target:
            hi_bits = mid_bits
        else:
            lo_bits = mid_bits
    return _from_bits(lo_bits), _from_bits(hi_bits)


def _widen(x: float, bound: float, target: int, total: _Counter, *, below: bool) -> float:
    """Moves ``x`` towards ``bound`` by doubling steps in ulps until ``total(x) < target``
    (``below``) or ``total(x) >= target``; ``bound`` itself satisfies it."""
    step = 1
    bound_bits = _bits(bound)
    while (total(x) >= target) if below else (total(x) < target):
        x_bits = _bits(x)
        x_bits = max(x_bits - step, bound_bits) if below else min(x_bits + step, bound_bits)
        x = _from_bits(x_bits)
        step *= 2
    return x
