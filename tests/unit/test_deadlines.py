"""Deadline admission, work stealing and adaptive batch sizing as pure decisions."""

from __future__ import annotations

import math

import pytest

from idla.serve.batcher import BatchPolicy, DynamicBatcher, ServiceCurve
from idla.serve.deadlines import (
    adaptive_batch_rows,
    admission,
    queue_completions_s,
    steal_count,
)
from idla.serve.policies import LoadView, predict_completion_s


def _curve(alpha_s: float, beta_s: float) -> ServiceCurve:
    return ServiceCurve.from_points([[b, alpha_s + beta_s * b] for b in (1, 2, 4, 8, 16, 64)])


def _view(index: int, curve: ServiceCurve, *, queued: int = 0, inflight: int = 0,
          remaining_s: float = 0.0, max_batch: int = 8, wait_s: float = 0.0,
          slowdown: float = 1.0, link_s: float = 0.0, lateness_s: float = 0.0) -> LoadView:
    return LoadView(index, queued, queued, inflight, min(inflight, 1), remaining_s, 0.0,
                    curve, BatchPolicy(max_batch, wait_s), slowdown, link_s, lateness_s)


FAST, SLOW = _curve(0.002, 0.001), _curve(0.008, 0.008)  # slow: ~8x the cost per row


def test_admission_uses_a_slower_worker_that_still_meets_the_deadline() -> None:
    views = [_view(0, FAST, queued=40, inflight=8, remaining_s=0.010), _view(1, SLOW)]
    fast_s, slow_s = (predict_completion_s(v, 1) for v in views)
    assert slow_s < fast_s  # the fast worker's backlog outweighs its speed
    decision = admission(views, 1, budget_s=slow_s + 0.001)
    assert decision.index == 1 and decision.retry_after_s == 0
    assert decision.completion_s == pytest.approx(slow_s)


def test_admission_refuses_only_when_no_worker_meets_the_deadline() -> None:
    views = [_view(0, FAST, queued=40, inflight=8, remaining_s=0.010),
             _view(1, SLOW, queued=8, inflight=8, remaining_s=0.05)]
    soonest_s = min(predict_completion_s(v, 1) for v in views)
    assert admission(views, 1, budget_s=soonest_s).index is not None  # exactly in time
    refused = admission(views, 1, budget_s=soonest_s - 0.01)
    assert refused.index is None
    assert refused.retry_after_s == pytest.approx(0.01)
    assert refused.completion_s == pytest.approx(soonest_s)


def test_admission_breaks_ties_toward_the_faster_worker() -> None:
    same = ServiceCurve.from_points([[1, 0.004]])
    faster = ServiceCurve.from_points([[1, 0.002]])
    views = [_view(0, same, remaining_s=0.0), _view(1, faster, remaining_s=0.002)]
    assert predict_completion_s(views[0], 1) == pytest.approx(predict_completion_s(views[1], 1))
    assert admission(views, 1, math.inf).index == 1


def test_a_worker_whose_answers_come_late_is_predicted_late() -> None:
    honest, late = _view(0, SLOW), _view(1, SLOW, lateness_s=0.05)
    assert predict_completion_s(late, 1) == pytest.approx(predict_completion_s(honest, 1) + 0.05)
    assert admission([late, honest], 1, budget_s=1.0).index == 0
    budget_s = predict_completion_s(honest, 1) + 0.01
    assert admission([late], 1, budget_s).index is None  # in time only if it were on time
    victim = _view(2, SLOW, queued=2, inflight=1, remaining_s=0.02)  # ends at 36 and 44 ms
    assert steal_count(honest, victim, [1, 1]) == 2  # both in 24 ms
    assert steal_count(late, victim, [1, 1]) == 0  # 16 + 50 ms: later than either


def test_queue_completions_follow_fifo_batches() -> None:
    view = _view(0, FAST, inflight=4, remaining_s=0.003, max_batch=4, link_s=0.001)
    done_s = queue_completions_s(view, [2, 2, 2])  # batches [2, 2] and [2]
    assert done_s[0] == pytest.approx(0.003 + 0.004 + 0.001)
    assert done_s[1] == pytest.approx(0.003 + 0.006 + 0.001)
    assert done_s[2] == pytest.approx(0.003 + 0.006 + 0.001 + 0.004 + 0.001)


def test_an_idle_fast_worker_steals_the_tail_of_a_slow_queue() -> None:
    thief = _view(0, FAST, max_batch=8)
    victim = _view(1, SLOW, queued=6, inflight=1, remaining_s=0.02, max_batch=1)
    rows = [1] * 6  # on the victim the k-th from the end ends at 0.02 + 0.016 × (7 - k)
    count = steal_count(thief, victim, rows)
    assert count == 6  # one batch of 6 on the thief (8 ms) beats even the first one's turn
    thief_done_s = predict_completion_s(thief, count)
    assert thief_done_s < queue_completions_s(victim, rows)[-count]


def test_stealing_stops_where_the_thief_would_be_later() -> None:
    thief = _view(0, SLOW, max_batch=64)  # 8 ms + 8 ms per row
    victim = _view(1, FAST, queued=10, inflight=4, remaining_s=0.002, max_batch=4)
    rows = [1] * 10
    count = steal_count(thief, victim, rows)
    victim_done_s = queue_completions_s(victim, rows)
    assert 0 < count < len(rows)
    assert 0.008 + 0.008 * count < victim_done_s[-count]  # the stolen ones finish sooner
    assert 0.008 + 0.008 * (count + 1) >= victim_done_s[-count - 1]  # one more would not


def test_no_steal_from_a_queue_the_thief_cannot_beat() -> None:
    thief = _view(0, SLOW)
    victim = _view(1, FAST, queued=2, max_batch=8)
    assert steal_count(thief, victim, [1, 1]) == 0


def test_stealing_respects_the_thiefs_batch_limit() -> None:
    thief = _view(0, FAST, max_batch=3)
    victim = _view(1, SLOW, queued=20, inflight=8, remaining_s=0.5, max_batch=1)
    assert steal_count(thief, victim, [1] * 20) == 3
    assert steal_count(thief, victim, [5]) == 1  # one request bigger than the limit still goes


def test_adaptive_batch_grows_with_the_backlog_within_the_oldest_deadline() -> None:
    view = _view(0, FAST, max_batch=8)  # s(b) = 2 ms + 1 ms × b
    assert adaptive_batch_rows(view, queued_rows=6, head_budget_s=1.0, cap_rows=64) == 8
    assert adaptive_batch_rows(view, queued_rows=50, head_budget_s=1.0, cap_rows=64) == 50
    assert adaptive_batch_rows(view, queued_rows=100, head_budget_s=1.0, cap_rows=64) == 64
    # 30.5 ms left: the largest b with 2 + b ms <= 30.5 ms is 28
    assert adaptive_batch_rows(view, queued_rows=100, head_budget_s=0.0305, cap_rows=64) == 28
    busy = _view(0, FAST, max_batch=8, inflight=8, remaining_s=0.010, slowdown=2.0)
    # 10 ms in flight + 2 × (2 + b) ms <= 40.5 ms: b = 13
    assert adaptive_batch_rows(busy, queued_rows=100, head_budget_s=0.0405, cap_rows=64) == 13


def test_adaptive_batch_keeps_the_base_limit_without_slack_or_deadline() -> None:
    view = _view(0, FAST, max_batch=8)
    assert adaptive_batch_rows(view, queued_rows=100, head_budget_s=0.005, cap_rows=64) == 8
    assert adaptive_batch_rows(view, queued_rows=100, head_budget_s=math.inf, cap_rows=64) == 8


def test_batcher_takes_a_bigger_batch_and_gives_up_its_tail() -> None:
    batcher: DynamicBatcher[str] = DynamicBatcher(BatchPolicy(2, 0.0))
    for i in range(6):
        batcher.push(f"r{i}", 1, now_s=float(i))
    assert batcher.head() == "r0" and batcher.request_rows() == [1] * 6
    assert batcher.take_tail(2) == [("r4", 1, 4.0), ("r5", 1, 5.0)]
    batch, _ = batcher.take(10.0, max_rows=3)
    assert [item for item, _ in batch] == ["r0", "r1", "r2"]
    assert batcher.queued_rows == 1 and batcher.head() == "r3"
