"""A stand-in policy for the agent when `idla.pool.policy` is not installed: priority fill.

Jobs in order of priority (then arrival) first get their minimum, then grow to their maximum,
each taking back the devices it holds before any other, the fastest free ones next (as the
models rate a device alone). A job that cannot get its minimum waits. It maximises nothing
(that is `idla.pool.policy.allocate`); it only keeps the agent usable and its tests
independent of the policy. Cost: O(J·D log D) for J jobs and D devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from idla.pool.model import Allocation, Device, JobView, PerfModels


def priority_fill(jobs: Sequence[JobView], devices: Sequence[Device], models: PerfModels,
                  current: Allocation) -> dict[str, tuple[str, ...]]:
    order = sorted(jobs, key=lambda j: (-j.priority, j.arrival_s, j.job_id))
    free = {d.device_id: d for d in devices}
    taken: dict[str, list[str]] = {}

    def take(job: JobView, count: int) -> list[str]:
        fits = [d for d in free.values() if d.memory_bytes >= job.memory_bytes_per_worker]
        held = set(current.get(job.job_id, ()))
        fits.sort(key=lambda d: (d.device_id not in held,
                                 -models.rate_per_s(job.job_id, [d]), d.device_id))
        chosen = [d.device_id for d in fits[:count]]
        for device_id in chosen:
            del free[device_id]
        return chosen

    for job in order:
        if sum(d.memory_bytes >= job.memory_bytes_per_worker for d in free.values()) >= (
                job.min_workers):
            taken[job.job_id] = take(job, job.min_workers)
    for job in order:
        if job.job_id in taken:
            taken[job.job_id] += take(job, job.max_workers - len(taken[job.job_id]))
    return {job: tuple(sorted(held)) for job, held in taken.items()}


class CountModels:
    """Rates from the devices' relative speeds alone (the stand-in for `idla.pool.perf`)."""

    def __init__(self, speeds: Mapping[str, float] | None = None) -> None:
        self.speeds = dict(speeds or {})

    def rate_per_s(self, job_id: str, devices: Sequence[Device]) -> float:
        return sum(self.speeds.get(d.device_id, 1.0) for d in devices)

    def resize_cost_s(self, job_id: str) -> float:
        return 1.0
