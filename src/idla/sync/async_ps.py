"""Asynchronous training through a parameter server, with bounded staleness (SSP) and DC-ASGD.

One rank (`AsyncConfig.server_rank`) holds the parameters and does not train; every other rank
is a worker that loops: receive parameters, compute a gradient on its next local batch, push it.
The server applies each push as soon as it arrives, as one optimizer step (ASGD: Recht et al.,
Hogwild!, 2011; Dean et al., Downpour SGD, 2012), so fast workers never wait for slow ones.

Staleness. A push's staleness is the number of other pushes applied between the worker reading
the parameters (version v0) and its gradient being applied (version v1): s = v1 − v0. SSP (Ho et
al. 2013) bounds it: a worker's clock is its number of pushes, and it may start a step only if
its clock <= the slowest live clock + S; otherwise the server holds its reply. That gives
s <= (N − 1)(2S + 1) for N workers and clocks that never differ by more than S + 1
(delay_comp.ssp_staleness_bound). With λ > 0 the server applies DC-ASGD (Zheng et al. 2017),
keeping for each worker the parameters it was sent (one copy of the model per worker).

Costs. Each step sends one gradient and receives one parameter vector per worker: 2 × model
size per worker step, all through the server, which handles N × 2 × model size per round of
N pushes and is the bottleneck as N grows (sharding the server is the usual remedy, not done
here). Server memory: parameters, optimizer state, one parameter copy per worker.

Failures. A worker is declared dead when its connection fails, or when it stays silent longer
than `dead_after_s` after being sent parameters. Dead workers leave the SSP minimum, so they
never hold the others back; gloo's pairs are independent, so the other workers keep talking
to the server (tests/distributed/test_async_ps.py kills one to check). Message layouts and
why the server uses one link thread per worker: async_wire.py.

Longer than 400 lines because the server's SSP clocks, its failure detection and the worker
loop form one protocol; the wire format already lives apart (async_wire.py).
"""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from idla.errors import ConfigError
from idla.runtime.group import Group
from idla.sync.async_wire import (
    MAX_VERSION,
    PUSH_HEADER,
    REPLY_HEADER,
    LinkEvent,
    PushFlag,
    ReplyFlag,
    ServerLink,
    flat_grad_into,
    flat_params,
    load_flat,
    make_reply,
    read_push_header,
    read_reply_header,
    write_push_header,
)
from idla.sync.delay_comp import (
    dc_asgd,
    ssp_may_start,
    ssp_staleness_bound,
    staleness_histogram,
    staleness_summary,
)

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
"""Builds the server's optimizer over a list holding its one flat parameter."""
ComputeGrad = Callable[[nn.Module], "tuple[int, float] | None"]
"""Fills the model's .grad with the mean gradient of its next batch and returns (samples, mean
loss); None when the worker has no more data."""


@dataclass(kw_only=True, slots=True)
class AsyncConfig:
    """How asynchronous training runs; validated when built."""

    staleness_bound: int
    """SSP's S: a worker's clock may lead the slowest live worker's by at most S (0: lockstep
    clocks; a large S is plain ASGD)."""
    delay_compensation: float = 0.0
    """DC-ASGD's λ (0: no compensation)."""
    server_rank: int = 0
    """The rank that holds the parameters (it does not train)."""
    dead_after_s: float = 10.0
    """A worker silent this long after being sent parameters is declared dead, seconds; must
    exceed the slowest worker's step time."""

    def __post_init__(self) -> None:
        if isinstance(self.staleness_bound, bool) or self.staleness_bound < 0:
            raise ConfigError(
                f"async.staleness_bound must be an integer >= 0, got {self.staleness_bound}"
            )
        lam = self.delay_compensation
        if not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"async.delay_compensation must be a finite number >= 0, got {lam}")
        if self.server_rank < 0:
            raise ConfigError(f"async.server_rank must be >= 0, got {self.server_rank}")
        if not math.isfinite(self.dead_after_s) or self.dead_after_s <= 0:
            raise ConfigError(f"async.dead_after_s must be > 0 seconds, got {self.dead_after_s}")


class WorkerStatus(str, Enum):
    """Where a worker stands, as the server sees it."""

    COMPUTING = "computing"  # holds parameters; the server waits for its push
    HELD = "held"  # pushed; its reply waits for SSP or for the step budget
    STOPPED = "stopped"  # sent the stop message
    DEAD = "dead"  # connection failed, or silent longer than dead_after_s


@dataclass(slots=True)
class _Worker:
    link: ServerLink
    status: WorkerStatus = WorkerStatus.HELD
    clock: int = 0  # pushes applied
    sent: torch.Tensor | None = None  # (2 + n,) the last reply: version + the params it read
    sent_at_s: float = 0.0  # monotonic time the last reply was handed to the link
    heard_at_s: float = 0.0  # monotonic time of the last message
    held_since_s: float = 0.0  # monotonic time it was last held
    held_s: float = 0.0  # total time held, seconds


def _optimizer(optimizer: float | OptimizerFactory, flat: nn.Parameter) -> torch.optim.Optimizer:
    if callable(optimizer):
        return optimizer([flat])
    if not math.isfinite(optimizer) or optimizer <= 0:
        raise ConfigError(f"async.lr must be a positive number, got {optimizer}")
    return torch.optim.SGD([flat], lr=optimizer)


class ParameterServer:
    """The server's loop: apply pushes as they arrive, release workers under the SSP rule.

    `optimizer` is plain SGD's learning rate, or a factory called on [the flat parameter]. Each
    push is one optimizer step with the worker's mean gradient, as in ASGD. Training ends when
    `total_steps` pushes were applied, or when no live worker is left; the server then sends
    every live worker a stop message and writes the final parameters into `model`.
    `record_gradients` keeps every applied gradient as received (before DC), for tests.
    """

    def __init__(
        self,
        model: nn.Module,
        group: Group,
        config: AsyncConfig,
        optimizer: float | OptimizerFactory,
        total_steps: int,
        record_gradients: bool = False,
        should_stop: Callable[[int], bool] | None = None,
    ) -> None:
        if group.world_size < 2 or not 0 <= config.server_rank < group.world_size:
            raise ConfigError(
                f"async.server_rank {config.server_rank} needs a group of at least 2 ranks "
                f"holding it, got world size {group.world_size}"
            )
        if group.rank != config.server_rank:
            raise ConfigError(f"rank {group.rank} is not async.server_rank {config.server_rank}")
        if not 1 <= total_steps < MAX_VERSION:
            raise ConfigError(
                f"async.total_steps must be in 1..{MAX_VERSION - 1}, got {total_steps}"
            )
        self.model = model
        self.config = config
        self.total_steps = total_steps
        self.record_gradients = record_gradients
        self.should_stop = should_stop  # asked after every applied push, with the new version
        self.flat = nn.Parameter(flat_params(model))  # (n,)
        self.optimizer = _optimizer(optimizer, self.flat)
        self.version = 0  # pushes applied
        self._inbox: queue.Queue[LinkEvent] = queue.Queue()
        numel = self.flat.numel()
        self._workers = {
            rank: _Worker(ServerLink(group, rank, numel, self._inbox))
            for rank in range(group.world_size)
            if rank != config.server_rank
        }
        self._arrivals: list[dict[str, Any]] = []
        self._gradients: list[torch.Tensor] = []
        self._dead: dict[int, dict[str, Any]] = {}
        self._start_s = 0.0

    def run(self, poll_s: float = 0.05) -> dict[str, Any]:
        """Serve until done; return the report (see `report`). Waits on arrivals at most
        `poll_s` at a time, to check silences."""
        self._start_s = time.monotonic()
        for worker in self._workers.values():
            worker.heard_at_s = worker.held_since_s = self._start_s
        self._dispatch(self._start_s)
        while any(
            w.status in (WorkerStatus.COMPUTING, WorkerStatus.HELD) for w in self._workers.values()
        ):
            try:
                event: LinkEvent | None = self._inbox.get(timeout=poll_s)
            except queue.Empty:
                event = None
            now = time.monotonic()
            if event is not None:
                self._handle(event, now)
            self._check_silence(now)
            self._dispatch(now)
        wall_s = time.monotonic() - self._start_s
        for worker in self._workers.values():
            if worker.status is WorkerStatus.STOPPED:
                worker.link.join(self.config.dead_after_s)
        load_flat(self.model, self.flat.detach())
        return self.report(wall_s)

    def _live_clocks(self) -> list[int]:
        live = (WorkerStatus.COMPUTING, WorkerStatus.HELD)
        return [w.clock for w in self._workers.values() if w.status in live]

    def _reply(self, worker: _Worker, flag: ReplyFlag, now: float) -> None:
        worker.sent = make_reply(self.version, flag, self.flat.detach())
        worker.sent_at_s = now
        worker.link.send(worker.sent)

    def _dispatch(self, now: float) -> None:
        """Release held workers, slowest clock first: parameters while the SSP rule and the step
        budget allow, the stop message once `total_steps` pushes were applied."""
        held = sorted(
            (item for item in self._workers.items() if item[1].status is WorkerStatus.HELD),
            key=lambda item: (item[1].clock, item[0]),
        )
        in_flight = sum(w.status is WorkerStatus.COMPUTING for w in self._workers.values())
        clocks = self._live_clocks()
        for _, worker in held:
            if self.version >= self.total_steps:
                flag = ReplyFlag.STOP
            elif self.version + in_flight < self.total_steps and ssp_may_start(
                worker.clock, clocks, self.config.staleness_bound
            ):
                flag = ReplyFlag.PARAMS
                in_flight += 1
            else:
                continue
            worker.held_s += now - worker.held_since_s
            worker.status = (
                WorkerStatus.STOPPED if flag is ReplyFlag.STOP else WorkerStatus.COMPUTING
            )
            self._reply(worker, flag, now)

    def _handle(self, event: LinkEvent, now: float) -> None:
        worker = self._workers[event.rank]
        if event.push is None:
            if worker.status is not WorkerStatus.DEAD:
                self._declare_dead(event.rank, now, f"connection failed: {event.error[:200]}")
            return
        worker.heard_at_s = event.at_s
        if worker.status is WorkerStatus.DEAD:  # declared dead, then spoke: tell it to stop
            self._reply(worker, ReplyFlag.STOP, now)
            return
        header = read_push_header(event.push)
        if header.flag is PushFlag.DONE:
            worker.status = WorkerStatus.STOPPED
            self._reply(worker, ReplyFlag.STOP, now)
            return
        self._apply(event.rank, worker, event.push, now)
        worker.status = WorkerStatus.HELD
        worker.held_since_s = now

    def _apply(self, rank: int, worker: _Worker, push: torch.Tensor, now: float) -> None:
        """One optimizer step with the pushed mean gradient (DC-corrected when λ > 0)."""
        header = read_push_header(push)
        assert worker.sent is not None  # a push always answers a reply
        sent_version, _ = read_reply_header(worker.sent)
        if header.base_version != sent_version:
            raise RuntimeError(
                f"worker {rank} pushed a gradient of version {header.base_version}, but was "
                f"sent version {sent_version}"
            )
        grad = push[PUSH_HEADER:]  # (n,)
        if self.record_gradients:
            self._gradients.append(grad.clone())
        w_stale = worker.sent[REPLY_HEADER:]
        lam = self.config.delay_compensation
        self.flat.grad = dc_asgd(grad, self.flat.detach(), w_stale, lam)
        self.optimizer.step()
        self.flat.grad = None
        self._arrivals.append(
            {
                "worker": rank,
                "base_version": header.base_version,
                "version": self.version,  # before this push; it produced version + 1
                "staleness": self.version - header.base_version,
                "at_s": now - self._start_s,
                "samples": header.samples,
                "loss": header.loss_sum / max(header.samples, 1),
            }
        )
        self.version += 1
        worker.clock += 1
        if self.should_stop is not None and self.should_stop(self.version):
            self.total_steps = self.version  # no more parameters go out; in-flight pushes land

    def _check_silence(self, now: float) -> None:
        for rank, worker in self._workers.items():
            silent_s = now - worker.sent_at_s
            if worker.status is WorkerStatus.COMPUTING and silent_s > self.config.dead_after_s:
                self._declare_dead(rank, now, f"silent for {silent_s:.1f} s")

    def _declare_dead(self, rank: int, now: float, reason: str) -> None:
        worker = self._workers[rank]
        worker.status = WorkerStatus.DEAD
        self._dead[rank] = {
            "declared_at_s": now - self._start_s,
            "last_heard_s": worker.heard_at_s - self._start_s,
            "pushes": worker.clock,
            "reason": reason,
        }

    def report(self, wall_s: float) -> dict[str, Any]:
        """Versions, pushes per worker, staleness (list in arrival order, histogram, summary),
        the SSP bound, the arrival log, dead workers, seconds each worker was held, wall time;
        plus `gradients` (list of (n,) tensors, arrival order) when recorded."""
        staleness = [a["staleness"] for a in self._arrivals]
        report: dict[str, Any] = {
            "version": self.version,
            "total_steps": self.total_steps,
            "completed": self.version == self.total_steps,
            "pushes": {rank: w.clock for rank, w in self._workers.items()},
            "staleness": staleness,
            "staleness_histogram": staleness_histogram(staleness),
            "max_staleness": max(staleness, default=0),
            "staleness_summary": asdict(staleness_summary(staleness)),
            "ssp_staleness_bound": ssp_staleness_bound(
                len(self._workers), self.config.staleness_bound
            ),
            "arrivals": self._arrivals,
            "dead": self._dead,
            "held_s": {rank: w.held_s for rank, w in self._workers.items()},
            "wall_s": wall_s,
        }
        if self.record_gradients:
            report["gradients"] = self._gradients
        return report


def gradient_from_batches(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> ComputeGrad:
    """A ComputeGrad that runs forward and backward of `loss_fn` (a mean loss) on the next
    (inputs, targets) batch; None once the iterator is exhausted."""

    def compute(model: nn.Module) -> tuple[int, float] | None:
        batch = next(batches, None)
        if batch is None:
            return None
        inputs, targets = batch
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        return int(targets.shape[0]), float(loss.detach())

    return compute


def async_worker(
    model: nn.Module, compute_grad: ComputeGrad, group: Group, config: AsyncConfig
) -> dict[str, Any]:
    """A worker's loop: receive parameters, compute a mean gradient, push it; until stopped.

    Receives block, so the group's timeout must exceed the longest hold (about the slowest
    step plus `dead_after_s`). On stop the model holds the final parameters. Returns the
    worker's pushes, the last version it saw and its seconds waiting and computing. Cost per
    step: one receive of n + 2 and one send of n + 4 float32 values.
    """
    server = config.server_rank
    if group.rank == server or not 0 <= server < group.world_size:
        raise ConfigError(f"rank {group.rank} cannot be a worker of server rank {server}")
    numel = sum(p.numel() for p in model.parameters())
    reply = torch.empty(REPLY_HEADER + numel)  # (2 + n,)
    push = torch.zeros(PUSH_HEADER + numel)  # (4 + n,)
    pushes, wait_s, compute_s = 0, 0.0, 0.0
    while True:
        start_s = time.monotonic()
        group.control_irecv(reply, server).wait()
        wait_s += time.monotonic() - start_s
        version, flag = read_reply_header(reply)
        load_flat(model, reply[REPLY_HEADER:])
        if flag is ReplyFlag.STOP:
            break
        start_s = time.monotonic()
        model.zero_grad(set_to_none=True)
        result = compute_grad(model)
        if result is None:
            write_push_header(push, version, 0, 0.0, PushFlag.DONE)
        else:
            samples, loss = result
            flat_grad_into(model, push[PUSH_HEADER:])
            write_push_header(push, version, samples, loss * samples, PushFlag.GRADIENT)
            pushes += 1
        compute_s += time.monotonic() - start_s
        group.control_isend(push, server).wait()
    return {
        "rank": group.rank,
        "pushes": pushes,
        "final_version": version,
        "wait_s": wait_s,
        "compute_s": compute_s,
    }
