"""Per-worker dynamic batching: a worker's measured batch-size curve, the (max batch, max wait)
it implies, and the queue that forms batches by those two limits.

The limits follow Clipper (Crankshaw et al., "Clipper: A Low-Latency Online Prediction Serving
System", NSDI 2017): the largest batch whose service time fits the latency budget. The wait
bound is the ski-rental rule (Karlin et al., "Competitive snoopy caching", 1988): holding a lone
request back for company can at best save the batch's fixed cost α, so an idle worker waits at
most α (and at most a configured cap) before it runs what it has.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from idla.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServiceCurve:
    """Measured service time of one worker as a function of the batch size in rows.

    Between measured sizes the time is interpolated linearly; above the largest it is
    extrapolated along the last segment, below the smallest it scales proportionally.
    """

    rows: tuple[int, ...]
    """Measured batch sizes in rows (samples), strictly increasing, all ≥ 1."""
    seconds: tuple[float, ...]
    """Service time in seconds at each size, made non-decreasing on construction."""

    @staticmethod
    def from_points(points: Sequence[Sequence[float]]) -> ServiceCurve:
        """Build from ``[[rows, seconds], ...]`` (any order); checks every value."""
        try:
            pairs = sorted((int(row), float(sec)) for row, sec in points)
        except (TypeError, ValueError):
            raise ConfigError(f"service curve {points!r} must be [[rows, seconds], ...]") from None
        if not pairs:
            raise ConfigError("service curve is empty")
        rows = [r for r, _ in pairs]
        if rows[0] < 1 or len(set(rows)) != len(rows):
            raise ConfigError(f"service curve rows {rows} must be distinct and ≥ 1")
        seconds: list[float] = []
        for _, sec in pairs:
            if not math.isfinite(sec) or sec <= 0:
                raise ConfigError(f"service curve time {sec} s must be positive and finite")
            seconds.append(max(sec, seconds[-1]) if seconds else sec)
        return ServiceCurve(tuple(rows), tuple(seconds))

    def predict_s(self, rows: int) -> float:
        """Predicted service time in seconds of a batch of ``rows`` rows; O(log points)."""
        if rows <= 0:
            return 0.0
        if rows <= self.rows[0]:
            return self.seconds[0] * rows / self.rows[0]
        i = bisect.bisect_left(self.rows, rows)
        if i == len(self.rows):
            i -= 1  # extrapolate along the last segment (or proportionally with one point)
            if i == 0:
                return self.seconds[0] * rows / self.rows[0]
        r0, r1 = self.rows[i - 1], self.rows[i]
        s0, s1 = self.seconds[i - 1], self.seconds[i]
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)

    def fixed_s(self) -> float:
        """α: the per-batch fixed cost, the intercept of a least-squares line (≥ 0)."""
        if len(self.rows) < 2:
            return 0.0
        n = len(self.rows)
        mean_r = sum(self.rows) / n
        mean_s = sum(self.seconds) / n
        var = sum((r - mean_r) ** 2 for r in self.rows)
        slope = sum((r - mean_r) * (s - mean_s) for r, s in zip(self.rows, self.seconds,
                                                                   strict=True)) / var
        return min(max(mean_s - slope * mean_r, 0.0), self.seconds[0])

    def capacity_rows_per_s(self, batch_rows: int) -> float:
        """Throughput in rows/s when every batch holds ``batch_rows`` rows."""
        return batch_rows / self.predict_s(batch_rows)

    def to_json(self) -> list[list[float]]:
        return [[r, s] for r, s in zip(self.rows, self.seconds, strict=True)]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When a worker's queue becomes a batch."""

    max_batch_rows: int
    """A batch holds at most this many rows (a single larger request still runs, alone)."""
    max_wait_s: float
    """An idle worker runs its queue once the oldest request has waited this long, in seconds."""

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1:
            raise ConfigError(f"max_batch_rows {self.max_batch_rows} must be at least 1")
        if not 0 <= self.max_wait_s < math.inf:
            raise ConfigError(f"max_wait_s {self.max_wait_s} must be a non-negative number")


def size_batching(
    curve: ServiceCurve,
    batch_budget_s: float,
    max_batch_rows: int,
    max_wait_cap_s: float,
    min_batch_rows: int = 1,
) -> BatchPolicy:
    """(max batch, max wait) from a worker's curve: the largest batch (rows, ≤ ``max_batch_rows``
    and ≥ ``min_batch_rows``, the rows of one request) whose predicted service time stays within
    ``batch_budget_s``, and a wait of the fixed cost α capped at ``max_wait_cap_s``.

    Cost: O(log(max_batch_rows) · log points) by bisection on the monotone curve.
    """
    if not batch_budget_s > 0:
        raise ConfigError(f"batch budget {batch_budget_s} s must be positive")
    if max_batch_rows < 1 or min_batch_rows < 1:
        raise ConfigError(f"batch rows {min_batch_rows}..{max_batch_rows} must be at least 1")
    low, high = 1, max_batch_rows
    while low < high:  # largest b with predict_s(b) <= budget (b = 1 when none fits)
        mid = (low + high + 1) // 2
        if curve.predict_s(mid) <= batch_budget_s:
            low = mid
        else:
            high = mid - 1
    rows = max(low, min(min_batch_rows, max_batch_rows))
    return BatchPolicy(rows, min(curve.fixed_s(), max(max_wait_cap_s, 0.0)))


@dataclass(slots=True)
class _Queued(Generic[T]):
    item: T
    rows: int
    enqueued_s: float


class DynamicBatcher(Generic[T]):
    """FIFO queue of requests (each of some rows) that yields batches by a BatchPolicy.

    `take` is called whenever the worker is idle: it returns a batch once the queue holds
    ``max_batch_rows`` rows or its oldest request has waited ``max_wait_s``, else how long to
    wait. Requests are never split or reordered. Each call costs O(requests in the batch).
    """

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._queue: deque[_Queued[T]] = deque()
        self._rows = 0

    def push(self, item: T, rows: int, now_s: float) -> None:
        if rows < 1:
            raise ValueError(f"a request has at least one row, got {rows}")
        self._queue.append(_Queued(item, rows, now_s))
        self._rows += rows

    @property
    def queued_rows(self) -> int:
        return self._rows

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    def oldest_wait_s(self, now_s: float) -> float:
        """Seconds the oldest queued request has waited (0 when the queue is empty)."""
        return now_s - self._queue[0].enqueued_s if self._queue else 0.0

    def head(self) -> T | None:
        """The oldest queued item (None when the queue is empty)."""
        return self._queue[0].item if self._queue else None

    def request_rows(self) -> list[int]:
        """Rows of each queued item, oldest first."""
        return [queued.rows for queued in self._queue]

    def take(self, now_s: float, max_rows: int | None = None
             ) -> tuple[list[tuple[T, float]], float | None]:
        """An idle worker asks for work: ``(batch, None)`` with each item's enqueue time, or
        ``([], wait_s)`` — wait that long at most (None: the queue is empty). ``max_rows``:
        this batch's limit instead of the policy's (a backlog may be served in bigger batches;
        the policy's limit still decides when a batch is full enough to run without waiting)."""
        if not self._queue:
            return [], None
        due_s = self._queue[0].enqueued_s + self.policy.max_wait_s
        if self._rows < self.policy.max_batch_rows and now_s < due_s:
            return [], due_s - now_s
        limit = self.policy.max_batch_rows if max_rows is None else max_rows
        batch: list[tuple[T, float]] = []
        rows = 0
        while self._queue and (not batch or rows + self._queue[0].rows <= limit):
            queued = self._queue.popleft()
            rows += queued.rows
            batch.append((queued.item, queued.enqueued_s))
        self._rows -= rows
        return batch, None

    def take_tail(self, count: int) -> list[tuple[T, int, float]]:
        """Remove the ``count`` newest items; returns (item, rows, enqueue time), oldest first
        (an idle worker steals them)."""
        taken: list[tuple[T, int, float]] = []
        for _ in range(min(count, len(self._queue))):
            queued = self._queue.pop()
            self._rows -= queued.rows
            taken.append((queued.item, queued.rows, queued.enqueued_s))
        return taken[::-1]

    def drain(self) -> list[T]:
        """Remove and return every queued item, oldest first (failover hands them elsewhere)."""
        items = [queued.item for queued in self._queue]
        self._queue.clear()
        self._rows = 0
        return items
