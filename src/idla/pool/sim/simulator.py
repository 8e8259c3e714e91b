"""A round-based replay of a workload on a simulated heterogeneous GPU cluster.

As in the Sia/Pollux artifacts' simulator: every ``round_s`` (60 s, as Sia) the policy re-plans
every active job; a job's progress in a round is its rate on its devices (`TraceModels`) times
the round less the time its (re)start holds the devices; it ends at its target progress. A
first start, and a restart after a preemption, hold the devices for the application's restart
seconds under every policy; a resize of a running job costs the restart for checkpoint-restart
schedulers and one iteration for idla's in-place elastic resize (``SimPolicy.restart_resize``).
Arrivals wait for the next round boundary. Cost: one `plan` per round plus O(active jobs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from idla.errors import ConfigError
from idla.pool.model import Device
from idla.pool.perf import TraceModels
from idla.pool.sim.traces import AppTrace, TraceJob


@dataclass(slots=True)
class SimJob:
    """One job's state during a replay."""

    name: str
    application: str
    arrival_s: float
    num_replicas: int
    """The GPUs its user asked for (what a rigid policy gives it)."""
    batch_size: int
    priority: float
    target_progress: float
    progress: float = 0.0
    attained_gpu_s: float = 0.0
    devices: tuple[str, ...] = ()
    hold_s: float = 0.0
    """Seconds of (re)start left before it progresses again."""
    finish_s: float | None = None
    resizes: int = 0


class SimPolicy(Protocol):
    """A scheduling policy as the simulator drives it."""

    name: str
    adaptive: bool
    """True: the policy chooses each job's size and batch; False: it uses num_replicas and
    batch_size as given."""
    restart_resize: bool
    """True: every resize of a running job is a checkpoint-restart."""

    def plan(self, now_s: float, jobs: Sequence[SimJob], devices: Sequence[Device],
             models: TraceModels) -> dict[str, tuple[str, ...]]:
        """Devices per active job for the next round (a job left out is queued)."""
        ...


@dataclass(kw_only=True, slots=True)
class SimConfig:
    """Settings of one replay."""

    round_s: float = 60.0
    """Seconds between re-plans (Sia: 60)."""
    seed: int = 0
    """Seed of the priority assignment."""
    priority_mix: tuple[tuple[float, float], ...] = ((4.0, 0.2), (2.0, 0.3), (1.0, 0.5))
    """(priority, fraction of jobs): the workloads carry none, so they are assigned."""
    max_rounds: int = 200_000
    """A replay still running after this many rounds is an error (a job that can never run)."""

    def __post_init__(self) -> None:
        if not self.round_s > 0:
            raise ConfigError(f"sim.round_s must be positive, got {self.round_s}")
        if abs(sum(f for _, f in self.priority_mix) - 1.0) > 1e-9:
            raise ConfigError("sim.priority_mix fractions must sum to 1")


@dataclass(slots=True)
class SimResult:
    """What a replay measured."""

    jct_s: dict[str, float]
    priority: dict[str, float]
    resizes: dict[str, int]
    gpu_s: float
    makespan_s: float
    plan_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """avg/p99/weighted JCT, makespan, resizes per job and GPU-hours."""
        jct = np.array(list(self.jct_s.values()))
        weights = np.array([self.priority[j] for j in self.jct_s])
        return {
            "avg_jct_s": float(jct.mean()),
            "p99_jct_s": float(np.percentile(jct, 99)),
            "makespan_s": self.makespan_s,
            "weighted_jct_s": float((jct * weights).sum() / weights.sum()),
            "resizes_per_job": float(np.mean(list(self.resizes.values()))),
            "gpu_hours": self.gpu_s / 3600.0,
        }


def assign_priorities(names: Sequence[str], config: SimConfig) -> dict[str, float]:
    """Priorities by the configured mix, on a seeded shuffle of the jobs."""
    order = list(names)
    random.Random(config.seed).shuffle(order)
    priorities: dict[str, float] = {}
    start = 0
    for index, (priority, fraction) in enumerate(config.priority_mix):
        end = len(order) if index == len(config.priority_mix) - 1 else start + round(
            fraction * len(order))
        priorities.update(dict.fromkeys(order[start:end], priority))
        start = end
    return priorities


def simulate(workload: Sequence[TraceJob], apps: Mapping[str, AppTrace],
             devices: Sequence[Device], policy: SimPolicy, priorities: Mapping[str, float],
             config: SimConfig | None = None) -> SimResult:
    """Replay ``workload`` under ``policy`` (module docstring)."""
    config = config or SimConfig()
    models = TraceModels(apps, restart_resize=policy.restart_resize)
    jobs = []
    for row in workload:
        models.add_job(row.name, row.application, 0 if policy.adaptive else row.batch_size)
        jobs.append(SimJob(row.name, row.application, row.arrival_s, row.num_replicas,
                           row.batch_size, priorities.get(row.name, 1.0),
                           models.target_progress(row.name)))
    by_id = {device.device_id: device for device in devices}
    pending = sorted(jobs, key=lambda job: job.arrival_s)
    active: list[SimJob] = []
    result = SimResult({}, {}, {}, 0.0, 0.0)
    now_s = 0.0
    for _ in range(config.max_rounds):
        while pending and pending[0].arrival_s <= now_s:
            active.append(pending.pop(0))
        if not active:
            if not pending:
                return result
            now_s = math.ceil(pending[0].arrival_s / config.round_s) * config.round_s
            continue
        for job in active:
            models.set_progress(job.name, job.progress)
        allocation = policy.plan(now_s, active, devices, models)
        for job in active:
            _advance(job, allocation.get(job.name, ()), by_id, models, policy, now_s,
                     config.round_s, apps[job.application].restart_s)
        for job in list(active):
            if job.finish_s is None:
                continue
            active.remove(job)
            result.jct_s[job.name] = job.finish_s - job.arrival_s
            result.priority[job.name] = job.priority
            result.resizes[job.name] = job.resizes
            result.makespan_s = max(result.makespan_s, job.finish_s)
        result.gpu_s += sum(len(job.devices) for job in active) * config.round_s
        now_s += config.round_s
    raise ConfigError(f"{policy.name}: replay did not finish within {config.max_rounds} rounds")


def _advance(job: SimJob, held: tuple[str, ...], by_id: Mapping[str, Device],
             models: TraceModels, policy: SimPolicy, now_s: float, round_s: float,
             restart_s: float) -> None:
    held = tuple(sorted(held))
    if held != job.devices:
        if held and job.devices and not policy.restart_resize:
            job.hold_s = models.iteration_s(job.name, [by_id[d] for d in held])
        elif held:
            job.hold_s = restart_s
        if job.devices:
            job.resizes += 1
        job.devices = held
        models.set_devices(job.name, [by_id[d] for d in held])
    if not held:
        return
    job.attained_gpu_s += len(held) * round_s
    run_s = max(0.0, round_s - job.hold_s)
    start_s = now_s + min(job.hold_s, round_s)
    job.hold_s = max(0.0, job.hold_s - round_s)
    rate = models.rate_per_s(job.name, [by_id[d] for d in held])
    if rate <= 0:
        return
    need = job.target_progress - job.progress
    if rate * run_s >= need:
        job.finish_s = start_s + need / rate
        job.progress = job.target_progress
    else:
        job.progress += rate * run_s


def alone_jct_s(row: TraceJob, apps: Mapping[str, AppTrace], devices: Sequence[Device],
                policy: SimPolicy, config: SimConfig | None = None) -> float:
    """The job's completion time alone on the empty cluster under ``policy``, arriving at the
    same point of a round as in the workload (so both wait alike for the round boundary)."""
    round_s = (config or SimConfig()).round_s
    shifted = TraceJob(row.name, row.arrival_s % round_s, row.application, row.num_replicas,
                       row.batch_size)
    result = simulate([shifted], apps, devices, policy, {row.name: 1.0}, config)
    return result.jct_s[row.name]
