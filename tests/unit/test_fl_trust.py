"""Trust weights: scores against the robust center, decay for attackers, slow recovery."""

from __future__ import annotations

import json

import numpy as np
import pytest

from idla.errors import ConfigError
from idla.fl.aggregate import coordinate_median
from idla.fl.trust import TrustTracker, score_updates

_GLOBAL = [np.zeros((4, 3)), np.zeros(3)]


def _honest_round(rng: np.random.Generator, count: int) -> list[list[np.ndarray]]:
    """Honest clients step roughly the same way (+1 per coordinate) with non-IID spread."""
    return [[g + 1.0 + 0.3 * rng.normal(size=g.shape) for g in _GLOBAL] for _ in range(count)]


def test_scores_flag_sign_flip_and_scaled_updates() -> None:
    rng = np.random.default_rng(0)
    updates = _honest_round(rng, 7)
    updates.append([-a for a in updates[0]])  # sign flip
    updates.append([10.0 * a for a in updates[1]])  # scaled

    scores = score_updates(updates, coordinate_median(updates), _GLOBAL)

    honest = scores[:7]
    assert all(s.cosine > 0.8 and s.normalized_distance < 3.0 for s in honest)
    assert scores[7].cosine < -0.8
    assert scores[8].normalized_distance > 3.0 and scores[8].cosine > 0.8
    assert np.median([s.normalized_distance for s in scores]) == pytest.approx(1.0)


def test_identical_updates_score_zero_distance() -> None:
    same = [[np.ones(3)] for _ in range(4)]

    scores = score_updates(same, coordinate_median(same), [np.zeros(3)])

    assert all(s.normalized_distance == 0.0 and s.cosine == pytest.approx(1.0) for s in scores)


def test_trust_decays_geometrically_for_a_consistent_attacker() -> None:
    rng = np.random.default_rng(1)
    tracker = TrustTracker(decay=0.5, recovery=0.1)
    ids = list(range(10))
    history = []

    for _ in range(6):
        updates = _honest_round(rng, 9)
        updates.append([-3.0 * a for a in updates[0]])  # client 9 attacks every round
        outliers = tracker.update(ids, score_updates(updates, coordinate_median(updates), _GLOBAL))
        assert outliers == [False] * 9 + [True]
        history.append(tracker.trust(9))

    np.testing.assert_allclose(history, [0.5**r for r in range(1, 7)])
    assert tracker.weights(ids[:9]) == [1.0] * 9
    assert tracker.outlier_rounds(9) == 6


def test_honest_client_recovers_slowly_after_a_transient_fault() -> None:
    rng = np.random.default_rng(2)
    tracker = TrustTracker(decay=0.5, recovery=0.1)
    ids = list(range(8))
    trust_of_3 = []

    for round_index in range(12):
        updates = _honest_round(rng, 8)
        if round_index in (0, 1):  # client 3 sends garbage twice (a NaN-free but huge fault)
            updates[3] = [a + 50.0 * rng.normal(size=a.shape) for a in updates[3]]
        tracker.update(ids, score_updates(updates, coordinate_median(updates), _GLOBAL))
        trust_of_3.append(tracker.trust(3))

    assert trust_of_3[1] == pytest.approx(0.25)
    # Then +0.1 per honest round: 0.35, 0.45, ... capped at 1.
    np.testing.assert_allclose(trust_of_3[2:9], [0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
    assert trust_of_3[9:] == [1.0, 1.0, 1.0]


def test_floor_and_state_round_trip_through_json() -> None:
    tracker = TrustTracker(decay=0.1, floor=0.05)
    outlier = score_updates([[np.ones(2)], [np.ones(2)], [-np.ones(2)]], [np.ones(2)])[2]
    for _ in range(3):
        tracker.update([7], [outlier])

    state = json.loads(json.dumps(tracker.state_dict()))
    restored = TrustTracker()
    restored.load_state_dict(state)

    assert tracker.trust(7) == 0.05
    assert restored.trust(7) == 0.05 and restored.outlier_rounds(7) == 3
    assert restored.trust(8) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": 1.5},
        {"recovery": -0.1},
        {"outlier_distance": 0.0},
        {"min_cosine": 2.0},
        {"floor": float("nan")},
    ],
)
def test_bad_parameters_raise_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="trust"):
        TrustTracker(**kwargs)


def test_malformed_state_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="malformed"):
        TrustTracker().load_state_dict({"trust": {"x": "y"}})
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        TrustTracker().load_state_dict({"trust": {"1": 3.0}})
