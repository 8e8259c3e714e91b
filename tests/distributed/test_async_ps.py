"""The asynchronous parameter server in real processes: SSP's bound under a throttled worker,
equivalence with a single-process replay, and workers that die or hang."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from idla.emulate.cgroup import CpuThrottle, cgroups_available
from idla.errors import ConfigError
from idla.runtime.launch import launch_local
from idla.sync.async_ps import AsyncConfig
from idla.sync.delay_comp import dc_asgd, ssp_staleness_bound
from tests.distributed import async_workers
from tests.distributed.shared_launch import launch_cases


def clock_gaps(arrivals: list[dict[str, Any]], workers: list[int]) -> list[int]:
    """max − min of the workers' clocks (pushes so far) after each arrival."""
    clocks = dict.fromkeys(workers, 0)
    gaps = []
    for arrival in arrivals:
        clocks[arrival["worker"]] += 1
        gaps.append(max(clocks.values()) - min(clocks.values()))
    return gaps


@pytest.mark.cgroup
@pytest.mark.skipif(not cgroups_available(), reason="needs a writable cgroup v1 cpu controller")
def test_ssp_bounds_staleness_under_a_worker_eight_times_slower() -> None:
    # Prepare: the server (rank 0) runs free; workers 1 and 2 get 0.8 CPU, worker 3 0.1 CPU (the
    # kernel's smallest quota at a 10 ms period), i.e. 8× slower; 1.7 CPUs in all.
    small, large = AsyncConfig(staleness_bound=2), AsyncConfig(staleness_bound=1000)
    steps = 120

    # Execute: both runs share one launch (the start-up of 4 processes dominates)
    with CpuThrottle([1.0, 1.0, 0.125], base_cores=0.8) as throttle:
        paths = {rank: str(throttle.paths[rank - 1]) for rank in (1, 2, 3)}
        bounded, free = launch_local(
            async_workers.staleness_runs, ([small, large], steps, paths), 4, timeout_s=120
        )[0]

    # Assert: S = 2 keeps staleness within (N − 1)(2S + 1) and the clocks within S + 1
    assert bounded["version"] == steps and not bounded["dead"]
    assert bounded["ssp_staleness_bound"] == ssp_staleness_bound(3, 2) == 10
    assert bounded["max_staleness"] <= 10
    assert max(clock_gaps(bounded["arrivals"], [1, 2, 3])) <= 2 + 1
    assert bounded["held_s"][1] > 0 and bounded["held_s"][2] > 0  # SSP did hold the fast ones
    # ... while S = 1000 lets the fast workers run ahead of the slow one
    assert free["version"] == steps
    assert free["pushes"][3] < 0.5 * min(free["pushes"][1], free["pushes"][2])
    assert bounded["test_accuracy"] > 0.2 and free["test_accuracy"] > 0.2  # chance: 0.1


REPLAY_CONFIG = AsyncConfig(staleness_bound=1, delay_compensation=2.0)
REPLAYS = {"step-budget": (40, 40), "workers-run-out-of-data": (100, 5)}  # steps, batches


@pytest.fixture(scope="module")
def replay_runs() -> dict[str, list[Any]]:
    """DC-ASGD on, momentum SGD on the server, three unthrottled workers: both runs in one
    launch, one after the other (the start-up of 4 processes dominates)."""
    return launch_cases({name: (async_workers.tiny_run, (REPLAY_CONFIG, steps, batches))
                         for name, (steps, batches) in REPLAYS.items()}, 4, timeout_s=90)


@pytest.mark.parametrize(("name", "applied"), [("step-budget", 40),
                                               ("workers-run-out-of-data", 15)],
                         ids=list(REPLAYS))
def test_server_parameters_equal_a_single_process_replay_in_arrival_order(
    replay_runs: dict[str, list[Any]], name: str, applied: int
) -> None:
    config, (steps, _) = REPLAY_CONFIG, REPLAYS[name]
    results = replay_runs[name]

    # Assert: the run ends at the step budget or when every worker is done; the wire delivered
    # each worker's gradients, in its order
    server = results[0]
    report = server["report"]
    arrivals = report["arrivals"]
    gradients = [torch.tensor(g) for g in report["gradients"]]
    assert report["version"] == len(arrivals) == len(gradients) == applied
    assert report["completed"] == (applied == steps) and not report["dead"]
    for rank in (1, 2, 3):
        received = [
            async_workers.grad_hash(g)
            for a, g in zip(arrivals, gradients, strict=True)
            if a["worker"] == rank
        ]
        assert received == results[rank]["hashes"]
        assert results[rank]["pushes"] == report["pushes"][rank]
    # ... and replaying them in arrival order, with w_stale = the parameters of the version the
    # worker read, gives the server's parameters
    weights = torch.nn.Parameter(torch.tensor(server["initial"]))
    optimizer = async_workers.replay_optimizer([weights])
    history = [weights.detach().clone()]  # parameters after each version
    for index, (arrival, grad) in enumerate(zip(arrivals, gradients, strict=True)):
        assert arrival["version"] == index
        stale = history[arrival["base_version"]]
        weights.grad = dc_asgd(grad, weights.detach(), stale, config.delay_compensation)
        optimizer.step()
        history.append(weights.detach().clone())
    assert float((weights.detach() - torch.tensor(server["final"])).abs().max()) <= 1e-6
    assert report["max_staleness"] <= ssp_staleness_bound(3, 1)


def test_dead_and_silent_workers_do_not_stall_the_others() -> None:
    # Prepare: rank 2 exits after 3 pushes, rank 3 hangs (connected but silent) after 5; S = 1
    # means the live workers are held while the hung one is still the slowest
    dead_after_s = 2.0
    config = AsyncConfig(staleness_bound=1, dead_after_s=dead_after_s)
    steps = 40
    faults = {2: ("exit", 3), 3: ("hang", 5)}

    # Execute
    results = launch_local(
        async_workers.faulty_job, (config, steps, faults, dead_after_s + 1.5), 4, timeout_s=80,
        allow_lost=True,
    )

    # Assert: the run completed on the survivors
    report = results[0]
    assert "lost" not in report and "lost" not in results[1], (report, results[1])
    assert report["completed"] and report["version"] == steps
    assert report["pushes"][2] == 3 and report["pushes"][3] == 5
    assert report["pushes"][1] == steps - 8
    assert sorted(report["dead"]) == [2, 3]
    exited, hung = report["dead"][2], report["dead"][3]
    margin_s = 1.5
    assert exited["reason"].startswith("connection failed")
    assert exited["declared_at_s"] - exited["last_heard_s"] <= dead_after_s + margin_s
    assert hung["reason"].startswith("silent")
    assert dead_after_s <= hung["declared_at_s"] - hung["last_heard_s"] <= dead_after_s + margin_s
    assert results[2] is None and results[3] is None  # both died without a result
    # ... and the survivor's pair kept working after both others failed
    last_declared_s = max(exited["declared_at_s"], hung["declared_at_s"])
    assert any(a["worker"] == 1 and a["at_s"] > last_declared_s for a in report["arrivals"])


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"staleness_bound": -1}, "staleness_bound"),
        ({"staleness_bound": 1, "delay_compensation": -0.1}, "delay_compensation"),
        ({"staleness_bound": 1, "delay_compensation": float("nan")}, "delay_compensation"),
        ({"staleness_bound": 1, "dead_after_s": 0.0}, "dead_after_s"),
        ({"staleness_bound": 1, "server_rank": -1}, "server_rank"),
    ],
)
def test_bad_config_is_a_config_error_naming_the_field(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        AsyncConfig(**fields)


def test_negative_lambda_is_refused_by_dc_asgd() -> None:
    zeros = torch.zeros(3)
    with pytest.raises(ConfigError, match="delay_compensation"):
        dc_asgd(zeros, zeros, zeros, -1.0)
