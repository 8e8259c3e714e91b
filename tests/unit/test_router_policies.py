"""Routing policies as pure decisions, and the delay prediction behind idla's."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from idla.errors import ConfigError
from idla.serve.batcher import BatchPolicy, ServiceCurve
from idla.serve.metrics import percentile
from idla.serve.policies import (
    LeastOutstanding,
    LoadView,
    PowerOfTwo,
    RoundRobin,
    ShortestExpectedDelay,
    make_policy,
    predict_completion_s,
)


def _curve(alpha_s: float, beta_s: float) -> ServiceCurve:
    return ServiceCurve.from_points([[b, alpha_s + beta_s * b] for b in (1, 2, 4, 8, 16)])


def _view(index: int, curve: ServiceCurve, *, queued: int = 0, inflight: int = 0,
          remaining_s: float = 0.0, oldest_s: float = 0.0, max_batch: int = 8,
          wait_s: float = 0.001, slowdown: float = 1.0, link_s: float = 0.0) -> LoadView:
    return LoadView(index, queued, queued, inflight, min(inflight, 1), remaining_s, oldest_s,
                    curve, BatchPolicy(max_batch, wait_s), slowdown, link_s)


def test_predicted_delay_by_hand() -> None:
    curve = _curve(0.002, 0.001)  # s(b) = 2 ms + 1 ms × b
    # idle and empty: the batching wait, then a batch of one row
    assert predict_completion_s(_view(0, curve), 1) == pytest.approx(0.001 + 0.003)
    # idle, the oldest of 2 queued rows has waited 0.4 ms: 0.6 ms more, then 3 rows
    view = _view(0, curve, queued=2, oldest_s=0.0004)
    assert predict_completion_s(view, 1) == pytest.approx(0.0006 + 0.005)
    # busy 2 ms more, 10 rows queued + 1 new = a batch of 8 and one of 3; no wait
    busy = _view(0, curve, queued=10, inflight=4, remaining_s=0.002)
    assert predict_completion_s(busy, 1) == pytest.approx(0.002 + 0.010 + 0.005)
    slowed = _view(0, curve, queued=10, inflight=4, remaining_s=0.002, slowdown=2.0,
                   link_s=0.001)
    assert predict_completion_s(slowed, 1) == pytest.approx(0.002 + 2 * 0.015 + 2 * 0.001)


def test_idla_weighs_queue_against_speed() -> None:
    fast, slow = _curve(0.001, 0.001), _curve(0.008, 0.008)  # slow: 8x the cost
    policy = ShortestExpectedDelay()
    short_queue = [_view(0, fast, queued=3, inflight=2, remaining_s=0.003), _view(1, slow)]
    assert policy.choose(short_queue, 1) == 0  # a queue on the fast worker still wins
    long_queue = [_view(0, fast, queued=40, inflight=8, remaining_s=0.009), _view(1, slow)]
    assert policy.choose(long_queue, 1) == 1
    assert min(predict_completion_s(v, 1) for v in long_queue) == predict_completion_s(
        long_queue[1], 1)


def test_round_robin_cycles_over_the_workers_with_room() -> None:
    curve = _curve(0.001, 0.001)
    policy = RoundRobin()
    views = [_view(i, curve) for i in range(3)]
    assert [policy.choose(views, 1) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    without_1 = [views[0], views[2]]
    assert [policy.choose(without_1, 1) for _ in range(3)] == [0, 2, 0]


def test_power_of_two_takes_the_shorter_of_two_samples() -> None:
    curve = _curve(0.001, 0.001)
    policy = PowerOfTwo(seed=1)
    pair = [_view(0, curve, queued=5), _view(1, curve, queued=2)]
    assert all(policy.choose(pair, 1) == 1 for _ in range(50))
    trio = [_view(0, curve, queued=1), _view(1, curve, queued=9), _view(2, curve, queued=3)]
    picks = Counter(policy.choose(trio, 1) for _ in range(600))
    assert picks[1] == 0  # the longest queue loses every comparison
    assert picks[0] > picks[2] > 0  # 0 wins both its pairs, 2 only against 1


def test_least_outstanding_breaks_ties_at_random() -> None:
    curve = _curve(0.001, 0.001)
    policy = LeastOutstanding(seed=2)
    views = [_view(0, curve, queued=1), _view(1, curve), _view(2, curve)]
    picks = Counter(policy.choose(views, 1) for _ in range(400))
    assert picks[0] == 0 and picks[1] > 100 and picks[2] > 100


def test_unknown_policy_is_a_config_error() -> None:
    assert make_policy("power_of_two").name == "power_of_two"
    with pytest.raises(ConfigError, match="round_robin"):
        make_policy("random")


def _simulate(policy_name: str, seed: int = 0) -> list[float]:
    """Open-loop Poisson arrivals at 80 % of capacity on FIFO workers of speeds 1, 1/2, 1/4
    (one request per batch); returns each request's latency in seconds."""
    service_s = [0.010, 0.020, 0.040]
    curves = [ServiceCurve.from_points([[1, s]]) for s in service_s]
    rate = 0.8 * sum(1 / s for s in service_s)
    policy = make_policy(policy_name, seed)
    rng = random.Random(seed)
    jobs: list[list[tuple[float, float]]] = [[] for _ in service_s]  # (start, end) per worker
    latencies: list[float] = []
    now = 0.0
    for _ in range(4000):
        now += rng.expovariate(rate)
        views = []
        for index, worker_jobs in enumerate(jobs):
            worker_jobs[:] = [(a, b) for a, b in worker_jobs if b > now]
            running = [b for a, b in worker_jobs if a <= now]
            waiting = sum(1 for a, _ in worker_jobs if a > now)
            views.append(LoadView(index, waiting, waiting, len(running), len(running),
                                  running[0] - now if running else 0.0, 0.0, curves[index],
                                  BatchPolicy(1, 0.0)))
        chosen = policy.choose(views, 1)
        start = max([now, *(b for _, b in jobs[chosen])])
        jobs[chosen].append((start, start + service_s[chosen]))
        latencies.append(start + service_s[chosen] - now)
    return latencies


def test_idla_beats_power_of_two_on_heterogeneous_workers_in_simulation() -> None:
    idla_p99 = percentile(_simulate("idla"), 0.99)
    p2c_p99 = percentile(_simulate("power_of_two"), 0.99)
    lor_p99 = percentile(_simulate("least_outstanding"), 0.99)
    assert idla_p99 < 0.7 * p2c_p99
    assert idla_p99 < lor_p99
