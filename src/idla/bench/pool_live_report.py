"""What `idla bench pool`'s live part reports, as pure functions of what it collected: the
serving job's latency per window, each training job's completion time, resizes and steps lost,
and the issue's targets. The runner is `idla.bench.pool_live`.

Serving: latency counts from each request's scheduled send time (open loop, `loadgen`); the
run is cut into windows of ``window_s`` seconds (within each load-generator segment) and the
target holds in a window whose p99 is at or under it; ``target_held_fraction`` is the fraction
of windows with requests in which it held. ``failed``: requests answered with neither 200 nor
429, or not answered; ``refused``: 429s (the router's admission control said it would miss).

Training: ``jct_s`` = finished − submitted (the agent's store); ``resizes``: the agent's
``resized`` events; ``steps_lost``: per re-form (a generation of the job's group in one
rendezvous), the most any member reports it lost, summed over the re-forms;
``max_steps_lost_per_resize``: the most one re-form lost. A preempted job restarts in a new
rendezvous from its first step (the bench's script keeps no checkpoint):
``steps_lost_to_preemption`` is the progress its earlier attempts made and threw away (None
when an attempt left no report: its workers were killed before they could write one). Cost:
O(requests log requests + jobs × events).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from idla.serve.metrics import percentile


def window_p99s_ms(records: Sequence[Mapping[str, Any]], window_s: float
                   ) -> list[tuple[float, int]]:
    """(p99 latency in ms, requests) of every window with requests, in time order; a record's
    window is from its scheduled time ``t`` (seconds from its segment's start)."""
    windows: dict[int, list[float]] = {}
    for record in records:
        windows.setdefault(int(record["t"] // window_s), []).append(1e3 * record["latency_s"])
    return [(percentile(latencies, 0.99), len(latencies))
            for _, latencies in sorted(windows.items())]


def serving_summary(segments: Sequence[Sequence[Mapping[str, Any]]], target_ms: float,
                    window_s: float) -> dict[str, Any]:
    """The serving job's figures over load-generator ``segments`` (each a list of records)."""
    windows = [w for records in segments for w in window_p99s_ms(records, window_s)]
    records = [r for s in segments for r in s]
    answered = [1e3 * r["latency_s"] for r in records if r.get("status") == 200]
    held = sum(p99 <= target_ms for p99, _ in windows)
    return {
        "p99_ms": percentile(answered, 0.99), "p50_ms": percentile(answered, 0.5),
        "target_ms": target_ms,
        "target_held_fraction": held / len(windows) if windows else math.nan,
        "windows": len(windows), "requests": len(records),
        "failed": sum(r.get("status") not in (200, 429) for r in records),
        "refused": sum(r.get("status") == 429 for r in records),
    }


def reform_losses(reports: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], int]:
    """Steps lost per re-form ((rendezvous, generation)), the most any member's report says."""
    lost: dict[tuple[str, int], int] = {}
    for report in reports:
        for event in report.get("events", ()):
            key = (str(report.get("rendezvous", "")), int(event["generation"]))
            lost[key] = max(lost.get(key, 0), int(event.get("steps_lost", 0)))
    return lost


def preempted_steps(reports: Sequence[Mapping[str, Any]]) -> int:
    """Steps the attempts before the last made (the last attempt: the rendezvous of the report
    that ended last), thrown away by a restart from the first step."""
    if not reports:
        return 0
    last = str(max(reports, key=lambda r: float(r.get("ended_s", 0.0))).get("rendezvous", ""))
    earlier: dict[str, int] = {}
    for report in reports:
        key = str(report.get("rendezvous", ""))
        if key != last:
            earlier[key] = max(earlier.get(key, 0), int(report.get("step", 0)))
    return sum(earlier.values())


def job_summary(row: Mapping[str, Any], events: Sequence[Mapping[str, Any]],
                reports: Sequence[Mapping[str, Any]], t0_s: float) -> dict[str, Any]:
    """One training job: ``row`` from GET /jobs, its store ``events``, its workers' reports;
    times relative to the run's start ``t0_s``."""
    finished = row.get("finished_s") if row["state"] == "done" else None
    lost = reform_losses(reports)
    return {
        "name": row["name"], "id": row["id"], "priority": row["priority"],
        "state": row["state"], "arrival_s": row["submitted_s"] - t0_s,
        "jct_s": None if finished is None else finished - row["submitted_s"],
        "finished_s": None if finished is None else finished - t0_s,
        "resizes": sum(e["kind"] == "resized" for e in events),
        "preemptions": sum(e["kind"] == "preempted" for e in events),
        "starts": row["starts"], "reforms": len(lost), "steps_lost": sum(lost.values()),
        "max_steps_lost_per_resize": max(lost.values(), default=0),
        "steps_lost_to_preemption": preempted_steps(reports) if len(
            {str(r.get("rendezvous", "")) for r in reports}) >= row["starts"] else None,
        "steps": max((int(r.get("step", 0)) for r in reports), default=0),
        "message": row.get("message", ""),
    }


def makespan_s(jobs: Sequence[Mapping[str, Any]]) -> float | None:
    """From the run's start to the last training job's end (None if one did not finish)."""
    ends = [j["finished_s"] for j in jobs]
    return None if not ends or any(e is None for e in ends) else max(ends)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def live_targets(live: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's live targets for the idla policy (a target whose inputs were not run is
    left out): the p=4 job's JCT ≤ 1.2× alone, makespan ≤ FIFO's, every resize ≤ 1 step
    lost, serving target held ≥ 99 % of the time with 0 failed requests."""
    idla = live.get("idla")
    if idla is None:
        return {}
    out: dict[str, Any] = {}
    top = max(idla["jobs"], key=lambda j: j["priority"], default=None)
    if top is not None and top.get("alone_s") is not None:
        ratio = _ratio(top["jct_s"], top["alone_s"])
        out["top_priority_jct_over_alone"] = {"value": ratio, "target": 1.2,
                                              "met": ratio is not None and ratio <= 1.2}
    fifo = live.get("fifo")
    if fifo is not None:
        ratio = _ratio(idla["makespan_s"], fifo["makespan_s"])
        out["makespan_over_fifo"] = {"value": ratio, "target": 1.0,
                                     "met": ratio is not None and ratio <= 1.0}
    worst = max((j["max_steps_lost_per_resize"] for j in idla["jobs"]), default=0)
    out["max_steps_lost_per_resize"] = {"value": worst, "target": 1, "met": worst <= 1}
    serving = idla["serving"]
    held = serving["target_held_fraction"]
    out["serving_target_held_fraction"] = {
        "value": held, "target": 0.99, "failed": serving["failed"],
        "met": bool(held >= 0.99) and serving["failed"] == 0}
    return out


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        format(value, spec))


def print_live(live: Mapping[str, Any]) -> None:
    """The table: one row per policy × job, then each policy's makespan and serving figures,
    then the targets."""
    print(f"{'policy':<7} {'job':<10} {'p':>3} {'arrive s':>8} {'JCT s':>7} {'alone s':>7} "
          f"{'resizes':>7} {'preempt':>7} {'lost':>4} {'redone':>6}")
    for policy, run in live.items():
        if policy in ("targets", "settings", "machine", "alone"):
            continue
        for job in run["jobs"]:
            print(f"{policy:<7} {job['name']:<10} {job['priority']:>3g} "
                  f"{job['arrival_s']:>8.1f} {_fmt(job['jct_s']):>7} "
                  f"{_fmt(job.get('alone_s')):>7} {job['resizes']:>7} "
                  f"{job['preemptions']:>7} {job['steps_lost']:>4} "
                  f"{_fmt(job['steps_lost_to_preemption'], 'd'):>6}")
        s = run["serving"]
        print(f"{policy:<7} makespan {_fmt(run['makespan_s'])} s; serving p99 "
              f"{_fmt(s['p99_ms'])} ms (target {s['target_ms']:g}), held "
              f"{_fmt(s['target_held_fraction'], '.1%')} of {s['windows']} windows, "
              f"{s['requests']} requests, {s['failed']} failed, {s['refused']} refused")
    for name, target in live.get("targets", {}).items():
        print(f"target {name}: {_fmt(target['value'], '.3g')} (target {target['target']:g}) "
              f"{'met' if target['met'] else 'NOT met'}")
