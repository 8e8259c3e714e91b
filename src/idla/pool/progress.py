"""What a running training job's workers report, turned into what the pool decides with.

Every tick the agent reads the job's metrics folder (`idla.agent.pool_metrics.read_job_metrics`:
one small JSON file per worker, rewritten at most once a second) and `JobProgress.update`

- feeds each new row to the performance models (`OnlineModels.observe`: the kind of the device
  the pool put the worker on, its local batch, compute and communication seconds per step) and
  the job's global batch (`OnlineModels.set_job`);
- seeds each device kind the job has not run on with every observation of one it has, scaled
  by their emulated speeds (`kind_speed`: ``cpu@0.5`` is taken to be half as fast as ``cpu@1``
  until it is measured), so the seed follows the measured kind past its warm-up steps;
- says whether the job is *formed*: every worker the pool runs for it has reported a step at
  the job's current world size since its workers last changed (the pool resizes only a formed
  job: a worker stopped while the group forms fails the others' start);
- measures what a resize cost, in seconds of progress: between the job's last row before the
  decision (time t₀, samples s₀) and the first row of the new world (t₁, s₁), at the faster of
  the rates before and after, ``lost = (t₁ − t₀) − (s₁ − s₀) / rate`` (≥ 0) — the pause of the
  re-form, counted generously; it goes to `OnlineModels.observe_resize`;
- counts the samples done (newest row), so the policy sees the spec's samples minus those.

`SpeedPrior` rates a job nothing has been measured for by its devices' emulated speeds, and a
serving job by its workers' measured capacities (before any: its offered load on its minimum
of devices, whatever their kind).
Cost per tick and job: one read of each worker's file (~0.5 kB), O(workers) arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from idla.agent.pool_metrics import read_job_metrics
from idla.pool.model import Device, JobKind, JobView
from idla.pool.perf import OnlineModels


def kind_speed(kind: str) -> float:
    """The emulated relative speed a device kind carries (``"cpu@0.25"`` → 0.25), else 1.0."""
    _, _, speed = kind.partition("@")
    try:
        value = float(speed)
    except ValueError:
        return 1.0
    return value if math.isfinite(value) and value > 0 else 1.0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class _Mark:
    """One point of the job's progress: a row's time, its samples done and the job's rate."""

    time_s: float
    samples: float
    samples_per_s: float | None


def _mark(row: Mapping[str, Any]) -> _Mark:
    return _Mark(float(row["time"]), _number(row.get("samples_done")) or 0.0,
                 _number(row.get("job_samples_per_s")))


class JobProgress:
    """One running job's progress as its metrics show it (module docstring).

    Args:
        job_id: The job.
        metrics_dir: The folder its workers write to (``IDLA_POOL_METRICS_DIR``).
        started_wall_s: When this attempt started (Unix seconds); older rows are ignored.
        pool_kinds: The kinds of the pool's devices (seeded from those measured).
    """

    def __init__(self, job_id: str, metrics_dir: Path, started_wall_s: float,
                 pool_kinds: Sequence[str] = ()) -> None:
        self.job_id, self.metrics_dir = job_id, metrics_dir
        self._since_s = started_wall_s
        self._changed_s = started_wall_s
        self.formed = False
        """Every worker has stepped at the current world size since the last change."""
        self.samples_done = 0.0
        """Samples the job has trained (its newest row), this attempt."""
        self.step = 0
        """The job's committed steps (its newest row)."""
        self.reported: set[str] = set()
        """Devices whose worker has reported a step this attempt (a newcomer still starting
        has not)."""
        self._latest: _Mark | None = None
        self._pending: _Mark | None = None
        self._resize_pending = False
        self._seen: dict[int, float] = {}
        self._kinds: set[str] = set()
        self._pool_kinds = set(pool_kinds)

    def changed(self, now_wall_s: float) -> None:
        """The pool changed the job's workers now: it is formed again once the new world steps,
        and what the change cost is measured then."""
        self.formed = False
        self._changed_s = now_wall_s
        if not self._resize_pending:
            self._pending, self._resize_pending = self._latest, True

    def update(self, workers: Mapping[str, Device], models: OnlineModels) -> float | None:
        """Read the rows (``workers``: device id → device of each worker the pool runs now);
        return the measured cost in seconds of a resize that has just completed, else None."""
        rows = [r for r in read_job_metrics(self.metrics_dir)
                if float(r["time"]) >= self._since_s and r.get("status") == "running"]
        if not rows:
            return None
        self.reported.update(str(r.get("worker")) for r in rows)
        newest = max(rows, key=lambda r: float(r["time"]))
        self._latest = _mark(newest)
        self.samples_done = max(self.samples_done, self._latest.samples)
        self.step = max(self.step, int(newest["job_step"]))
        batch = newest.get("global_batch")
        if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
            models.set_job(self.job_id, batch)
        for row in rows:
            self._feed(row, workers, models)
        if self.formed:
            return None
        fresh = {str(r.get("worker")): r for r in rows if float(r["time"]) >= self._changed_s
                 and r.get("world_size") == len(workers) and int(r["job_step"]) >= 1}
        if not workers or any(device_id not in fresh for device_id in workers):
            return None
        self.formed = True
        if not self._resize_pending:
            return None
        self._resize_pending = False
        before, after = self._pending, _mark(max(fresh.values(), key=lambda r: float(r["time"])))
        rates = [m.samples_per_s for m in (before, after) if m is not None and m.samples_per_s]
        if before is None or not rates:
            return None
        lost_s = max(0.0, after.time_s - before.time_s - (after.samples - before.samples)
                     / max(rates))
        models.observe_resize(self.job_id, lost_s)
        return lost_s

    def _feed(self, row: Mapping[str, Any], workers: Mapping[str, Device],
              models: OnlineModels) -> None:
        member, time_s = int(row["member"]), float(row["time"])
        device = workers.get(str(row.get("worker")))
        if device is None or time_s <= self._seen.get(member, -math.inf):
            return
        self._seen[member] = time_s
        local_batch, compute_s = row.get("local_batch"), _number(row.get("compute_s"))
        if not isinstance(local_batch, int) or local_batch < 1 or not compute_s:
            return
        models.observe(self.job_id, device.kind, local_batch, compute_s,
                       _number(row.get("comm_s")))
        self._kinds.add(device.kind)
        for other in self._pool_kinds - self._kinds:  # scaled, until it is measured itself
            models.seed(self.job_id, other,
                        [(local_batch, compute_s * kind_speed(device.kind) / kind_speed(other))])


class SpeedPrior:
    """`OnlineModels`, except that a job with nothing measured yet (or on a kind no fit covers)
    is rated ``prior_rate_per_s`` × the sum of its devices' emulated speeds, so that a new job
    is first placed on the fast devices. A serving job is rated by its router's measured
    capacity per device; until there is one, it is assumed to carry its offered load on its
    ``min_workers`` devices of any kind (requests/s, not a training job's samples/s), so that
    the policy starts it on the slowest kind and grows it once the router has measured it.
    Implements `idla.pool.model.PerfModels`."""

    def __init__(self, online: OnlineModels, prior_rate_per_s: float = 1.0) -> None:
        self.online, self.prior_rate_per_s = online, prior_rate_per_s
        self._capacity: dict[str, dict[str, float]] = {}
        self._serving_prior: dict[str, float] = {}

    def refresh(self, views: Iterable[JobView], kinds: Iterable[str]) -> None:
        """Rate a training job not measured yet like a typical one: ``prior_rate_per_s``
        becomes the median, over the jobs measured so far, of their one-device rate per unit of
        emulated speed (kept when none is). A prior of a few samples/s against measured
        thousands would make a new job look worthless to a policy that divides by its work.
        A serving job with an offered load gets its own prior (class docstring).
        O(jobs × kinds)."""
        kinds = list(kinds)
        rates = []
        for view in views:
            job_id = view.job_id
            if view.kind is JobKind.SERVE and view.offered_requests_per_s > 0:
                self._serving_prior[job_id] = view.offered_requests_per_s / view.min_workers
                continue
            if job_id in self._capacity:
                continue
            per_kind = [self.online.rate_per_s(job_id, [Device("probe", kind, "probe", 0)])
                        / kind_speed(kind) for kind in kinds
                        if math.isfinite(self.online.step_s(job_id,
                                                            [Device("probe", kind, "probe", 0)]))]
            if per_kind:
                rates.append(sum(per_kind) / len(per_kind))
        if rates:
            self.prior_rate_per_s = float(np.median(rates))

    def set_capacity(self, job_id: str, kind: str, requests_per_s: float) -> None:
        """A serving job's measured capacity on a device of ``kind`` (its router's meter)."""
        self._capacity.setdefault(job_id, {})[kind] = requests_per_s

    def rate_per_s(self, job_id: str, devices: Sequence[Device]) -> float:
        if not devices:
            return 0.0
        capacity = self._capacity.get(job_id)
        if capacity:  # a serving job: the sum of its workers' capacities, unknown kinds scaled
            def per_device(kind: str) -> float:
                if kind in capacity:
                    return capacity[kind]
                return sum(c * kind_speed(kind) / kind_speed(k)
                           for k, c in capacity.items()) / len(capacity)
            return sum(per_device(d.kind) for d in devices)
        if job_id in self._serving_prior:
            return self._serving_prior[job_id] * len(devices)
        if math.isinf(self.online.step_s(job_id, devices)):
            return self.prior_rate_per_s * sum(kind_speed(d.kind) for d in devices)
        return self.online.rate_per_s(job_id, devices)

    def resize_cost_s(self, job_id: str) -> float:
        return self.online.resize_cost_s(job_id)
