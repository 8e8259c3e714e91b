"""`idla bench pool`'s live part: idla's policy, FIFO and a static equal partition on one
emulated pool of this machine, with the same jobs arriving at the same times.

Per policy a fresh agent runs as its own process (`idla pool start --policy P`, its own home
folder, one cgroup per device whose CPU quota is ``base_cores × speed``; without a writable
cgroup v1 cpu controller the devices run unthrottled, and the bench says so). The bench drives
it through its HTTP API only: at t = 0 a serving job (a small MLP model dir, `idla serve` under
the pool) and the first training job, later ones at their arrival times; once the serving job
answers, an open-loop Poisson load well under its capacity runs against it from a load
generator process (`idla.bench.loadgen`, in back-to-back segments of ``segment_s``) until every
training job has ended; then the serving job is cancelled and the agent stopped. Each job's
completion time comes from the agent's store, its resizes from the store's events, the steps
each re-form lost from the job's own reports (`idla.bench.pool_live_job`). ``alone_s``: each
training job run by itself on the same pool under idla's policy (beside the serving job).
The figures are `idla.bench.pool_live_report`'s. Cost: per policy, the last job's end plus
about 15 s (the agent's and the serving job's start, the last load segment); the alone runs
add the jobs' alone times.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from idla.bench.pool_live_config import (
    JOB_SCRIPT,
    START_TIMEOUT_S,
    LiveJob,
    PoolLiveConfig,
)
from idla.bench.pool_live_report import job_summary, live_targets, makespan_s, serving_summary
from idla.bench.pool_live_serving import LoadSegments, save_serve_model, serve_spec
from idla.emulate.cgroup import cgroups_available
from idla.errors import IdlaError


class _Agent:
    """`idla pool start` as a process, and its API."""

    def __init__(self, home: Path, config: PoolLiveConfig, policy: str, emulate: bool) -> None:
        self.home = home
        command = [sys.executable, "-m", "idla.cli", "pool", "start", "--home", str(home),
                   "--port", "0", "--policy", policy, "--base-cores", f"{config.base_cores:g}"]
        command += (["--emulate-speeds", ",".join(f"{s:g}" for s in config.speeds)] if emulate
                    else ["--devices", str(len(config.speeds))])
        self.log = open(home / "agent.log", "wb")  # noqa: SIM115  # the process holds it
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        deadline_s = time.monotonic() + START_TIMEOUT_S
        while not (home / "agent.json").exists():
            if self.process.poll() is not None or time.monotonic() > deadline_s:
                self.close()
                tail = (home / "agent.log").read_text(errors="replace").strip()[-400:]
                raise IdlaError(f"idla pool start did not come up: {tail}")
            time.sleep(0.1)
        time.sleep(0.2)  # written atomically; the API thread may still be starting
        state = json.loads((home / "agent.json").read_text())
        self.url, self.token = state["url"], state["token"]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            reason = error.read().decode(errors="replace")[:300]
            raise IdlaError(f"the pool agent answered {method} {path} with {error.code}: "
                            f"{reason}") from None
        except (urllib.error.URLError, OSError) as error:
            raise IdlaError(f"the pool agent does not answer {method} {path} ({error}); see "
                            f"{self.home / 'agent.log'}") from None

    def close(self) -> int:
        """Stop the agent; returns how many of its workers outlived it (then killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return _kill_leftovers(self.home / "runs")


def _kill_leftovers(runs: Path) -> int:
    """SIGKILL every process still working in a job's run dir under ``runs`` (the agent stops
    its workers as it exits; this is the bench's safety net, counted in the results)."""
    import psutil

    killed = 0
    for process in psutil.process_iter(["cwd"]):
        cwd = process.info.get("cwd") or ""
        if cwd.startswith(f"{runs}{os.sep}"):
            with contextlib.suppress(psutil.Error):
                process.kill()
                killed += 1
    return killed


def _train_spec(job: LiveJob, config: PoolLiveConfig) -> dict[str, Any]:
    # No train.samples: the spec caps it at 4096 (MAX_WORKERS), below these jobs' work, so the
    # policy sees every job's work as unknown.
    return {"name": job.name, "kind": "train", "priority": job.priority, "min_workers": 1,
            "max_workers": job.max_workers,
            "train": {"script": str(JOB_SCRIPT), "resizable": True,
                      "args": ["--model", config.model, "--epochs", str(job.epochs),
                               "--global-batch",
                               str(config.global_batch), "--seed", str(config.seed)]}}


def _store_history(db: Path) -> tuple[list[dict[str, Any]], list[tuple[float, str, list[str]]]]:
    """The agent's events and allocation history (time, job, devices from then on), read from
    its SQLite database without writing to it."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        events = connection.execute("SELECT time_s, job, kind FROM events ORDER BY seq")
        event_rows = events.fetchall()
        held = connection.execute("SELECT time_s, job, devices FROM allocations ORDER BY seq")
        allocation_rows = held.fetchall()
    finally:
        connection.close()
    return ([{"time_s": t, "job": job, "kind": kind} for t, job, kind in event_rows],
            [(t, job, json.loads(devices)) for t, job, devices in allocation_rows])


def _reports(run_dir: Path) -> list[dict[str, Any]]:
    reports = []
    for path in sorted(run_dir.glob("report-*.json")):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            reports.append(json.loads(path.read_text()))
    return reports


def _wait_done(agent: _Agent, ids: Sequence[str], deadline_s: float) -> None:
    while time.monotonic() < deadline_s:
        rows = {r["id"]: r for r in agent.call("GET", "/jobs")["jobs"]}
        if all(rows[i]["state"] in ("done", "failed", "cancelled") for i in ids):
            return
        time.sleep(0.5)


def run_policy(config: PoolLiveConfig, policy: str, jobs: Sequence[LiveJob], home: Path,
               model_dir: Path, emulate: bool, one_by_one: bool = False) -> dict[str, Any]:
    """One agent under ``policy``: the serving job and ``jobs`` at their arrival times (with
    ``one_by_one``, each once the one before it ended: the alone runs), the load until every
    job ended; the figures of `idla.bench.pool_live_report`."""
    agent = _Agent(home, config, policy, emulate)
    load: LoadSegments | None = None
    ids: list[str] = []
    leftovers = 0
    try:
        t0_s = time.time()
        start_s = time.monotonic()
        deadline_s = start_s + config.job_timeout_s
        serve_id = agent.call("POST", "/jobs", serve_spec(model_dir, config))["id"]
        load = LoadSegments(home / "runs" / serve_id, config)
        load.start()
        for job in sorted(jobs, key=lambda j: j.arrival_s):
            if one_by_one:
                _wait_done(agent, ids, deadline_s)
            else:
                time.sleep(max(0.0, start_s + job.arrival_s - time.monotonic()))
            ids.append(agent.call("POST", "/jobs", _train_spec(job, config))["id"])
        _wait_done(agent, ids, deadline_s)
        load.stop.set()
        load.join(timeout=config.segment_s + 150)
        with contextlib.suppress(IdlaError):
            agent.call("DELETE", f"/jobs/{serve_id}")
        rows = {r["id"]: r for r in agent.call("GET", "/jobs")["jobs"]}
    finally:
        if load is not None:
            load.stop.set()
        leftovers = agent.close()
    events, history = _store_history(home / "pool.db")
    names = {i: rows[i]["name"] for i in rows}
    summaries = [job_summary(rows[i], [e for e in events if e["job"] == i],
                             _reports(home / "runs" / i), t0_s) for i in ids]
    serving = serving_summary(load.segments, config.serve_p99_ms, config.window_s)
    serving.update(ready_s=load.ready_s, load_errors=load.errors)
    return {"jobs": summaries, "makespan_s": makespan_s(summaries), "serving": serving,
            "workers_left_running": leftovers,
            "allocations": [[round(t - t0_s, 2), names.get(job, job), devices]
                            for t, job, devices in history]}


def run_pool_live(config: PoolLiveConfig, work_dir: Path | None = None) -> dict[str, Any]:
    """Every policy of ``config`` on a fresh agent, then the alone runs; the ``live`` dict."""
    from idla.bench.machine import machine_info
    from idla.bench.pool_live_report import print_live

    emulate = cgroups_available()
    if not emulate:
        print("idla bench pool: the cgroup v1 cpu controller is not writable here; the "
              f"{len(config.speeds)} devices run unthrottled (speeds not emulated)", flush=True)
    live: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="idla-bench-pool-", dir=work_dir) as tmp:
        root = Path(tmp)
        save_serve_model(root / "model", config)
        settings = {**asdict(config), "emulated_speeds": emulate, "python": sys.executable}
        jobs = config.jobs or []
        _print_settings(settings)
        for policy in config.policies:
            print(f"live: {policy} ...", flush=True)
            (root / policy).mkdir()
            live[policy] = run_policy(config, policy, jobs, root / policy,
                                      root / "model", emulate)
        if config.alone:
            print("live: each job alone (idla) ...", flush=True)
            (root / "alone").mkdir()
            alone = run_policy(config, "idla", jobs, root / "alone", root / "model",
                               emulate, one_by_one=True)
            live["alone"] = alone
            times = {j["name"]: j["jct_s"] for j in alone["jobs"]}
            for policy in config.policies:
                for job in live[policy]["jobs"]:
                    job["alone_s"] = times.get(job["name"])
    live["targets"] = live_targets(live)
    live["settings"] = settings
    live["machine"] = machine_info()
    print_live(live)
    return live


def _print_settings(settings: dict[str, Any]) -> None:
    speeds = ", ".join(f"{s:g}" for s in settings["speeds"])
    quota = settings["base_cores"] * sum(settings["speeds"])
    how = "cgroup quotas" if settings["emulated_speeds"] else "NOT throttled"
    print(f"idla bench pool (live): devices at speeds {speeds} x {settings['base_cores']:g} "
          f"cores = {quota:.3g} cores ({how}), {os.cpu_count()} CPUs; policies "
          f"{', '.join(settings['policies'])}")
    for job in settings["jobs"]:
        print(f"  {job['name']}: p={job['priority']:g}, arrives at {job['arrival_s']:g} s, "
              f"{job['epochs']} epochs of {settings['model']} at a global batch of "
              f"{settings['global_batch']}, 1..{job['max_workers']} workers")
    print(f"  serving: MLP {settings['serve_features']}-{settings['serve_hidden']}x2-10, "
          f"Poisson {settings['serve_requests_per_s']:g} req/s, p99 target "
          f"{settings['serve_p99_ms']:g} ms per {settings['window_s']:g} s window", flush=True)
