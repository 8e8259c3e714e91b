"""Staleness math for asynchronous training: delay compensation, the SSP rule and its bound.

A gradient is *stale* by s when s other updates reached the parameters between the moment its
worker read them and the moment it was applied. DC-ASGD (Zheng et al., "Asynchronous
Stochastic Gradient Descent with Delay Compensation", ICML 2017) corrects a stale gradient with
a first-order Taylor term whose Hessian is approximated by λ·g⊙g. Stale Synchronous Parallel
(Ho et al., "More Effective Distributed ML via a Stale Synchronous Parallel Parameter Server",
NIPS 2013) bounds the staleness by never letting a worker's clock run more than S ahead of the
slowest live worker's.

Everything here is a pure function: the parameter server calls them, tests hit them directly.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from idla.errors import ConfigError


def dc_asgd(
    grad: torch.Tensor,  # (n,) the worker's gradient, taken at w_stale
    w_now: torch.Tensor,  # (n,) the parameters it is applied to
    w_stale: torch.Tensor,  # (n,) the parameters the worker read
    lam: float,
) -> torch.Tensor:
    """DC-ASGD's compensated gradient g + λ·g⊙g⊙(w_now − w_stale) (Zheng et al. 2017).

    λ = 0 returns `grad` unchanged (plain ASGD). Cost: four elementwise passes over n values and
    one temporary of n values; the caller keeps one copy of w_stale per worker.
    """
    if not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"async.delay_compensation must be a finite number >= 0, got {lam}")
    if not grad.shape == w_now.shape == w_stale.shape:
        raise ConfigError(
            f"dc_asgd: shapes differ: grad {tuple(grad.shape)}, w_now {tuple(w_now.shape)}, "
            f"w_stale {tuple(w_stale.shape)}"
        )
    if lam == 0:
        return grad
    return grad + lam * grad * grad * (w_now - w_stale)


def ssp_may_start(clock: int, live_clocks: Iterable[int], staleness_bound: int) -> bool:
    """SSP's admission rule (Ho et al. 2013): a worker whose clock (pushes done) is `clock` may
    start its next step only if clock <= min(live clocks) + S. With no live clock to compare
    against, it may. Cost: one pass over the live clocks."""
    slowest = min(live_clocks, default=clock)
    return clock <= slowest + staleness_bound


def ssp_staleness_bound(workers: int, staleness_bound: int) -> int:
    """The largest staleness the SSP rule allows with `workers` workers and bound S.

    Proof sketch: worker i starts its step with clock k <= m + S, where m is the slowest live
    clock then, so every live j has clock >= m >= k − S. While i computes, its clock stays k, so
    the live minimum stays <= k and j may start only steps with clock <= k + S: j's clock ends
    <= k + S + 1. Hence j pushes at most (k + S + 1) − (k − S) = 2S + 1 times meanwhile, and the
    staleness of i's gradient (pushes applied by others in between) is <= (N − 1)(2S + 1).
    The bound is reached when i was S ahead and every other worker sprints while i computes.
    """
    if workers < 1 or staleness_bound < 0:
        raise ConfigError(f"need workers >= 1 and S >= 0, got {workers} and {staleness_bound}")
    return (workers - 1) * (2 * staleness_bound + 1)


def staleness_histogram(values: Sequence[int]) -> dict[int, int]:
    """How many gradients had each staleness, in increasing staleness order."""
    counts = Counter(int(v) for v in values)
    return {s: counts[s] for s in sorted(counts)}


@dataclass(frozen=True, slots=True)
class StalenessSummary:
    """Summary of the staleness of applied gradients (all 0 when there were none)."""

    count: int
    """Gradients applied."""
    max: int
    """Largest staleness, in updates."""
    mean: float
    """Mean staleness, in updates."""
    p50: int
    """Median (nearest-rank), in updates."""
    p90: int
    """90th percentile (nearest-rank), in updates."""


def _nearest_rank(ordered: Sequence[int], fraction: float) -> int:
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def staleness_summary(values: Sequence[int]) -> StalenessSummary:
    """Count, max, mean and nearest-rank p50/p90 of `values`. Cost: one sort."""
    if not values:
        return StalenessSummary(count=0, max=0, mean=0.0, p50=0, p90=0)
    ordered = sorted(int(v) for v in values)
    return StalenessSummary(
        count=len(ordered),
        max=ordered[-1],
        mean=sum(ordered) / len(ordered),
        p50=_nearest_rank(ordered, 0.5),
        p90=_nearest_rank(ordered, 0.9),
    )
