"""Delay compensation, staleness statistics and the SSP rule, as pure functions."""

from __future__ import annotations

import random

import pytest
import torch

from idla.errors import ConfigError
from idla.sync.delay_comp import (
    StalenessSummary,
    dc_asgd,
    ssp_may_start,
    ssp_staleness_bound,
    staleness_histogram,
    staleness_summary,
)


def test_dc_asgd_matches_a_hand_computation() -> None:
    # Prepare: g⊙g = [1, 4, 0.25], w_now − w_stale = [0.5, −1, 0], λ = 0.5
    grad = torch.tensor([1.0, -2.0, 0.5])
    w_now = torch.tensor([1.0, 1.0, 1.0])
    w_stale = torch.tensor([0.5, 2.0, 1.0])

    # Execute
    compensated = dc_asgd(grad, w_now, w_stale, 0.5)

    # Assert: g + λ·g⊙g⊙Δw = [1 + 0.25, −2 − 2, 0.5 + 0]
    assert torch.equal(compensated, torch.tensor([1.25, -4.0, 0.5]))


def test_dc_asgd_without_lambda_is_the_plain_gradient() -> None:
    grad = torch.randn(5)
    assert torch.equal(dc_asgd(grad, torch.randn(5), torch.randn(5), 0.0), grad)


@pytest.mark.parametrize("lam", [-0.5, float("nan"), float("inf")])
def test_dc_asgd_refuses_a_bad_lambda(lam: float) -> None:
    zeros = torch.zeros(2)
    with pytest.raises(ConfigError, match="delay_compensation"):
        dc_asgd(zeros, zeros, zeros, lam)


def test_dc_asgd_refuses_mismatched_shapes() -> None:
    with pytest.raises(ConfigError, match="shapes differ"):
        dc_asgd(torch.zeros(2), torch.zeros(2), torch.zeros(3), 0.1)


def test_histogram_and_summary() -> None:
    values = [0, 1, 1, 2, 5, 3, 1, 0, 2, 4]  # sorted: 0 0 1 1 1 2 2 3 4 5

    assert staleness_histogram(values) == {0: 2, 1: 3, 2: 2, 3: 1, 4: 1, 5: 1}
    assert staleness_summary(values) == StalenessSummary(count=10, max=5, mean=1.9, p50=1, p90=4)
    assert staleness_summary([]) == StalenessSummary(count=0, max=0, mean=0.0, p50=0, p90=0)


def test_ssp_rule() -> None:
    assert ssp_may_start(3, [1, 3, 4], 2)
    assert not ssp_may_start(4, [1, 3, 4], 2)
    assert ssp_may_start(7, [], 0)  # no live worker to wait for
    assert ssp_staleness_bound(3, 2) == 10
    assert ssp_staleness_bound(1, 5) == 0
    with pytest.raises(ConfigError):
        ssp_staleness_bound(3, -1)


def simulate_ssp(workers: int, bound: int, pushes: int, rng: random.Random) -> list[int]:
    """The server's SSP protocol under a random schedule: one worker at a time finishes its
    step (computing workers picked at random, with random per-worker speeds); returns the
    staleness of every push."""
    clocks = [0] * workers
    base: list[int | None] = [0] * workers  # version each computing worker read; None: held
    speeds = [rng.random() ** 3 + 1e-3 for _ in range(workers)]
    version, staleness = 0, []
    while version < pushes:
        computing = [w for w in range(workers) if base[w] is not None]
        w = rng.choices(computing, weights=[speeds[c] for c in computing])[0]
        staleness.append(version - (base[w] or 0))
        version += 1
        clocks[w] += 1
        base[w] = None
        for held in sorted((h for h in range(workers) if base[h] is None), key=clocks.__getitem__):
            if ssp_may_start(clocks[held], clocks, bound):
                base[held] = version
    return staleness


@pytest.mark.parametrize(("workers", "bound"), [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (4, 1)])
def test_ssp_staleness_never_exceeds_the_bound_and_reaches_it(workers: int, bound: int) -> None:
    rng = random.Random(workers * 10 + bound)
    worst = max(max(simulate_ssp(workers, bound, 200, rng)) for _ in range(300))
    assert worst == ssp_staleness_bound(workers, bound)
