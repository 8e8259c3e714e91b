"""The online router: per-worker dynamic batching, routing by a policy (`idla.serve.policies`),
admission control (deadlines and bounded queues), work stealing, health checks and failover,
and hot model rollout.

A request is routed on arrival to the worker its policy picks among those with room in their
queue, and waits there for a batch (`idla.serve.batcher`). With a latency target and the
predictive policy (idla) it is refused (429) only when no worker is predicted to answer it by
its deadline, an idle worker steals queued requests it would answer sooner, and a backlog runs
in batches as big as the oldest deadline allows (`idla.serve.deadlines`). When a worker dies (its
connection breaks, a ping or a batch times out) its batch in flight and its queue go to the
others, so a request is answered exactly once unless it failed on ``max_attempts`` workers.
A lost worker comes back through `Router.revive` (`idla.serve.supervisor` calls it), on the
model the others serve; workers join and leave at runtime (`idla.serve.membership`, which
`Router` inherits). Rollouts: `idla.serve.rollout`; each worker's state: `idla.serve.slots`.

Admission, routing, failover and rollout stay in one class because they share one piece of
state (every worker's queue and batch in flight) that one event loop owns; split, each part
would reach into the others' queues. Membership is apart only as a mixin over that same state.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from idla.errors import ConfigError, IdlaError
from idla.profile.meters import EmaMeter
from idla.serve import wire
from idla.serve.batcher import BatchPolicy, DynamicBatcher, ServiceCurve, size_batching
from idla.serve.deadlines import adaptive_batch_rows, admission, steal_count
from idla.serve.link import WorkerError, WorkerLink, WorkerLost
from idla.serve.membership import Membership
from idla.serve.policies import POLICIES, Policy, make_policy, predict_completion_s
from idla.serve.rollout import CONFLICT, RolloutError, commit_all, prepare_all
from idla.serve.router_config import Overloaded, RouterConfig, Unavailable
from idla.serve.slots import LATENESS_DECAY, SLOWDOWN_DECAY, Batch, Prediction, Request, WorkerSlot

PIPELINE_DEPTH = 2  # batches a worker may have outstanding: one running, one in its socket
REFUSED_REASONS = ("deadline", "queue_full")
LATENESS_CAP = 0.5  # of the latency target: the most lateness a worker's predictions add

__all__ = ["POLICIES", "Overloaded", "Prediction", "RolloutError", "Router", "RouterConfig",
           "Unavailable"]


class Router(Membership):
    """Routes requests to workers, batches per worker, retries on a worker's death.

    All methods run on one asyncio event loop; nothing here blocks it.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.policy: Policy = make_policy(config.policy, config.seed)
        self.workers: list[WorkerSlot] = []
        self.input_shape: tuple[int, ...] = ()
        self.output_features = 0
        self.failovers = 0
        self.retried_requests = 0
        self.stolen_requests = 0
        self.refused: Counter[str] = Counter({reason: 0 for reason in REFUSED_REASONS})
        """Requests answered 429, by reason (none of them is a failure)."""
        self.last_rollout: dict[str, Any] | None = None
        self.version: str | None = None
        """The model version every worker serves (None while they differ)."""
        self.model_path: str | None = None
        """Directory of the last model rolled out (None: still the one the workers began on)."""
        self._secret = b""
        self._rollout_lock = asyncio.Lock()  # one rollout, or one worker joining, at a time

    def set_policy(self, name: str) -> None:
        self.policy = make_policy(name, self.config.seed)

    async def connect(self, addresses: Sequence[tuple[str, int]], secret: bytes) -> None:
        """Connect to every worker (``secret``: the pool's link secret), read its curve and size
        its batching; start dispatching."""
        self._secret = secret
        links = await asyncio.gather(*(WorkerLink.connect(h, p, secret) for h, p in addresses))
        shapes = {(tuple(link.hello["input_shape"]), int(link.hello["output_features"]))
                  for link in links}
        if len(shapes) != 1:
            for link in links:
                link.close()
            raise ConfigError(f"workers serve models of different shapes: {sorted(shapes)}")
        (self.input_shape, self.output_features), = shapes
        versions = {str(link.hello["version"]) for link in links}
        self.version = versions.pop() if len(versions) == 1 else None
        for address, link in zip(addresses, links, strict=True):
            curve, batcher = self._batching(link)
            worker = WorkerSlot(len(self.workers), address, link, curve, batcher,
                                str(link.hello["version"]))
            self._attach(worker, address, link)
            self.workers.append(worker)

    def _batching(self, link: WorkerLink) -> tuple[ServiceCurve, DynamicBatcher[Request]]:
        """The curve a worker's hello reports, and a batcher sized by it."""
        curve = ServiceCurve.from_points(link.hello["curve"])
        batching = size_batching(curve, self.config.batch_budget_s, self.config.max_batch_rows,
                                 self.config.max_wait_cap_s, self.config.request_rows)
        if self.config.max_wait_s is not None:
            batching = BatchPolicy(batching.max_batch_rows, self.config.max_wait_s)
        return curve, DynamicBatcher(batching)

    def _attach(self, worker: WorkerSlot, address: tuple[str, int], link: WorkerLink) -> None:
        """Serve ``worker`` through ``link`` (curve and batching from its hello); dispatch."""
        worker.address, worker.link = address, link
        worker.curve, worker.batcher = self._batching(link)
        worker.version = str(link.hello["version"])
        worker.slowdown, worker.link_s = EmaMeter(SLOWDOWN_DECAY), EmaMeter(0.9)
        worker.lateness_s = EmaMeter(LATENESS_DECAY)
        target_s = self.config.latency_target_s
        worker.lateness_cap_s = 0.0 if target_s is None else LATENESS_CAP * target_s
        worker.alive = True
        link.set_on_lost(worker.wake.set)
        if worker.task is not None:
            worker.task.cancel()
        worker.task = asyncio.get_running_loop().create_task(self._dispatch(worker))

    async def submit(self, inputs: np.ndarray, arrival_s: float | None = None) -> Prediction:
        """Answer one request (``inputs``: (rows, *input_shape) float32; ``arrival_s``: the
        perf_counter time it arrived, which starts its deadline; default now). Raises
        Overloaded, Unavailable, WorkerError or asyncio.TimeoutError."""
        start_s = time.perf_counter()
        target_s = self.config.latency_target_s
        deadline_s = math.inf if target_s is None else (
            (start_s if arrival_s is None else arrival_s) + target_s)
        request = Request(inputs, asyncio.get_running_loop().create_future(),
                          deadline_s=deadline_s)
        self._route(request, admit=True)
        request.route_s = time.perf_counter() - start_s
        return await asyncio.wait_for(request.future, self.config.request_timeout_s)

    def _route(self, request: Request, admit: bool) -> None:
        alive = [w for w in self.workers if w.alive and not w.retired]
        if not alive:
            raise Unavailable("no healthy worker")
        limit = self.config.max_queue_requests
        room = [w for w in alive if w.batcher.queued_requests < limit] if admit else alive
        now_s = time.perf_counter()
        if not room:
            self.refused["queue_full"] += 1
            drain_s = min(predict_completion_s(w.view(now_s), 0) for w in alive)
            raise Overloaded(f"all {len(alive)} worker queues are full ({limit} requests each)",
                             drain_s, "queue_full")
        views = [w.view(now_s) for w in room]
        if admit and self.policy.predictive and not math.isinf(request.deadline_s):
            decision = admission(views, request.rows, request.deadline_s - now_s)
            if decision.index is None:
                self.refused["deadline"] += 1
                raise Overloaded(f"no worker is predicted to answer within the latency target "
                                 f"(soonest in {decision.completion_s:.3f} s)",
                                 decision.retry_after_s, "deadline")
            index = decision.index
        else:
            index = self.policy.choose(views, request.rows)
        worker = self.workers[index]
        if self.policy.predictive:  # the raw prediction, for the worker's lateness
            view = next(v for v in views if v.index == index)
            request.predicted_s = now_s + predict_completion_s(view, request.rows) - \
                view.lateness_s
        worker.batcher.push(request, request.rows, now_s)
        worker.wake.set()

    def _batch_limit(self, worker: WorkerSlot, now_s: float) -> int | None:
        """The next batch's row limit when a backlog may run bigger (None: the policy's)."""
        head = worker.batcher.head()
        if (head is None or not self.config.adaptive_batching or math.isinf(head.deadline_s)
                or worker.batcher.queued_rows <= worker.batcher.policy.max_batch_rows):
            return None
        return adaptive_batch_rows(worker.view(now_s), worker.batcher.queued_rows,
                                   head.deadline_s - now_s, self.config.max_batch_rows)

    def _steal(self, thief: WorkerSlot) -> None:
        """An idle ``thief`` takes the tail of the queue it can shorten most."""
        now_s = time.perf_counter()
        thief_view = thief.view(now_s)
        best: tuple[int, WorkerSlot] | None = None
        for victim in self.workers:
            if victim is thief or not victim.batcher.queued_requests:
                continue
            count = steal_count(thief_view, victim.view(now_s), victim.batcher.request_rows())
            if count and (best is None or count > best[0]):
                best = (count, victim)
        if best is not None:
            for request, rows, enqueued_s in best[1].batcher.take_tail(best[0]):
                request.predicted_s = math.nan  # predicted for the victim, not the thief
                thief.batcher.push(request, rows, enqueued_s)
            self.stolen_requests += best[0]

    async def _dispatch(self, worker: WorkerSlot) -> None:
        """Start batches on ``worker``: one when it is idle (by the batching rule; an idle
        worker with an empty queue first tries to steal), and while one runs a second only when
        a full batch is queued, so the worker does not idle through the round trip
        (pipelining)."""
        loop = asyncio.get_running_loop()
        policy = worker.batcher.policy
        while worker.alive:
            if worker.link.closed:
                self._lose(worker, [])
                return
            batch: list[tuple[Request, float]] = []
            wait_s = None
            if (not worker.inflight and not worker.batcher.queued_requests and not worker.retired
                    and self.policy.predictive and self.config.work_stealing):
                self._steal(worker)
            if not worker.inflight or (len(worker.inflight) < PIPELINE_DEPTH and
                                       worker.batcher.queued_rows >= policy.max_batch_rows):
                now_s = time.perf_counter()
                batch, wait_s = worker.batcher.take(now_s, self._batch_limit(worker, now_s))
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

    async def _ping(self, worker: WorkerSlot) -> None:
        link = worker.link
        try:
            await link.call({"op": "ping"}, timeout_s=self.config.health_timeout_s)
        except (WorkerLost, WorkerError, asyncio.TimeoutError):
            self._lose(worker, [], link)

    async def _run(self, worker: WorkerSlot, batch: list[tuple[Request, float]]) -> None:
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
        record = Batch(rows, len(requests), begin_s + slowdown * predicted_s + link_s)
        worker.inflight.append(record)
        shape, data = wire.to_payload(inputs)
        timeout_s = max(self.config.batch_timeout_floor_s,
                        20 * (record.until_s - start_s))
        link = worker.link
        try:
            header, payload = await link.call({"op": "batch", "shape": shape}, data, timeout_s)
            outputs = wire.from_payload(header.get("shape"), payload)
        except WorkerError as error:
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        except (WorkerLost, wire.WireError, asyncio.TimeoutError):
            self._lose(worker, requests, link)
            return
        finally:
            if record in worker.inflight:
                worker.inflight.remove(record)
            worker.wake.set()
        elapsed_s = time.perf_counter() - start_s
        service_s = float(header.get("service_s", elapsed_s))
        worker.slowdown.update(min(max(service_s / predicted_s, 0.1), 10.0))
        if not pipelined:  # a pipelined batch's round trip includes its predecessor's turn
            worker.link_s.update(max(elapsed_s - service_s, 0.0))
        version = str(header.get("version"))
        worker.version = version
        answered_s = time.perf_counter()
        offset = 0
        for request, enqueued_s in batch:
            out = outputs[offset:offset + request.rows]
            offset += request.rows
            if not request.future.done():
                if not math.isnan(request.predicted_s):
                    worker.lateness_s.update(answered_s - request.predicted_s)
                worker.served_requests += 1
                request.future.set_result(Prediction(out, version, worker.index, rows,
                                                     start_s - enqueued_s, request.route_s,
                                                     elapsed_s))

    def _lose(self, worker: WorkerSlot, inflight: list[Request],
              link: WorkerLink | None = None) -> None:
        """Mark ``worker`` dead and hand its batch in flight and its queue to the others;
        ``link``: the connection that failed (an older one than the worker's changes nothing
        but its requests)."""
        if worker.alive and (link is None or link is worker.link):
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

    async def rollout(self, path: str, load_timeout_s: float | None = None) -> dict[str, Any]:
        """Roll the model in ``path`` out to every live worker, all or nothing
        (`idla.serve.rollout`): all load it beside the old one within ``load_timeout_s``
        (default: the config's), then all switch between two batches. Version skew is the
        spread of the workers' switch times, at most about one batch plus a round trip."""
        if self._rollout_lock.locked():
            raise RolloutError("another model rollout (or a worker's recovery) is in progress",
                               CONFLICT)
        async with self._rollout_lock:
            workers = [w for w in self.workers if w.alive]
            if not workers:
                raise Unavailable("no healthy worker")
            previous = sorted({w.version for w in workers})
            start_s = time.perf_counter()
            control_s = self.config.health_timeout_s
            prepared = await prepare_all(
                [w.link for w in workers], [w.index for w in workers], path,
                self.config.load_timeout_s if load_timeout_s is None else load_timeout_s,
                control_s, (self.input_shape, self.output_features))
            prepare_s = time.perf_counter() - start_s
            # A worker switches once the batches already sent to it are done: the spread of
            # switch times is bounded by the longest such wait plus a round trip.
            now_s = time.perf_counter()
            bound_s = max(w.view(now_s).inflight_remaining_s + w.estimates()[1] for w in workers)
            switched_s = []
            for worker, commit in zip(workers, await commit_all(prepared, control_s),
                                      strict=True):
                if isinstance(commit, BaseException):  # it rejoins on the new model
                    self._lose(worker, [], worker.link)
                else:
                    worker.version = str(commit["version"])
                    switched_s.append(float(commit["switched_at_s"]))
            self.version, self.model_path = str(prepared[0].reply["version"]), path
            self.last_rollout = {
                "version": self.version, "previous_versions": previous,
                "workers": len(switched_s), "prepare_s": prepare_s,
                "total_s": time.perf_counter() - start_s,
                "skew_s": max(switched_s) - min(switched_s) if switched_s else math.nan,
                "skew_bound_s": bound_s,
            }
            return self.last_rollout

    def stats(self) -> list[dict[str, Any]]:
        return [w.stats(self.config.request_rows) for w in self.workers]

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
