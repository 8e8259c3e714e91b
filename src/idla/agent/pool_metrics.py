"""What each worker of a pool job tells the pool: one small JSON file per worker, rewritten at
most once a second while it trains.

With ``IDLA_POOL_METRICS_DIR`` set (the pool sets it when it starts a worker), every worker
writes ``<dir>/member-<member>.json``: the job's step and samples done, this worker's measured
samples/s and the job's, its local batch, its compute / communication / wait seconds per step
(the agent's bias-corrected meters, `idla.profile.meters`), its device kind and the world size.
The pool's performance models learn from these (`read_job_metrics`). Unset, the agent holds
None and pays one ``is None`` test a step.

Cost when set: per step, a sum over the world's statistics rows and a clock read; once a
second, one JSON file of ~0.5 kB written beside the old one and renamed over it (no fsync:
the file is a gauge, not a record; a reader sees the old file or the new one, never a part).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from idla.errors import ConfigError
from idla.runtime.stats import Stat


class Agent(Protocol):
    """What a metrics row reads from `idla.agent.Agent` (a protocol, so this module does not
    import the agent that calls it)."""

    @property
    def observer(self) -> Any: ...
    @property
    def config(self) -> Any: ...
    @property
    def group(self) -> Any: ...
    @property
    def step(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def shares(self) -> list[int]: ...

METRICS_DIR_ENV = "IDLA_POOL_METRICS_DIR"
JOB_ID_ENV = "IDLA_POOL_JOB_ID"
WORKER_ENV = "IDLA_POOL_WORKER"
"""The pool's own name for the worker, copied into its row (a newcomer's member id is given by
the rendezvous, so the pool may not know it in advance)."""
MAX_FILE_BYTES = 64 * 1024
"""A metrics file larger than this is not read (a worker writes ~0.5 kB)."""


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def metrics_row(agent: Agent, *, member: int, job_step: int, samples_done: int,
                status: str = "running", now_s: float | None = None) -> dict[str, Any]:
    """This worker's metrics as a JSON-ready dict (meters not measured yet are None)."""
    meters = [m.snapshot() for m in agent.observer.meters]
    mine = meters[agent.rank]
    rates = [m["samples_per_s"] for m in meters]
    return {
        "job_id": os.environ.get(JOB_ID_ENV), "worker": os.environ.get(WORKER_ENV),
        "member": member, "rank": agent.rank,
        "world_size": agent.world_size, "status": status, "pid": os.getpid(),
        "job_step": job_step, "samples_done": samples_done,
        "samples_per_s": _finite_or_none(mine["samples_per_s"]),
        "job_samples_per_s": _finite_or_none(sum(rates)) if rates else None,
        "local_batch": agent.shares[agent.rank],
        "global_batch": agent.config.global_batch_size,
        "compute_s": _finite_or_none(mine["compute_s"]),
        "comm_s": _finite_or_none(mine["comm_s"]),
        "wait_s": _finite_or_none(mine["wait_s"]),
        "device_kind": agent.group.device.type, "device": str(agent.group.device),
        "time": time.time() if now_s is None else now_s,
    }


def write_metrics(path: Path, row: dict[str, Any]) -> None:
    """Write `row` to `path` through a temporary file renamed over it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(row, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)


class PoolMetrics:
    """One worker's metrics file, rewritten at most once every `interval_s`.

    Args:
        directory: Where the file goes (created if missing).
        member: The worker's member id (RANK until an elastic run says otherwise).
        interval_s: The least time between two writes.
    """

    def __init__(self, directory: Path, member: int, interval_s: float = 1.0) -> None:
        self.directory, self.member, self.interval_s = directory, member, interval_s
        self.step_base = 0
        """Job steps committed before this agent's first (an elastic generation's start)."""
        self.samples_base = 0
        """Job samples trained before this agent's first step."""
        self._samples = 0  # global samples of this agent's steps
        self._last_write_s = -math.inf
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{METRICS_DIR_ENV}={str(directory)!r}: cannot create it "
                              f"({error.strerror})") from None

    @classmethod
    def from_env(cls) -> PoolMetrics | None:
        """A writer when ``IDLA_POOL_METRICS_DIR`` is set, else None."""
        directory = os.environ.get(METRICS_DIR_ENV)
        if not directory:
            return None
        rank = os.environ.get("RANK", "0")
        return cls(Path(directory), int(rank) if rank.isdigit() else 0)

    @property
    def path(self) -> Path:
        return self.directory / f"member-{self.member}.json"

    def start_at(self, member: int, step: int, samples: int) -> None:
        """This agent continues a job at `step` committed steps and `samples` samples done."""
        self.member, self.step_base, self.samples_base = member, step, samples
        self._samples = 0

    def after_step(self, agent: Agent, stats: list[list[float]]) -> None:
        """Count the step that is ending (`stats`: every rank's statistics row); write when
        due. Called before the agent counts the step, so the job has ``agent.step + 1``."""
        self._samples += int(sum(r[Stat.SAMPLES] for r in stats))
        now = time.monotonic()
        if now - self._last_write_s >= self.interval_s:
            self._last_write_s = now
            self._write(agent, agent.step + 1, "running")

    def write(self, agent: Agent, status: str = "running") -> None:
        """Write the file now, between steps (a worker that leaves or ends says so in
        `status`)."""
        self._write(agent, agent.step, status)

    def _write(self, agent: Agent, steps: int, status: str) -> None:
        """A failed write is skipped: metrics never stop training."""
        row = metrics_row(agent, member=self.member, job_step=self.step_base + steps,
                          samples_done=self.samples_base + self._samples, status=status)
        with contextlib.suppress(OSError):
            write_metrics(self.path, row)


def _read_one(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    member, step, when = value.get("member"), value.get("job_step"), value.get("time")
    if not (isinstance(member, int) and isinstance(step, int)
            and isinstance(when, int | float) and not isinstance(when, bool)):
        return None
    return value


def read_job_metrics(directory: str | Path) -> list[dict[str, Any]]:
    """Every readable worker file in `directory`, by member; files that are missing, partial,
    too large or malformed (or lack an integer member and job_step and a numeric time) are
    left out. Never raises."""
    try:
        paths = sorted(Path(directory).glob("member-*.json"))
    except OSError:
        return []
    rows = [row for row in map(_read_one, paths) if row is not None]
    return sorted(rows, key=lambda row: int(row["member"]))
