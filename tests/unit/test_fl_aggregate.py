"""Aggregation math: hand-computed cases and equality with Flower's own functions."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedYogi
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from idla.fl.aggregate import (
    ServerOptState,
    centered_clipping,
    clipping_radius,
    coordinate_median,
    krum,
    krum_scores,
    server_opt_step,
    trimmed_mean,
    weighted_mean,
)


def _clients(seed: int, count: int, dtype: type = np.float32) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (4,), (2, 2, 3), ()]
    return [[rng.normal(size=s).astype(dtype) for s in shapes] for _ in range(count)]


def _close(ours: list[np.ndarray], theirs: list[np.ndarray], atol: float = 1e-6) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == np.shape(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_weighted_mean_hand_case_keeps_dtype() -> None:
    updates = [[np.array([1.0, 2.0], np.float32)], [np.array([3.0, 6.0], np.float32)]]

    result = weighted_mean(updates, [1, 3])

    np.testing.assert_array_equal(result[0], [2.5, 5.0])
    assert result[0].dtype == np.float32


def test_median_and_trimmed_mean_hand_cases() -> None:
    odd = [[np.array([v, -v])] for v in (1.0, 5.0, 2.0)]
    even = [[np.array([v])] for v in (1.0, 4.0, 2.0, 10.0)]
    spread = [[np.array([v])] for v in (1.0, 2.0, 3.0, 4.0, 100.0)]

    np.testing.assert_array_equal(coordinate_median(odd)[0], [2.0, -2.0])
    np.testing.assert_array_equal(coordinate_median(even)[0], [3.0])
    np.testing.assert_array_equal(trimmed_mean(spread, 0.2)[0], [3.0])  # cuts 1 and 100
    np.testing.assert_array_equal(trimmed_mean(spread, 0.0)[0], [22.0])


def test_krum_picks_the_cluster_not_the_outlier() -> None:
    cluster = [[np.array([0.0, 0.0])], [np.array([0.1, 0.0])], [np.array([0.0, 0.2])]]
    outlier = [[np.array([0.05, 0.05])], [np.array([50.0, -50.0])]]
    updates = cluster + outlier

    single, chosen = krum(updates, num_malicious=1)
    scores = krum_scores(updates, num_malicious=1)
    multi, chosen_multi = krum(updates, num_malicious=1, num_selected=4)

    # K − f − 2 = 2 nearest: client 3 at (0.05, 0.05) is closest to the others.
    assert chosen == [3]
    np.testing.assert_array_equal(single[0], [0.05, 0.05])
    assert scores[4] > 1000 * scores[:4].max()
    assert 4 not in chosen_multi
    np.testing.assert_allclose(multi[0], [0.0375, 0.0625])


@pytest.mark.parametrize("seed,count", [(0, 5), (1, 10), (2, 11), (3, 20)])
def test_equal_to_flower_functions(seed: int, count: int) -> None:
    updates = _clients(seed, count)
    samples = [int(n) for n in np.random.default_rng(seed + 100).integers(1, 500, size=count)]
    results = [(u, n) for u, n in zip(updates, samples, strict=True)]

    _close(weighted_mean(updates, samples), aggregate(results))
    _close(coordinate_median(updates), aggregate_median(results))
    for fraction in (0.0, 0.1, 0.2, 0.3, 0.45):
        _close(trimmed_mean(updates, fraction), aggregate_trimmed_avg(results, fraction))
    for malicious in (0, 1, (count - 3) // 2):
        _close(krum(updates, malicious)[0], aggregate_krum(results, malicious, 0))
        keep = max(1, count - malicious)
        ours, _ = krum(updates, malicious, keep, weights=samples)
        _close(ours, aggregate_krum(results, malicious, keep))


def _fit_res(arrays: list[np.ndarray], num_examples: int) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {})


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_server_optimizer_equals_flower_strategy(kind: str) -> None:
    initial = _clients(7, 1, np.float64)[0]
    lr, beta1, beta2, tau = 0.05, 0.8, 0.95, 1e-3
    flower_class = FedAdam if kind == "adam" else FedYogi
    flower = flower_class(
        initial_parameters=ndarrays_to_parameters(initial),
        eta=lr,
        beta_1=beta1,
        beta_2=beta2,
        tau=tau,
        fit_metrics_aggregation_fn=lambda metrics: {},
    )
    params = [a.copy() for a in initial]
    state = ServerOptState()

    for server_round in range(1, 5):
        clients = _clients(10 + server_round, 6, np.float64)
        samples = [10 * (i + 1) for i in range(6)]
        results = [(None, _fit_res(c, n)) for c, n in zip(clients, samples, strict=True)]
        flower_params, _ = flower.aggregate_fit(server_round, results, [])  # type: ignore[arg-type]
        mean = weighted_mean(clients, samples)
        delta = [m - p for m, p in zip(mean, params, strict=True)]
        params, state = server_opt_step(params, delta, state, kind, lr, beta1, beta2, tau)  # type: ignore[arg-type]

        assert flower_params is not None
        _close(params, parameters_to_ndarrays(flower_params))
    assert state.step == 4


def test_yogi_first_step_by_hand() -> None:
    params = [np.array([1.0, -2.0])]
    delta = [np.array([0.5, -0.25])]

    new, state = server_opt_step(params, delta, ServerOptState(), "yogi", 0.1, 0.9, 0.99, 1e-3)

    # v = 0.01 d², m = 0.1 d → x + 0.1 · 0.1 d / (0.1 |d| + τ)
    d = delta[0]
    expected = params[0] + 0.1 * 0.1 * d / (0.1 * np.abs(d) + 1e-3)
    np.testing.assert_allclose(new[0], expected, rtol=1e-12)
    np.testing.assert_allclose(state.second_moment[0], 0.01 * d * d, rtol=1e-12)


def test_bad_inputs_raise_value_errors() -> None:
    one = [[np.zeros(2)]]
    with pytest.raises(ValueError, match="at least one"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="weights"):
        weighted_mean(one, [-1.0])
    with pytest.raises(ValueError, match="arrays"):
        coordinate_median([[np.zeros(2)], [np.zeros(2), np.zeros(1)]])
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(one, 0.5)
    with pytest.raises(ValueError, match="num_selected"):
        krum(one, 0, num_selected=2)
    with pytest.raises(ValueError, match="kind"):
        server_opt_step([np.zeros(1)], [np.zeros(1)], ServerOptState(), "sgd", 0.1)  # type: ignore[arg-type]


def test_integer_layers_keep_their_dtype() -> None:
    updates = [[np.array([1.0], np.float32), np.array([c], np.int64)] for c in (3, 4, 4, 9)]

    for result in (
        weighted_mean(updates, [1, 1, 1, 1]),
        coordinate_median(updates),
        trimmed_mean(updates, 0.25),
    ):
        assert [a.dtype for a in result] == [np.float32, np.int64]
    assert weighted_mean(updates, [1, 1, 1, 1])[1][0] == 5  # 20 / 4
    assert coordinate_median(updates)[1][0] == 4


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def test_centered_clipping_matches_a_per_client_reference_loop() -> None:
    clients = _clients(seed=11, count=6, dtype=np.float64)
    center = coordinate_median(clients)
    radius = 0.5 * clipping_radius(clients, center)  # small enough that most are clipped
    value = _flat(center)
    for _ in range(3):
        step = np.zeros_like(value)
        for client in clients:
            offset = _flat(client) - value
            step += offset * min(1.0, radius / float(np.linalg.norm(offset)))
        value = value + step / len(clients)

    ours = centered_clipping(clients, center, radius, iterations=3)

    np.testing.assert_allclose(_flat(ours), value, rtol=0, atol=1e-12)
    assert [a.shape for a in ours] == [np.shape(a) for a in clients[0]]


def test_centered_clipping_is_the_mean_with_a_large_radius_and_the_center_with_none() -> None:
    clients = _clients(seed=12, count=5)
    center = coordinate_median(clients)

    _close(centered_clipping(clients, center, 1e9, iterations=1),
           weighted_mean(clients, [1.0] * 5), atol=1e-6)
    _close(centered_clipping(clients, center, 0.0), center, atol=0)
    with pytest.raises(ValueError, match="radius"):
        centered_clipping(clients, center, float("nan"))
    with pytest.raises(ValueError, match="iterations"):
        centered_clipping(clients, center, 1.0, iterations=0)


def test_weighted_centered_clipping_is_the_weighted_mean_unclipped() -> None:
    clients = _clients(seed=15, count=4)
    center = coordinate_median(clients)
    weights = [3.0, 1.0, 0.0, 2.0]

    _close(centered_clipping(clients, center, 1e9, iterations=1, weights=weights),
           weighted_mean(clients, weights), atol=1e-6)
    _close(centered_clipping(clients, center, 0.7, weights=[2.0] * 4),
           centered_clipping(clients, center, 0.7), atol=1e-7)
    with pytest.raises(ValueError, match="weights"):
        centered_clipping(clients, center, 1.0, weights=[1.0, -1.0, 1.0, 1.0])


def test_far_attackers_move_centered_clipping_at_most_their_clipped_share() -> None:
    rng = np.random.default_rng(13)
    honest = [[rng.normal(size=(8, 4))] for _ in range(7)]
    attackers = [[1e6 * rng.normal(size=(8, 4))] for _ in range(3)]
    everyone = honest + attackers
    center = coordinate_median(everyone)
    radius = clipping_radius(everyone, center)
    iterations = 3

    result = _flat(centered_clipping(everyone, center, radius, iterations))

    honest_mean = _flat(weighted_mean(honest, [1.0] * 7))
    honest_distances = [np.linalg.norm(_flat(h) - _flat(center)) for h in honest]
    assert radius <= max(honest_distances)  # the attackers cannot inflate the radius
    assert np.linalg.norm(result - _flat(center)) <= iterations * radius + 1e-9
    # Each attacker pulls by at most radius / K per iteration; the plain mean moves by ~3e5.
    assert np.linalg.norm(result - honest_mean) < iterations * 3 * radius / 10 + radius
    assert np.linalg.norm(_flat(weighted_mean(everyone, [1.0] * 10)) - honest_mean) > 1e4


def test_clipping_radius_is_the_median_distance_and_scales_with_the_updates() -> None:
    clients = _clients(seed=14, count=5, dtype=np.float64)
    center = coordinate_median(clients)
    distances = [np.linalg.norm(_flat(c) - _flat(center)) for c in clients]

    assert clipping_radius(clients, center) == pytest.approx(float(np.median(distances)))
    scaled = [[3.0 * a for a in c] for c in clients]
    assert clipping_radius(scaled, [3.0 * a for a in center]) == pytest.approx(
        3.0 * clipping_radius(clients, center))
