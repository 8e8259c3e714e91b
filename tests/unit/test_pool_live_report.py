"""The live pool bench's figures as pure functions of what it collected."""

from __future__ import annotations

import math

from idla.bench.pool_live_report import (
    job_summary,
    live_targets,
    makespan_s,
    preempted_steps,
    reform_losses,
    serving_summary,
    window_p99s_ms,
)


def _record(t: float, latency_s: float, status: int = 200) -> dict[str, float]:
    return {"t": t, "latency_s": latency_s, "status": status}


def test_windows_take_the_p99_of_their_own_requests() -> None:
    records = [_record(0.1 * i, 0.010) for i in range(10)] + [_record(1.5, 0.5)]
    assert window_p99s_ms(records, 1.0) == [(10.0, 10), (500.0, 1)]


def test_serving_summary_counts_held_windows_failures_and_refusals() -> None:
    first = [_record(0.2, 0.01), _record(1.2, 0.3), _record(1.3, 0.01, 429)]
    second = [_record(0.5, 0.02), _record(0.6, 0.0, 0)]  # a request never answered
    summary = serving_summary([first, second], target_ms=100.0, window_s=1.0)
    assert summary["windows"] == 3 and summary["requests"] == 5
    assert math.isclose(summary["target_held_fraction"], 2 / 3)  # window [1, 2) of the first
    assert summary["failed"] == 1 and summary["refused"] == 1
    assert math.isclose(summary["p99_ms"], 300.0)  # answered ones only


def test_reform_losses_take_the_worst_member_per_generation_of_each_attempt() -> None:
    reports = [{"rendezvous": "r1", "events": [{"generation": 1, "steps_lost": 0},
                                               {"generation": 2, "steps_lost": 1}]},
               {"rendezvous": "r1", "events": [{"generation": 2, "steps_lost": 0}]},
               {"rendezvous": "r2", "events": [{"generation": 1, "steps_lost": 1}]},
               {"rendezvous": "r2", "events": []}]
    assert reform_losses(reports) == {("r1", 1): 0, ("r1", 2): 1, ("r2", 1): 1}


def test_preempted_steps_are_the_earlier_attempts_progress() -> None:
    reports = [{"rendezvous": "r1", "step": 30, "ended_s": 20.0},
               {"rendezvous": "r1", "step": 31, "ended_s": 21.0},
               {"rendezvous": "r2", "step": 100, "ended_s": 90.0}]
    assert preempted_steps(reports) == 31
    assert preempted_steps(reports[2:]) == 0 and preempted_steps([]) == 0


def _row(name: str, priority: float, submitted_s: float, finished_s: float | None,
         state: str = "done") -> dict[str, object]:
    return {"name": name, "id": name, "priority": priority, "state": state, "starts": 1,
            "submitted_s": submitted_s, "finished_s": finished_s, "message": ""}


def test_job_summary_and_makespan() -> None:
    events = [{"kind": "submitted"}, {"kind": "resized"}, {"kind": "resized"},
              {"kind": "preempted"}]
    reports = [{"step": 40, "events": [{"generation": 1, "steps_lost": 1}]}]
    job = job_summary(_row("a", 4, 110.0, 150.0), events, reports, t0_s=100.0)
    assert job["jct_s"] == 40.0 and job["arrival_s"] == 10.0 and job["finished_s"] == 50.0
    assert job["resizes"] == 2 and job["preemptions"] == 1 and job["steps_lost"] == 1
    assert job["steps_lost_to_preemption"] == 0  # one start, one attempt's reports
    restarted = job_summary({**_row("a", 4, 110.0, 150.0), "starts": 2}, events, reports, 100.0)
    assert restarted["steps_lost_to_preemption"] is None  # the first attempt left no report
    failed = job_summary(_row("b", 1, 100.0, 120.0, "failed"), [], [], t0_s=100.0)
    assert failed["jct_s"] is None and failed["steps"] == 0
    assert makespan_s([job]) == 50.0 and makespan_s([job, failed]) is None


def test_targets_compare_idla_with_alone_and_fifo() -> None:
    serving = {"target_held_fraction": 1.0, "failed": 0}
    top = {"priority": 4, "jct_s": 60.0, "alone_s": 40.0, "max_steps_lost_per_resize": 1}
    low = {"priority": 1, "jct_s": 90.0, "alone_s": 50.0, "max_steps_lost_per_resize": 0}
    live = {"idla": {"jobs": [low, top], "makespan_s": 100.0, "serving": serving},
            "fifo": {"jobs": [], "makespan_s": 125.0, "serving": serving}}
    targets = live_targets(live)
    assert targets["top_priority_jct_over_alone"] == {"value": 1.5, "target": 1.2, "met": False}
    assert targets["makespan_over_fifo"]["value"] == 0.8 and targets["makespan_over_fifo"]["met"]
    assert targets["max_steps_lost_per_resize"]["met"]
    assert targets["serving_target_held_fraction"]["met"]
    assert live_targets({"fifo": live["fifo"]}) == {}
