"""The federated strategy: bad updates rejected with reasons, late ones dropped, robust rounds,
and configuration errors that name the field."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from idla.errors import ConfigError
from idla.fl.aggregate import (
    ServerOptState,
    centered_clipping,
    clipping_radius,
    coordinate_median,
    krum,
    server_opt_step,
    trimmed_mean,
    weighted_mean,
)
from idla.fl.strategy import (
    ClientTask,
    ClientUpdate,
    Failure,
    FedStrategy,
    StrategyConfig,
)
from idla.fl.wire import WireError, arrays_from_bytes, arrays_to_bytes, validate_update
from idla.plan.selection import ClientProfile

_GLOBAL = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]


def _fleet(count: int = 10) -> list[ClientProfile]:
    return [ClientProfile(i, 20 + 10 * i, 1000.0, 1e7) for i in range(count)]


def _honest(client: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [(g + 1.0 + 0.1 * rng.normal(size=g.shape)).astype(np.float32) for g in _GLOBAL]


def _updates(tasks: list[ClientTask], seed: int = 0) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(t.client_id, 20 + 10 * t.client_id, _honest(t.client_id, rng)) for t in tasks
    ]


def test_bad_updates_are_rejected_with_reasons_and_the_round_goes_on() -> None:
    strategy = FedStrategy(StrategyConfig(clients_per_round=9), _fleet())
    tasks = strategy.configure_round(1, _GLOBAL, 1000)
    good = _updates(tasks)
    ids = [t.client_id for t in tasks]
    unselected = next(i for i in range(10) if i not in ids)
    bad = [
        ClientUpdate(ids[0], 10, [np.zeros((2, 3), np.float32), _GLOBAL[1]]),
        ClientUpdate(ids[1], 10, [np.full((3, 2), np.nan, np.float32), _GLOBAL[1]]),
        ClientUpdate(ids[2], 10, [a.astype(np.float64) for a in _GLOBAL]),
        ClientUpdate(ids[3], 10, [_GLOBAL[0]]),
        ClientUpdate(ids[4], 0, list(_GLOBAL)),
        ClientUpdate(ids[5], 10, list(_GLOBAL), finish_s=float("nan")),
        ClientUpdate(ids[6], 10, list(_GLOBAL)),  # ids[6] also sends its good update
        ClientUpdate(12345, 10, list(_GLOBAL)),
        ClientUpdate(unselected, 10, list(_GLOBAL)),
    ]

    result = strategy.aggregate_round(1, _GLOBAL, [*bad, *good[6:8]], [Failure(ids[8], "gone")])

    reasons = result.rejected
    assert "shape (2, 3)" in reasons[ids[0]]
    assert "non-finite" in reasons[ids[1]]
    assert "dtype float64" in reasons[ids[2]]
    assert "expected 2 arrays, got 1" in reasons[ids[3]]
    assert "num_samples" in reasons[ids[4]]
    assert "finish_s" in reasons[ids[5]]
    assert "sent 2 updates" in reasons[ids[6]]
    assert reasons[12345] == "unknown client id 12345"
    assert "not selected" in reasons[unselected]
    assert result.accepted == [ids[7]]
    assert result.failed == {ids[8]: "gone"}
    for ours, theirs in zip(result.arrays, good[7].arrays, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
        assert ours.dtype == np.float32
    totals = strategy.report()["totals"]
    assert totals["rejected"] == 8 and totals["accepted"] == 1 and totals["failed"] == 1


def test_fedavg_weights_by_samples() -> None:
    strategy = FedStrategy(StrategyConfig(clients_per_round=5), _fleet())
    updates = _updates(strategy.configure_round(1, _GLOBAL, 1000), seed=9)

    result = strategy.aggregate_round(1, _GLOBAL, updates, [])

    expected = weighted_mean([u.arrays for u in updates], [u.num_samples for u in updates])
    for ours, theirs in zip(result.arrays, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_a_round_with_only_bad_updates_keeps_the_global_model() -> None:
    strategy = FedStrategy(StrategyConfig(clients_per_round=3), _fleet())
    tasks = strategy.configure_round(4, _GLOBAL, 1000)
    nan = [np.full(g.shape, np.inf, np.float32) for g in _GLOBAL]

    result = strategy.aggregate_round(
        4, _GLOBAL, [ClientUpdate(t.client_id, 5, nan) for t in tasks], []
    )
    stale = strategy.aggregate_round(3, _GLOBAL, _updates(tasks), [])  # wrong round

    assert result.accepted == [] and len(result.rejected) == 3
    for ours, glob in zip(result.arrays, _GLOBAL, strict=True):
        np.testing.assert_array_equal(ours, glob)
    assert all("not selected for round 3" in r for r in stale.rejected.values())
    report = json.loads(json.dumps(strategy.report()))
    assert report["totals"]["rejected"] == 6


def test_late_updates_are_dropped_and_the_round_lasts_until_the_deadline() -> None:
    config = StrategyConfig(clients_per_round=4, deadline_s=2.0)
    strategy = FedStrategy(config, _fleet())
    tasks = strategy.configure_round(1, _GLOBAL, 1000)
    updates = _updates(tasks)
    timed = [
        ClientUpdate(u.client_id, u.num_samples, u.arrays, finish_s=5.0 if k == 0 else 1.0 + k / 10)
        for k, u in enumerate(updates)
    ]

    result = strategy.aggregate_round(1, _GLOBAL, timed, [])

    assert result.late == [tasks[0].client_id]
    assert tasks[0].client_id not in result.accepted and len(result.accepted) == 3
    assert result.round_s == 2.0
    on_time = FedStrategy(config, _fleet())
    on_time_tasks = on_time.configure_round(1, _GLOBAL, 1000)
    early = [
        ClientUpdate(u.client_id, u.num_samples, u.arrays, 0.5 + k)
        for k, u in enumerate(_updates(on_time_tasks))
    ]
    assert on_time.aggregate_round(1, _GLOBAL, early[:2], []).round_s == 1.5


@pytest.mark.parametrize("aggregator", ["median", "trimmed", "krum", "multikrum", "cclip"])
def test_robust_aggregators_match_the_pure_functions(aggregator: str) -> None:
    config = StrategyConfig(aggregator=aggregator, clients_per_round=8, num_malicious=2)
    strategy = FedStrategy(config, _fleet())
    updates = _updates(strategy.configure_round(1, _GLOBAL, 1000), seed=3)
    arrays = [u.arrays for u in updates]
    samples = [u.num_samples for u in updates]
    expected = {
        "median": lambda: coordinate_median(arrays),
        "trimmed": lambda: trimmed_mean(arrays, 0.2),
        "krum": lambda: krum(arrays, 2)[0],
        "multikrum": lambda: krum(arrays, 2, 6, samples)[0],
        "cclip": lambda: centered_clipping(
            arrays, coordinate_median(arrays),
            clipping_radius(arrays, coordinate_median(arrays)), 3),
    }[aggregator]()

    result = strategy.aggregate_round(1, _GLOBAL, updates, [])

    for ours, theirs in zip(result.arrays, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_trust_aggregator_resists_a_sign_flip_attack_and_reports_trust() -> None:
    config = StrategyConfig(aggregator="trust", clients_per_round=10)
    strategy = FedStrategy(config, _fleet())
    attackers = {2, 7}
    for round_index in range(1, 4):
        tasks = strategy.configure_round(round_index, _GLOBAL, 1000)
        updates = _updates(tasks, seed=round_index)
        updates = [
            ClientUpdate(u.client_id, u.num_samples, [-5.0 * a for a in u.arrays])
            if u.client_id in attackers
            else u
            for u in updates
        ]
        result = strategy.aggregate_round(round_index, _GLOBAL, updates, [])
        assert sorted(result.outliers) == sorted(attackers)
        assert all(abs(float(a.mean()) - 1.0) < 0.1 for a in result.arrays)

    report = json.loads(json.dumps(strategy.report()))
    assert report["trust"]["2"] == pytest.approx(0.125) and report["trust"]["7"] == pytest.approx(
        0.125
    )
    assert report["trust"]["0"] == 1.0
    assert report["participation"]["2"]["outlier"] == 3


def test_trustclip_clips_the_updates_that_are_not_outliers_weighted_by_trust() -> None:
    strategy = FedStrategy(StrategyConfig(aggregator="trustclip", clients_per_round=10), _fleet())
    tasks = strategy.configure_round(1, _GLOBAL, 1000)
    attackers = {1, 4, 8}
    updates = [
        ClientUpdate(u.client_id, u.num_samples, [-5.0 * a for a in u.arrays])
        if u.client_id in attackers
        else u
        for u in _updates(tasks, seed=5)
    ]
    everyone = [u.arrays for u in updates]
    honest = [u.arrays for u in updates if u.client_id not in attackers]
    center = coordinate_median(everyone)
    expected = centered_clipping(honest, center, clipping_radius(honest, center), 3)

    result = strategy.aggregate_round(1, _GLOBAL, updates, [])

    assert sorted(result.outliers) == sorted(attackers)
    for ours, theirs in zip(result.arrays, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert all(abs(float(a.mean()) - 1.0) < 0.1 for a in result.arrays)


def test_fedavg_is_poisoned_by_the_same_attack() -> None:
    strategy = FedStrategy(StrategyConfig(clients_per_round=10), _fleet())
    tasks = strategy.configure_round(1, _GLOBAL, 1000)
    updates = [
        ClientUpdate(u.client_id, u.num_samples, [-5.0 * a for a in u.arrays])
        if u.client_id in (8, 9)
        else u
        for u in _updates(tasks)
    ]

    result = strategy.aggregate_round(1, _GLOBAL, updates, [])

    assert float(result.arrays[1].mean()) < 0.0


def test_fedadam_server_step_through_the_strategy() -> None:
    config = StrategyConfig(server_optimizer="adam", clients_per_round=5)
    strategy = FedStrategy(config, _fleet())
    updates = _updates(strategy.configure_round(1, _GLOBAL, 1000))

    result = strategy.aggregate_round(1, _GLOBAL, updates, [])

    mean = weighted_mean([u.arrays for u in updates], [u.num_samples for u in updates])
    delta = [m.astype(np.float64) - g for m, g in zip(mean, _GLOBAL, strict=True)]
    expected, _ = server_opt_step(_GLOBAL, delta, ServerOptState(), "adam", 0.1, 0.9, 0.99, 1e-3)
    for ours, theirs in zip(result.arrays, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_deadline_selection_sends_weight_scales_and_partial_work() -> None:
    fleet = [ClientProfile(i, 100, 10.0 if i < 3 else 1000.0, 1e7) for i in range(12)]
    config = StrategyConfig(selection="deadline", deadline_s=1.0, clients_per_round=4, seed=1)
    strategy = FedStrategy(config, fleet)
    seen_slow = []

    for round_index in range(60):
        tasks = strategy.configure_round(round_index, _GLOBAL, 1000)
        assert len(tasks) == 4
        for task in tasks:
            if task.client_id < 3:
                seen_slow.append(task)
            else:
                assert task.work_fraction == 1.0
        strategy.aggregate_round(round_index, _GLOBAL, [], [])

    assert seen_slow and all(t.work_fraction < 0.11 and t.weight_scale > 1.0 for t in seen_slow)
    assert strategy.report()["selection"]["never_selected"] == 0


def test_wire_round_trip_and_garbage() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(3, 2).T, np.array(3, np.int64)]

    back = arrays_from_bytes(arrays_to_bytes(arrays))

    assert [a.dtype for a in back] == [np.float32, np.int64]
    np.testing.assert_array_equal(back[0], arrays[0])  # a transposed view goes out contiguous
    assert validate_update(back, arrays) is None
    with pytest.raises(WireError, match="safetensors"):
        arrays_from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(WireError, match="limit"):
        arrays_from_bytes(arrays_to_bytes(arrays), max_bytes=10)
    with pytest.raises(WireError, match="keys"):
        arrays_from_bytes(save({"0": np.zeros(1), "weights": np.zeros(2)}))
    with pytest.raises(WireError, match="dtype object"):
        arrays_to_bytes([np.array([{}], dtype=object)])
    assert "expected a numpy array" in str(validate_update([[1.0]], [np.zeros(1)]))


@pytest.mark.parametrize(
    "kwargs,field_name",
    [
        ({"trim_fraction": 0.7}, "trim_fraction"),
        ({"trim_fraction": -0.1}, "trim_fraction"),
        ({"late_weight": 0.0}, "late_weight"),
        ({"trust_decay": 1.5}, "trust_decay"),
        ({"trust_floor": -0.2}, "trust_floor"),
        ({"server_beta1": 1.0}, "server_beta1"),
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"clients_per_round": 2.5}, "clients_per_round"),
        ({"aggregator": "fedsum"}, "aggregator"),
        ({"server_optimizer": "sgd"}, "server_optimizer"),
        ({"selection": "deadline"}, "deadline_s"),
        ({"deadline_s": float("nan")}, "deadline_s"),
        ({"seed": True}, "seed"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ConfigError, match=field_name):
        StrategyConfig(**kwargs)


def test_bad_profiles_and_duplicate_ids_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="availability"):
        FedStrategy(StrategyConfig(), [ClientProfile(0, 10, 1.0, 1.0, availability=1.5)])
    with pytest.raises(ConfigError, match="twice"):
        FedStrategy(StrategyConfig(), [ClientProfile(0, 10, 1.0, 1.0)] * 2)


_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "fedavg",
            "median",
            "trimmed",
            "krum",
            "multikrum",
            "trust",
            "adam",
            "yogi",
            "none",
            "uniform",
            "deadline",
        ]
    ),
    st.lists(st.integers(), max_size=2),
)
_FIELDS = [f.name for f in fields(StrategyConfig)]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _ANY, max_size=6))
def test_any_config_input_gives_a_config_or_a_config_error(kwargs: dict[str, Any]) -> None:
    try:
        config = StrategyConfig(**kwargs)
    except ConfigError as exc:
        assert any(name in str(exc) for name in _FIELDS)
        return
    assert isinstance(config.server_lr, float) and config.server_lr > 0
    FedStrategy(config, _fleet(3)).configure_round(0, _GLOBAL, 100)
