"""Where a job's worker processes run: the interface between the agent (which decides what runs
where, `idla.pool.agent`) and a backend that starts and stops processes on devices.

Backends: local subprocesses on this machine (the default; emulated CPU speeds through cgroups),
and Ray actors on a Ray cluster's nodes (`idla pool start --ray ADDRESS`). Both start the same
argv with the same environment; workers of one job meet through torch.distributed as they
would under torchrun.

Shrinking a resizable job is a graceful stop: the worker gets SIGTERM, finishes its step,
leaves at the step boundary after the commit (`run_elastic`), and exits 0; the others go on
without losing a step. Growing starts a worker with ``IDLA_JOIN=1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from idla.pool.model import Device


@dataclass(frozen=True, slots=True)
class WorkerLaunch:
    """One worker process of one job on one device."""

    job_id: str
    member: int
    """The worker's member id within its job (unique over the job's life, never reused)."""
    device: Device
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    """Added to the backend's own environment (RANK, WORLD_SIZE, IDLA_RENDEZVOUS, ...)."""
    cwd: str | None = None
    log_path: str | None = None
    """Where stdout and stderr go (appended); None discards them."""
    stdin_path: str | None = None
    """A file the process reads as its stdin (a serving worker's link secret); None: none."""


class WorkerHandle(Protocol):
    """A started worker."""

    launch: WorkerLaunch

    def poll(self) -> int | None:
        """Its exit code, or None while it runs."""
        ...


class Backend(Protocol):
    """Starts and stops worker processes on devices."""

    def devices(self) -> Sequence[Device]:
        """The devices this backend can place workers on."""
        ...

    def start(self, launch: WorkerLaunch) -> WorkerHandle:
        ...

    def stop(self, handle: WorkerHandle, graceful: bool = True) -> None:
        """graceful: SIGTERM (leave at the next step boundary); else kill at once."""
        ...

    def close(self) -> None:
        """Stop every worker still running and release what the backend holds."""
        ...
