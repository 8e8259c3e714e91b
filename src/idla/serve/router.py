"""The online router: per-worker dynamic batching, routing by a policy (`idla.serve.policies`),
admission control (bounded queues), health checks and failover, and hot model rollout.

A request is routed once on arrival to the worker its policy picks among those with room in
their queue, and waits there for a batch (`idla.serve.batcher`). When a worker dies (its
connection breaks, a ping or a batch times out) its batch in flight and its queue go to the
others, so a request is answered exactly once unless it failed on ``max_attempts`` workers.

Longer than 400 lines because admission, routing, failover and rollout share one piece of
state (every worker's queue and batch in flight) that one event loop owns; split, each part
would reach into the others' queues.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from idla.errors import ConfigError, IdlaError
from idla.profile.meters import EmaMeter
from idla.serve import wire
from idla.serve.batcher import BatchPolicy, DynamicBatcher, ServiceCurve, size_batching
from idla.serve.link import WorkerError, WorkerLink, WorkerLost
from idla.serve.policies import POLICIES, LoadView, Policy, make_policy, predict_completion_s

PIPELINE_DEPTH = 2  # batches a worker may have outstanding: one running, one in its socket

__all__ = ["POLICIES", "Overloaded", "Prediction", "RolloutError", "Router", "RouterConfig",
           "Unavailable"]


class Overloaded(IdlaError):
    """Every worker's queue is full: the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(IdlaError):
    """No healthy worker can answer (all died, or a request was retried too often)."""


class RolloutError(IdlaError):
    """A model rollout was refused (bad model, other shapes, or another rollout running)."""


@dataclass(kw_only=True, slots=True)
class RouterConfig:
    policy: str = "idla"
    """One of POLICIES."""
    max_queue_requests: int = 64
    """Requests a worker may hold queued; when every worker is full a request gets 429."""
    batch_budget_s: float = 0.05
    """A batch's predicted service time stays within this (sets each worker's max batch)."""
    max_batch_rows: int = 256
    """Upper bound on any worker's batch, in rows."""
    max_wait_cap_s: float = 0.005
    """Upper bound on the wait for a fuller batch (each worker waits its fixed cost α)."""
    max_wait_s: float | None = None
    """Force this batching wait on every worker instead (seconds)."""
    request_rows: int = 1
    """Rows of a typical request: every batch may hold at least one."""
    health_interval_s: float = 1.0
    """An idle worker is pinged after this many seconds without traffic."""
    health_timeout_s: float = 5.0
    """A ping unanswered this long marks a worker dead."""
    batch_timeout_floor_s: float = 10.0
    """A batch unanswered for max(this, 20 × its predicted time) marks the worker dead."""
    request_timeout_s: float = 30.0
    """A request waits at most this long for its answer (then 504)."""
    max_attempts: int = 3
    """A request is tried on at most this many workers (failover)."""
    seed: int = 0

    def __post_init__(self) -> None:
        make_policy(self.policy)
        for name in ("max_queue_requests", "max_batch_rows", "request_rows", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("batch_budget_s", "health_interval_s", "health_timeout_s",
                     "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} {getattr(self, name)} must be positive")


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
class _Request:
    inputs: np.ndarray  # (rows, *input_shape)
    future: asyncio.Future[Prediction]
    attempts: int = 1
    route_s: float = 0.0

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(slots=True)
class _Batch:
    rows: int
    requests: int
    until_s: float
    """Predicted time (perf_counter) its reply arrives."""


@dataclass(eq=False)
class _Worker:
    index: int
    address: tuple[str, int]
    link: WorkerLink
    curve: ServiceCurve
    batcher: DynamicBatcher[_Request]
    version: str
    alive: bool = True
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: list[_Batch] = field(default_factory=list)
    slowdown: EmaMeter = field(default_factory=lambda: EmaMeter(0.9))
    link_s: EmaMeter = field(default_factory=lambda: EmaMeter(0.9))
    served_requests: int = 0
    task: asyncio.Task[None] | None = None
    batch_tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def estimates(self) -> tuple[float, float]:
        """(slowdown, link seconds) as measured so far; (1, 0) before the first batch."""
        if not self.slowdown.count:
            return 1.0, 0.0
        return self.slowdown.value, self.link_s.value

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
                        self.curve, self.batcher.policy, *self.estimates())


class Router:
    """Routes requests to workers, batches per worker, retries on a worker's death.

    All methods run on one asyncio event loop; nothing here blocks it.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.policy: Policy = make_policy(config.policy, config.seed)
        self.workers: list[_Worker] = []
        self.input_shape: tuple[int, ...] = ()
        self.output_features = 0
        self.failovers = 0
        self.retried_requests = 0
        self.last_rollout: dict[str, Any] | None = None
        self._rollout_lock = asyncio.Lock()

    def set_policy(self, name: str) -> None:
        self.policy = make_policy(name, self.config.seed)

    async def connect(self, addresses: Sequence[tuple[str, int]]) -> None:
        """Connect to every worker, read its curve and size its batching; start dispatching."""
        links = await asyncio.gather(*(WorkerLink.connect(h, p) for h, p in addresses))
        shapes = {(tuple(link.hello["input_shape"]), int(link.hello["output_features"]))
                  for link in links}
        if len(shapes) != 1:
            for link in links:
                link.close()
            raise ConfigError(f"workers serve models of different shapes: {sorted(shapes)}")
        (self.input_shape, self.output_features), = shapes
        for address, link in zip(addresses, links, strict=True):
            curve = ServiceCurve.from_points(link.hello["curve"])
            batching = size_batching(curve, self.config.batch_budget_s,
                                     self.config.max_batch_rows, self.config.max_wait_cap_s,
                                     self.config.request_rows)
            if self.config.max_wait_s is not None:
                batching = BatchPolicy(batching.max_batch_rows, self.config.max_wait_s)
            worker = _Worker(len(self.workers), address, link, curve,
                             DynamicBatcher(batching), str(link.hello["version"]))
            link.set_on_lost(worker.wake.set)
            worker.task = asyncio.get_running_loop().create_task(self._dispatch(worker))
            self.workers.append(worker)

    async def submit(self, inputs: np.ndarray) -> Prediction:
        """Answer one request (``inputs``: (rows, *input_shape) float32). Raises Overloaded,
        Unavailable, WorkerError or asyncio.TimeoutError."""
        start_s = time.perf_counter()
        request = _Request(inputs, asyncio.get_running_loop().create_future())
        self._route(request, admit=True)
        request.route_s = time.perf_counter() - start_s
        return await asyncio.wait_for(request.future, self.config.request_timeout_s)

    def _route(self, request: _Request, admit: bool) -> None:
        alive = [w for w in self.workers if w.alive]
        if not alive:
            raise Unavailable("no healthy worker")
        limit = self.config.max_queue_requests
        room = [w for w in alive if w.batcher.queued_requests < limit] if admit else alive
        now_s = time.perf_counter()
        if not room:
            drain_s = min(predict_completion_s(w.view(now_s), 0) for w in alive)
            raise Overloaded(f"all {len(alive)} worker queues are full ({limit} requests each)",
                             drain_s)
        worker = self.workers[self.policy.choose([w.view(now_s) for w in room], request.rows)]
        worker.batcher.push(request, request.rows, now_s)
        worker.wake.set()

    async def _dispatch(self, worker: _Worker) -> None:
        """Start batches on ``worker``: one when it is idle (by the batching rule), and while
        one runs a second only when a full batch is queued, so the worker does not idle through
        the round trip (pipelining)."""
        loop = asyncio.get_running_loop()
        policy = worker.batcher.policy
        while worker.alive:
            if worker.link.closed:
                self._lose(worker, [])
                return
            batch: list[tuple[_Request, float]] = []
            wait_s = None
            if not worker.inflight or (len(worker.inflight) < PIPELINE_DEPTH and
                                       worker.batcher.queued_rows >= policy.max_batch_rows):
                batch, wait_s = worker.batcher.take(time.perf_counter())
            if batch:
                task = loop.create_task(self._run(worker, batch))
                worker.batch_tasks.add(task)
                task.add_done_callback(worker.batch_tasks.discard)
                continue
            worker.wake.clear()
            idle = not worker.inflight
            timeout_s = wait_s if wait_s is not None else (
                self.config.health_interval_s if idle else None)
            try:
                await asyncio.wait_for(worker.wake.wait(), timeout_s)
            except asyncio.TimeoutError:
                if wait_s is None and idle:
                    await self._ping(worker)

    async def _ping(self, worker: _Worker) -> None:
        try:
            await worker.link.call({"op": "ping"}, timeout_s=self.config.health_timeout_s)
        except (WorkerLost, WorkerError, asyncio.TimeoutError):
            self._lose(worker, [])

    async def _run(self, worker: _Worker, batch: list[tuple[_Request, float]]) -> None:
        batch = [(r, enqueued_s) for r, enqueued_s in batch if not r.future.done()]
        if not batch:
            return
        requests = [r for r, _ in batch]
        rows = sum(r.rows for r in requests)
        inputs = requests[0].inputs if len(requests) == 1 else np.concatenate(
            [r.inputs for r in requests])
        start_s = time.perf_counter()
        predicted_s = worker.curve.predict_s(rows)
        slowdown, link_s = worker.estimates()
        pipelined = bool(worker.inflight)
        begin_s = max(start_s, worker.inflight[-1].until_s) if pipelined else start_s
        record = _Batch(rows, len(requests), begin_s + slowdown * predicted_s + link_s)
        worker.inflight.append(record)
        shape, data = wire.to_payload(inputs)
        timeout_s = max(self.config.batch_timeout_floor_s,
                        20 * (record.until_s - start_s))
        try:
            header, payload = await worker.link.call({"op": "batch", "shape": shape}, data,
                                                     timeout_s)
            outputs = wire.from_payload(header.get("shape"), payload)
        except WorkerError as error:
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        except (WorkerLost, wire.WireError, asyncio.TimeoutError):
            self._lose(worker, requests)
            return
        finally:
            worker.inflight.remove(record)
            worker.wake.set()
        elapsed_s = time.perf_counter() - start_s
        service_s = float(header.get("service_s", elapsed_s))
        worker.slowdown.update(min(max(service_s / predicted_s, 0.1), 10.0))
        if not pipelined:  # a pipelined batch's round trip includes its predecessor's turn
            worker.link_s.update(max(elapsed_s - service_s, 0.0))
        version = str(header.get("version"))
        worker.version = version
        offset = 0
        for request, enqueued_s in batch:
            out = outputs[offset:offset + request.rows]
            offset += request.rows
            if not request.future.done():
                worker.served_requests += 1
                request.future.set_result(Prediction(out, version, worker.index, rows,
                                                     start_s - enqueued_s, request.route_s,
                                                     elapsed_s))

    def _lose(self, worker: _Worker, inflight: list[_Request]) -> None:
        """Mark ``worker`` dead and hand its batch in flight and its queue to the others."""
        if worker.alive:
            worker.alive = False
            worker.link.close()
            self.failovers += 1
        for request in inflight + worker.batcher.drain():
            if request.future.done():
                continue
            if request.attempts >= self.config.max_attempts:
                request.future.set_exception(Unavailable(
                    f"request failed on {request.attempts} workers"))
                continue
            request.attempts += 1
            self.retried_requests += 1
            try:
                self._route(request, admit=False)
            except IdlaError as error:
                request.future.set_exception(error)

    async def rollout(self, path: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Roll the model in ``path`` out to every live worker: all load it beside the old one
        (prepare), then all switch between two batches (commit). Version skew is the spread of
        the workers' switch times, at most about one batch plus a round trip."""
        if self._rollout_lock.locked():
            raise RolloutError("another model rollout is in progress")
        async with self._rollout_lock:
            workers = [w for w in self.workers if w.alive]
            if not workers:
                raise Unavailable("no healthy worker")
            previous = sorted({w.version for w in workers})
            start_s = time.perf_counter()
            replies = await asyncio.gather(
                *(w.link.call({"op": "prepare", "path": path}, timeout_s=timeout_s)
                  for w in workers), return_exceptions=True)
            prepared = [(w, r[0]) for w, r in zip(workers, replies, strict=True)
                        if not isinstance(r, BaseException)]
            refusals = [str(r) for r in replies if isinstance(r, WorkerError)]
            if refusals or not prepared:
                raise RolloutError(refusals[0] if refusals else "every worker failed to load")
            shapes = {(tuple(h["input_shape"]), int(h["output_features"])) for _, h in prepared}
            if shapes != {(self.input_shape, self.output_features)}:
                raise RolloutError(
                    f"the new model maps {sorted(shapes)}, the served one "
                    f"{self.input_shape} -> {self.output_features} features")
            prepare_s = time.perf_counter() - start_s
            # A worker switches once the batches already sent to it are done: the spread of
            # switch times is bounded by the longest such wait plus a round trip.
            now_s = time.perf_counter()
            bound_s = max(w.view(now_s).inflight_remaining_s + w.estimates()[1]
                          for w, _ in prepared)
            commits = await asyncio.gather(
                *(w.link.call({"op": "commit"}, timeout_s=timeout_s) for w, _ in prepared),
                return_exceptions=True)
            switched_s = []
            for (worker, _), commit in zip(prepared, commits, strict=True):
                if not isinstance(commit, BaseException):
                    worker.version = str(commit[0]["version"])
                    switched_s.append(float(commit[0]["switched_at_s"]))
            self.last_rollout = {
                "version": prepared[0][1]["version"], "previous_versions": previous,
                "workers": len(switched_s), "prepare_s": prepare_s,
                "total_s": time.perf_counter() - start_s,
                "skew_s": max(switched_s) - min(switched_s) if switched_s else math.nan,
                "skew_bound_s": bound_s,
            }
            return self.last_rollout

    def capacity_requests_per_s(self, worker: _Worker) -> float:
        """Requests/s a worker sustains with full batches of typical requests."""
        per_batch = max(1, worker.batcher.policy.max_batch_rows // self.config.request_rows)
        return per_batch / worker.curve.predict_s(per_batch * self.config.request_rows)

    def stats(self) -> list[dict[str, Any]]:
        return [{
            "worker": w.index, "address": f"{w.address[0]}:{w.address[1]}", "up": w.alive,
            "pid": w.link.hello.get("pid"), "device": w.link.hello.get("device"),
            "version": w.version, "queued_requests": w.batcher.queued_requests,
            "queued_rows": w.batcher.queued_rows, "inflight_rows": sum(b.rows for b in w.inflight),
            "served_requests": w.served_requests, "max_batch_rows": w.batcher.policy.max_batch_rows,
            "max_wait_s": w.batcher.policy.max_wait_s,
            "capacity_requests_per_s": self.capacity_requests_per_s(w),
            "slowdown": w.estimates()[0], "link_s": w.estimates()[1],
            "curve": w.curve.to_json(),
        } for w in self.workers]

    async def close(self) -> None:
        for worker in self.workers:
            worker.alive = False
            worker.link.close()
            for task in [worker.task, *worker.batch_tasks]:
                if task is not None:
                    task.cancel()
        for worker in self.workers:
            for request in worker.batcher.drain():
                if not request.future.done():
                    request.future.set_exception(Unavailable("the router is shutting down"))
