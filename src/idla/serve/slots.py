"""A worker as the router sees it (`WorkerSlot`): its connection, measured curve, batcher,
batches in flight, health and counters; and the records of a request and a batch in flight.

A slot outlives its connection: a worker that is lost and comes back (a new connection, or a
new process) is the same slot with a new link, so its index and counters carry on.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from idla.profile.meters import EmaMeter
from idla.serve.batcher import DynamicBatcher, ServiceCurve
from idla.serve.link import WorkerLink
from idla.serve.policies import LoadView

LATENESS_DECAY = 0.95  # about a worker's last 20 answers
SLOWDOWN_DECAY = 0.98  # about 50 batches: a throttled worker's batches swing from fast to slow


@dataclass(frozen=True, slots=True)
class Prediction:
    outputs: np.ndarray  # (rows, output_features)
    version: str
    worker: int
    batch_rows: int
    queue_s: float
    """Seconds from (the last) enqueue to dispatch."""
    route_s: float
    """Seconds the router spent choosing a worker and enqueuing."""
    service_s: float
    """Seconds from sending the batch to the worker to its reply (the worker's share)."""


@dataclass(slots=True, eq=False)
class Request:
    inputs: np.ndarray  # (rows, *input_shape)
    future: asyncio.Future[Prediction]
    attempts: int = 1
    route_s: float = 0.0
    deadline_s: float = math.inf
    """perf_counter time by which it should be answered (arrival + the latency target)."""
    predicted_s: float = math.nan
    """perf_counter time its answer was predicted for when it was admitted by deadline."""

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(slots=True)
class Batch:
    rows: int
    requests: int
    until_s: float
    """Predicted time (perf_counter) its reply arrives."""


@dataclass(eq=False)
class WorkerSlot:
    index: int
    address: tuple[str, int]
    link: WorkerLink
    curve: ServiceCurve
    batcher: DynamicBatcher[Request]
    version: str
    alive: bool = True
    retired: bool = False
    """Taken out of service (`Router.retire_worker`): never routed to nor brought back."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: list[Batch] = field(default_factory=list)
    slowdown: EmaMeter = field(default_factory=lambda: EmaMeter(SLOWDOWN_DECAY))
    link_s: EmaMeter = field(default_factory=lambda: EmaMeter(0.9))
    lateness_s: EmaMeter = field(default_factory=lambda: EmaMeter(LATENESS_DECAY))
    """Answer time minus the completion predicted when the request was routed (seconds)."""
    lateness_cap_s: float = 0.0
    """The most lateness its predictions add: half the latency target (answers made late by a
    burst must not shut admission to it for good; only its answers update the estimate); 0
    without a target."""
    served_requests: int = 0
    restarts: int = 0
    """Times its process was replaced by a new one (`idla.serve.supervisor`)."""
    reconnects: int = 0
    """Times it came back after being lost (a new process or only a new connection)."""
    task: asyncio.Task[None] | None = None
    batch_tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def estimates(self) -> tuple[float, float]:
        """(slowdown, link seconds) as measured so far; (1, 0) before the first batch."""
        if not self.slowdown.count:
            return 1.0, 0.0
        return self.slowdown.value, self.link_s.value

    def late_s(self) -> float:
        """The lateness its predictions add: measured, at least 0, at most the cap."""
        if not self.lateness_s.count:
            return 0.0
        return min(max(0.0, self.lateness_s.value), self.lateness_cap_s)

    def view(self, now_s: float) -> LoadView:
        if self.inflight:
            rows = sum(b.rows for b in self.inflight)
            requests = sum(b.requests for b in self.inflight)
            remaining_s = max(0.0, self.inflight[-1].until_s - now_s)
        else:
            rows = requests = 0
            remaining_s = 0.0
        return LoadView(self.index, self.batcher.queued_rows, self.batcher.queued_requests,
                        rows, requests, remaining_s, self.batcher.oldest_wait_s(now_s),
                        self.curve, self.batcher.policy, *self.estimates(), self.late_s())

    def capacity_requests_per_s(self, request_rows: int) -> float:
        """Requests/s it sustains with full batches of requests of ``request_rows`` rows."""
        per_batch = max(1, self.batcher.policy.max_batch_rows // request_rows)
        return per_batch / self.curve.predict_s(per_batch * request_rows)

    def stats(self, request_rows: int) -> dict[str, Any]:
        """Its state and counters, as /metrics and the benchmarks read them."""
        slowdown, link_s = self.estimates()
        return {
            "worker": self.index, "address": f"{self.address[0]}:{self.address[1]}",
            "up": self.alive, "retired": self.retired, "pid": self.link.hello.get("pid"),
            "device": self.link.hello.get("device"), "version": self.version,
            "queued_requests": self.batcher.queued_requests,
            "queued_rows": self.batcher.queued_rows,
            "inflight_rows": sum(b.rows for b in self.inflight),
            "served_requests": self.served_requests, "restarts": self.restarts,
            "reconnects": self.reconnects, "max_batch_rows": self.batcher.policy.max_batch_rows,
            "max_wait_s": self.batcher.policy.max_wait_s,
            "capacity_requests_per_s": self.capacity_requests_per_s(request_rows),
            "slowdown": slowdown, "link_s": link_s, "lateness_s": self.late_s(),
            "curve": self.curve.to_json(),
        }
