"""The pool agent: the controller loop that keeps every job on the devices the policy chose.

    observe (workers' exits, lost devices, arrivals, cancels) → plan (the policy, a pure
    function) → act (start, grow, shrink, stop) → record (SQLite)

A plan is made on every event (arrival, completion, cancel, a worker or device lost) and every
``replan_s`` (a measured speed change). Acting on it, per job:
- a queued job given devices starts: one worker per device, ranks 0..n-1, meeting in a fresh
  file rendezvous under its run dir, signed with a job secret of its own;
- a running resizable job given more devices grows: a worker per new device with
  ``IDLA_JOIN=1`` (`run_elastic` takes it in at a step boundary and it adopts the state);
- one given fewer shrinks: the worker on each device taken away is stopped gracefully
  (SIGTERM; `run_elastic` leaves at the step boundary after the commit);
- one given none is preempted: all its workers stop and it waits in the queue.
A job that is not resizable (a script without `run_elastic`, serving, inference) keeps its
devices while it runs, as does a job whose membership changed less than ``resize_hold_s`` ago
(a re-form must finish before the next). Cost per plan: the policy's, plus O(J + D).
"""

from __future__ import annotations

import importlib
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from idla.pool.backend import Backend, WorkerHandle, WorkerLaunch
from idla.pool.model import Allocation, Device, JobView, PerfModels, check_allocation
from idla.pool.spec import JobSpec
from idla.pool.store import JobRecord, Store
from idla.pool.workers import processes_per_device, worker_command

Policy = Callable[[Sequence[JobView], Sequence[Device], PerfModels, Allocation],
                  Mapping[str, Sequence[str]]]


def default_policy() -> Policy:
    """`idla.pool.policy.allocate` when it is installed, else the stand-in priority fill."""
    try:
        module = importlib.import_module("idla.pool.policy")
    except ImportError:
        from idla.pool.fill import priority_fill

        return priority_fill
    return cast(Policy, module.allocate)


@dataclass(kw_only=True, slots=True)
class PoolConfig:
    """How the agent paces itself and where jobs run."""

    run_root: Path
    """Each job's run dir is ``run_root/<job id>``: logs, rendezvous, metrics, checkpoints."""
    tick_s: float = 0.25
    """Seconds between two looks at the workers."""
    replan_s: float = 5.0
    """Seconds between two plans when nothing happened (measured speeds change)."""
    resize_hold_s: float = 6.0
    """A job is not resized again within this many seconds of a start or resize."""
    start_hold_s: float = 20.0
    """A new job is not resized within this many seconds of its start: its workers must import
    and form their first group (a worker stopped before that fails the others' start)."""
    finish_grace_s: float = 15.0
    """Once a worker of a job finished (exit 0), the others get this long to finish too."""
    python: str = sys.executable
    """The interpreter that runs training scripts and `idla serve`/`idla infer`."""


@dataclass
class _Run:
    """A job the agent has started: its workers by device, and what it is going through."""

    record: JobRecord
    attempt: int
    run_dir: Path
    secret: str
    workers: dict[str, WorkerHandle] = field(default_factory=dict)
    leaving: list[WorkerHandle] = field(default_factory=list)
    """Workers the agent stopped that have not exited yet (their exit is no failure)."""
    failed_last: bool = False
    """The last worker left by failing (not stopped, not finished)."""
    next_member: int = 0
    changed_s: float = 0.0
    started_s: float = 0.0
    finished_s: float | None = None
    failures: list[str] = field(default_factory=list)
    resizes: int = 0


class PoolAgent:
    """Runs the pool: the store says what is asked, the backend does it, the policy decides."""

    def __init__(self, store: Store, backend: Backend, config: PoolConfig,
                 policy: Policy | None = None, models: PerfModels | None = None) -> None:
        self.store, self.backend, self.config = store, backend, config
        self.policy = policy or default_policy()
        if models is None:
            from idla.pool.fill import CountModels

            speeds = getattr(backend, "speeds", None)
            models = CountModels(speeds() if callable(speeds) else None)
        self.models = models
        self._runs: dict[str, _Run] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._dirty = True
        self._next_plan_s = 0.0
        self.started_s = time.time()
        for job_id in store.requeue_running():
            store.add_event(job_id, "resume", {"how": "requeued; restarts from its run dir"})

    def submit(self, spec: JobSpec) -> str:
        job_id = self.store.submit(spec)
        self._poke()
        return job_id

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job (KeyError when unknown); its workers are killed."""
        record = self.store.job(job_id)
        if record is None:
            raise KeyError(job_id)
        self.store.set_state(job_id, "cancelled")
        self._poke()
        updated = self.store.job(job_id)
        assert updated is not None
        return updated

    def _poke(self) -> None:
        with self._lock:
            self._dirty = True
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """The loop, until ``stop`` is set; then every worker is stopped."""
        try:
            while not stop.is_set():
                self.tick()
                self._wake.wait(self.config.tick_s)
                self._wake.clear()
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            self.backend.close()
            self._runs.clear()

    def allocation(self) -> dict[str, tuple[str, ...]]:
        with self._lock:
            return {j: tuple(sorted(r.workers)) for j, r in self._runs.items() if r.workers}

    def run_info(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            run = self._runs.get(job_id)
            if run is None:
                return None
            return {"devices": sorted(run.workers), "attempt": run.attempt,
                    "run_dir": str(run.run_dir), "resizes": run.resizes,
                    "failures": list(run.failures)}

    def tick(self) -> None:
        """One look: reap exits, drop cancelled jobs, plan when needed, act, record."""
        with self._lock:
            now = time.monotonic()
            reap = getattr(self.backend, "reap", None)
            if callable(reap):
                reap()
            self._observe(now)
            if self._dirty or now >= self._next_plan_s:
                self._dirty = False
                self._next_plan_s = now + self.config.replan_s
                self._plan(now)
            self.store.record_allocation(self.allocation())

    def _observe(self, now: float) -> None:
        alive = {d.device_id for d in self.backend.devices()}
        for job_id, run in list(self._runs.items()):
            record = self.store.job(job_id)
            cancelled = record is not None and record.state == "cancelled"
            grace_over = (run.finished_s is not None
                          and now - run.finished_s > self.config.finish_grace_s)
            for device_id, handle in list(run.workers.items()):
                if device_id not in alive:
                    run.failures.append(f"device {device_id} lost")
                if cancelled or grace_over or device_id not in alive:
                    self._stop(run, device_id, graceful=False)
                    continue
                code = handle.poll()
                if code is None:
                    continue
                del run.workers[device_id]
                self._dirty = True
                if code == 0:
                    run.finished_s = run.finished_s or now
                else:
                    run.failures.append(f"worker on {device_id} exited with code {code}")
                    run.failed_last = not run.workers
                    self.store.add_event(job_id, "worker_failed",
                                         {"device": device_id, "code": code})
            run.leaving = [h for h in run.leaving if h.poll() is None]
            if not run.workers and not run.leaving:
                self._end(job_id, run, record)

    def _end(self, job_id: str, run: _Run, record: JobRecord | None) -> None:
        del self._runs[job_id]
        if record is None or record.state != "running":
            return
        if run.finished_s is not None:
            self.store.set_state(job_id, "done")
        elif run.failed_last:
            log_tail = _tail(run.run_dir / "worker-0.log")
            self.store.set_state(job_id, "failed",
                                 message="; ".join(run.failures[-3:]) + log_tail)
        else:
            self.store.set_state(job_id, "queued")  # preempted: the agent stopped every worker

    def _plan(self, now: float) -> None:
        draining = {j for j, r in self._runs.items() if not r.workers}
        records = {r.job_id: r for r in self.store.jobs(("queued", "running"))
                   if r.job_id not in draining}
        devices = list(self.backend.devices())
        current = self.allocation()
        held = {j for j, r in self._runs.items()
                if j in records and (not records[j].spec.view(j, 0.0).resizable
                                     or now - r.changed_s < self.config.resize_hold_s
                                     or now - r.started_s < self.config.start_hold_s
                                     or r.finished_s is not None)}
        views = [self._view(r, current, held) for r in records.values()]
        holds_end = [max(r.changed_s + self.config.resize_hold_s,
                         r.started_s + self.config.start_hold_s)
                     for j, r in self._runs.items() if j in held and r.finished_s is None]
        self._next_plan_s = min([self._next_plan_s, *[t for t in holds_end if t > now]])
        target = {j: tuple(d) for j, d in self.policy(views, devices, self.models,
                                                       current).items()}
        target = _respect(target, current, held, {v.job_id: v for v in views})
        check_allocation(target, views, devices)
        for job_id in sorted(set(target) | set(current), key=lambda j: j not in current):
            record = records.get(job_id)
            if record is not None:
                self._act(record, tuple(sorted(target.get(job_id, ()))), devices, now)

    def _view(self, record: JobRecord, current: Allocation, held: set[str]) -> JobView:
        view = record.spec.view(record.job_id, record.submitted_s - self.started_s)
        if record.job_id in held:
            count = len(current.get(record.job_id, ()))
            return JobView(**{**_fields(view), "min_workers": count, "max_workers": count,
                              "resizable": False})
        return view

    def _act(self, record: JobRecord, target: tuple[str, ...], devices: Sequence[Device],
             now: float) -> None:
        by_id = {d.device_id: d for d in devices}
        run = self._runs.get(record.job_id)
        if run is None:
            if target:
                self._start(record, [by_id[d] for d in target], now)
            return
        if not run.workers:
            return  # it is draining (preempted or cancelled); it may start again once ended
        have = set(run.workers)
        gone, new = have - set(target), set(target) - have
        if not gone and not new:
            return
        for device_id in sorted(gone):
            self._stop(run, device_id, graceful=True)
        if target and new:
            for device_id in sorted(new):
                self._launch(run, by_id[device_id], rank=0, world=1, joining=True)
        run.changed_s = now
        if target:
            run.resizes += 1
            self.store.add_event(record.job_id, "resized", {"devices": list(target)})
        else:
            self.store.add_event(record.job_id, "preempted", {})

    def _start(self, record: JobRecord, devices: Sequence[Device], now: float) -> None:
        run_dir = self.config.run_root / record.job_id
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        run = _Run(record=record, attempt=record.starts + 1, run_dir=run_dir,
                   secret=secrets.token_hex(16), changed_s=now, started_s=now)
        self.store.set_state(record.job_id, "running")
        self._runs[record.job_id] = run
        if not processes_per_device(record.spec):
            handle = self._launch(run, devices[0], rank=0, world=len(devices), joining=False)
            run.workers.update({d.device_id: handle for d in devices})
            return
        for rank, device in enumerate(devices):
            self._launch(run, device, rank=rank, world=len(devices), joining=False)

    def _launch(self, run: _Run, device: Device, rank: int, world: int, joining: bool
                ) -> WorkerHandle:
        spec = run.record.spec
        member = run.next_member
        run.next_member += 1
        env = {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "IDLA_RENDEZVOUS": f"file:{run.run_dir / f'rendezvous-{run.attempt}'}",
            "IDLA_JOB_SECRET": run.secret, "IDLA_POOL_JOB": run.record.job_id,
            "IDLA_POOL_RUN_DIR": str(run.run_dir),
            "IDLA_POOL_METRICS_DIR": str(run.run_dir / "metrics"),
            "IDLA_POOL_DEVICE": device.device_id, "MASTER_ADDR": "127.0.0.1",
            "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **spec.env,
        }
        if device.kind == "cpu":
            env["IDLA_DEVICE"] = "cpu"
        if joining:
            env["IDLA_JOIN"] = "1"
        launch = WorkerLaunch(job_id=run.record.job_id, member=member, device=device,
                              argv=worker_command(spec, self.config.python, world, run.run_dir),
                              env=env, cwd=str(run.run_dir),
                              log_path=str(run.run_dir / f"worker-{member}.log"))
        handle = self.backend.start(launch)
        run.workers[device.device_id] = handle
        return handle

    def _stop(self, run: _Run, device_id: str, graceful: bool) -> None:
        """Take the worker off ``device_id`` (one process holding several devices stops with
        the first of them)."""
        handle = run.workers.pop(device_id)
        for other in [d for d, h in run.workers.items() if h is handle]:
            del run.workers[other]
        if not any(h is handle for h in run.leaving):
            run.leaving.append(handle)
            self.backend.stop(handle, graceful=graceful)
        self._dirty = True


def _fields(view: JobView) -> dict[str, Any]:
    return {name: getattr(view, name) for name in JobView.__slots__}


def _respect(target: Mapping[str, Sequence[str]],
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


def _tail(path: Path, max_chars: int = 300) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    last = text.splitlines()[-1] if text else ""
    return f" (worker-0.log: {last[-max_chars:]})" if last else ""
