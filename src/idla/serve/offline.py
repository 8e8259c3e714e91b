"""Offline batch inference over heterogeneous local workers: `infer_offline`.

Worker processes (spawned; one thread each; each optionally in its own throttled cgroup) map the
inputs and outputs as raw float32 files in shared memory (``/dev/shm``): no array is ever
pickled. The launcher hands out index ranges ("chunks") one at a time; a worker writes its
outputs in place, by index, and asks for more. With ``chunking="dynamic"`` a chunk's size follows
the worker's measured rate (`weighted_guided_chunk`), so fast workers take more and everyone
finishes together; ``"equal"`` gives each worker N/workers samples up front (the baseline).
A worker that dies loses only its chunk in flight, which is handed to another worker: every
input is scored, and counted, exactly once.

Longer than 400 lines because the launcher's chunk bookkeeping and the worker loop it talks
to speak one small protocol over one pair of queues; they are read together.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from idla.emulate.cgroup import CpuThrottle
from idla.errors import ConfigError, EmulationError, IdlaError
from idla.profile.meters import RateMeter
from idla.serve.devices import CPU, load_on, resolve_devices, run_on

CHUNKINGS = ("dynamic", "equal")
_POLL_S = 0.05  # how often the launcher checks for dead workers while it waits
_PIECE = 8  # an equal share goes out in pieces this long (progress, failover)
_DEPTH = 2  # ranges queued at a worker at once


class WorkerFailed(RuntimeError):
    """A worker raised an unexpected exception (its traceback is in the message)."""


def weighted_guided_chunk(
    remaining: int, rate_per_s: float, total_rate_per_s: float, k: float = 2.0,
    min_chunk: int = 1, max_chunk: int | None = None,
) -> int:
    """Work units (e.g. batches) for a worker at ``rate_per_s`` out of ``total_rate_per_s``.

    Guided self-scheduling (Polychronopoulos & Kuck, IEEE ToC 1987) gives ``remaining / P``;
    factoring (Hummel, Schonberg & Flynn, CACM 1992) divides by ``k·P`` so that the last chunks
    are small; weighting by the worker's share of the total rate (weighted factoring, Hummel et
    al. 1996) makes every chunk take about ``remaining / (k · total rate)`` seconds on any
    worker, so a slow worker never holds the tail. Bounded below by ``min_chunk`` (per-chunk
    overhead) and above by ``max_chunk``. O(1).
    """
    if remaining <= 0:
        return 0
    share = rate_per_s / total_rate_per_s if total_rate_per_s > 0 else math.nan
    size = math.ceil(remaining * share / k) if math.isfinite(share) and share > 0 else min_chunk
    size = size if max_chunk is None else min(size, max_chunk)
    return max(1, min(remaining, max(size, min_chunk)))


def equal_ranges(n: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges, one per worker, sizes differing by at most one."""
    return list(itertools.pairwise(i * n // workers for i in range(workers + 1)))


@dataclass(kw_only=True, slots=True)
class ChunkPlan:
    """Which range each worker scores next; pure bookkeeping, no processes (tested directly).

    Ranges are whole batches of ``batch_size`` aligned to multiples of it, so every forward
    pass sees exactly the batch one process looping over the inputs would: the outputs are
    bit-identical to single-process inference at that batch size.
    """

    n: int
    """Samples in all."""
    workers: int
    chunking: str = "dynamic"
    batch_size: int = 256
    """Samples per forward pass, and the unit ranges are made of. An equal share is handed
    out in pieces of a few batches, so the split is fixed but progress and failover work."""
    max_chunk_s: float = 0.5
    """Longest a dynamic range should take at the worker's rate (bounds the work a death loses
    and keeps the progress bar moving)."""
    rates: list[RateMeter] = field(init=False)
    """Measured samples/s per worker."""
    _batches: int = field(init=False, default=0)  # ceil(n / batch_size)
    _cursor: int = field(init=False, default=0)  # first batch not yet handed out
    _own: list[list[tuple[int, int]]] = field(init=False, default_factory=list)  # equal shares
    _requeued: list[tuple[int, int]] = field(init=False, default_factory=list)  # lost ranges
    _live: set[int] = field(init=False, default_factory=set)
    _last: list[int] = field(init=False, default_factory=list)  # batches last handed out

    def __post_init__(self) -> None:
        if self.chunking not in CHUNKINGS:
            raise ConfigError(f"--chunking {self.chunking!r} must be one of {', '.join(CHUNKINGS)}")
        if self.n < 1 or self.workers < 1 or self.batch_size < 1:
            raise ConfigError(f"n {self.n}, workers {self.workers} and batch size "
                              f"{self.batch_size} must all be at least 1")
        self.rates = [RateMeter(decay=0.7) for _ in range(self.workers)]
        self._live = set(range(self.workers))
        self._last = [1] * self.workers
        self._batches = -(-self.n // self.batch_size)
        if self.chunking == "equal":
            self._own = [
                [(b, min(b + _PIECE, hi)) for b in range(lo, hi, _PIECE)]
                for lo, hi in equal_ranges(self._batches, self.workers)
            ]
            self._cursor = self._batches

    def _range(self, first_batch: int, stop_batch: int) -> tuple[int, int]:
        return first_batch * self.batch_size, min(self.n, stop_batch * self.batch_size)

    def next_for(self, worker: int) -> tuple[int, int] | None:
        """The next ``[start, stop)`` sample range for ``worker``; None when none is left.

        Dynamic ranges are one-batch probes until every live worker has a measured rate, and
        then grow at most 2× per range (a slow start: a probe shorter than a CFS period can
        overstate a throttled worker's rate several times over)."""
        if self._own and self._own[worker]:
            return self._range(*self._own[worker].pop(0))
        if self._requeued:
            return self._requeued.pop(0)
        remaining = self._batches - self._cursor
        if remaining <= 0:
            return None
        rates = {w: self.rates[w].per_s for w in self._live | {worker}}
        if not all(math.isfinite(rate) and rate > 0 for rate in rates.values()):
            size = 1
        else:
            longest = int(rates[worker] * self.max_chunk_s / self.batch_size)
            size = weighted_guided_chunk(remaining, rates[worker], sum(rates.values()), 2.0, 1,
                                         max(1, min(2 * self._last[worker], longest)))
        self._last[worker] = size
        first = self._cursor
        self._cursor = min(self._batches, first + size)
        return self._range(first, self._cursor)

    def done(self, worker: int, samples: int, seconds: float) -> None:
        self.rates[worker].update(samples, seconds)

    def lost(self, worker: int, in_flight: Sequence[tuple[int, int]]) -> None:
        """``worker`` died: its ranges in flight and any share it had not taken go to others."""
        self._live.discard(worker)
        self._requeued.extend(in_flight)
        if self._own:
            self._requeued.extend(self._range(lo, hi) for lo, hi in self._own[worker])
            self._own[worker] = []


@dataclass(kw_only=True)
class InferResult:
    """Outputs in input order, and how the work was spread."""

    outputs: np.ndarray  # (N, classes) float32, row i scores input i
    version: str
    chunking: str
    samples_per_worker: list[int]
    busy_s_per_worker: list[float]
    """Seconds each worker spent scoring (wall time, throttling stalls included)."""
    finish_s_per_worker: list[float]
    """When each worker handed back its last range, seconds after scoring started."""
    chunks: list[tuple[int, int, int]]
    """Completed ``(worker, start, stop)`` ranges, in completion order."""
    wall_s: float
    """Scoring time: from every worker ready to the last output written."""
    startup_s: float
    """Spawning workers and loading the model, before scoring starts."""
    failed_workers: list[int]

    @property
    def samples_per_s(self) -> float:
        return len(self.outputs) / self.wall_s if self.wall_s > 0 else math.inf

    @property
    def utilization(self) -> float:
        """Fraction of the workers' time spent scoring: Σ busy / (workers × wall). Idle tails
        lower it; unlike throughput it does not move with the machine's other load."""
        slots_s = len(self.busy_s_per_worker) * self.wall_s
        return sum(self.busy_s_per_worker) / slots_s if slots_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Every field but the outputs, as JSON."""
        return {
            "samples": len(self.outputs), "version": self.version, "chunking": self.chunking,
            "samples_per_s": self.samples_per_s, "wall_s": self.wall_s,
            "startup_s": self.startup_s, "samples_per_worker": self.samples_per_worker,
            "busy_s_per_worker": self.busy_s_per_worker,
            "finish_s_per_worker": self.finish_s_per_worker, "chunks": len(self.chunks),
            "utilization": self.utilization, "failed_workers": self.failed_workers,
        }


def _worker(
    rank: int, model_dir: str, in_path: str, out_path: str, shape: tuple[int, ...], classes: int,
    batch_size: int, tasks: Any, results: Any, cgroup_procs: str | None, device: str,
) -> None:
    try:
        import torch

        torch.set_num_threads(1)
        model, info = load_on(model_dir, device)
        inputs = np.memmap(in_path, dtype=np.float32, mode="r", shape=shape)
        outputs = np.memmap(out_path, dtype=np.float32, mode="r+", shape=(shape[0], classes))
        with torch.no_grad():
            run_on(model, torch.tensor(inputs[:batch_size]), device)  # warm-up, unthrottled
            if cgroup_procs is not None:  # join after the heavy imports, as launch.py does
                try:
                    Path(cgroup_procs).write_text(f"{os.getpid()}\n")
                except OSError as error:
                    raise EmulationError(f"cannot join cgroup {cgroup_procs}: {error}") from None
            results.put(("ready", rank, info.version))
            while (task := tasks.get()) is not None:
                start, stop = task
                began = time.perf_counter()
                for lo in range(start, stop, batch_size):
                    hi = min(lo + batch_size, stop)
                    outputs[lo:hi] = run_on(model, torch.tensor(inputs[lo:hi]), device).numpy()
                results.put(("done", rank, (start, stop, time.perf_counter() - began)))
        outputs.flush()
    except IdlaError as error:
        results.put(("user", rank, str(error)))
    except BaseException:
        results.put(("crash", rank, traceback.format_exc()))


def _check_inputs(inputs: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(inputs, np.ndarray) or inputs.dtype.kind not in "fiub":
        kind = getattr(inputs, "dtype", type(inputs).__name__)
        raise ConfigError(f"inputs must be a numeric array, got {kind}")
    if inputs.ndim < 1 or tuple(inputs.shape[1:]) != input_shape or inputs.shape[0] < 1:
        raise ConfigError(f"inputs have shape {list(inputs.shape)}; the model wants (N, "
                          f"{', '.join(map(str, input_shape))}) with N >= 1")
    data = np.ascontiguousarray(inputs, dtype=np.float32)
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ConfigError(f"inputs hold {bad} NaN or infinite values")
    return data


def infer_offline(
    model_dir: str | Path,
    inputs: np.ndarray,  # (N, *input_shape), converted to float32
    workers: int = 1,
    speeds: Sequence[float] | None = None,
    base_cores: float = 0.5,
    chunking: str = "dynamic",
    batch_size: int = 256,
    on_progress: Callable[[int, int], None] | None = None,
    timeout_s: float = 3600.0,
    devices: str | Sequence[str] = CPU,
) -> InferResult:
    """Score ``inputs`` with the model in ``model_dir`` on ``workers`` local processes.

    Worker i scores on ``devices[i]`` (``devices``: a ``--device`` value or one per worker) and,
    with ``speeds``, in a cgroup of ``base_cores × speeds[i]`` CPUs (the scheduler is not told).
    ``on_progress(done, total)`` is called here after each range. Cost: one copy of the inputs
    and outputs in shared memory; one queue round trip per range.
    """
    from idla.serve.model_io import load_model

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if speeds is not None and len(speeds) != workers:
        raise ConfigError(f"--emulate-speeds lists {len(speeds)} speeds for {workers} workers")
    worker_devices = resolve_devices(devices, workers)
    model, info = load_model(model_dir)
    data = _check_inputs(inputs, info.input_shape)
    import torch

    with torch.no_grad():
        classes = int(model(torch.tensor(data[:1])).shape[1])
    plan = ChunkPlan(n=len(data), workers=workers, chunking=chunking, batch_size=batch_size)
    context = mp.get_context("spawn")
    results = context.Queue()
    task_queues = [context.Queue() for _ in range(workers)]
    with ExitStack() as stack:
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # RAM, where there is one
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="idla-in-", dir=shm)))
        data.tofile(tmp / "inputs.f32")
        with (tmp / "outputs.f32").open("wb") as out_file:
            out_file.truncate(len(data) * classes * 4)
        throttle = stack.enter_context(CpuThrottle(speeds, base_cores)) if speeds else None
        procs = [
            context.Process(target=_worker, daemon=True, args=(
                rank, str(model_dir), str(tmp / "inputs.f32"), str(tmp / "outputs.f32"),
                data.shape, classes, batch_size, task_queues[rank], results,
                None if throttle is None else str(throttle.paths[rank] / "cgroup.procs"),
                worker_devices[rank]))
            for rank in range(workers)
        ]
        began = time.perf_counter()
        try:
            for proc in procs:
                proc.start()
            run = _Run(plan, procs, task_queues, results, info.version, on_progress)
            run.wait_ready(began + timeout_s)
            ready = time.perf_counter()
            run.score(ready, ready + timeout_s)
            wall_s = time.perf_counter() - ready
        finally:
            for task_queue, proc in zip(task_queues, procs, strict=True):
                if proc.is_alive():
                    task_queue.put(None)
            for proc in (p for p in procs if p.pid is not None):  # the started ones
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(timeout=5)
        outputs = np.fromfile(tmp / "outputs.f32", dtype=np.float32).reshape(len(data), classes)
    return InferResult(
        outputs=outputs, version=info.version, chunking=chunking,
        samples_per_worker=run.samples, busy_s_per_worker=run.busy_s,
        finish_s_per_worker=run.finish_s, chunks=run.chunks, wall_s=wall_s,
        startup_s=ready - began, failed_workers=sorted(run.dead),
    )


class _Run:
    """The launcher's side of one scoring run: hands out ranges, collects completions."""

    def __init__(
        self, plan: ChunkPlan, procs: list[Any], task_queues: list[Any], results: Any,
        version: str, on_progress: Callable[[int, int], None] | None,
    ) -> None:
        self.plan, self.procs, self.task_queues = plan, procs, task_queues
        self.results, self.version, self.on_progress = results, version, on_progress
        self.samples, self.busy_s = [0] * len(procs), [0.0] * len(procs)
        self.finish_s = [0.0] * len(procs)
        self.chunks: list[tuple[int, int, int]] = []
        self.in_flight: dict[int, list[tuple[int, int]]] = {r: [] for r in range(len(procs))}
        self.dead: set[int] = set()
        self.done = 0

    def _message(self, deadline: float) -> tuple[str, int, Any] | None:
        """The next message, or None after a poll interval (having noticed dead workers)."""
        try:
            message: tuple[str, int, Any] = self.results.get(timeout=_POLL_S)
        except queue.Empty:
            for rank, proc in enumerate(self.procs):
                if rank not in self.dead and proc.exitcode is not None:
                    self.dead.add(rank)
                    self.plan.lost(rank, self.in_flight[rank])
                    self.in_flight[rank] = []
            if len(self.dead) == len(self.procs):
                codes = [proc.exitcode for proc in self.procs]
                raise WorkerFailed(f"every inference worker exited (codes {codes})") from None
            if time.perf_counter() > deadline:
                raise WorkerFailed("inference did not finish in time") from None
            return None
        kind, rank, value = message
        if kind == "user":
            raise IdlaError(value)
        if kind == "crash":
            raise WorkerFailed(f"inference worker {rank} failed:\n{value}")
        return message

    def wait_ready(self, deadline: float) -> None:
        ready: set[int] = set()
        while len(ready | self.dead) < len(self.procs):
            message = self._message(deadline)
            if message is not None and message[0] == "ready":
                if message[2] != self.version:
                    raise IdlaError(f"worker {message[1]} loaded model version {message[2]}, "
                                    f"expected {self.version} (the model changed meanwhile)")
                ready.add(message[1])

    def _hand_out(self, rank: int) -> None:
        """Keep `_DEPTH` ranges queued at ``rank``: it starts the next one the moment it is done
        with one, without waiting a round trip (which a throttled worker pays in CFS periods)."""
        while len(self.in_flight[rank]) < _DEPTH and (task := self.plan.next_for(rank)):
            self.in_flight[rank].append(task)
            self.task_queues[rank].put(task)

    def score(self, started: float, deadline: float) -> None:
        for rank in range(len(self.procs)):
            if rank not in self.dead:
                self._hand_out(rank)
        while self.done < self.plan.n:
            message = self._message(deadline)
            if message is None:
                for rank in set(range(len(self.procs))) - self.dead:
                    self._hand_out(rank)  # a range a dead worker lost
                continue
            _, rank, (start, stop, seconds) = message
            if rank in self.dead:
                continue  # it died right after: its range went back to the others already
            if self.in_flight[rank][:1] != [(start, stop)]:
                raise WorkerFailed(f"worker {rank} finished {start}:{stop}, not its range")
            self.in_flight[rank].pop(0)
            self.plan.done(rank, stop - start, seconds)
            self.chunks.append((rank, start, stop))
            self.samples[rank] += stop - start
            self.busy_s[rank] += seconds
            self.finish_s[rank] = time.perf_counter() - started
            self.done += stop - start
            if self.on_progress is not None:
                self.on_progress(self.done, self.plan.n)
            self._hand_out(rank)
