"""Every share decision of one data-parallel job, in one place: `JobPlanner`.

"Where is worker 3's batch size decided?" Here, at four moments, and at each every share is 0
or at least the job's ``min_share`` (BatchNorm in training needs 2 samples per replica):

- at the start: equal shares within the memory caps, or the configured ``initial_shares``
  (`initial_shares`);
- for a batch of another size, an epoch's short last batch (`JobPlanner.shares_for`);
- after every step, from the statistics matrix (`JobPlanner.absorb`): a rank non-finite
  ``nan_drop_after`` steps in a row is dropped and the batch re-planned around it; a new
  reduction topology that persists for ``TOPOLOGY_PATIENCE_STEPS`` votes is applied with a
  forced plan; otherwise the `SharePlanner`'s hysteresis decides whether a new plan pays; a
  rank planned no samples for a while is probed with the minimum share for one step
  (`PlannerConfig.probe_after_steps`).

Every rank holds the same statistics matrix after the sync, so every rank's planner makes the
same decisions without communicating: nothing here reads a clock or a random number.
`SharePlanner` stays the learning part (per-worker step-time fits, their noise, the
hysteresis) and is tested on its own; this class adds what a job needs around it: the shares in
force, the caps, the topology, the dropped ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from idla.errors import ConfigError, PlanError
from idla.plan.observer import JobObserver
from idla.plan.planner import MAX_PROBE_WAIT_STEPS, PlannerConfig, SharePlanner
from idla.plan.shares import allocate_shares, respects_min_share
from idla.plan.topology import Topology, choose_topology
from idla.profile.perf_model import StepModel
from idla.runtime.stats import Stat, StepFlag, flags_of

TOPOLOGY_PATIENCE_STEPS = 5
"""Consecutive steps that must ask for the same new topology before it is applied."""

_EQUAL = StepModel(compute_fixed_s=0.0, compute_per_sample_s=1.0)


def memory_caps(limits: Sequence[int | None], global_batch_size: int) -> list[int] | None:
    """Every rank's cap on its local batch (None: no rank has one; a rank without a limit may
    take the whole batch).

    Raises:
        PlanError: If the caps together cannot hold the global batch.
    """
    if all(limit is None for limit in limits):
        return None
    caps = [global_batch_size if limit is None else limit for limit in limits]
    if sum(caps) < global_batch_size:
        raise PlanError(
            f"memory caps hold at most {sum(caps)} samples but the global batch is "
            f"{global_batch_size}"
        )
    return caps


def initial_shares(
    global_batch_size: int, world_size: int, caps: Sequence[int] | None = None,
    configured: Sequence[int] | None = None, min_share: int = 1,
) -> list[int]:
    """Local batch per rank before anything is measured: `configured` when given, else equal
    shares within `caps` (the first ``global_batch_size % world_size`` ranks take one more sample);
    where equal shares would fall below `min_share`, fewer ranks get samples (the lower ranks).

    Raises:
        ConfigError: If the batch is smaller than the number of workers, or `configured` does
            not list one non-negative share per rank summing to the batch, each 0 or at least
            `min_share`.
        PlanError: If the caps cannot hold the batch.
    """
    if global_batch_size < world_size:
        raise ConfigError(
            f"the global batch {global_batch_size} is smaller than the number of workers "
            f"{world_size}"
        )
    shares = allocate_shares(global_batch_size, [_EQUAL] * world_size, caps, min_share)
    if configured is None:
        return shares
    if len(configured) != world_size:
        raise ConfigError(
            f"initial_shares lists {len(configured)} shares for {world_size} ranks"
        )
    if any(s < 0 for s in configured) or sum(configured) != global_batch_size:
        raise ConfigError(
            f"initial_shares {list(configured)} must be non-negative and sum to the global batch "
            f"{global_batch_size}"
        )
    check_min_share(configured, min(min_share, global_batch_size))
    return list(configured)


def check_min_share(configured: Sequence[int], min_share: int) -> None:
    """Refuse configured shares that give a rank some samples but fewer than `min_share`.

    Raises:
        ConfigError: Naming the first such rank, ``initial_shares`` and ``min_local_batch``.
    """
    if respects_min_share(configured, min_share):
        return
    rank = next(r for r, s in enumerate(configured) if 0 < s < min_share)
    raise ConfigError(
        f"initial_shares {list(configured)} gives rank {rank} {configured[rank]} sample(s), "
        f"fewer than min_local_batch {min_share}: every share must be 0 or at least "
        f"{min_share}"
    )


def lockstep_batch(global_batch_size: int, workers: int, min_share: int = 1) -> int:
    """The one local batch for modes whose workers all step alike and count alike (local SGD,
    DiLoCo, asynchronous pushes): the smallest equal share, ⌊global_batch_size / workers⌋, and at
    least `min_share` (every worker takes a batch there, so none can take 0)."""
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if global_batch_size < workers:
        return max(1, min_share)
    return max(global_batch_size // workers, min_share)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What `JobPlanner.absorb` decided for the next step."""

    shares: tuple[int, ...]
    """Local batch per rank for a full global batch."""
    topology: Topology
    """Reduction topology for the next step."""
    topology_changed: bool
    """True when `topology` is new: apply it to the gradient exchange before the next step."""


class JobPlanner:
    """Owns the shares, caps, topology and dropped ranks of one job, and every decision on them.

    Args:
        global_batch_size: Samples per optimizer step, summed over all ranks.
        world_size: Number of ranks.
        caps: Largest local batch per rank (see `memory_caps`), or None for no limit.
        initial: Configured shares before anything is measured (None: equal shares).
        rebalance: Re-plan from measurements; False keeps the shares except to route around
            dropped ranks and to split a short batch in proportion.
        nan_drop_after: A rank non-finite this many steps in a row gets no more samples
            (0: never drop).
        leaf_ratio: A rank this many times slower per sample than the fastest becomes a leaf.
        config: How measurements become a plan (fits, noise, hysteresis).
        hub_leaf: Whether the gradient exchange supports hub/leaf topologies; False keeps the
            ring (a compressed exchange has no leaves).
        min_share: Fewest samples any plan gives a rank that gets any (a batch smaller than
            this goes whole to one rank).

    Raises:
        ConfigError, PlanError: As `initial_shares`.
    """

    def __init__(
        self, global_batch_size: int, world_size: int, *, caps: Sequence[int] | None = None,
        initial: Sequence[int] | None = None, rebalance: bool = True, nan_drop_after: int = 3,
        leaf_ratio: float = 1.8, config: PlannerConfig | None = None, hub_leaf: bool = True,
        min_share: int = 1,
    ) -> None:
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.caps = None if caps is None else list(caps)
        self.min_share = min_share
        self.shares = initial_shares(global_batch_size, world_size, self.caps, initial, min_share)
        self.rebalance = rebalance
        self.nan_drop_after = nan_drop_after
        self.leaf_ratio = leaf_ratio
        self.hub_leaf = hub_leaf
        self.share_planner = SharePlanner(world_size, config, min_share)
        self.observer = JobObserver(world_size)
        self.topology = Topology.ring(world_size)
        self.nonfinite_steps = [0] * world_size  # steps each rank's contribution was dropped
        self.dropped: set[int] = set()  # ranks planned no more samples (repeat offenders)
        self._nonfinite_streak = [0] * world_size
        self._topology_votes = 0  # consecutive steps that asked for the same new topology
        self._prev_topology = self.topology  # the topology the next matrix's sync columns saw
        base = self.share_planner.config.probe_after_steps
        self._starved = [0] * world_size  # steps in a row each rank was planned no samples
        self._probe_wait = [base] * world_size  # starved steps before each rank's next probe
        self._probe: list[int] | None = None  # shares of full batches until the next absorb
        self._probing: set[int] = set()  # ranks whose next measured step is a probe

    @property
    def replan_steps(self) -> list[int]:
        """Steps at which a new plan was applied by the hysteresis or forced, in order."""
        return self.share_planner.controller.changes

    def set_topology(self, topology: Topology) -> None:
        """Fix the reduction topology from the next step on (the caller applies it to the
        exchange)."""
        self.topology = topology

    def shares_for(self, batch_size: int) -> list[int]:
        """Local batch per rank for a global batch of `batch_size` samples: the shares in force
        for a full batch (a probe's, from the step that planned it to the next absorb); for
        another size (an epoch's short last batch) a one-off plan from the fits, or in
        proportion to the shares in force before every rank is measured or without
        rebalancing."""
        if batch_size == self.global_batch_size:
            return list(self.shares if self._probe is None else self._probe)
        return self.share_planner.plan_now(batch_size, self.shares, self.caps,
                                           measured=self.rebalance)

    def absorb(self, step: int, stats: list[list[float]], batch_shares: Sequence[int]) -> StepPlan:
        """Learn from one step's statistics matrix (world_size × WIDTH, the same on every rank)
        and decide the shares and topology of the next step.

        Args:
            step: The step the matrix describes (0 for the first of the run).
            stats: One row per rank, columns as `idla.runtime.stats.Stat`.
            batch_shares: The local batches the step ran with.

        Raises:
            PlanError: If a dropped rank leaves too little memory for the global batch.
        """
        costs = self.observer.absorb(stats, batch_shares, self._prev_topology, step == 0)
        self._probe, probed = None, False
        for rank, r in enumerate(stats):
            if rank in self._probing and batch_shares[rank] > 0:
                self._probing.discard(rank)
                self.share_planner.fits[rank].forget_stale()  # stale: learn from the probe
                probed = True
            self.share_planner.observe(rank, batch_shares[rank], r[Stat.COMPUTE_S], costs[rank])
        self._prev_topology = self.topology
        self._drop_repeat_offenders(stats)
        before = self.topology
        if self.rebalance and self.world_size > 1:
            self._replan(step, probed)
            self._plan_probe()
        return StepPlan(tuple(self.shares), self.topology, self.topology != before)

    def _plan_probe(self) -> None:
        """Count the steps each live rank has been planned no samples; the first rank whose
        wait is over gets the minimum share of the next full batch, from the rank with the
        most, and waits twice as long for its next probe."""
        base = self.share_planner.config.probe_after_steps
        probe = max(self.min_share, 1)
        for rank, share in enumerate(self.shares):
            if share > 0:
                self._starved[rank], self._probe_wait[rank] = 0, base
                continue
            if not base or rank in self.dropped or (self.caps is not None
                                                    and self.caps[rank] < probe):
                continue
            self._starved[rank] += 1
            donor = max(range(self.world_size), key=lambda q: (self.shares[q], -q))
            left = self.shares[donor] - probe
            if (self._probe is not None or self._starved[rank] < self._probe_wait[rank]
                    or not (left == 0 or left >= self.min_share)):
                continue
            self._probe = list(self.shares)
            self._probe[donor], self._probe[rank] = left, probe
            self._probing.add(rank)
            self._starved[rank] = 0
            self._probe_wait[rank] = min(2 * self._probe_wait[rank], MAX_PROBE_WAIT_STEPS)

    def _drop_repeat_offenders(self, stats: list[list[float]]) -> None:
        """Count non-finite steps per rank; a repeat offender is planned no more samples."""
        limit = self.nan_drop_after
        for rank, r in enumerate(stats):
            if flags_of(r) & StepFlag.NONFINITE:
                self.nonfinite_steps[rank] += 1
                self._nonfinite_streak[rank] += 1
            else:
                self._nonfinite_streak[rank] = 0
            if limit and self._nonfinite_streak[rank] >= limit and rank not in self.dropped:
                self.dropped.add(rank)
                big = self.global_batch_size
                self.caps = [0 if q in self.dropped else (self.caps[q] if self.caps else big)
                             for q in range(self.world_size)]
                if sum(self.caps) < big:
                    raise PlanError(f"rank {rank} was dropped for non-finite gradients and the "
                                    "remaining ranks cannot hold the global batch")
                weights = [0 if q in self.dropped else s for q, s in enumerate(self.shares)]
                self.shares = self.share_planner.plan_now(big, weights, self.caps,
                                                          measured=self.rebalance)

    def _replan(self, step: int, probed: bool = False) -> None:
        """`probed`: a starved rank was just measured, and its one-sample fit underrates it
        (its fixed cost read as per-sample): its plan is applied without the hysteresis, so
        that the next measurement, at a real share, corrects the fit."""
        models = self.share_planner.models()
        forced = self._vote_topology(step, models) or probed
        if forced and all(m is not None for m in models):
            self.shares = allocate_shares(
                self.global_batch_size, models, self.caps, self.min_share  # type: ignore[arg-type]
            )
            return
        new = self.share_planner.decide(step, self.shares, self.global_batch_size, self.caps)
        if new is not None:
            self.shares = list(new)

    def _vote_topology(self, step: int, models: list[StepModel | None]) -> bool:
        """Vote for the topology the fits ask for; True when a new one was applied."""
        fits = self.share_planner.fits
        if not self.hub_leaf or step < 2 or any(f.count < 2 for f in fits):
            return False
        # Compute time per sample at an equal share is the role-independent measure of a
        # worker's speed (robust to how a noisy fit splits α from β); a worker several times
        # slower than the fastest stalls every ring phase.
        equal = self.global_batch_size / self.world_size
        slowness = [
            (m.compute_fixed_s + m.compute_per_sample_s * equal) / equal  # type: ignore[union-attr]
            for m in models
        ]
        topology = choose_topology(slowness, self.leaf_ratio, previous=self.topology)
        self._topology_votes = self._topology_votes + 1 if topology != self.topology else 0
        if self._topology_votes < TOPOLOGY_PATIENCE_STEPS:
            return False
        self._topology_votes = 0
        self.topology = topology
        return True
