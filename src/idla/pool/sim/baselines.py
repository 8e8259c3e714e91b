"""The policies the simulator compares, idla's among them, all behind `SimPolicy`.

- `Fifo`: rigid (the user's GPUs and batch), non-preemptive, strict arrival order.
- `Tiresias`: discretised least-attained-service with two queues (Gu et al., "Tiresias",
  NSDI 2019): rigid, preemptive, a job drops to the second queue after ``threshold_gpu_s``.
- `GavelMaxMin` (`idla.pool.sim.gavel`): heterogeneity-aware max-min fairness (Narayanan et
  al., "Gavel", OSDI 2020): rigid, Gavel's allocation LP every 360 s lease and its priority
  schedule (time share asked / time share had), free GPUs filled in between.
- `PolluxLike`: a goodput maximiser (Qiao et al., "Pollux", OSDI 2021): adaptive size and
  batch, one GPU kind per job, a checkpoint-restart on every resize; it runs `allocate` with
  proportional fairness on speedups (no priorities, no knowledge of the work left).
- `Idla`: `allocate` as the live agent runs it: priorities (p=4 jobs guaranteed near their rate
  alone), work left, mixed kinds, in-place resizes.

The rigid baselines place a job on one kind, on the nodes with the most free GPUs first. Each
plan costs O(jobs × kinds + GPUs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from idla.pool.model import Device, JobKind, JobView
from idla.pool.perf import TraceModels
from idla.pool.policy import PolicyConfig, Utility, allocate
from idla.pool.sim.gavel import GavelMaxMin
from idla.pool.sim.simulator import SimJob

ADAPTIVE_MAX_WORKERS = 16
"""Largest size an adaptive policy may give a job (the largest request in the workloads)."""


def _place(job: SimJob, free: dict[str, dict[str, list[str]]], kind: str) -> tuple[str, ...]:
    by_node = free[kind]
    chosen: list[str] = []
    for node in sorted(by_node, key=lambda n: (-len(by_node[n]), n)):
        while by_node[node] and len(chosen) < job.num_replicas:
            chosen.append(by_node[node].pop())
    return tuple(sorted(chosen))


def _free(devices: Sequence[Device], taken: set[str]) -> dict[str, dict[str, list[str]]]:
    free: dict[str, dict[str, list[str]]] = {}
    for device in sorted(devices, key=lambda d: d.device_id, reverse=True):
        if device.device_id not in taken:
            free.setdefault(device.kind, {}).setdefault(device.node, []).append(device.device_id)
    return free


def _count(free: dict[str, dict[str, list[str]]], kind: str) -> int:
    return sum(len(ids) for ids in free.get(kind, {}).values())


def _claim(free: dict[str, dict[str, list[str]]], held: Sequence[str]) -> bool:
    """Take ``held`` out of ``free`` if every one of them is free (a job keeps its GPUs)."""
    where = {d: ids for by_node in free.values() for ids in by_node.values() for d in ids}
    if not all(d in where for d in held):
        return False
    for d in held:
        where[d].remove(d)
    return True


def _fits(job: SimJob, free: dict[str, dict[str, list[str]]]) -> list[str]:
    return [kind for kind in sorted(free) if _count(free, kind) >= job.num_replicas]


@dataclass
class Fifo:
    name: str = "fifo"
    adaptive: bool = False
    restart_resize: bool = True

    def plan(self, now_s: float, jobs: Sequence[SimJob], devices: Sequence[Device],
             models: TraceModels) -> dict[str, tuple[str, ...]]:
        result = {job.name: job.devices for job in jobs if job.devices}
        free = _free(devices, {d for held in result.values() for d in held})
        for job in sorted(jobs, key=lambda j: (j.arrival_s, j.name)):
            if job.devices:
                continue
            kinds = _fits(job, free)
            if not kinds:
                break
            result[job.name] = _place(job, free, max(kinds, key=lambda k: _count(free, k)))
        return result


@dataclass
class Tiresias:
    threshold_gpu_s: float = 3600.0
    """Attained GPU-seconds after which a job drops to the low-priority queue."""
    name: str = "tiresias"
    adaptive: bool = False
    restart_resize: bool = True

    def plan(self, now_s: float, jobs: Sequence[SimJob], devices: Sequence[Device],
             models: TraceModels) -> dict[str, tuple[str, ...]]:
        order = sorted(jobs, key=lambda j: (j.attained_gpu_s >= self.threshold_gpu_s,
                                            j.arrival_s, j.name))
        result: dict[str, tuple[str, ...]] = {}
        free = _free(devices, set())
        for job in order:
            if job.devices and _claim(free, job.devices):
                result[job.name] = job.devices
                continue
            kinds = _fits(job, free)
            if kinds:
                result[job.name] = _place(job, free, max(kinds, key=lambda k: _count(free, k)))
        return result


def _views(jobs: Sequence[SimJob], *, priorities: bool, work: bool) -> list[JobView]:
    return [JobView(job_id=job.name, kind=JobKind.TRAIN,
                    priority=job.priority if priorities else 1.0, min_workers=1,
                    max_workers=ADAPTIVE_MAX_WORKERS, arrival_s=job.arrival_s,
                    remaining_samples=(job.target_progress - job.progress) if work else None)
            for job in jobs]


@dataclass
class PolluxLike:
    name: str = "pollux"
    adaptive: bool = True
    restart_resize: bool = True
    config: PolicyConfig = field(default_factory=lambda: PolicyConfig(
        utility=Utility.LOG_SPEEDUP, one_kind_per_job=True))

    def plan(self, now_s: float, jobs: Sequence[SimJob], devices: Sequence[Device],
             models: TraceModels) -> dict[str, tuple[str, ...]]:
        current = {job.name: job.devices for job in jobs if job.devices}
        return allocate(_views(jobs, priorities=False, work=False), devices, models, current,
                        self.config)


@dataclass
class Idla:
    name: str = "idla"
    adaptive: bool = True
    restart_resize: bool = False
    config: PolicyConfig = field(default_factory=PolicyConfig)

    def plan(self, now_s: float, jobs: Sequence[SimJob], devices: Sequence[Device],
             models: TraceModels) -> dict[str, tuple[str, ...]]:
        current = {job.name: job.devices for job in jobs if job.devices}
        return allocate(_views(jobs, priorities=True, work=True), devices, models, current,
                        self.config)


POLICIES = {"fifo": Fifo, "tiresias": Tiresias, "gavel": GavelMaxMin, "pollux": PolluxLike,
            "idla": Idla}
"""Policy name → a factory of a fresh policy (policies keep per-replay state)."""
