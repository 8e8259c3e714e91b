"""Colluding attacks against the properties their papers state."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from idla.fl.aggregate import coordinate_median, krum
from idla.fl.attacks import COLLUDING, Attack, attack_update, parse_attack
from idla.fl.collusion import IPM_EPSILON, alie, alie_z, collude, ipm, min_max, min_max_gamma

SHAPES = [(20, 10), (10,)]


def _round(seed: int = 0, honest: int = 7) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Global weights and non-IID-looking honest updates: a common drift plus a large
    per-client part, as in federated rounds with label skew."""
    rng = np.random.default_rng(seed)
    global_arrays = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    drift = [0.05 * rng.normal(size=s) for s in SHAPES]
    updates = [[(g + d + 0.1 * rng.normal(size=g.shape)).astype(np.float32)
                for g, d in zip(global_arrays, drift, strict=True)] for _ in range(honest)]
    return global_arrays, updates


def _flat_deltas(global_arrays: list[np.ndarray], updates: list[list[np.ndarray]]) -> np.ndarray:
    origin = np.concatenate([g.astype(np.float64).ravel() for g in global_arrays])
    return np.stack([np.concatenate([a.astype(np.float64).ravel() for a in u]) - origin
                     for u in updates])


def test_alie_z_follows_the_papers_formula() -> None:
    # n = 10, m = 3: s = ⌊6⌋ − 3 = 3 supporters, z = Φ⁻¹(7 / 10).
    assert alie_z(10, 3) == pytest.approx(NormalDist().inv_cdf(0.7))
    assert alie_z(10, 3) == pytest.approx(0.5244, abs=1e-4)
    # n = 50, m = 12: s = 26 − 12 = 14, z = Φ⁻¹(36 / 50).
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(0.72))
    assert alie_z(10, 9) == pytest.approx(NormalDist().inv_cdf(0.9))  # s held at 1
    assert alie_z(1, 0) == 0.0
    with pytest.raises(ValueError, match="num_malicious"):
        alie_z(10, 11)


def test_alie_is_mean_minus_z_std_and_lies_within_the_honest_spread() -> None:
    global_arrays, honest = _round()
    deltas = _flat_deltas(global_arrays, honest)
    mean, std = deltas.mean(axis=0), deltas.std(axis=0)
    z = alie_z(10, 3)

    crafted = alie(global_arrays, honest, num_clients=10, num_malicious=3)

    assert [a.dtype for a in crafted] == [np.float32] * 2
    delta = _flat_deltas(global_arrays, [crafted])[0]
    np.testing.assert_allclose(delta, mean - z * std, atol=1e-5)
    # Per coordinate it is no farther from the honest mean than the farthest honest update
    # (σ ≤ max |x − μ| and z < 1) and lies between the honest extremes.
    farthest = np.abs(deltas - mean).max(axis=0)
    assert np.all(np.abs(delta - mean) <= farthest + 1e-6)
    inside = (delta >= deltas.min(axis=0) - 1e-6) & (delta <= deltas.max(axis=0) + 1e-6)
    assert inside.mean() > 0.95
    # In L2 it sits closer to the honest mean than any honest update: distance-based
    # defences see the most typical client of the round.
    assert np.linalg.norm(delta - mean) < np.linalg.norm(deltas - mean, axis=1).min()


def test_alie_hides_from_krum_and_drags_the_median() -> None:
    global_arrays, honest = _round(seed=1)
    crafted = alie(global_arrays, honest, num_clients=10, num_malicious=3)
    everyone = honest + [crafted] * 3

    _, chosen = krum(everyone, num_malicious=3)
    median = _flat_deltas(global_arrays, [coordinate_median(everyone)])[0]
    honest_median = _flat_deltas(global_arrays, [coordinate_median(honest)])[0]
    target = _flat_deltas(global_arrays, [crafted])[0]

    assert chosen[0] >= len(honest)  # Krum keeps a colluder
    assert np.linalg.norm(median - target) < np.linalg.norm(honest_median - target)


def test_ipm_has_a_negative_inner_product_with_the_honest_mean() -> None:
    global_arrays, honest = _round(seed=2)
    mean = _flat_deltas(global_arrays, honest).mean(axis=0)

    crafted = ipm(global_arrays, honest)

    delta = _flat_deltas(global_arrays, [crafted])[0]
    np.testing.assert_allclose(delta, -IPM_EPSILON * mean, atol=1e-5)
    assert float(delta @ mean) == pytest.approx(-IPM_EPSILON * float(mean @ mean), rel=1e-3)
    assert float(delta @ mean) < 0
    assert float(_flat_deltas(global_arrays, [ipm(global_arrays, honest, 2.0)])[0] @ mean) < 0
    with pytest.raises(ValueError, match="epsilon"):
        ipm(global_arrays, honest, 0.0)


def test_min_max_takes_the_largest_step_that_stays_within_the_honest_diameter() -> None:
    global_arrays, honest = _round(seed=3)
    deltas = _flat_deltas(global_arrays, honest)
    mean, std = deltas.mean(axis=0), deltas.std(axis=0)
    diameter = max(np.linalg.norm(a - b) for a in deltas for b in deltas)

    gamma = min_max_gamma(deltas)
    crafted = _flat_deltas(global_arrays, [min_max(global_arrays, honest)])[0]

    def farthest(g: float) -> float:
        return float(np.linalg.norm(mean - g * std - deltas, axis=1).max())

    assert gamma > 1.0  # far beyond ALIE's z: the whole diameter is used
    assert farthest(gamma) <= diameter * (1 + 1e-9)
    assert farthest(gamma * 1.001) > diameter  # the largest such step
    np.testing.assert_allclose(crafted, mean - gamma * std, atol=1e-4)
    assert min_max_gamma(np.ones((4, 6))) == 0.0  # identical updates: nowhere to hide


def test_collude_dispatches_and_refuses_lone_attacks() -> None:
    global_arrays, honest = _round(seed=4)

    for attack, expected in (
        (Attack.ALIE, alie(global_arrays, honest, 10, 3)),
        (Attack.IPM, ipm(global_arrays, honest)),
        (Attack.MINMAX, min_max(global_arrays, honest)),
    ):
        for ours, theirs in zip(collude(attack, global_arrays, honest, 10, 3), expected,
                                strict=True):
            np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match="not a colluding attack"):
        collude(Attack.SIGNFLIP, global_arrays, honest, 10, 3)
    with pytest.raises(ValueError, match="at least one honest update"):
        alie(global_arrays, [], 10, 3)
    with pytest.raises(ValueError, match="values, expected"):
        ipm(global_arrays, [[np.zeros((2, 2)), np.zeros(10)]])


def test_colluding_attacks_are_parsed_and_leave_trained_weights_to_the_server_side() -> None:
    global_arrays, honest = _round(seed=5)
    rng = np.random.default_rng(0)

    for name in ("alie", "IPM", " minmax "):
        attack = parse_attack(name)
        assert attack in COLLUDING
        unchanged = attack_update(attack, global_arrays, honest[0], rng)
        for ours, theirs in zip(unchanged, honest[0], strict=True):
            np.testing.assert_array_equal(ours, theirs)
