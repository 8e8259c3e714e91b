"""The agent's planner in a closed loop under the timing noise of throttled CPUs."""

from __future__ import annotations

import random

import pytest

from idla.plan.planner import PlannerConfig, SharePlanner

GLOBAL_BATCH = 512
STEADY_FROM, SLOWDOWN_AT, STEPS = 20, 120, 150


def simulate(
    seed: int, noise: float, per_sample_s: list[float]
) -> tuple[SharePlanner, list[float]]:
    """True step time c + α + β·b per worker; measured compute carries ±noise uniform error.
    Returns the planner and the true spread (max−min)/max of the shares in force, per step."""
    rng = random.Random(seed)
    betas = list(per_sample_s)
    fixed_s, comm_s = 2e-3, 5e-3
    planner = SharePlanner(len(betas))
    shares = [GLOBAL_BATCH // len(betas)] * len(betas)
    spreads = []
    for step in range(STEPS):
        if step == SLOWDOWN_AT:
            betas[0] *= 2.0
        true_s = [comm_s + fixed_s + beta * b for beta, b in zip(betas, shares, strict=True)]
        spreads.append((max(true_s) - min(true_s)) / max(true_s))
        for rank, (beta, b) in enumerate(zip(betas, shares, strict=True)):
            measured = (fixed_s + beta * b) * (1.0 + rng.uniform(-noise, noise))
            planner.observe(rank, b, measured, comm_s)
        new = planner.decide(step, shares, GLOBAL_BATCH)
        if new is not None:
            shares = new
    return planner, spreads


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("noise", [0.10, 0.15])
def test_heterogeneous_workers_calm_then_quick_after_a_slowdown(seed: int, noise: float) -> None:
    planner, spreads = simulate(seed, noise, [0.15e-3, 0.15e-3, 0.3e-3, 0.6e-3])

    steady = [s for s in planner.controller.changes if STEADY_FROM <= s < SLOWDOWN_AT]
    assert len(steady) <= 2
    assert spreads[SLOWDOWN_AT] > 0.3
    assert min(spreads[SLOWDOWN_AT : SLOWDOWN_AT + 10]) < 0.10


@pytest.mark.parametrize("seed", range(5))
def test_heterogeneous_workers_under_30_percent_noise(seed: int) -> None:
    planner, spreads = simulate(seed, 0.30, [0.15e-3, 0.15e-3, 0.3e-3, 0.6e-3])

    steady = [s for s in planner.controller.changes if STEADY_FROM <= s < SLOWDOWN_AT]
    assert len(steady) <= 2
    # ±30 % timings cannot pin a new speed down to 10 % in a few steps (a statistical floor,
    # not a tuning choice): the spread is under 20 % within 30 steps
    assert min(spreads[SLOWDOWN_AT : SLOWDOWN_AT + 30]) < 0.20


@pytest.mark.parametrize("seed", range(5))
def test_equal_workers_keep_equal_shares_under_noise(seed: int) -> None:
    planner, _ = simulate(seed, 0.30, [0.15e-3] * 4)

    assert len([s for s in planner.controller.changes if s < SLOWDOWN_AT]) <= 2


def test_noise_gain_grows_with_noise_and_is_capped() -> None:
    quiet, _ = simulate(0, 0.01, [0.15e-3] * 4)
    noisy, _ = simulate(0, 0.30, [0.15e-3] * 4)

    assert quiet.noise_gain() < noisy.noise_gain() <= PlannerConfig().max_noise_gain
