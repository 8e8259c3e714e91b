"""Hot model rollout in two phases, all or nothing: every worker loads the new model beside the
one it serves (prepare), and only when all have it does every worker switch (commit).

A prepare that fails anywhere (the model cannot be read or built, its shapes differ, a worker
is lost or still busy with an earlier load) or does not finish within the load timeout is
aborted on every worker, so the old model keeps serving everywhere; the caller gets a
`RolloutError` whose ``status`` is the HTTP answer:

- 409: another rollout is in progress, or a worker is still loading an earlier (aborted) model;
- 422: the model is refused (not idla's format, fails to build, maps other shapes);
- 503: a worker was lost while loading (it is restarted on the old model; retry);
- 504: the model did not load within the load timeout on some worker.

A load timeout is not a sign of a dead worker: its connection stays up and keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from idla.errors import IdlaError
from idla.serve.link import WorkerError, WorkerLink, WorkerLost

CONFLICT, REFUSED, UNAVAILABLE, TIMED_OUT = 409, 422, 503, 504


class RolloutError(IdlaError):
    """A model rollout was refused; ``status`` is the HTTP status that says why (see above)."""

    def __init__(self, message: str, status: int = REFUSED) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Prepared:
    link: WorkerLink
    token: int
    """The worker's name for the load, which ``commit`` repeats."""
    reply: dict[str, Any]


def _failure(name: int, reply: BaseException, load_timeout_s: float) -> tuple[int, str]:
    """(status, reason) of one worker's failed prepare."""
    if isinstance(reply, WorkerError):
        status = CONFLICT if reply.code == "busy" else REFUSED
        return status, f"worker {name}: {reply}"
    if isinstance(reply, asyncio.TimeoutError):
        return TIMED_OUT, (f"worker {name} did not load the model within the load timeout "
                           f"({load_timeout_s:g} s)")
    if isinstance(reply, WorkerLost):
        return UNAVAILABLE, f"worker {name} was lost while loading the model"
    return UNAVAILABLE, f"worker {name}: {reply!r}"


async def prepare_all(links: Sequence[WorkerLink], names: Sequence[int], path: str,
                      load_timeout_s: float, control_timeout_s: float,
                      shape: tuple[tuple[int, ...], int]) -> list[Prepared]:
    """Load ``path`` beside the served model on every link, each within ``load_timeout_s``;
    ``shape`` is the served (input shape, output features), which the new model must keep.
    Any failure aborts the loads everywhere (each abort within ``control_timeout_s``) and
    raises RolloutError; the answer comes within about ``load_timeout_s``."""
    replies = await asyncio.gather(
        *(link.call({"op": "prepare", "path": path}, timeout_s=load_timeout_s)
          for link in links), return_exceptions=True)
    failures = [_failure(name, reply, load_timeout_s)
                for name, reply in zip(names, replies, strict=True)
                if isinstance(reply, BaseException)]
    prepared = [Prepared(link, int(reply[0].get("prepare", -1)), reply[0])
                for link, reply in zip(links, replies, strict=True)
                if not isinstance(reply, BaseException)]
    shapes = {(tuple(p.reply.get("input_shape", ())), int(p.reply.get("output_features", -1)))
              for p in prepared}
    if not failures and shapes != {shape}:
        failures = [(REFUSED, f"the new model maps {sorted(shapes)}, the served one "
                              f"{shape[0]} -> {shape[1]} features")]
    if failures:
        await abort_all(links, control_timeout_s)
        # The most telling reason first: a bad model, then a conflict, a timeout, a loss.
        order = {REFUSED: 0, CONFLICT: 1, TIMED_OUT: 2, UNAVAILABLE: 3}
        status, reason = min(failures, key=lambda f: order[f[0]])
        others = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise RolloutError(f"{reason}{others}; the rollout was aborted and every worker keeps "
                           "its model", status)
    return prepared


async def abort_all(links: Sequence[WorkerLink], timeout_s: float) -> None:
    """Drop the loads of these links on their workers; a lost link has dropped them already."""
    await asyncio.gather(*(link.call({"op": "abort"}, timeout_s=timeout_s) for link in links
                           if not link.closed), return_exceptions=True)


async def commit_all(prepared: Sequence[Prepared],
                     timeout_s: float) -> list[dict[str, Any] | BaseException]:
    """Switch every prepared worker to its new model; each entry is the ``committed`` reply or
    why that worker did not answer."""
    replies = await asyncio.gather(
        *(p.link.call({"op": "commit", "prepare": p.token}, timeout_s=timeout_s)
          for p in prepared), return_exceptions=True)
    return [r if isinstance(r, BaseException) else r[0] for r in replies]
