"""Gavel's heterogeneity-aware max-min fairness (Narayanan et al., "Heterogeneity-Aware Cluster
Scheduling Policies for Deep Learning Workloads", OSDI 2020) as the simulator's baseline.

Every lease (Gavel's 360 s round) it solves Gavel's allocation LP over the active jobs: X[m, k]
is the fraction of time job m should run on GPU kind k,

    maximise  min_m  Σ_k X[m, k] · tput[m, k] · scale_m / tput_equal_m
    s.t.      Σ_k X[m, k] ≤ 1,   Σ_m X[m, k] · scale_m ≤ GPUs of kind k,   X ≥ 0

(tput: the job's rate on ``scale_m`` = its requested GPUs of kind k; tput_equal: its rate when
every job gets an equal time share of every kind), then a second LP that keeps every job at that
minimum and maximises Σ of the same normalised throughputs, so that capacity the minimum does not
need is not left idle (Gavel's water-filling variant goes further; this is its first level).
Gavel's round-based mechanism turns X into a schedule: each (job, kind) has priority X[m, k]
divided by the job's share of all the time kind k has given (a new job starts with half a lease
on every kind, as in the Sia artifact's Gavel, so least-served jobs come first); jobs are taken
in priority order, each on one kind with enough free GPUs, and keep
their previous GPUs when they stay on the same kind (bigger jobs placed first). Between
leases jobs keep their GPUs and queued jobs fill free ones in the same order.

Cost per lease: two LPs of (jobs × kinds + 1) variables (HiGHS, milliseconds at 100 jobs), plus
O(jobs × kinds) for the schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linprog

from idla.pool.model import Device
from idla.pool.perf import TraceModels
from idla.pool.sim.simulator import SimJob


def max_min_allocation(tput: np.ndarray, scale: np.ndarray,
                       capacity: np.ndarray) -> np.ndarray:
    """Gavel's max-min fair X (module docstring) for throughputs ``tput`` (jobs, kinds), GPUs
    per job ``scale`` (jobs,) and GPUs per kind ``capacity`` (kinds,); rows of a job that fits
    nowhere are 0."""
    jobs, kinds = tput.shape
    total = capacity.sum()
    equal = (tput * (capacity / total)).sum(axis=1)
    coef = np.where(equal[:, None] > 0, tput * scale[:, None] / np.maximum(equal, 1e-12)[:, None],
                    0.0)  # (jobs, kinds)
    live = coef.sum(axis=1) > 0
    x = np.zeros((jobs, kinds))
    if not live.any():
        return x
    c, s = coef[live], scale[live]
    n = len(c)
    size = n * kinds
    rows_time = np.kron(np.eye(n), np.ones(kinds))  # Σ_k X[m, k] ≤ 1
    rows_gpus = np.kron(s[:, None].T, np.eye(kinds))  # Σ_m X[m, k]·scale_m ≤ capacity_k
    rows_min = -np.kron(np.eye(n), np.ones(kinds)) * c.reshape(1, -1)  # t − Σ_k c·X ≤ 0
    a_ub = np.vstack([np.hstack([rows_time, np.zeros((n, 1))]),
                      np.hstack([rows_gpus, np.zeros((kinds, 1))]),
                      np.hstack([rows_min, np.ones((n, 1))])])
    b_ub = np.concatenate([np.ones(n), capacity, np.zeros(n)])
    first = linprog(np.concatenate([np.zeros(size), [-1.0]]), A_ub=a_ub, b_ub=b_ub,
                    bounds=(0, None), method="highs")
    floor = float(first.x[-1]) * (1 - 1e-6) if first.status == 0 else 0.0
    second = linprog(np.concatenate([-c.reshape(-1), [0.0]]), A_ub=a_ub, b_ub=b_ub,
                     bounds=[*([(0, None)] * size), (floor, None)], method="highs")
    chosen = second if second.status == 0 else first
    if chosen.status == 0:
        x[live] = np.clip(chosen.x[:size].reshape(n, kinds), 0.0, 1.0)
    return x


@dataclass
class GavelMaxMin:
    """Gavel's max-min fairness with its round-based schedule (module docstring)."""

    lease_rounds: int = 6
    """Simulator rounds per Gavel round (Gavel's 360 s at 60 s rounds)."""
    round_s: float = 60.0
    name: str = "gavel"
    adaptive: bool = False
    restart_resize: bool = True
    _time_s: dict[str, dict[str, float]] = field(default_factory=dict)
    _kind_s: dict[str, float] = field(default_factory=dict)
    _x: dict[str, dict[str, float]] = field(default_factory=dict)
    _rounds: int = 0

    def plan(self, now_s: float, jobs: Sequence[SimJob], devices: Sequence[Device],
             models: TraceModels) -> dict[str, tuple[str, ...]]:
        by_id = {d.device_id: d for d in devices}
        kinds = sorted({d.kind for d in devices})
        for job in jobs:
            if job.name not in self._time_s:
                start_s = self.lease_rounds * self.round_s / 2
                self._time_s[job.name] = dict.fromkeys(kinds, start_s)
                for kind in kinds:
                    self._kind_s[kind] = self._kind_s.get(kind, 0.0) + start_s
            if job.devices:
                kind = by_id[job.devices[0]].kind
                self._time_s[job.name][kind] += self.round_s
                self._kind_s[kind] += self.round_s
        replan = self._rounds % self.lease_rounds == 0
        self._rounds += 1
        if replan:
            self._x = self._solve(jobs, devices, kinds, models)
        keep = {} if replan else {job.name: job.devices for job in jobs if job.devices}
        return self._schedule(jobs, devices, kinds, keep)

    def _solve(self, jobs: Sequence[SimJob], devices: Sequence[Device], kinds: list[str],
               models: TraceModels) -> dict[str, dict[str, float]]:
        by_kind = {k: sorted((d for d in devices if d.kind == k),
                             key=lambda d: (d.node, d.device_id)) for k in kinds}
        tput = np.array([[models.rate_per_s(job.name, by_kind[k][:job.num_replicas])
                          if job.num_replicas <= len(by_kind[k]) else 0.0 for k in kinds]
                         for job in jobs]).reshape(len(jobs), len(kinds))
        scale = np.array([float(job.num_replicas) for job in jobs])
        capacity = np.array([float(len(by_kind[k])) for k in kinds])
        x = max_min_allocation(tput, scale, capacity)
        return {job.name: dict(zip(kinds, map(float, x[i]), strict=True))
                for i, job in enumerate(jobs)}

    def _priority(self, job: SimJob, kind: str) -> float:
        share = self._x.get(job.name, {}).get(kind, 0.0)
        return share * self._kind_s[kind] / self._time_s[job.name][kind]

    def _schedule(self, jobs: Sequence[SimJob], devices: Sequence[Device],
                  kinds: list[str], keep: Mapping[str, tuple[str, ...]],
                  ) -> dict[str, tuple[str, ...]]:
        by_id = {d.device_id: d for d in devices}
        free = {k: sum(1 for d in devices if d.kind == k) for k in kinds}
        for held in keep.values():
            free[by_id[held[0]].kind] -= len(held)
        entries = sorted(((self._priority(job, k), index, job, k)
                          for index, job in enumerate(jobs) if job.name not in keep
                          for k in kinds), key=lambda e: (-e[0], e[1]))
        chosen: dict[str, str] = {}
        for _, _, job, kind in entries:
            if job.name in chosen or free[kind] < job.num_replicas:
                continue
            chosen[job.name] = kind
            free[kind] -= job.num_replicas
        result = dict(keep)
        taken = {d for held in keep.values() for d in held}
        order = sorted((job for job in jobs if job.name in chosen),
                       key=lambda j: -j.num_replicas)
        for job in order:  # stayers keep their GPUs when those are still free
            if job.devices and by_id[job.devices[0]].kind == chosen[job.name] and not (
                    set(job.devices) & taken):
                result[job.name] = job.devices
                taken |= set(job.devices)
        for job in order:
            if job.name not in result:
                result[job.name] = _place(job.num_replicas, chosen[job.name], devices, taken)
                taken |= set(result[job.name])
        return result


def _place(count: int, kind: str, devices: Sequence[Device], taken: set[str]) -> tuple[str, ...]:
    """``count`` free GPUs of ``kind``, from the nodes with the most free GPUs first."""
    by_node: dict[str, list[str]] = {}
    for device in sorted(devices, key=lambda d: d.device_id):
        if device.kind == kind and device.device_id not in taken:
            by_node.setdefault(device.node, []).append(device.device_id)
    chosen: list[str] = []
    for node in sorted(by_node, key=lambda n: (-len(by_node[n]), n)):
        chosen += by_node[node][:count - len(chosen)]
    return tuple(sorted(chosen))
