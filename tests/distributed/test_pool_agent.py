"""The pool agent end to end with real processes over gloo: a higher-priority arrival takes
devices from a running job (which shrinks and later grows back in place), a killed worker is
replaced, a restarted agent resumes from its database, a cancel stops the workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from idla.pool.agent import PoolAgent, PoolConfig
from idla.pool.local import LocalBackend, LocalConfig, LocalWorker
from idla.pool.spec import JobSpec, parse_spec
from idla.pool.store import Store

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "pool" / "train_pool.py"
START_HOLD_S = 12.0  # the workers import torch and form their group
STEPS_PER_EPOCH = 12  # digits' training split at a global batch of 128


def _spec(name: str, priority: int, max_workers: int, epochs: int) -> JobSpec:
    return parse_spec(f'name = "{name}"\nkind = "train"\npriority = {priority}\n'
                      f'max_workers = {max_workers}\n[train]\nscript = "{SCRIPT}"\n'
                      f'args = ["--epochs", "{epochs}"]\n', f"{name}.toml")


@contextmanager
def _agent(home: Path, devices: int) -> Iterator[PoolAgent]:
    agent = PoolAgent(Store(home / "pool.db"), LocalBackend(LocalConfig(devices=devices)),
                      PoolConfig(run_root=home / "runs", resize_hold_s=4.0,
                                 start_hold_s=START_HOLD_S))
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,))
    loop.start()
    try:
        yield agent
    finally:
        stop.set()
        loop.join(timeout=30)
        agent.store.close()


def _wait(what: Callable[[], bool], timeout_s: float, why: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


def _state(agent: PoolAgent, job_id: str) -> str:
    record = agent.store.job(job_id)
    assert record is not None
    return record.state


def _reports(home: Path, job_id: str) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted((home / "runs" / job_id).glob("report-*"))]


def test_a_priority_arrival_shrinks_a_running_job_which_grows_back_after(tmp_path: Path) -> None:
    with _agent(tmp_path, devices=3) as agent:
        low = agent.submit(_spec("sweep", priority=1, max_workers=3, epochs=60))
        _wait(lambda: len(agent.allocation().get(low, ())) == 3, 20, "low did not start on 3")
        high = agent.submit(_spec("finetune", priority=4, max_workers=2, epochs=8))
        _wait(lambda: len(agent.allocation().get(high, ())) == 2, START_HOLD_S + 5,
              "high did not start")
        assert len(agent.allocation()[low]) == 1  # shrunk in place, not stopped
        _wait(lambda: _state(agent, high) == "done", 60, "high did not finish")
        _wait(lambda: len(agent.allocation().get(low, ())) == 3, 10, "low did not grow back")
        _wait(lambda: _state(agent, low) == "done", 90, "low did not finish")
        history = [(job, len(devices)) for _, job, devices in agent.store.allocations()]

    assert history[0] == (low, 3) and set(history[1:3]) == {(high, 2), (low, 1)}
    assert (low, 3) in history[3:]
    finishers = _reports(tmp_path, low)
    everything = [[e, b] for e in range(60) for b in range(STEPS_PER_EPOCH)]
    assert any(r["joined"] for r in finishers)  # a newcomer adopted the running state
    for report in finishers:
        assert report["world_size"] == 3
        assert report["committed"] == everything  # no batch skipped or repeated
    assert max(int(str(r["steps_lost"])) for r in finishers) <= 2  # ≤ 1 per shrink


def test_a_killed_worker_is_replaced_and_a_restarted_agent_resumes_then_cancels(
        tmp_path: Path) -> None:
    with _agent(tmp_path, devices=2) as agent:
        job = agent.submit(_spec("long", priority=1, max_workers=2, epochs=400))
        _wait(lambda: len(agent.allocation().get(job, ())) == 2, 20, "did not start")
        time.sleep(START_HOLD_S)
        victim = agent._runs[job].workers["cpu1"]
        assert isinstance(victim, LocalWorker)
        os.killpg(victim.pid, signal.SIGKILL)  # the device's worker dies under the job
        _wait(lambda: agent._runs[job].workers.get("cpu1") not in (None, victim), 15,
              "the lost worker was not replaced")
        assert [e["kind"] for e in agent.store.events(job)].count("worker_failed") == 1
        assert _state(agent, job) == "running"
    # The agent stopped (its workers with it); a new one reads the database.
    with _agent(tmp_path, devices=2) as agent:
        _wait(lambda: len(agent.allocation().get(job, ())) == 2, 20, "did not resume")
        record = agent.store.job(job)
        assert record is not None and record.state == "running" and record.starts == 2
        workers = list(agent._runs[job].workers.values())

        agent.cancel(job)
        _wait(lambda: job not in agent._runs, 15, "cancel did not stop the job")
        assert _state(agent, job) == "cancelled"
        assert all(w.poll() is not None for w in workers)
        assert "requeued" in [e["kind"] for e in agent.store.events(job)]
