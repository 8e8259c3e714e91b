"""The numbers of `idla bench serve`: one trial's summary, medians over repeats, the targets of
issue 17 and the printed table. Pure functions of the trials' records and rows.

Terms: a request is *answered* (200), *refused* (429 with Retry-After: the router said it could
not serve it in time, or its queues were full) or *failed* (anything else: a 5xx, a broken
connection, no answer within the client's timeout). *SLO goodput* is the fraction of all
offered requests answered within the latency target; a refused request counts as a miss.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from idla.bench.arrivals import interarrival_cv
from idla.serve.metrics import percentile

STEADY_FROM = 0.1  # throughput is counted over arrivals' [10 %, 100 %] window
TARGET_BURSTY_P99_RATIO = 0.5  # idla's p99 at 80 % with bursty arrivals vs power-of-two's
TARGET_SATURATION = 0.95  # throughput at saturation vs the closed-loop capacity
TARGET_OVERHEAD_MS = 1.0  # router overhead p50
BASELINE = "power_of_two"


def summarize(records: Sequence[dict[str, Any]], duration_s: float, slo_s: float
              ) -> dict[str, Any]:
    """One trial's numbers from its records (``t``: scheduled send, ``latency_s``, ``status``,
    ``worker``, ``queue_ms``, ``service_ms``).

    Throughput counts answers completed in the steady window [10 %, 100 %] of the arrivals, so
    neither the empty queues at the start nor the drain after the last arrival enter the rate.
    Latency percentiles are of answered requests; goodput is of every request sent.
    """
    ok = [r for r in records if r["status"] == 200]
    refused = [r for r in records if r["status"] == 429]
    latencies_ms = [1e3 * r["latency_s"] for r in ok]
    start_s = STEADY_FROM * duration_s
    steady = [r for r in ok if start_s <= r["t"] + r["latency_s"] <= duration_s]
    span_s = duration_s - start_s
    outside_ms = [1e3 * r["latency_s"] - r["queue_ms"] - r["service_ms"] for r in ok]
    shares = Counter(str(r.get("worker")) for r in ok)
    in_time = sum(1 for r in ok if r["latency_s"] <= slo_s)
    return {
        "sent": len(records), "ok": len(ok), "refused": len(refused),
        "failed": len(records) - len(ok) - len(refused),
        "refused_without_retry_after": sum(1 for r in refused if "retry_after" not in r),
        "codes": dict(sorted(Counter(str(r["status"]) for r in records).items())),
        "client_reconnects": sum(1 for r in records if r.get("reconnected")),
        "arrival_cv": interarrival_cv(sorted(r["t"] for r in records)),
        "throughput_rps": len(steady) / span_s,
        "goodput_rps": sum(1 for r in steady if r["latency_s"] <= slo_s) / span_s,
        "slo_goodput": in_time / len(records) if records else math.nan,
        "p50_ms": percentile(latencies_ms, 0.50), "p90_ms": percentile(latencies_ms, 0.90),
        "p99_ms": percentile(latencies_ms, 0.99),
        "outside_workers_p50_ms": percentile(outside_ms, 0.50),
        "share_by_worker": {k: v / max(1, len(ok)) for k, v in sorted(shares.items())},
        "p99_ms_by_worker": {k: percentile([1e3 * r["latency_s"] for r in ok
                                            if str(r.get("worker")) == k], 0.99)
                             for k in sorted(shares)},
    }


def median_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of each numeric field over repeats (others from the first), with
    ``repeats`` and each repeat's p99 and goodput beside it; failures are summed, not
    medianed, so that one failure in any repeat shows."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [float(row[key]) for row in rows if not math.isnan(float(row[key]))]
            out[key] = statistics.median(values) if values else math.nan
    out["failed"] = sum(int(row["failed"]) for row in rows)
    out["repeats"] = len(rows)
    out["p99_ms_by_repeat"] = [row["p99_ms"] for row in rows]
    out["slo_goodput_by_repeat"] = [row["slo_goodput"] for row in rows]
    return out


def _target(value: float, target: str, met: bool) -> dict[str, Any]:
    return {"value": value, "target": target, "met": bool(met)}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 17's targets, each with its value and whether it is met."""
    out: dict[str, Any] = {}
    policies = result["policies"]
    idla, base = policies.get("idla", {}), policies.get(BASELINE, {})
    for arrival in result["settings"]["arrivals"]:
        mine, theirs = idla.get(arrival, {}).get("load_80"), base.get(arrival, {}).get("load_80")
        if mine and theirs and arrival != "poisson":
            ratio = mine["p99_ms"] / theirs["p99_ms"]
            out[f"p99_idla_over_{BASELINE}_at_80_{arrival}"] = _target(
                ratio, f"<= {TARGET_BURSTY_P99_RATIO}", ratio <= TARGET_BURSTY_P99_RATIO)
    mine, theirs = idla.get("poisson", {}).get("load_95"), base.get("poisson", {}).get("load_95")
    if mine and theirs:
        ratio = mine["p99_ms"] / theirs["p99_ms"]
        out[f"p99_idla_over_{BASELINE}_at_95_poisson"] = _target(ratio, "<= 1", ratio <= 1)
        gap = mine["slo_goodput"] - theirs["slo_goodput"]
        out[f"slo_goodput_idla_minus_{BASELINE}_at_95_poisson"] = _target(gap, ">= 0", gap >= 0)
    saturation = idla.get("poisson", {}).get("saturation")
    if saturation:
        fraction = saturation["throughput_rps"] / result["capacity"]["closed_loop_rps"]
        out["saturation_throughput_over_closed_loop_capacity"] = _target(
            fraction, f">= {TARGET_SATURATION}", fraction >= TARGET_SATURATION)
    failed = sum(row["failed"] for arrivals in policies.values() for levels in arrivals.values()
                 for row in levels.values()) + result["kill_trial"]["failed"]
    out["failed_requests_in_all_trials"] = _target(failed, "== 0", failed == 0)
    p50 = result["router_overhead_ms"]["p50"]
    out["router_overhead_p50_ms"] = _target(p50, f"< {TARGET_OVERHEAD_MS}",
                                            p50 < TARGET_OVERHEAD_MS)
    return out


def print_serve_bench(result: dict[str, Any]) -> None:
    capacity = result["capacity"]
    print(f"\ncapacity: summed worker curves {capacity['summed_curves_rps']:.1f} req/s, closed "
          f"loop through the router {capacity['closed_loop_rps']:.1f} req/s (the 100 % below)")
    print(f"{'policy':<18}{'arrivals':<9}{'load':>6}{'offered':>9}{'thru':>8}{'p50 ms':>9}"
          f"{'p99 ms':>9}{'SLO good':>9}{'refused':>8}{'failed':>7}")
    rows = [(name, arrival, row) for name, arrivals in result["policies"].items()
            for arrival, levels in arrivals.items() for row in levels.values()]
    rows.append(("idla (kill)", "poisson", result["kill_trial"]))
    for name, arrival, row in rows:
        print(f"{name:<18}{arrival:<9}{row['load_pct']:>5g}%{row['offered_rps']:>9.1f}"
              f"{row['throughput_rps']:>8.1f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"
              f"{100 * row['slo_goodput']:>8.1f}%{row['refused']:>8g}{row['failed']:>7g}")
    overhead = result["router_overhead_ms"]
    print(f"router overhead per request: p50 {overhead['p50']:.3f} ms, "
          f"p99 {overhead['p99']:.3f} ms")
    for name, target in result["targets"].items():
        print(f"  {name}: {target['value']:.3g} (target {target['target']}) "
              f"{'met' if target['met'] else 'NOT met'}")
