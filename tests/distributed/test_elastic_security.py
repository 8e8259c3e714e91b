"""Elastic training against forged joiners and a poisoned survivor, with real processes over gloo.

The honest workers share a job secret; forgers reach the same store (a file store here, as
`idla train --elastic` uses) without it, with a wrong one, or with it but a forged state.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from idla.agent import AgentConfig
from idla.jobs.train import TrainConfig
from idla.runtime.launch import launch_local
from tests.distributed.elastic_workers import (
    FORGED_STEP,
    forged_joiner,
    honest_worker,
    poisoned_survivor_worker,
)

CONFIG = TrainConfig(workers=3, emulate_speeds=None, epochs=3,
                     agent=AgentConfig(global_batch_size=128), out=None)
SECRET = "a-test-secret-of-enough-length"


def _all_batches(report: dict[str, Any]) -> list[list[int]]:
    return [[e, b] for e in range(CONFIG.epochs) for b in range(report["steps_per_epoch"])]


def test_forged_joiners_change_nothing_and_a_newcomer_never_supplies_state(
        tmp_path: Path) -> None:
    spec = f"file:{tmp_path / 'rendezvous'}"
    stop = tmp_path / "stop"
    base = {"IDLA_RENDEZVOUS": spec, "IDLA_JOIN": "1"}
    forgers = {  # name: (fill of every weight, environment)
        "unsigned": (float("nan"), base),
        "wrong secret": (1e30, {**base, "IDLA_JOB_SECRET": "x" * 32, "FORGE_RAW_JOIN": "1"}),
        "rogue with the secret": (1e30, {**base, "IDLA_JOB_SECRET": SECRET}),
    }
    outcomes: dict[str, Any] = {}

    def forge(name: str, fill: float, env: dict[str, str]) -> None:
        outcomes[name] = launch_local(forged_joiner, (CONFIG, fill, str(stop)), 1,
                                      allow_lost=True, timeout_s=300, env=env)[0]

    threads = [threading.Thread(target=forge, args=(name, *spec_env))
               for name, spec_env in forgers.items()]
    for thread in threads:
        thread.start()
    try:
        honest = launch_local(honest_worker, (CONFIG, len(forgers)), CONFIG.workers,
                              allow_lost=True,
                              timeout_s=300, env={"IDLA_RENDEZVOUS": spec,
                                                  "IDLA_JOB_SECRET": SECRET})
    finally:
        stop.touch()
        for thread in threads:
            thread.join()

    rogue = outcomes["rogue with the secret"]["report"]
    for report in honest:
        assert report["step"] == len(_all_batches(report))  # training ran to its end
        assert report["committed"] == _all_batches(report)
        assert report["world_size"] == 4  # the three honest workers and the rogue only
        (event,) = report["events"]
        assert event["joined_members"] == [rogue["member"]] and event["steps_lost"] == 0
        assert any("newcomer" in line and str(FORGED_STEP) in line
                   for line in event["refused_claims"])
        assert report["test_accuracy"] > 0.8  # neither NaN nor 1e30 reached the weights
    # Rank 0 (looking for joiners) or the re-form's leader read both forged join requests.
    assert sum(r["refused_store_entries"] for r in honest) >= 2
    assert rogue["committed"] == _all_batches(rogue) and rogue["finite"]
    assert len({r["param_digest"] for r in [*honest, rogue]}) == 1
    assert not outcomes["unsigned"].get("report")  # never admitted
    assert not outcomes["wrong secret"].get("report")


def test_a_survivor_with_a_non_finite_state_is_not_adopted() -> None:
    # Member 0's weights turn NaN after step 6; member 2 is killed before step 6, so the
    # survivors re-form while member 0 (new rank 0, equal steps) holds the NaN state.
    results = launch_local(poisoned_survivor_worker, (CONFIG, 0, 6), CONFIG.workers,
                           allow_lost=True, timeout_s=300,
                           env={"IDLA_FAULTS": "kill:2@6", "IDLA_JOB_SECRET": SECRET})

    assert results[2] is None
    survivors = [results[0], results[1]]
    for report in survivors:
        (event,) = report["events"]
        assert event["lost_members"] == [2]
        assert any("member 0" in line and "not finite" in line
                   for line in event["refused_claims"])
        assert report["finite"] and report["test_accuracy"] > 0.8
        assert report["committed"] == _all_batches(report)
    assert survivors[0]["param_digest"] == survivors[1]["param_digest"]
