"""`idla bench serve`'s numbers: refused apart from failed, SLO goodput over every request sent,
medians over repeats, and the targets."""

from __future__ import annotations

from typing import Any

import pytest

from idla.bench.serve_report import median_row, summarize, targets


def _record(t: float, latency_s: float, status: int = 200, **extra: Any) -> dict[str, Any]:
    return {"t": t, "latency_s": latency_s, "status": status, "worker": "0", "queue_ms": 1.0,
            "service_ms": 2.0, **extra}


def test_refused_and_failed_are_counted_apart_and_goodput_counts_both_as_misses() -> None:
    records = [_record(1.0 + i, 0.05) for i in range(6)]
    records += [_record(2.5, 0.5)]  # answered, but late
    records += [_record(3.5, 0.001, 429, retry_after="1"), _record(4.5, 0.001, 429)]
    records += [_record(5.5, 30.0, 0, error="timeout"), _record(6.5, 0.01, 503)]
    row = summarize(records, duration_s=10.0, slo_s=0.2)
    assert (row["sent"], row["ok"], row["refused"], row["failed"]) == (11, 7, 2, 2)
    assert row["refused_without_retry_after"] == 1
    assert row["slo_goodput"] == pytest.approx(6 / 11)
    assert row["codes"] == {"0": 1, "200": 7, "429": 2, "503": 1}
    assert row["p50_ms"] == pytest.approx(50.0)  # percentiles of answered requests only


def test_medians_over_repeats_sum_the_failures() -> None:
    rows = [{"p99_ms": p99, "slo_goodput": good, "failed": failed, "policy": "idla"}
            for p99, good, failed in ((100.0, 0.9, 0), (300.0, 0.7, 2), (200.0, 0.8, 0))]
    row = median_row(rows)
    assert row["p99_ms"] == 200.0 and row["slo_goodput"] == pytest.approx(0.8)
    assert row["failed"] == 2 and row["repeats"] == 3 and row["policy"] == "idla"
    assert row["p99_ms_by_repeat"] == [100.0, 300.0, 200.0]


def _cell(p99_ms: float, goodput: float, thru: float = 100.0, failed: int = 0
          ) -> dict[str, Any]:
    return {"p99_ms": p99_ms, "slo_goodput": goodput, "throughput_rps": thru, "failed": failed}


def test_targets_compare_idla_with_power_of_two() -> None:
    result = {
        "settings": {"arrivals": ["poisson", "mmpp"]},
        "capacity": {"closed_loop_rps": 200.0},
        "policies": {
            "idla": {"poisson": {"load_95": _cell(300, 0.9),
                                 "saturation": _cell(900, 0.5, thru=195.0)},
                     "mmpp": {"load_80": _cell(250, 0.95)}},
            "power_of_two": {"poisson": {"load_95": _cell(600, 0.6)},
                             "mmpp": {"load_80": _cell(1000, 0.7, failed=1)}},
        },
        "kill_trial": {"failed": 0}, "router_overhead_ms": {"p50": 0.3},
    }
    out = targets(result)
    assert out["p99_idla_over_power_of_two_at_80_mmpp"]["value"] == pytest.approx(0.25)
    assert out["p99_idla_over_power_of_two_at_80_mmpp"]["met"]
    assert out["p99_idla_over_power_of_two_at_95_poisson"]["value"] == pytest.approx(0.5)
    assert out["slo_goodput_idla_minus_power_of_two_at_95_poisson"]["value"] == pytest.approx(0.3)
    assert out["saturation_throughput_over_closed_loop_capacity"]["value"] == pytest.approx(0.975)
    assert out["failed_requests_in_all_trials"] == {"value": 1, "target": "== 0", "met": False}
