"""Reduction topology: who joins the ring, who sends to a hub."""

from __future__ import annotations

import pytest

from idla.plan.costs import cpu_bound_comm_s, effective_comm_s
from idla.plan.topology import Topology, choose_topology


def test_equal_workers_form_one_ring() -> None:
    topology = choose_topology([1.0, 1.05, 0.98, 1.02])

    assert topology == Topology.ring(4)


def test_slow_workers_become_leaves_spread_over_hubs() -> None:
    # per-sample compute time: two fast, one 2.3× and one 8× slower
    topology = choose_topology([1.0, 1.0, 2.3, 8.0], leaf_ratio=1.8)

    assert topology.core == (0, 1)
    assert topology.hub_of == {3: 0, 2: 1}
    assert topology.leaves_of(0) == (3,)


def test_hysteresis_keeps_a_leaf_near_the_threshold() -> None:
    previous = choose_topology([1.0, 1.0, 2.0], leaf_ratio=1.8)

    again = choose_topology([1.0, 1.0, 1.6], leaf_ratio=1.8, previous=previous)
    fresh = choose_topology([1.0, 1.0, 1.6], leaf_ratio=1.8)

    assert 2 in again.hub_of
    assert 2 not in fresh.hub_of


def test_topology_rejects_a_bad_partition() -> None:
    with pytest.raises(ValueError):
        Topology(3, (0, 1), {1: 0, 2: 0})
    with pytest.raises(ValueError):
        Topology(3, (0,), {1: 2, 2: 0})


def test_ring_members_pay_the_slowest_ring_cost_leaves_their_own() -> None:
    topology = Topology(3, (0, 1), {2: 0})

    costs = effective_comm_s([0.002, 0.004, 0.010], [0.001, 0.001, 0.003], topology)

    assert costs == pytest.approx([0.005, 0.005, 0.013])


def test_cpu_bound_comm_scales_with_the_cpu_fraction() -> None:
    # a worker that gets 1/8 of a core needs 8× the CPU time in wall time
    assert cpu_bound_comm_s(0.001, 0.010, 0.080) == pytest.approx(0.008)
    assert cpu_bound_comm_s(0.001, 0.0, 0.0) == pytest.approx(0.001)


def test_cpu_ranks_many_times_slower_than_a_gpu_rank_become_its_leaves() -> None:
    """A mixed fleet (one GPU rank, two CPU ranks ~20× slower per sample): the CPU ranks
    send to the GPU hub instead of stalling every phase of a ring."""
    topology = choose_topology([0.05e-3, 1.0e-3, 1.2e-3], leaf_ratio=1.8)
    assert topology.core == (0,)
    assert topology.hub_of == {1: 0, 2: 0}
