"""What the job learns from each step's statistics matrix: per-worker times and costs.

Every rank holds the same matrix after the sync, so every rank's observer holds the same state.
"""

from __future__ import annotations

from collections.abc import Sequence

from idla.plan.costs import cpu_bound_comm_s, effective_comm_s
from idla.plan.topology import Topology
from idla.profile.meters import EmaMeter, StepTimes, WorkerMeter
from idla.runtime.stats import Stat


class JobObserver:
    """Per-worker meters (compute, communication, waiting, samples/s) and the communication
    cost each worker adds to a step, as the planner should see it."""

    def __init__(self, world_size: int) -> None:
        self.meters = [WorkerMeter() for _ in range(world_size)]
        self.own_comm = [EmaMeter(0.7) for _ in range(world_size)]  # cpu-bound comm, s
        self.cpu_fraction = [EmaMeter(0.7) for _ in range(world_size)]  # of a core, computing
        self.late_s = [0.0] * world_size  # integrated lateness of each leaf, seen by its hub
        self._prev_wait_s = [0.0] * world_size

    def absorb(
        self, stats: list[list[float]], shares: Sequence[int], prev_topology: Topology,
        first_step: bool,
    ) -> list[float | None]:
        """Update the meters from one step's matrix; return each worker's communication cost
        for the planner (None on the first step, whose previous-step columns are empty).

        `prev_topology` is the topology of the previous step, whose sync the
        previous-step columns describe."""
        compute = [r[Stat.COMPUTE_S] for r in stats]
        own = [
            cpu_bound_comm_s(r[Stat.PREV_COMM_CPU_S], r[Stat.COMPUTE_CPU_S], r[Stat.COMPUTE_S])
            for r in stats
        ]
        costs = effective_comm_s(own, [r[Stat.PREV_OTHER_S] for r in stats], prev_topology)
        for rank, r in enumerate(stats):
            # A leaf whose gradient reaches its hub late costs more than its own measurements
            # show (throttling stalls, its link): integrate the lateness into its cost, and let
            # it leak away slowly once the leaf is on time.
            self.late_s[rank] = 0.9 * self.late_s[rank] + r[Stat.LATE_S]
            costs[rank] += self.late_s[rank]
            if not first_step:
                self.own_comm[rank].update(own[rank])
            if r[Stat.COMPUTE_S] > 0 and shares[rank] > 0:
                self.cpu_fraction[rank].update(r[Stat.COMPUTE_CPU_S] / r[Stat.COMPUTE_S])
            wait = self._prev_wait_s[rank]
            self.meters[rank].update(StepTimes(
                compute_s=compute[rank],
                comm_s=max(r[Stat.PREV_SYNC_S] - wait, 0.0),
                wait_s=wait,
                samples=shares[rank],
            ))
        slowest = max(compute)
        self._prev_wait_s = [slowest - c for c in compute]
        return [None if first_step else cost for cost in costs]
