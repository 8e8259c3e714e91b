"""The pool's reading of a serving router's /metrics: parsing, the p99 of an interval from the
difference of two cumulative histograms, and whether the latency target held in it."""

from __future__ import annotations

import math

import pytest

from idla.pool.serving import interval_summary, latency_buckets, parse_metrics, quantile_s
from idla.serve.metrics import ServeMetrics


def _render(latencies_s: list[float], answered: int, refused: int = 0) -> str:
    metrics = ServeMetrics()
    for _ in range(answered):
        metrics.count("predict", 200)
    for latency_s in latencies_s:
        metrics.observe(latency_s, 1e-5)
    return metrics.render([], 0, 0, None, {"deadline": refused} if refused else None)


def test_the_router_s_own_exposition_parses_into_its_histogram() -> None:
    values = parse_metrics(_render([0.004, 0.02], answered=2) + "garbage line\n# HELP x y\n")

    buckets = latency_buckets(values)
    assert buckets[-1] == (math.inf, 2.0) and (0.005, 1.0) in buckets
    assert values[("idla_requests_total", (("code", "200"), ("endpoint", "predict")))] == 2.0


def test_quantiles_interpolate_inside_a_bucket() -> None:
    buckets = [(0.01, 0.0), (0.02, 100.0), (math.inf, 100.0)]

    assert quantile_s(buckets, 0.5) == pytest.approx(0.015)
    assert quantile_s(buckets, 0.99) == pytest.approx(0.0199)
    assert quantile_s([(0.01, 0.0), (math.inf, 0.0)], 0.99) is None
    assert quantile_s([(0.01, 0.0), (math.inf, 5.0)], 0.99) == 0.01  # beyond the last bound


def test_an_interval_holds_its_target_only_when_its_own_p99_does() -> None:
    fast = parse_metrics(_render([0.004] * 100, answered=100))
    then_slow = parse_metrics(_render([0.004] * 100 + [0.2] * 10, answered=110))
    then_refusing = parse_metrics(_render([0.004] * 200, answered=200, refused=5))

    first = interval_summary({}, fast, target_ms=50)
    slow = interval_summary(fast, then_slow, target_ms=50)
    refusing = interval_summary(fast, then_refusing, target_ms=50)

    assert first["held"] and first["requests"] == 100 and first["p99_ms"] <= 5
    assert not slow["held"] and slow["requests"] == 10 and slow["p99_ms"] > 100
    assert not refusing["held"] and refusing["refused"] == 5  # 5 % refused: not held
    assert interval_summary(fast, fast, target_ms=50) == {
        "requests": 0, "refused": 0, "failed": 0, "p99_ms": None, "held": True}
