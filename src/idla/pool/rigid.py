"""Rigid policies for the live agent, to compare `idla.pool.policy.allocate` against in the
same run (``idla pool start --policy fifo|static``): what a team without the agent does.

- `fifo`: jobs in arrival order; a running job keeps its devices until it ends (no
  preemption, no resize); the oldest queued job gets up to its ``max_workers`` of the free
  devices, fastest first (as the models rate each device alone), once at least its
  ``min_workers`` are free — and a job that cannot start blocks those behind it.
- `static_partition(share)`: the same, each job capped at ``share`` devices: the pool cut
  into equal fixed parts, one job per part.

Both have `allocate`'s signature; neither reads priorities. Cost: O(J log J + J·D log D).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from idla.errors import ConfigError
from idla.pool.model import Allocation, Device, JobView, PerfModels


def fifo(jobs: Sequence[JobView], devices: Sequence[Device], models: PerfModels,
         current: Allocation, share: int | None = None) -> dict[str, tuple[str, ...]]:
    """First come, first served, non-preemptive (module docstring); ``share`` caps each job."""
    by_id = {d.device_id: d for d in devices}
    result: dict[str, tuple[str, ...]] = {}
    for job in jobs:
        held = tuple(d for d in current.get(job.job_id, ()) if d in by_id)
        if held and len(held) >= job.min_workers:
            result[job.job_id] = held
    taken = {d for held in result.values() for d in held}
    for job in sorted(jobs, key=lambda j: (j.arrival_s, j.job_id)):
        if job.job_id in result:
            continue
        free = [d for d in devices if d.device_id not in taken
                and d.memory_bytes >= job.memory_bytes_per_worker]
        want = min(job.max_workers, share or job.max_workers)
        if len(free) < job.min_workers or want < job.min_workers:
            break  # the head of the queue waits, and so does everyone behind it
        free.sort(key=lambda d: (-models.rate_per_s(job.job_id, [d]), d.device_id))
        result[job.job_id] = tuple(sorted(d.device_id for d in free[:want]))
        taken.update(result[job.job_id])
    return result


RigidPolicy = Callable[[Sequence[JobView], Sequence[Device], PerfModels, Allocation],
                      dict[str, tuple[str, ...]]]


def static_partition(share: int) -> RigidPolicy:
    """`fifo` with every job capped at ``share`` devices (one job per fixed part)."""
    if share < 1:
        raise ConfigError(f"--static-share must be at least 1, got {share}")

    def allocate(jobs: Sequence[JobView], devices: Sequence[Device], models: PerfModels,
                 current: Allocation) -> dict[str, tuple[str, ...]]:
        return fifo(jobs, devices, models, current, share)

    return allocate
