"""`JobPlanner`: every share decision of a job, from synthetic statistics matrices."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from idla.errors import ConfigError, PlanError
from idla.plan.job_planner import (
    TOPOLOGY_PATIENCE_STEPS,
    JobPlanner,
    initial_shares,
    lockstep_batch,
    memory_caps,
)
from idla.plan.topology import Topology
from idla.runtime.stats import WIDTH, Stat, StepFlag

PER_SAMPLE_S = [1e-4, 1e-4, 1e-4, 9e-4]  # rank 3 is nine times slower


def matrix(
    rng: random.Random, step: int, shares: Sequence[int], hub_of: dict[int, int],
    per_sample_s: Sequence[float] = PER_SAMPLE_S, nonfinite: Sequence[int] = (),
) -> list[list[float]]:
    """One step's statistics as the sync would deliver them: compute 2 ms + β·b with ±20 %
    noise, CPU fractions 0.3 to 0.9, a few ms of communication, hub lateness for leaves."""
    rows = []
    for rank, b in enumerate(shares):
        r = [0.0] * WIDTH
        r[Stat.COMPUTE_S] = (2e-3 + per_sample_s[rank] * b) * (1 + rng.uniform(-0.2, 0.2))
        r[Stat.COMPUTE_CPU_S] = r[Stat.COMPUTE_S] * (0.3 + 0.2 * rank)
        if step:
            r[Stat.PREV_SYNC_S] = rng.uniform(1e-3, 5e-3)
            r[Stat.PREV_COMM_CPU_S] = rng.uniform(1e-4, 2e-3)
            r[Stat.PREV_OTHER_S] = rng.uniform(1e-4, 1e-3)
        r[Stat.SAMPLES] = 0.0 if rank in nonfinite else float(b)
        r[Stat.LOSS_SUM] = 0.0 if rank in nonfinite else 2.0 * b
        r[Stat.FLAGS] = float(StepFlag.NONFINITE) if rank in nonfinite else 0.0
        r[Stat.LATE_S] = rng.uniform(0.0, 3e-3) if rank in hub_of else 0.0
        rows.append(r)
    return rows


def run(planner: JobPlanner, steps: int, seed: int = 0, last_batch_every: int = 0,
        last_batch: int = 0) -> list[tuple[list[int], str]]:
    """Closed loop: (shares the step ran with, topology after it) per step."""
    rng = random.Random(seed)
    trace = []
    for step in range(steps):
        short = last_batch_every and step % last_batch_every == last_batch_every - 1
        shares = planner.shares_for(last_batch if short else planner.global_batch_size)
        plan = planner.absorb(step, matrix(rng, step, shares, planner.topology.hub_of), shares)
        trace.append((shares, plan.topology.describe()))
    return trace


# Taken from the Agent's share logic before it moved into JobPlanner (same matrices).
EXPECTED_SHARES = [
    [64, 64, 64, 64], [64, 64, 64, 64], [78, 79, 89, 10], [78, 79, 89, 10], [78, 79, 89, 10],
    [78, 79, 89, 10], [78, 79, 89, 10], [82, 88, 78, 8], [82, 88, 78, 8], [0, 0, 35, 2],
    [82, 88, 78, 8], [82, 88, 78, 8], [82, 88, 78, 8], [82, 88, 78, 8], [82, 88, 78, 8],
    [82, 88, 78, 8], [82, 88, 78, 8], [81, 88, 83, 4], [81, 88, 83, 4], [18, 0, 19, 0],
    [81, 88, 83, 4], [81, 88, 83, 4], [81, 88, 83, 4], [81, 88, 83, 4], [81, 88, 83, 4],
]
EXPECTED_LEAF_FROM = 6  # the step after which rank 3 sends to a hub
EXPECTED_REPLANS = [1, 16, 24]  # the forced plan at the topology switch is not one


def test_matches_the_agents_former_decisions_step_by_step() -> None:
    planner = JobPlanner(256, 4)

    trace = run(planner, len(EXPECTED_SHARES), last_batch_every=10, last_batch=37)

    assert [shares for shares, _ in trace] == EXPECTED_SHARES
    leaf_from = next(step for step, (_, topology) in enumerate(trace) if "leaves" in topology)
    assert leaf_from == EXPECTED_LEAF_FROM
    assert trace[-1][1] == "ring [0, 1, 2]; leaves 3→0"
    assert planner.replan_steps == EXPECTED_REPLANS


def test_same_matrices_give_the_same_plan_on_every_rank() -> None:
    ranks = [JobPlanner(256, 4) for _ in range(3)]

    traces = [run(planner, 40, seed=7) for planner in ranks]

    assert traces[0] == traces[1] == traces[2]


def test_initial_shares_are_equal_within_caps_or_as_configured() -> None:
    assert initial_shares(512, 3) == [171, 171, 170]
    assert initial_shares(300, 3, caps=[60, 300, 300]) == [60, 120, 120]
    assert initial_shares(128, 2, configured=[80, 48]) == [80, 48]


@pytest.mark.parametrize(("args", "message"), [
    ((2, 3), "the global batch 2 is smaller than the number of workers 3"),
    ((128, 2, None, [128]), "initial_shares lists 1 shares for 2 ranks"),
    ((128, 2, None, [100, 20]), "must be non-negative and sum to the global batch 128"),
])
def test_initial_shares_name_what_is_wrong(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        initial_shares(*args)


def test_memory_caps_fill_in_unlimited_ranks_and_must_hold_the_batch() -> None:
    assert memory_caps([None, None], 64) is None
    assert memory_caps([None, 10], 64) == [64, 10]
    with pytest.raises(PlanError, match="memory caps hold at most 20 samples"):
        memory_caps([10, 10], 64)


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 7])
def test_lockstep_batch_is_the_floor_of_an_equal_split(workers: int) -> None:
    for global_batch in [1, 2, 6, 64, 100, 511, 512]:
        assert lockstep_batch(global_batch, workers) == max(1, global_batch // workers)


def test_a_short_batch_is_split_in_proportion_until_measured() -> None:
    planner = JobPlanner(100, 2, initial=[75, 25])

    assert planner.shares_for(100) == [75, 25]
    assert planner.shares_for(40) == [30, 10]


def test_a_repeat_offender_is_dropped_and_the_batch_replanned_around_it() -> None:
    planner = JobPlanner(96, 3, initial=[50, 30, 16], rebalance=False)
    rng = random.Random(0)

    for step in range(3):
        shares = planner.shares_for(96)
        planner.absorb(step, matrix(rng, step, shares, {}, [1e-4] * 3, nonfinite=[1]), shares)

    assert planner.dropped == {1}
    assert planner.nonfinite_steps == [0, 3, 0]
    assert planner.shares == [73, 0, 23]
    assert planner.caps == [96, 0, 96]


def test_dropping_a_rank_whose_memory_is_needed_fails_clearly() -> None:
    planner = JobPlanner(96, 2, caps=[60, 60], rebalance=False)
    rng = random.Random(0)

    with pytest.raises(PlanError, match="rank 0 was dropped"):
        for step in range(3):
            shares = planner.shares_for(96)
            planner.absorb(step, matrix(rng, step, shares, {}, [1e-4] * 2, nonfinite=[0]),
                           shares)


def test_a_ring_only_exchange_never_switches_topology() -> None:
    planner = JobPlanner(256, 4, hub_leaf=False)

    trace = run(planner, 30)

    assert {topology for _, topology in trace} == {"ring of 4"}


def test_a_new_topology_needs_its_votes_and_comes_with_a_forced_plan() -> None:
    planner = JobPlanner(256, 4)

    trace = run(planner, EXPECTED_LEAF_FROM + 1)

    # votes start at step 2, once every fit has two observations
    assert EXPECTED_LEAF_FROM == 2 + TOPOLOGY_PATIENCE_STEPS - 1
    assert trace[EXPECTED_LEAF_FROM - 1][1] == "ring of 4"
    assert planner.topology != Topology.ring(4)
    assert planner.shares == [82, 88, 78, 8]  # planned at once, outside the hysteresis
    assert EXPECTED_LEAF_FROM not in planner.replan_steps


def test_every_decision_respects_the_minimum_share() -> None:
    # Prepare: rank 3 is planned 2 to 10 samples without a minimum; short batches of 37
    planner = JobPlanner(256, 4, min_share=5)

    # Execute
    trace = run(planner, 25, last_batch_every=10, last_batch=37)

    # Assert
    assert all(b == 0 or b >= 5 for shares, _ in trace for b in shares)
    assert any(5 <= shares[3] < 64 for shares, _ in trace)  # the slow rank was still planned
    assert planner.shares_for(5) in ([5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0])


def test_short_batches_and_nan_drops_respect_the_minimum_before_any_measurement() -> None:
    planner = JobPlanner(12, 2, min_share=2, rebalance=False)
    dropping = JobPlanner(7, 3, initial=[3, 2, 2], min_share=2, rebalance=False)
    rng = random.Random(0)

    for step in range(3):
        shares = dropping.shares_for(7)
        dropping.absorb(step, matrix(rng, step, shares, {}, [1e-4] * 3, nonfinite=[0]), shares)

    assert planner.shares_for(3) == [3, 0]  # proportional [2, 1] would give rank 1 one sample
    assert planner.shares_for(1) == [1, 0]  # a batch below the minimum goes whole to one rank
    assert initial_shares(6, 4, min_share=2) == [2, 2, 2, 0]
    assert dropping.shares == [0, 4, 3]


def test_configured_shares_below_the_minimum_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"initial_shares \[11, 1\] gives rank 1 1 sample\(s\), "
                                          "fewer than min_local_batch 2"):
        initial_shares(12, 2, configured=[11, 1], min_share=2)
    assert initial_shares(12, 2, configured=[12, 0], min_share=2) == [12, 0]


def test_lockstep_batch_is_at_least_the_minimum() -> None:
    assert lockstep_batch(12, 8, min_share=2) == 2
    assert lockstep_batch(3, 8, min_share=2) == 2
    assert lockstep_batch(64, 4, min_share=2) == 16
