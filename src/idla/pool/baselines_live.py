"""Baseline policies for the live agent (`idla pool start --policy fifo|static`), with the
signature of `idla.pool.policy.allocate`, so that `idla bench pool` compares idla's policy with
them on the same devices, jobs and workers.

- `fifo`: jobs start in arrival order, each on as many of the free devices as it may use (its
  maximum; at least its minimum, else it and every job behind it wait: head-of-line blocking),
  and keep exactly those devices until they end: no priorities, no resizes, no preemption.
- `static_partition(parts)`: the devices (by id) are cut once into ``parts`` equal contiguous
  groups, as a team splits a pool by hand; a job takes the first wholly free group in arrival
  order (up to its maximum of its devices) and keeps it until it ends. ``parts`` = the number
  of devices gives one device per job.

Both hold on to what a running job has (devices that are gone are dropped; a job left below its
minimum is given up and waits). Cost: O(J log J + J·D) for J jobs and D devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from idla.pool.model import Allocation, Device, JobView, PerfModels

LivePolicy = Callable[[Sequence[JobView], Sequence[Device], PerfModels, Allocation],
                      dict[str, tuple[str, ...]]]


def _keep_running(jobs: Sequence[JobView], devices: Sequence[Device], current: Allocation
                  ) -> dict[str, tuple[str, ...]]:
    alive = {d.device_id for d in devices}
    kept: dict[str, tuple[str, ...]] = {}
    for job in jobs:
        held = tuple(sorted(d for d in current.get(job.job_id, ()) if d in alive))
        if held and len(held) >= job.min_workers:
            kept[job.job_id] = held[:job.max_workers]
    return kept


def _arrival_order(jobs: Sequence[JobView]) -> list[JobView]:
    return sorted(jobs, key=lambda j: (j.arrival_s, j.job_id))


def fifo(jobs: Sequence[JobView], devices: Sequence[Device], models: PerfModels,
         current: Allocation) -> dict[str, tuple[str, ...]]:
    """First come, first served, non-preemptive, fixed size (module docstring)."""
    result = _keep_running(jobs, devices, current)
    used = {d for held in result.values() for d in held}
    free = [d for d in devices if d.device_id not in used]
    for job in _arrival_order(jobs):
        if job.job_id in result:
            continue
        fits = sorted((d for d in free if d.memory_bytes >= job.memory_bytes_per_worker),
                      key=lambda d: (-models.rate_per_s(job.job_id, [d]), d.device_id))
        if len(fits) < job.min_workers:
            break
        chosen = fits[:job.max_workers]
        result[job.job_id] = tuple(sorted(d.device_id for d in chosen))
        free = [d for d in free if d not in chosen]
    return result


def partition(devices: Sequence[Device], parts: int) -> list[tuple[Device, ...]]:
    """``devices`` by id in ``parts`` contiguous groups whose sizes differ by at most one
    (fewer groups when there are fewer devices)."""
    ordered = sorted(devices, key=lambda d: d.device_id)
    parts = max(1, min(parts, len(ordered)))
    size, extra = divmod(len(ordered), parts)
    groups, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        groups.append(tuple(ordered[start:end]))
        start = end
    return [g for g in groups if g]


def static_partition(parts: int | None = None) -> LivePolicy:
    """The static equal partition into ``parts`` groups (None: one group per device)."""
    if parts is not None and parts < 1:
        raise ValueError(f"static_partition: parts must be at least 1, got {parts}")

    def static(jobs: Sequence[JobView], devices: Sequence[Device], models: PerfModels,
               current: Allocation) -> dict[str, tuple[str, ...]]:
        result = _keep_running(jobs, devices, current)
        used = {d for held in result.values() for d in held}
        groups = [g for g in partition(devices, parts or len(devices))
                  if not any(d.device_id in used for d in g)]
        for job in _arrival_order(jobs):
            if job.job_id in result:
                continue
            for group in groups:
                fits = [d for d in group if d.memory_bytes >= job.memory_bytes_per_worker]
                if len(fits) >= job.min_workers:
                    result[job.job_id] = tuple(sorted(d.device_id for d in
                                                      fits[:job.max_workers]))
                    groups.remove(group)
                    break
        return result

    return static


def live_policy(name: str) -> LivePolicy | None:
    """The policy called ``name`` (idla: None, the agent's default `allocate`)."""
    if name == "idla":
        return None
    if name == "fifo":
        return fifo
    if name == "static":
        return static_partition()
    raise ValueError(f"unknown policy {name!r}; choose idla, fifo or static")
