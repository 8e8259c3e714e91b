"""Bring lost workers back: reconnect to a worker whose connection dropped, restart one whose
process died (or that stays unreachable), with exponential backoff between tries.

One task per worker watches its slot on the router's event loop. When the router has marked
the worker lost (its connection broke, a ping or a batch timed out):

1. if its process has exited, or has been unreachable for `SupervisorConfig.restart_after_s`,
   the pool starts a new one in its place (`WorkerPool.restart`, on a thread: it blocks while
   the new process imports torch, loads the model and measures its curve), on the model the
   router serves now;
2. the router reconnects (`Router.revive`), bringing it to the served model if needed;
3. a try that fails waits `backoff_s` (0.5 s doubling to 10 s) before the next.

Without a pool (a router given bare addresses), only step 2 is tried. Restarts and reconnects
are counted on the worker's slot (``idla_worker_restarts_total`` in /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from idla.errors import ConfigError, IdlaError
from idla.serve.link import WorkerError, WorkerLost
from idla.serve.router import Router
from idla.serve.slots import WorkerSlot
from idla.serve.worker import WorkerPool, WorkerProcess

T = TypeVar("T")
log = logging.getLogger("idla.serve")


@dataclass(kw_only=True, slots=True)
class SupervisorConfig:
    poll_interval_s: float = 0.2
    """How often each worker's health is looked at."""
    backoff_initial_s: float = 0.5
    """Wait after the first failed try to bring a worker back; doubles after each."""
    backoff_max_s: float = 10.0
    """Longest wait between two tries."""
    restart_after_s: float = 20.0
    """A worker whose process runs but that cannot be reached this long is killed and
    restarted."""

    def __post_init__(self) -> None:
        for name in ("poll_interval_s", "backoff_initial_s", "backoff_max_s", "restart_after_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} {getattr(self, name)} must be positive")


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after failed try number ``attempt`` (0 first): initial_s × 2^attempt,
    at most max_s."""
    return min(initial_s * 2.0 ** min(attempt, 64), max_s)


async def _in_thread(function: Callable[[], T]) -> T:
    """``function()`` on a daemon thread (a stuck start never holds up the process's exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result: T | None = function()
            error: BaseException | None = None
        except BaseException as failure:  # handed to the awaiting task, which decides
            result, error = None, failure
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, future, result, error)

    threading.Thread(target=run, daemon=True, name="idla-worker-restart").start()
    return await future


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class Supervisor:
    """Watches the router's workers; ``pool_indices[i]`` is the pool's index of router worker
    i (a router may use some of a pool's workers)."""

    def __init__(self, router: Router, pool: WorkerPool | None = None,
                 pool_indices: Sequence[int] | None = None,
                 config: SupervisorConfig | None = None) -> None:
        self.router, self.pool = router, pool
        self.pool_indices = list(range(len(router.workers)) if pool_indices is None
                                 else pool_indices)
        self.config = config or SupervisorConfig()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(slot, index))
                       for slot, index in zip(self.router.workers, self.pool_indices,
                                              strict=True)]

    async def close(self) -> None:
        """Stop watching. The pool keeps the model the router serves now, for what follows."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.pool is not None and self.router.model_path is not None:
            self.pool.model_dir = self.router.model_path

    async def _watch(self, slot: WorkerSlot, index: int) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            if not slot.alive and not slot.retired:
                await self._recover(slot, index)

    async def _recover(self, slot: WorkerSlot, index: int) -> None:
        lost_s = time.monotonic()
        attempt = 0
        while True:
            address = slot.address
            try:
                if self.pool is not None and self._needs_restart(index, lost_s):
                    worker = await self._restart(slot, index)
                    address, lost_s = (worker.host, worker.port), time.monotonic()
                await self.router.revive(slot, address)
                log.warning("idla serve: worker %d is back (%s:%d)", slot.index, *address)
                return
            except (IdlaError, WorkerLost, WorkerError, asyncio.TimeoutError) as error:
                delay_s = backoff_s(attempt, self.config.backoff_initial_s,
                                    self.config.backoff_max_s)
                log.warning("idla serve: worker %d not back yet (%s); next try in %.1f s",
                            slot.index, error, delay_s)
            await asyncio.sleep(delay_s)
            attempt += 1

    def _needs_restart(self, index: int, lost_s: float) -> bool:
        assert self.pool is not None
        exited = self.pool.workers[index].process.poll() is not None
        return exited or time.monotonic() - lost_s >= self.config.restart_after_s

    async def _restart(self, slot: WorkerSlot, index: int) -> WorkerProcess:
        assert self.pool is not None
        pool, model_dir = self.pool, self.router.model_path or self.pool.model_dir
        old = pool.workers[index]
        worker = await _in_thread(lambda: pool.restart(index, model_dir))
        slot.restarts += 1
        log.warning("idla serve: worker %d (pid %d, exit code %s) restarted as pid %d",
                    slot.index, old.pid, old.process.returncode, worker.pid)
        return worker
