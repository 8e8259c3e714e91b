"""Deadline-aware decisions of the router, as pure functions over `LoadView`s: admission (refuse
only what no worker can answer in time), work stealing at batch boundaries, and a batch size
that follows the instantaneous queue.

Each request carries a deadline: its arrival plus the configured latency target. Predictions
come from each worker's measured batch curve, its queue and its batch in flight
(`idla.serve.policies.predict_completion_s`), so "can meet the deadline" means the same thing
to all three decisions.

- `admission`: route to the earliest predicted completion (Whitt's shortest expected delay, 1986);
  refuse (429) only when even that misses the deadline, and then say when to retry: the
  predicted time until the best worker's backlog has shrunk enough. A slower worker that can
  still make it is never refused. Cost: O(workers · log curve points).
- `steal_count`: an idle worker takes requests from the tail of another worker's queue when it
  would finish them sooner than their turn there (the work-stealing of Blumofe and Leiserson,
  "Scheduling multithreaded computations by work stealing", 1999, steering by predicted
  completion rather than at random). Each moved request finishes earlier than it would have;
  the requests left behind are not delayed. Cost: O(queued requests · log curve points).
- `adaptive_batch_rows`: the largest batch (up to a hard cap) whose predicted completion still
  meets the earliest deadline in it, so a backlog is served in bigger, more efficient batches
  (the fixed cost α is paid fewer times) while the queue is short batches stay at the
  budget-sized limit (cf. Clipper's AIMD batch sizing, Crankshaw et al., NSDI 2017, which reacts
  to the average; this reacts to the queue at hand). Cost: O(log cap · log curve points).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from idla.serve.policies import LoadView, drain_s, predict_completion_s, sed_key


@dataclass(frozen=True, slots=True)
class Admission:
    """The router's answer to one arriving request."""

    index: int | None
    """The worker to queue it on; None: refuse it (no worker is predicted to meet the deadline)."""
    completion_s: float
    """Predicted seconds until its answer on the best worker."""
    retry_after_s: float
    """When refused: predicted seconds until the best worker could meet a new deadline (0 when
    admitted)."""


def admission(views: Sequence[LoadView], rows: int, budget_s: float) -> Admission:
    """Admit a request of ``rows`` rows with ``budget_s`` seconds left to its deadline to the
    worker predicted to answer it first, or refuse it when none is predicted within the budget.
    ``views`` is never empty."""
    best = min(views, key=lambda v: sed_key(v, rows))
    completion_s = predict_completion_s(best, rows)
    if completion_s <= budget_s:
        return Admission(best.index, completion_s, 0.0)
    return Admission(None, completion_s, completion_s - budget_s)


def queue_completions_s(view: LoadView, request_rows: Sequence[int]) -> list[float]:
    """Predicted seconds until each queued request (``request_rows``: the queue's rows, oldest
    first) is answered: the batch in flight, then the queue in batches (`drain_s`), plus the
    worker's lateness."""
    done_s, prefix = [], 0
    for rows in request_rows:
        prefix += rows
        done_s.append(view.inflight_remaining_s + drain_s(view, prefix) + view.lateness_s)
    return done_s


def steal_count(thief: LoadView, victim: LoadView, victim_rows: Sequence[int]) -> int:
    """How many requests an idle ``thief`` should take from the tail of ``victim``'s queue
    (``victim_rows``: its requests' rows, oldest first): the most whose single batch on the
    thief (at most its batch limit) ends before the first of them would end on the victim.
    0 when none would finish sooner."""
    victim_done_s = queue_completions_s(victim, victim_rows)
    best, taken_rows = 0, 0
    for k in range(1, len(victim_rows) + 1):
        taken_rows += victim_rows[-k]
        if k > 1 and taken_rows > thief.batching.max_batch_rows:
            break
        thief_done_s = thief.inflight_remaining_s + drain_s(thief, taken_rows) + thief.lateness_s
        if thief_done_s >= victim_done_s[-k]:
            break  # the thief's time only grows with k, the victim's earliest only shrinks
        best = k
    return best


def adaptive_batch_rows(view: LoadView, queued_rows: int, head_budget_s: float,
                        cap_rows: int) -> int:
    """Rows for the next batch of a worker whose queue holds ``queued_rows`` rows and whose
    oldest request has ``head_budget_s`` seconds left to its deadline: the largest size in
    [``max_batch_rows``, ``cap_rows``] (and no more than the queue) predicted to complete
    within that budget; ``max_batch_rows`` when the queue is shorter, when no deadline is set
    (an infinite budget is not an invitation to grow) or when even that misses."""
    base = view.batching.max_batch_rows
    high = min(cap_rows, queued_rows)
    if high <= base or math.isinf(head_budget_s):
        return base

    def meets(rows: int) -> bool:
        return view.inflight_remaining_s + view.slowdown * view.curve.predict_s(rows) + \
            view.link_s + view.lateness_s <= head_budget_s

    if not meets(base):
        return base
    low = base
    while low < high:  # the largest size that meets the budget (the curve is monotone)
        mid = (low + high + 1) // 2
        if meets(mid):
            low = mid
        else:
            high = mid - 1
    return low
