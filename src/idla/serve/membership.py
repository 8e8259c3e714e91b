"""Who serves: a worker joins (`Membership.add_worker`), comes back after it was lost
(`Membership.revive`) or leaves (`Membership.retire_worker`) while the router keeps answering.

A joining worker is brought to the model the others serve (prepare and commit, as a rollout)
and never joins halfway through a rollout. A retiring worker gets no new requests; its queue is
routed to the others at once and its batches in flight finish where they are, so no request
fails because the fleet shrank. `Router` inherits these; they use its queues and links.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from idla.errors import ConfigError, IdlaError
from idla.serve.batcher import DynamicBatcher, ServiceCurve
from idla.serve.link import CONNECT_TIMEOUT_S, WorkerLink, WorkerLost
from idla.serve.rollout import RolloutError, commit_all, prepare_all
from idla.serve.router_config import RouterConfig, Unavailable
from idla.serve.slots import Request, WorkerSlot


class Membership:
    """The router's membership operations (mixed into `Router`, which owns the state)."""

    config: RouterConfig
    workers: list[WorkerSlot]
    input_shape: tuple[int, ...]
    output_features: int
    version: str | None
    model_path: str | None
    _secret: bytes
    _rollout_lock: asyncio.Lock

    def _batching(self, link: WorkerLink) -> tuple[ServiceCurve, DynamicBatcher[Request]]:
        raise NotImplementedError

    def _attach(self, worker: WorkerSlot, address: tuple[str, int], link: WorkerLink) -> None:
        raise NotImplementedError

    def _route(self, request: Request, admit: bool) -> None:
        raise NotImplementedError

    async def revive(self, worker: WorkerSlot, address: tuple[str, int]) -> None:
        """Bring a lost worker back at ``address``: connect, bring it to the served model if
        it serves another (prepare and commit ``model_path``), then route to it again. Raises
        WorkerLost, or RolloutError when it cannot serve the fleet's model."""
        await self._join(address, f"worker {worker.index} came back",
                         lambda link: self._attach(worker, address, link))
        worker.reconnects += 1

    async def add_worker(self, address: tuple[str, int]) -> WorkerSlot:
        """Serve with one more worker, at ``address`` (it holds the pool's link secret): as
        `revive`, on a new slot at the end of `workers`. Raises WorkerLost or RolloutError."""
        def attach(link: WorkerLink) -> None:
            curve, batcher = self._batching(link)
            slot = WorkerSlot(len(self.workers), address, link, curve, batcher,
                              str(link.hello["version"]))
            self._attach(slot, address, link)
            self.workers.append(slot)

        await self._join(address, f"the worker at {address[0]}:{address[1]}", attach)
        return self.workers[-1]

    async def retire_worker(self, index: int) -> dict[str, Any]:
        """Stop routing to worker ``index``, hand its queue to the others, let its batches in
        flight finish, then close its connection (its process is the caller's). Raises
        ConfigError for an unknown or retired worker, Unavailable for the last one."""
        if not 0 <= index < len(self.workers) or self.workers[index].retired:
            raise ConfigError(f"no worker {index} to retire")
        worker = self.workers[index]
        if not any(w.alive and not w.retired for w in self.workers if w is not worker):
            raise Unavailable(f"worker {index} is the last one serving")
        worker.retired = True
        moved = worker.batcher.drain()
        for request in moved:
            try:
                self._route(request, admit=False)
            except IdlaError as error:  # every other worker died meanwhile
                request.future.set_exception(error)
        while worker.batch_tasks:
            await asyncio.wait(set(worker.batch_tasks))
        worker.alive = False
        worker.link.close()
        if worker.task is not None:
            worker.task.cancel()
        return {"worker": index, "moved_requests": len(moved),
                "served_requests": worker.served_requests}

    async def _join(self, address: tuple[str, int], who: str,
                    attach: Callable[[WorkerLink], None]) -> None:
        """Connect to ``address``, bring it to the fleet's model, then ``attach`` the link, all
        outside any rollout; ``who`` names it in errors."""
        link = await WorkerLink.connect(*address, self._secret,
                                        timeout_s=min(CONNECT_TIMEOUT_S,
                                                      self.config.health_timeout_s))
        try:
            async with self._rollout_lock:  # never join halfway through a rollout
                shape = (tuple(link.hello["input_shape"]), int(link.hello["output_features"]))
                if shape != (self.input_shape, self.output_features):
                    raise RolloutError(f"{who} serving {shape}")
                if self.version is not None and link.hello["version"] != self.version:
                    if self.model_path is None:
                        raise RolloutError(f"{who} on version {link.hello['version']}, not "
                                           f"{self.version}")
                    prepared = await prepare_all([link], [len(self.workers)], self.model_path,
                                                 self.config.load_timeout_s,
                                                 self.config.health_timeout_s, shape)
                    commit, = await commit_all(prepared, self.config.health_timeout_s)
                    if isinstance(commit, BaseException):
                        raise WorkerLost(f"{who} did not switch ({commit!r})")
                    link.hello["version"] = commit["version"]
                attach(link)
        except BaseException:
            link.close()
            raise
