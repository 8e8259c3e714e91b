"""Routing policies: pure decisions over one `LoadView` per worker.

Policies see one `LoadView` per worker that has room and pick one:

- ``idla``: join the shortest expected delay (Whitt, "Deciding which queue to join", 1986),
  with each worker's delay predicted from its measured batch-size curve, its batching limits,
  the rows queued before the request, the batch in flight and a moving correction of the
  curve by the service times observed since. Cost: O(workers · log curve points) per request.
- ``round_robin``; ``power_of_two``: sample two workers, take the one with fewer outstanding
  requests (Mitzenmacher, "The power of two choices", 2001; Ray Serve's replica scheduler);
  ``least_outstanding``: fewest outstanding requests, ties broken at random.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from idla.errors import ConfigError
from idla.serve.batcher import BatchPolicy, ServiceCurve

POLICIES = ("idla", "round_robin", "power_of_two", "least_outstanding")


@dataclass(frozen=True, slots=True)
class LoadView:
    """What a policy knows about one worker at the moment a request arrives."""

    index: int
    queued_rows: int
    queued_requests: int
    inflight_rows: int
    """Rows of the batch the worker is running (0 when idle)."""
    inflight_requests: int
    inflight_remaining_s: float
    """Predicted seconds until the batch in flight is done."""
    oldest_wait_s: float
    """Seconds the oldest queued request has waited."""
    curve: ServiceCurve
    batching: BatchPolicy
    slowdown: float = 1.0
    """Observed over curve-predicted service time (moving average; 1 = as measured)."""
    link_s: float = 0.0
    """Round trip minus service time of one batch: wire, event loop (moving average)."""
    lateness_s: float = 0.0
    """How much later than predicted its answers came (moving average, ≥ 0, capped): what the
    terms above miss, such as a throttled worker's uneven CPU share or a busy event loop."""

    @property
    def outstanding(self) -> int:
        return self.queued_requests + self.inflight_requests


def drain_s(view: LoadView, rows: int) -> float:
    """Predicted seconds this worker takes to serve ``rows`` rows from the moment it is free:
    batches of ``max_batch_rows``, each its curve time scaled by ``slowdown``, plus ``link_s``."""
    batch_rows = view.batching.max_batch_rows
    full, rest = divmod(rows, batch_rows)
    service_s = full * view.curve.predict_s(batch_rows) + view.curve.predict_s(rest)
    return view.slowdown * service_s + (full + (rest > 0)) * view.link_s


def predict_completion_s(view: LoadView, rows: int) -> float:
    """Predicted seconds until a new request of ``rows`` rows would be answered by this worker:
    the batch in flight, the wait an idle worker may spend filling a batch, then the queue ahead
    of the request (FIFO) and the request itself (`drain_s`), plus its measured lateness."""
    pending_rows = view.queued_rows + rows
    delay_s = view.inflight_remaining_s
    if view.inflight_rows == 0 and pending_rows < view.batching.max_batch_rows:
        delay_s += max(0.0, view.batching.max_wait_s - view.oldest_wait_s)
    return delay_s + drain_s(view, pending_rows) + view.lateness_s


class Policy(Protocol):
    name: str
    predictive: bool
    """Routes by predicted completion; the router then also admits by deadline and lets an idle
    worker steal queued work (`idla.serve.deadlines`). The baselines do neither."""

    def choose(self, views: Sequence[LoadView], rows: int) -> int:
        """The ``index`` of the chosen view (``views`` is never empty)."""
        ...


class ShortestExpectedDelay:
    name = "idla"
    predictive = True

    def choose(self, views: Sequence[LoadView], rows: int) -> int:
        return min(views, key=lambda v: sed_key(v, rows)).index


def sed_key(view: LoadView, rows: int) -> tuple[float, float, int]:
    """Earliest predicted completion first; on a tie the faster worker, then the lower index."""
    return predict_completion_s(view, rows), view.curve.predict_s(rows), view.index


class RoundRobin:
    name = "round_robin"
    predictive = False

    def __init__(self) -> None:
        self._next = 0

    def choose(self, views: Sequence[LoadView], rows: int) -> int:
        later = [v.index for v in views if v.index >= self._next]
        chosen = min(later) if later else min(v.index for v in views)
        self._next = chosen + 1
        return chosen


class PowerOfTwo:
    name = "power_of_two"
    predictive = False

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, views: Sequence[LoadView], rows: int) -> int:
        if len(views) == 1:
            return views[0].index
        first, second = self._rng.sample(list(views), 2)
        return second.index if second.outstanding < first.outstanding else first.index


class LeastOutstanding:
    name = "least_outstanding"
    predictive = False

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, views: Sequence[LoadView], rows: int) -> int:
        fewest = min(v.outstanding for v in views)
        return self._rng.choice([v.index for v in views if v.outstanding == fewest])


def make_policy(name: str, seed: int = 0) -> Policy:
    policies: dict[str, Policy] = {
        "idla": ShortestExpectedDelay(), "round_robin": RoundRobin(),
        "power_of_two": PowerOfTwo(seed), "least_outstanding": LeastOutstanding(seed),
    }
    if name not in policies:
        raise ConfigError(f"--policy {name!r} is not one of {', '.join(POLICIES)}")
    return policies[name]
