"""Per-worker communication cost for the planner, from what each worker measured."""

from __future__ import annotations

from collections.abc import Sequence

from idla.plan.topology import Topology


def cpu_bound_comm_s(comm_cpu_s: float, compute_cpu_s: float, compute_s: float) -> float:
    """Wall seconds a worker needs for its share of communication at the CPU rate it gets.

    A worker that receives a fraction f of a core (throttled, oversubscribed, an edge box)
    needs comm_cpu_s / f seconds of wall time for work that costs comm_cpu_s of CPU time, and
    while it is busy with that the collective waits. f is measured during its compute.
    """
    if compute_s <= 0 or compute_cpu_s <= 0:
        return max(comm_cpu_s, 0.0)
    cpu_fraction = min(max(compute_cpu_s / compute_s, 0.02), 64.0)
    return max(comm_cpu_s, 0.0) / cpu_fraction


def effective_comm_s(
    own_comm_s: Sequence[float], other_s: Sequence[float], topology: Topology
) -> list[float]:
    """The per-step time each worker pays besides its compute.

    A ring advances at the pace of its slowest member, so every core rank pays the largest
    core cost; a leaf pays its own send and receive. `other_s` (optimizer step, bookkeeping)
    is each worker's own.
    """
    ring_s = max(own_comm_s[r] for r in topology.core)
    return [
        (own_comm_s[r] if r in topology.hub_of else ring_s) + other_s[r]
        for r in range(topology.world_size)
    ]
