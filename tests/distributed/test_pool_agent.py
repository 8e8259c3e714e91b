"""The pool agent end to end with real processes over gloo: a higher-priority arrival takes
devices from a running job (which shrinks in place and grows back once it is done), a lost
device shrinks the job on it by one, a restarted agent resumes from its database, a cancel
stops the workers; a job whose worker keeps failing is marked failed, and a tick that raises
is logged while the loop goes on. A failing test prints the agent's log and every worker's."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from idla.pool.agent import Policy, PoolAgent, PoolConfig
from idla.pool.local import LocalBackend, LocalConfig
from idla.pool.model import Allocation, Device, JobView, PerfModels
from idla.pool.policy import allocate
from idla.pool.spec import JobSpec, parse_spec
from idla.pool.store import Store

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "pool" / "train_pool.py"
STEPS_PER_EPOCH = 12  # digits' training split at a global batch of 128


STEP_S = 0.05  # steps paced by sleeping: the CPUs stay free for newcomers' imports


def _spec(name: str, priority: int, max_workers: int, epochs: int, script: Path = SCRIPT
          ) -> JobSpec:
    return parse_spec(f'name = "{name}"\nkind = "train"\npriority = {priority}\n'
                      f'max_workers = {max_workers}\n[train]\nscript = "{script}"\n'
                      f'args = ["--epochs", "{epochs}", "--step-s", "{STEP_S}"]\n',
                      f"{name}.toml")


def _dump_logs(home: Path) -> None:
    """Everything the agent and the workers wrote, for a failing test's output."""
    for path in sorted(home.rglob("*.log")):
        text = path.read_text(encoding="utf-8", errors="replace")
        print(f"----- {path.relative_to(home)} (last 3000 chars) -----\n{text[-3000:]}")


@contextmanager
def _agent(home: Path, devices: int, policy: Policy | None = None,
           **config: Any) -> Iterator[PoolAgent]:
    agent = PoolAgent(Store(home / "pool.db"), LocalBackend(LocalConfig(devices=devices)),
                      PoolConfig(run_root=home / "runs", **config), policy=policy)
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,))
    loop.start()
    try:
        yield agent
    except BaseException:
        print("events:", json.dumps(agent.store.events(), indent=None)[-4000:])
        _dump_logs(home)
        raise
    finally:
        stop.set()
        loop.join(timeout=30)
        agent.store.close()


def _wait(what: Callable[[], bool], timeout_s: float, why: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


def _state(agent: PoolAgent, job_id: str) -> str:
    record = agent.store.job(job_id)
    assert record is not None
    return record.state


def _formed_on(agent: PoolAgent, job_id: str, count: int) -> bool:
    info = agent.run_info(job_id)
    return info is not None and len(info["devices"]) == count and bool(info["formed"])


def _reports(home: Path, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((home / "runs" / job_id).glob("report-*"))]


def test_a_lost_device_and_a_priority_arrival_shrink_a_job_that_grows_back_after(
        tmp_path: Path) -> None:
    with _agent(tmp_path, devices=3) as agent:
        low = agent.submit(_spec("sweep", priority=1, max_workers=3, epochs=400))
        _wait(lambda: _formed_on(agent, low, 3), 40, "low did not form on 3 devices")
        lost = agent.allocation()[low][-1]
        agent.drain(lost, lost=True)  # the device dies under the job: its worker is killed
        _wait(lambda: _formed_on(agent, low, 2), 20, "low did not re-form on 2 devices")
        assert lost not in agent.allocation()[low]
        high = agent.submit(_spec("finetune", priority=4, max_workers=1, epochs=2))
        _wait(lambda: len(agent.allocation().get(high, ())) == 1, 5, "high did not start")
        assert len(agent.allocation()[low]) == 1  # shrunk in place, not stopped
        _wait(lambda: _state(agent, high) == "done", 40, "high did not finish")
        _wait(lambda: _formed_on(agent, low, 2), 30, "low did not grow back and form")
        for device_id in agent.allocation()[low]:  # every worker leaves at a step boundary
            agent.drain(device_id)
        _wait(lambda: low not in agent._runs, 20, "low's workers did not leave")
        assert _state(agent, low) == "queued"  # preempted, not failed
        agent.cancel(low)
        history = [(job, len(devices)) for _, job, devices in agent.store.allocations()]
        events = agent.store.events(low)

    assert history[:4] == [(low, 3), (low, 2), (low, 1), (high, 1)] or history[:4] == [
        (low, 3), (low, 2), (high, 1), (low, 1)]
    assert (low, 2) in history[4:]
    assert sum(e["kind"] == "resize_cost" for e in events) >= 2  # measured after each re-form
    reports = _reports(tmp_path, low)
    assert len(reports) == 3 and all(r["left"] for r in reports)  # the killed one wrote none
    assert any(r["joined"] and r["steps"] > 0 for r in reports)  # a newcomer adopted the state
    longest = max(len(r["committed"]) for r in reports)
    everything = [[e, b] for e in range(400) for b in range(STEPS_PER_EPOCH)][:longest]
    for report in reports:  # each worker committed a prefix of the batches: none skipped
        assert report["committed"] == everything[:len(report["committed"])]
        assert int(report["steps_lost"]) <= 1  # only the kill may cost a step


def test_a_restarted_agent_resumes_from_its_database_then_cancels(tmp_path: Path) -> None:
    with _agent(tmp_path, devices=2) as agent:
        job = agent.submit(_spec("long", priority=1, max_workers=2, epochs=400))
        _wait(lambda: _formed_on(agent, job, 2), 30, "did not form")
    # The agent stopped (its workers with it); a new one reads the database.
    with _agent(tmp_path, devices=2) as agent:
        _wait(lambda: len(agent.allocation().get(job, ())) == 2, 10, "did not resume")
        record = agent.store.job(job)
        assert record is not None and record.state == "running" and record.starts == 2
        workers = list(agent._runs[job].workers.values())

        agent.cancel(job)
        _wait(lambda: job not in agent._runs, 15, "cancel did not stop the job")
        assert _state(agent, job) == "cancelled"
        assert all(w.poll() is not None for w in workers)
        assert "requeued" in [e["kind"] for e in agent.store.events(job)]


class _RaisesOnce:
    """The real policy, except that its first call raises (a bug in a tick)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, jobs: Sequence[JobView], devices: Sequence[Device], models: PerfModels,
                 current: Allocation) -> Mapping[str, Sequence[str]]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in the policy")
        return allocate(jobs, devices, models, current)


def test_a_worker_that_keeps_failing_fails_its_job_and_a_bad_tick_is_logged(
        tmp_path: Path) -> None:
    script = tmp_path / "flaky.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['IDLA_POOL_DEVICE'] == 'cpu1':\n"
                      "    sys.exit(3)\n"
                      "time.sleep(60)\n")
    policy = _RaisesOnce()
    with _agent(tmp_path, devices=2, policy=policy, form_timeout_s=0.3, resize_hold_s=0.1,
                max_failures=3) as agent:
        job = agent.submit(_spec("flaky", priority=1, max_workers=2, epochs=1, script=script))
        _wait(lambda: _state(agent, job) == "failed", 20, "the job was not marked failed")
        _wait(lambda: job not in agent._runs, 10, "its last worker was not stopped")
        record = agent.store.job(job)
        errors = agent.tick_errors
        failures = [e for e in agent.store.events(job) if e["kind"] == "worker_failed"]

    assert record is not None and "worker on cpu1 exited with code 3" in record.message
    assert len(failures) == 3 and policy.calls > 1
    assert errors == 1
    log = (tmp_path / "runs" / "agent.log").read_text()
    assert "RuntimeError: a bug in the policy" in log and "Traceback" in log
