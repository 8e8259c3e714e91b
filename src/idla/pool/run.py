"""A job the pool agent has started (`JobRun`), and how the agent keeps held jobs in place.

A job is *held* while it must not be resized (rigid, not formed yet, just changed, finishing):
the policy sees it pinned to its current worker count (`held_view`), and `respect` makes the
policy's target leave it exactly on its devices. Cost: O(J + D) per plan.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idla.pool.backend import WorkerHandle
from idla.pool.model import Allocation, Device, JobView
from idla.pool.perf import OnlineModels
from idla.pool.progress import JobProgress, SpeedPrior
from idla.pool.serving import ServeWatch
from idla.pool.store import JobRecord


@dataclass
class JobRun:
    """A job the agent has started: its workers by device, and what it is going through."""

    record: JobRecord
    attempt: int
    run_dir: Path
    secret: str
    progress: JobProgress
    workers: dict[str, WorkerHandle] = field(default_factory=dict)
    leaving: list[WorkerHandle] = field(default_factory=list)
    """Workers the agent stopped that have not exited yet (their exit is no failure)."""
    failed_last: bool = False
    """The last worker left by failing (not stopped, not finished)."""
    gave_up: bool = False
    """Its workers failed ``max_failures`` times in a row: it ends as failed."""
    failures_in_row: int = 0
    step_at_failure: int = 0
    next_member: int = 0
    changed_s: float = 0.0
    finished_s: float | None = None
    failures: list[str] = field(default_factory=list)
    resizes: int = 0
    watch: ServeWatch | None = None
    """A serving job's router, followed through its /metrics."""
    anchor: str | None = None
    """A serving job's first device: its router's own worker, which stays while it runs."""
    metrics_written_s: float = -1e9
    """When its measurements last went to the store (monotonic seconds)."""

    def follow(self, alive: Mapping[str, Device], online: OnlineModels, prior: SpeedPrior,
               changed: bool, now: float) -> list[tuple[str, dict[str, Any]]]:
        """Read what the job reports — a training job its workers' metrics (models, formation,
        the cost of its last resize), a serving job its router (formed once it serves with a
        worker on every device; capacities) — and return the events to record. ``changed``:
        its world changed under it (a worker or a device lost), so it must re-form."""
        if changed:
            self.progress.changed(time.time())
            self.changed_s = now
        workers = {d: alive[d] for d in self.workers if d in alive}
        if self.watch is not None:
            self.progress.formed = self.watch.joined(self.workers)
            for device_id, requests_per_s in self.watch.capacities().items():
                if device_id in workers:
                    prior.set_capacity(self.record.job_id, workers[device_id].kind,
                                       requests_per_s)
            return self.watch.events()
        was_formed = self.progress.formed
        cost_s = self.progress.update(workers, online)
        events: list[tuple[str, dict[str, Any]]] = []
        if self.progress.formed and not was_formed:
            events.append(("formed", {"devices": sorted(workers), "step": self.progress.step}))
        if cost_s is not None:
            events.append(("resize_cost", {"lost_s": round(cost_s, 3)}))
        return events

    def info(self) -> dict[str, Any]:
        """What the API shows of it while it runs."""
        return {"devices": sorted(self.workers), "attempt": self.attempt,
                "run_dir": str(self.run_dir), "resizes": self.resizes,
                "formed": self.progress.formed, "step": self.progress.step,
                "samples_done": self.progress.samples_done, "failures": list(self.failures)}

    def measurements(self) -> dict[str, Any]:
        """Its latest measurements, for the store: training progress, or the serving router's
        latency (`ServeWatch.snapshot`)."""
        if self.watch is not None:
            return {"resizes": self.resizes, **self.watch.snapshot()}
        return {"step": self.progress.step, "samples_done": self.progress.samples_done,
                "formed": self.progress.formed, "resizes": self.resizes}

    def count_failure(self, device_id: str, code: int, max_failures: int) -> bool:
        """A worker failed; True when that makes ``max_failures`` in a row with no step of
        the job between them (the job is given up)."""
        self.failures.append(f"worker on {device_id} exited with code {code}")
        self.failed_last = not self.workers
        if self.progress.step > self.step_at_failure:
            self.failures_in_row = 0
        self.failures_in_row += 1
        self.step_at_failure = self.progress.step
        self.gave_up = self.gave_up or self.failures_in_row >= max_failures
        return self.gave_up


def held_view(view: JobView, count: int) -> JobView:
    """``view`` pinned to exactly ``count`` workers, not resizable (a held job)."""
    fields = {name: getattr(view, name) for name in JobView.__slots__}
    return JobView(**{**fields, "min_workers": count, "max_workers": count,
                      "resizable": False})


def respect(target: Mapping[str, Sequence[str]],
             current: Allocation, held: set[str], views: Mapping[str, JobView]
             ) -> dict[str, tuple[str, ...]]:
    """The policy's target, with every held job on exactly its current devices and no other
    job on them; a job left below its minimum by that keeps what it has, or waits."""
    result = {j: tuple(current.get(j, ())) for j in held if current.get(j)}
    reserved = {d for held_devices in result.values() for d in held_devices}
    for job_id, devices in target.items():
        if job_id in held or job_id not in views:
            continue
        mine = tuple(d for d in devices if d not in reserved)
        if len(mine) < views[job_id].min_workers:
            mine = tuple(d for d in current.get(job_id, ()) if d not in reserved)
            if len(mine) < views[job_id].min_workers:
                continue
        result[job_id] = mine
        reserved.update(mine)
    return result


def log_tail(path: Path, max_chars: int = 300) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    last = text.splitlines()[-1] if text else ""
    return f" (worker-0.log: {last[-max_chars:]})" if last else ""


def keep_anchors(target: Mapping[str, Sequence[str]], current: Allocation,
                 anchors: Mapping[str, str]) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    """The policy's ``target`` with each serving job (``anchors``: job → its router's device)
    on its anchor: a job moved off it swaps one of its new devices with whoever was given the
    anchor, so every job keeps its count. Returns the target and the jobs that could not be
    swapped (to hold where they are)."""
    result = {job: tuple(devices) for job, devices in target.items()}
    stuck: set[str] = set()
    for job, anchor in anchors.items():
        mine = result.get(job, ())
        if not mine or anchor in mine:
            continue
        spare = [d for d in mine if d not in current.get(job, ())]
        holder = next((j for j, held in result.items() if anchor in held), None)
        if not spare:
            stuck.add(job)
            continue
        result[job] = tuple(sorted({*mine, anchor} - {spare[0]}))
        if holder is not None:
            result[holder] = tuple(sorted({*result[holder], spare[0]} - {anchor}))
    return result, stuck
