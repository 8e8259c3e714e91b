"""The pool's shared vocabulary: devices, jobs as the policy sees them, allocations, and the
performance models that predict a job's rate on any set of devices.

One set of types serves the live agent (`idla pool start`) and the simulator
(`idla pool simulate`), so the policy cannot tell which of the two is calling it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


class JobKind(str, enum.Enum):
    """What a job does, and so what its utility means (README, "Pool")."""

    TRAIN = "train"
    """A user script on `idla.Agent`/`run_elastic`; utility: samples/s (goodput when reported)."""
    SERVE = "serve"
    """A model directory behind the router; utility: the fraction of time its p99 target holds."""
    INFER = "infer"
    """Offline inference over an input file; utility: rows/s."""


@dataclass(frozen=True, slots=True)
class Device:
    """One schedulable device: a GPU, or one emulated CPU worker slot."""

    device_id: str
    """Unique in the pool, e.g. ``"cpu0"`` or ``"dgx-ext/1/gpu3"``."""
    kind: str
    """Device kind; performance models are per job × kind (``"cpu"``, ``"a100"``, ``"t4"``...)."""
    node: str
    """The host (or simulated node) it sits on; placement across nodes costs communication."""
    memory_bytes: int
    """Memory a worker on it may use."""


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the policy sees it: what it asks for, not how it runs."""

    job_id: str
    kind: JobKind
    priority: float
    """p ≥ 0: the weight of this job's utility in Σ pᵢ·Uᵢ."""
    min_workers: int
    max_workers: int
    memory_bytes_per_worker: int = 0
    """A device with less memory cannot hold one of its workers."""
    resizable: bool = True
    """False for a script without `run_elastic`: placed rigidly, never resized once running."""
    arrival_s: float = 0.0
    deadline_s: float | None = None
    """Absolute time (same clock as ``arrival_s``) by which it should finish, if any."""
    remaining_samples: float | None = None
    """Work left (train: samples, infer: rows); None when unknown or for serving."""
    offered_requests_per_s: float = 0.0
    """Serving only: the load the job must carry within its latency target."""

    def __post_init__(self) -> None:
        if self.priority < 0:
            raise ValueError(f"job {self.job_id}: priority must be >= 0, got {self.priority}")
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"job {self.job_id}: need 1 <= min_workers <= max_workers, got "
                             f"{self.min_workers}, {self.max_workers}")


Allocation = Mapping[str, tuple[str, ...]]
"""job_id → the device ids it runs on (sorted). A job absent or with () is queued."""


class PerfModels(Protocol):
    """Predicted rates for any candidate allocation; learned online (`idla.pool.perf`)."""

    def rate_per_s(self, job_id: str, devices: Sequence[Device]) -> float:
        """Work per second of ``job_id`` on exactly ``devices`` (train: samples/s at uneven
        shares; serve: requests/s within its latency target; infer: rows/s). 0 for ()."""
        ...

    def resize_cost_s(self, job_id: str) -> float:
        """Seconds of progress a resize of ``job_id`` costs (measured; idla: ≤ one step)."""
        ...


def devices_of(allocation: Allocation, job_id: str) -> tuple[str, ...]:
    """The device ids ``job_id`` holds in ``allocation`` (() when queued)."""
    return tuple(allocation.get(job_id, ()))


def check_allocation(allocation: Allocation, jobs: Sequence[JobView],
                     devices: Sequence[Device]) -> None:
    """Raise ValueError unless every device is used at most once, every job is known, and each
    running job's worker count and memory fit its limits."""
    by_id = {device.device_id: device for device in devices}
    known = {job.job_id: job for job in jobs}
    used: dict[str, str] = {}
    for job_id, held in allocation.items():
        job = known.get(job_id)
        if job is None:
            raise ValueError(f"allocation names unknown job {job_id!r}")
        if not held:
            continue
        if not job.min_workers <= len(held) <= job.max_workers:
            raise ValueError(f"job {job_id}: {len(held)} workers outside "
                             f"[{job.min_workers}, {job.max_workers}]")
        for device_id in held:
            device = by_id.get(device_id)
            if device is None:
                raise ValueError(f"job {job_id}: unknown device {device_id!r}")
            if device_id in used:
                raise ValueError(f"device {device_id} given to both {used[device_id]} and {job_id}")
            if device.memory_bytes < job.memory_bytes_per_worker:
                raise ValueError(f"job {job_id}: device {device_id} has too little memory")
            used[device_id] = job_id


def as_mapping(allocation: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """A normalised copy: sorted device tuples, queued jobs dropped."""
    return {job: tuple(sorted(held)) for job, held in allocation.items() if held}
