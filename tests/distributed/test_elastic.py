"""Elastic training with real processes over gloo: a worker is killed (SIGKILL) or sends NaN."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from idla.agent import Agent, AgentConfig
from idla.agent.elastic import ElasticState, run_elastic
from idla.jobs.elastic import elastic_worker
from idla.jobs.train import TrainConfig
from idla.runtime.launch import launch_local
from tests.distributed.elastic_workers import honest_worker

CONFIG = TrainConfig(workers=3, emulate_speeds=None, epochs=3,
                     agent=AgentConfig(global_batch_size=128), out=None)


def _launch(faults: str) -> list[Any]:
    return launch_local(elastic_worker, (CONFIG,), CONFIG.workers, env={"IDLA_FAULTS": faults},
                        allow_lost=True, timeout_s=240)


def _all_batches(report: dict[str, Any]) -> list[list[int]]:
    return [[e, b] for e in range(CONFIG.epochs) for b in range(report["steps_per_epoch"])]


def test_survivors_of_a_kill_finish_with_at_most_one_step_lost() -> None:
    results = _launch("kill:1@6")

    assert results[1] is None  # SIGKILLed: no result
    survivors = [results[0], results[2]]
    for report in survivors:
        assert report["world_size"] == 2
        assert report["step"] == len(_all_batches(report))  # every planned step was done
        assert report["steps_lost"] <= 1
        assert report["committed"] == _all_batches(report)  # each global batch exactly once
        (event,) = report["events"]
        assert event["lost_members"] == [1]
        assert 0 <= event["declared_at"] - event["fault_at"] < 10.0  # named within seconds
    assert survivors[0]["param_digest"] == survivors[1]["param_digest"]
    assert survivors[0]["test_accuracy"] > 0.8


def test_a_newcomer_with_the_job_secret_joins_a_running_job_and_adopts_its_state(
        tmp_path: Path) -> None:
    secret = {"IDLA_JOB_SECRET": "the-job-secret-0123456789"}  # signs every store entry
    spec = f"file:{tmp_path / 'rendezvous'}"
    joined: list[Any] = []

    def newcomer() -> None:  # it asks to join once the founders' store exists
        joined.extend(launch_local(elastic_worker, (CONFIG,), 1, allow_lost=True, timeout_s=240,
                                   env={"IDLA_RENDEZVOUS": spec, "IDLA_JOIN": "1", **secret}))

    thread = threading.Thread(target=newcomer)
    thread.start()
    # The founders run steps 0-2, then wait for the newcomer's request (however late its
    # process starts), so the join check at step 5 answers it in a running job.
    results = launch_local(honest_worker, (CONFIG, 1), CONFIG.workers, allow_lost=True,
                           timeout_s=240, env={"IDLA_RENDEZVOUS": spec, "IDLA_FAULTS": "kill:2@5",
                                               **secret})
    thread.join()

    survivors = [results[0], results[1], joined[0]]
    assert joined[0]["member"] == 3  # the next free member id
    for report in survivors:
        assert report["world_size"] == 3
        assert report["committed"] == _all_batches(report)
        assert report["refused_store_entries"] == 0
    # The join may be answered before or after the kill at step 5.
    (join_event,) = [e for e in results[0]["events"] if e["joined_members"]]
    assert join_event["joined_members"] == [3] and join_event["steps_lost"] == 0
    assert join_event["refused_claims"] == []
    assert len({r["param_digest"] for r in survivors}) == 1


def test_nan_inputs_never_reach_the_model() -> None:
    results = _launch("nan:2@3+2")

    digests = {r["param_digest"] for r in results}
    assert len(digests) == 1  # replicas identical, nobody lost
    assert results[0]["agent"]["nonfinite_steps"][2] == 2
    assert results[0]["step"] == len(_all_batches(results[0]))
    assert results[0]["test_accuracy"] > 0.8  # a NaN in the weights would give chance level


def test_one_process_runs_the_same_code_path() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(64, 4), torch.randint(0, 2, (64,))]

    def train(agent: Agent, state: ElasticState) -> None:
        for x, y in state.batches(epochs=2):
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            state.commit()

    report = run_elastic(train, model, optimizer, data, AgentConfig(global_batch_size=16))

    assert report.state.step == 8 and report.events == []
    assert report.state.committed == [(e, b) for e in range(2) for b in range(4)]
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())
