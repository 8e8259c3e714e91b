"""The pool agent: the controller loop that keeps every job on the devices the policy chose.

    observe (workers' exits and metrics, lost devices, arrivals, cancels) → plan (the policy,
    a pure function) → act (start, grow, shrink, stop) → record (SQLite)

A plan is made on every event (arrival, completion, cancel, a worker or device lost, a job
formed) and every ``replan_s``, by `idla.pool.policy.allocate` over `OnlineModels` fed every
tick from each job's metrics (`idla.pool.progress`: rates per device kind, measured resize
costs, samples done so that the policy sees the work left). Acting on it, per job: a queued
job given devices starts (one worker per device, ranks 0..n-1, a fresh file rendezvous under
its run dir, a job secret of its own); a running resizable one given more grows (a worker
per new device with ``IDLA_JOIN=1``: `run_elastic` takes it in at a step boundary and it
adopts the state); one given fewer shrinks (SIGTERM to the worker on each device taken away:
it leaves at the step boundary after the commit); one given none is preempted (queued).
A serving job grows and shrinks through its router's membership (`idla.pool.serving`: a new
device's worker is added once ready, a leaving one retired before it stops: no request fails).
A job that is not resizable (a script without `run_elastic`, inference) keeps its
devices while it runs, as does one that is not *formed* — every worker has stepped at the
current world size since its start or last change (`JobProgress.formed`; ``form_timeout_s``
at most, for a script that writes no metrics) — and one changed less than ``resize_hold_s`` ago.

Faults: an exception in a tick goes to the agent log (one line and its traceback) and is
counted (``tick_errors``); the loop goes on. A job whose workers fail ``max_failures`` times
with no step of the job between is stopped and marked failed, with the reasons. A device
drained (`drain`) leaves the pool: its worker departs at a step boundary and the job shrinks
in place; a device lost (``drain(..., lost=True)``, or gone from the backend) has its worker
killed and the others re-form without it. Cost per plan: the policy's, plus O(J + D).

Longer than 400 lines because observe, plan and act share one piece of state (the running
jobs' table, under one lock); what needs none of it lives beside it: `idla.pool.run` (a job's
workers), `idla.pool.progress` (its meters), `idla.pool.serving`, `idla.pool.inventory`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idla.pool.backend import Backend, WorkerHandle, WorkerLaunch
from idla.pool.inventory import Inventory
from idla.pool.model import Allocation, Device, JobView, PerfModels, check_allocation
from idla.pool.perf import OnlineModels
from idla.pool.policy import allocate
from idla.pool.progress import JobProgress, SpeedPrior, kind_speed
from idla.pool.run import JobRun, held_view, keep_anchors, log_tail, respect
from idla.pool.serving import ServeWatch
from idla.pool.spec import JobSpec
from idla.pool.store import JobRecord, Store
from idla.pool.workers import (
    link_secret_file,
    processes_per_device,
    resizable,
    serve_worker_command,
    token_file,
    worker_command,
    worker_env,
)

Policy = Callable[[Sequence[JobView], Sequence[Device], PerfModels, Allocation],
                  Mapping[str, Sequence[str]]]


@dataclass(kw_only=True, slots=True)
class PoolConfig:
    """How the agent paces itself and where jobs run."""

    run_root: Path
    """Each job's run dir is ``run_root/<job id>``: logs, rendezvous, metrics, checkpoints."""
    tick_s: float = 0.25
    """Seconds between two looks at the workers."""
    replan_s: float = 5.0
    """Seconds between two plans when nothing happened (measured speeds change)."""
    resize_hold_s: float = 2.0
    """A job is not resized again within this many seconds of a change, even once formed."""
    form_timeout_s: float = 60.0
    """A job not formed this many seconds after a change counts as formed (its script writes
    no metrics, or a worker hangs): it may be resized again."""
    max_failures: int = 3
    """Worker failures with no step of the job between them after which it is marked failed."""
    finish_grace_s: float = 15.0
    """Once a worker of a job finished (exit 0), the others get this long to finish too."""
    python: str = sys.executable
    """The interpreter that runs training scripts and `idla serve`/`idla infer`."""
    log_path: Path | None = None
    """The agent log (errors with their tracebacks); None: ``run_root/agent.log``."""


class PoolAgent:
    """Runs the pool: the store says what is asked, the backend does it, the policy decides."""

    def __init__(self, store: Store, backend: Backend, config: PoolConfig,
                 policy: Policy | None = None, models: OnlineModels | None = None) -> None:
        self.store, self.backend, self.config = store, backend, config
        self.policy: Policy = policy or allocate
        self.online = models or OnlineModels()
        self.models = SpeedPrior(self.online)
        self.log_path = config.log_path or config.run_root / "agent.log"
        self.tick_errors = 0
        """Ticks that raised (each logged with its traceback); the loop went on."""
        self.inventory = Inventory(backend)
        self._runs: dict[str, JobRun] = {}
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

    def devices(self) -> list[Device]:
        """The backend's devices that are neither drained nor lost."""
        return self.inventory.up()

    def device_states(self) -> dict[str, str]:
        """Every backend device: ``up``, ``drained`` or ``lost``."""
        return self.inventory.states()

    def drain(self, device_id: str, lost: bool = False) -> None:
        """Take ``device_id`` out of the pool (KeyError when unknown): its worker leaves at a
        step boundary, or, ``lost``, is killed as if the device had died."""
        self.store.add_event(None, self.inventory.set(device_id, lost), {"device": device_id})
        self._poke()

    def restore(self, device_id: str) -> None:
        """Give a drained or lost device back to the pool (KeyError when unknown)."""
        self.store.add_event(None, self.inventory.set(device_id, None), {"device": device_id})
        self._poke()

    def _poke(self) -> None:
        with self._lock:
            self._dirty = True
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """The loop, until ``stop`` is set; then every worker is stopped. A tick that raises is
        logged and counted, and the loop goes on."""
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except Exception as error:  # logged; one bad tick is no outage
                    self._log_error(error)
                self._wake.wait(self.config.tick_s)
                self._wake.clear()
        finally:
            self.close()

    def _log_error(self, error: BaseException) -> None:
        self.tick_errors += 1
        line = f"idla pool: tick {self.tick_errors} failed: {type(error).__name__}: {error}"
        print(line, file=sys.stderr, flush=True)
        self._log(line, traceback.format_exc())

    def _log(self, line: str, detail: str = "") -> None:
        """A line (and a traceback) to the agent log; a full disk must not stop the loop."""
        with contextlib.suppress(OSError):
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n{detail}")

    def close(self) -> None:
        with self._lock:
            self.backend.close()
            for run in self._runs.values():
                if run.watch is not None:
                    run.watch.close()
            self._runs.clear()

    def allocation(self) -> dict[str, tuple[str, ...]]:
        with self._lock:
            return {j: tuple(sorted(r.workers)) for j, r in self._runs.items() if r.workers}

    def run_info(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            run = self._runs.get(job_id)
            return None if run is None else run.info()

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
        alive = {d.device_id: d for d in self.devices()}
        for job_id, run in list(self._runs.items()):
            record = self.store.job(job_id)
            cancelled = record is not None and record.state == "cancelled"
            grace_over = (run.finished_s is not None
                          and now - run.finished_s > self.config.finish_grace_s)
            changed = False
            for device_id in list(run.workers):
                handle = run.workers.get(device_id)
                if handle is None:
                    continue  # stopped with another device of the same process
                if device_id not in alive:
                    lost = self.inventory.lost(device_id)
                    run.failures.append(f"device {device_id} {'lost' if lost else 'drained'}")
                    self._stop(run, device_id, graceful=not lost)
                    changed = True
                    continue
                unjoined = (run.finished_s is not None and bool(run.progress.reported)
                            and device_id not in run.progress.reported)  # nothing to join
                if cancelled or grace_over or run.gave_up or unjoined:
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
                    changed = True
                    self._failed(run, device_id, code)
            if run.watch is not None and run.anchor not in run.workers:
                for device_id in list(run.workers):  # its router is gone: so is the job
                    self._stop(run, device_id, graceful=False)
            elif run.workers and (run.watch is not None or processes_per_device(run.record.spec)):
                was_formed = run.progress.formed
                for kind, detail in run.follow(alive, self.online, self.models, changed, now):
                    self.store.add_event(job_id, kind, detail)
                self._dirty = self._dirty or run.progress.formed != was_formed
            self._record_metrics(run, now)
            run.leaving = [h for h in run.leaving if h.poll() is None]
            if not run.workers and not run.leaving:
                self._end(job_id, run, record)

    def _failed(self, run: JobRun, device_id: str, code: int) -> None:
        self.store.add_event(run.record.job_id, "worker_failed",
                             {"device": device_id, "code": code})
        if run.count_failure(device_id, code, self.config.max_failures):
            for other in list(run.workers):
                if other in run.workers:
                    self._stop(run, other, graceful=False)

    def _record_metrics(self, run: JobRun, now: float, force: bool = False) -> None:
        """The job's latest measurements to the store, at most once a second."""
        if force or now - run.metrics_written_s >= 1.0:
            run.metrics_written_s = now
            self.store.set_metrics(run.record.job_id, run.measurements())

    def _end(self, job_id: str, run: JobRun, record: JobRecord | None) -> None:
        del self._runs[job_id]
        if run.watch is not None:
            run.watch.close()
        self._record_metrics(run, time.monotonic(), force=True)
        if record is None or record.state != "running":
            return
        if run.finished_s is not None:
            self.store.set_state(job_id, "done")
        elif run.failed_last or run.gave_up:
            self.store.set_state(job_id, "failed", message="; ".join(run.failures[-3:])
                                 + log_tail(run.run_dir / "worker-0.log"))
        else:
            self.store.set_state(job_id, "queued")  # preempted: the agent stopped every worker

    def _held(self, run: JobRun, record: JobRecord, now: float) -> bool:
        since_s = now - run.changed_s
        return (not resizable(record.spec)
                or run.finished_s is not None or since_s < self.config.resize_hold_s
                or (not run.progress.formed and since_s < self.config.form_timeout_s))

    def _plan(self, now: float) -> None:
        draining = {j for j, r in self._runs.items() if not r.workers}
        records = {r.job_id: r for r in self.store.jobs(("queued", "running"))
                   if r.job_id not in draining}
        devices = self.devices()
        current = self.allocation()
        held = {j for j, r in self._runs.items() if j in records and self._held(r, records[j],
                                                                                now)}
        views = [self._view(r, current, held) for r in records.values()]
        holds_end = [r.changed_s + (self.config.resize_hold_s if r.progress.formed
                                    else self.config.form_timeout_s)
                     for j, r in self._runs.items() if j in held and r.finished_s is None]
        self._next_plan_s = min([self._next_plan_s, *[t for t in holds_end if t > now]])
        self.models.refresh(views, {d.kind for d in devices})
        target = {j: tuple(d) for j, d in self.policy(views, devices, self.models,
                                                       current).items()}
        chosen = target
        anchors = {j: r.anchor for j, r in self._runs.items() if r.anchor is not None}
        swapped, anchored = keep_anchors(target, current, anchors)  # a router stays put
        try:
            check_allocation(swapped, views, devices)
            target = swapped
        except ValueError:  # the swap broke a memory need: hold those jobs instead
            anchored = {j for j, a in anchors.items() if target.get(j) and a not in target[j]}
        target = respect(target, current, held | anchored, {v.job_id: v for v in views})
        check_allocation(target, views, devices)
        if target != current:
            self._log(f"plan: held {sorted(held | anchored)}; policy {chosen}; acting {target}")
        for job_id in sorted(set(target) | set(current), key=lambda j: j not in current):
            record = records.get(job_id)
            if record is not None:
                self._act(record, tuple(sorted(target.get(job_id, ()))), devices, now)

    def _view(self, record: JobRecord, current: Allocation, held: set[str]) -> JobView:
        run = self._runs.get(record.job_id)
        remaining = None
        if record.spec.samples is not None and run is not None:
            remaining = max(0.0, record.spec.samples - run.progress.samples_done)
        view = record.spec.view(record.job_id, record.submitted_s - self.started_s, remaining)
        if record.job_id in held:
            return held_view(view, len(current.get(record.job_id, ())))
        return dataclasses.replace(view, resizable=resizable(record.spec))

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
                if run.watch is not None:
                    self._add_serving(run, by_id[device_id])
                else:
                    self._launch(run, by_id[device_id], rank=0, world=1, joining=True)
        run.changed_s = now
        run.progress.changed(time.time())
        if target:
            run.resizes += 1
            self.store.add_event(record.job_id, "resized", {"devices": list(target)})
        else:
            self.store.add_event(record.job_id, "preempted", {})

    def _start(self, record: JobRecord, devices: Sequence[Device], now: float) -> None:
        run_dir = self.config.run_root / record.job_id
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        progress = JobProgress(record.job_id, run_dir / "metrics", time.time(),
                               [d.kind for d in self.backend.devices()])
        run = JobRun(record=record, attempt=record.starts + 1, run_dir=run_dir,
                   secret=secrets.token_hex(16), progress=progress, changed_s=now)
        self.store.set_state(record.job_id, "running")
        self._runs[record.job_id] = run
        if record.spec.p99_ms is not None:  # serving: the router on the first device
            log = run_dir / "worker-0.log"
            offset = log.stat().st_size if log.exists() else 0  # earlier attempts wrote before
            run.anchor = devices[0].device_id
            self._launch(run, devices[0], rank=0, world=1, joining=False)
            run.watch = ServeWatch(log, token_file(run_dir), record.spec.p99_ms, run.anchor,
                                   offset)
            for device in devices[1:]:
                self._add_serving(run, device)
            return
        if not processes_per_device(record.spec):
            handle = self._launch(run, devices[0], rank=0, world=len(devices), joining=False)
            run.workers.update({d.device_id: handle for d in devices})
            return
        if resizable(record.spec):  # the slower devices join once it is formed: a group
            fastest = max(kind_speed(d.kind) for d in devices)  # forms when its slowest
            devices = [d for d in devices if kind_speed(d.kind) >= fastest]  # has imported
        for rank, device in enumerate(devices):
            self._launch(run, device, rank=rank, world=len(devices), joining=False)

    def _add_serving(self, run: JobRun, device: Device) -> None:
        """A standalone serving worker on ``device``, added to the router once ready."""
        assert run.watch is not None
        spec = run.record.spec
        handle = self._launch(run, device, rank=0, world=1, joining=False,
                              argv=serve_worker_command(spec, self.config.python),
                              stdin_path=str(link_secret_file(run.run_dir)))
        assert handle.launch.log_path is not None
        run.watch.add(device.device_id, Path(handle.launch.log_path))

    def _launch(self, run: JobRun, device: Device, rank: int, world: int, joining: bool,
                argv: Sequence[str] | None = None, stdin_path: str | None = None
                ) -> WorkerHandle:
        spec, job_id = run.record.spec, run.record.job_id
        member = run.next_member
        run.next_member += 1
        rendezvous = f"file:{run.run_dir / f'rendezvous-{run.attempt}'}"
        launch = WorkerLaunch(
            job_id=job_id, member=member, device=device,
            argv=argv or worker_command(spec, self.config.python, world, run.run_dir),
            env=worker_env(spec, job_id, run.run_dir, rendezvous, run.secret, device, rank,
                           world, joining),
            cwd=str(run.run_dir), log_path=str(run.run_dir / f"worker-{member}.log"),
            stdin_path=stdin_path)
        handle = self.backend.start(launch)
        run.workers[device.device_id] = handle
        return handle

    def _stop(self, run: JobRun, device_id: str, graceful: bool) -> None:
        """Take the worker off ``device_id`` (one process holding several devices stops with
        the first of them)."""
        handle = run.workers.pop(device_id)
        for other in [d for d, h in run.workers.items() if h is handle]:
            del run.workers[other]
        if not any(h is handle for h in run.leaving):
            run.leaving.append(handle)
            if run.watch is not None and graceful and device_id != run.anchor:
                run.watch.retire(device_id, lambda: self.backend.stop(handle, graceful=True))
            else:
                if run.watch is not None:
                    run.watch.forget(device_id)
                self.backend.stop(handle, graceful=graceful)
        self._dirty = True
