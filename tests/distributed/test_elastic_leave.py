"""Graceful leave with real processes over gloo: a worker stopped with SIGTERM leaves at a step
boundary after its commit, exits 0, and the others go on with no step lost and every sample
trained on exactly once per epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import idla
from idla.agent import Agent, AgentConfig
from idla.agent.elastic import ElasticState, run_elastic
from idla.agent.pool_metrics import METRICS_DIR_ENV, read_job_metrics
from idla.elastic.membership import store_prefix
from idla.elastic.rendezvous import open_store
from tests.distributed.leave_worker import (
    GLOBAL_BATCH,
    SAMPLES,
    check_every_sample_once_per_epoch,
)

WORKER = Path(__file__).with_name("leave_worker.py")
EPOCHS = 3
STEPS = EPOCHS * -(-SAMPLES // GLOBAL_BATCH)


def _start(tmp_path: Path, name: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    src = str(Path(idla.__file__).parents[1])
    full_env = {**os.environ, "PYTHONPATH": src, "GLOO_SOCKET_IFNAME": "lo",
                "IDLA_DEVICE": "cpu", "IDLA_RENDEZVOUS": f"file:{tmp_path / 'rendezvous'}",
                "IDLA_JOB_SECRET": "the-job-secret-0123456789", "LEAVE_EPOCHS": str(EPOCHS),
                **env}
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"{name}.json")],
                            env=full_env, stdout=log, stderr=subprocess.STDOUT)


def _finish(tmp_path: Path, procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, Any]:
    codes = {name: proc.wait(timeout=120) for name, proc in procs.items()}
    logs = {name: (tmp_path / f"{name}.log").read_text()[-2000:] for name in procs}
    assert codes == dict.fromkeys(procs, 0), logs  # the leaver too exits 0
    return {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in procs}


def test_a_worker_stopped_with_sigterm_leaves_and_the_others_lose_no_step(
        tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    procs = {f"w{rank}": _start(tmp_path, f"w{rank}", {
        "RANK": str(rank), "WORLD_SIZE": "3", "IDLA_FAULTS": "term:1@6",
        METRICS_DIR_ENV: str(metrics)}) for rank in range(3)}

    reports = _finish(tmp_path, procs)

    leaver, survivors = reports["w1"], [reports["w0"], reports["w2"]]
    assert leaver["left"] and not any(r["left"] for r in survivors)
    assert 6 < leaver["step"] < STEPS  # it finished the step it was in, then went
    for report in survivors:
        assert report["step"] == STEPS and report["world_size"] == 2
        (event,) = report["events"]
        assert event["left_members"] == [1] and event["lost_members"] == []
        assert event["steps_lost"] == 0 and report["steps_lost"] == 0
        assert event["members"] == [0, 2]
    assert survivors[0]["param_digest"] == survivors[1]["param_digest"]
    check_every_sample_once_per_epoch(list(reports.values()), EPOCHS)
    # What the pool reads: each worker's last word, with the job's counts
    rows = {row["member"]: row for row in read_job_metrics(metrics)}
    assert sorted(rows) == [0, 1, 2]
    assert rows[1]["status"] == "left" and rows[1]["job_step"] == leaver["step"]
    assert rows[1]["world_size"] == 3
    for member in (0, 2):
        assert rows[member]["status"] == "done" and rows[member]["job_step"] == STEPS
        assert rows[member]["samples_done"] == EPOCHS * SAMPLES
        assert rows[member]["world_size"] == 2 and rows[member]["device_kind"] == "cpu"
        assert rows[member]["local_batch"] + rows[2 - member]["local_batch"] == GLOBAL_BATCH


def _await_join_request(tmp_path: Path) -> None:
    store = open_store(f"file:{tmp_path / 'rendezvous'}", 60.0)
    deadline = time.monotonic() + 60.0
    while int(store.add(f"{store_prefix()}/join/count", 0)) == 0:
        assert time.monotonic() < deadline, "no join request"
        time.sleep(0.02)


@pytest.mark.parametrize("founders, stopped", [(1, "while it waits to join"),
                                               (2, "at step 12")])
def test_a_newcomer_joins_then_leaves_in_one_run(tmp_path: Path, founders: int,
                                                 stopped: str) -> None:
    procs = {f"w{rank}": _start(tmp_path, f"w{rank}", {
        "RANK": str(rank), "WORLD_SIZE": str(founders), "LEAVE_AWAIT_JOIN": "3"})
        for rank in range(founders)}
    newcomer = f"w{founders}"  # it gets the next free member id
    term = {} if stopped.startswith("while") else {"IDLA_FAULTS": f"term:{founders}@12"}
    procs[newcomer] = _start(tmp_path, newcomer, {"IDLA_JOIN": "1", **term})
    if not term:
        _await_join_request(tmp_path)
        procs[newcomer].send_signal(signal.SIGTERM)

    reports = _finish(tmp_path, procs)

    joined = reports[newcomer]
    assert joined["member"] == founders and joined["left"]
    assert joined["world_size"] == founders + 1
    stayers = [reports[f"w{rank}"] for rank in range(founders)]
    for report in stayers:
        assert report["step"] == STEPS and report["world_size"] == founders
        assert not report["left"] and report["steps_lost"] == 0
        grow, shrink = report["events"]
        assert grow["joined_members"] == [founders]
        assert grow["members"] == list(range(founders + 1))
        assert shrink["left_members"] == [founders]
        assert shrink["members"] == list(range(founders))
    assert len({r["param_digest"] for r in stayers}) == 1
    check_every_sample_once_per_epoch(list(reports.values()), EPOCHS)


def test_one_process_asked_to_leave_stops_after_its_commit_and_restores_sigterm() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(64, 4), torch.randint(0, 2, (64,))]
    before = signal.getsignal(signal.SIGTERM)

    def train(agent: Agent, state: ElasticState) -> None:
        for x, y in state.batches(epochs=2):
            agent.backward(F.cross_entropy(model(x), y))
            if state.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step
                assert state.leaving
            optimizer.step()
            state.commit()

    report = run_elastic(train, model, optimizer, data, AgentConfig(global_batch_size=16))

    assert report.left and report.state.step == 3  # the step it was in was finished
    assert report.state.committed == [(0, 0), (0, 1), (0, 2)]
    assert signal.getsignal(signal.SIGTERM) is before
