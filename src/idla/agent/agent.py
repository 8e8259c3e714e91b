"""The façade a user's training script touches: `Agent`.

    agent = idla.Agent(model, optimizer, train_set, global_batch_size=512)
    for epoch in range(3):
        for x, y in agent.batches(epoch):
            loss = F.cross_entropy(model(x), y)   # mean over this rank's share
            agent.backward(loss)
            optimizer.step()

Run as one process, or under `torchrun --nproc-per-node N`: the agent measures every worker,
gives each the share of the global batch it can carry, and keeps the replicas exactly in sync.

What a plain PyTorch script does keeps working, exactly:

- ``optimizer.zero_grad(set_to_none=True)`` anywhere, ``.grad`` set to None or to zeros, and
  parameters unused on some or all ranks follow DDP's reducer (`idla.sync.grad_views`);
- ``requires_grad_`` changed after the agent exists: see `idla.agent.trainable`;
- gradient accumulation: ``with agent.no_sync(): agent.backward(loss / K)`` for all but the
  last of K micro-batches, each a global batch of its own (`Agent.no_sync`);
- ``agent.backward(loss, reduction="sum")`` for a loss summed over the share;
- BatchNorm and other buffers: identical on every replica after each step (the source rank's,
  like DDP's ``broadcast_buffers=True``, or their share-weighted mean: ``AgentConfig.buffers``)
  and covered by the replica check; with BatchNorm no rank is given a single sample
  (``AgentConfig.min_local_batch``); see `idla.agent.buffers`;
- data as tensors, a map-style Dataset or a DataLoader (collate_fn, workers kept; batch size,
  sampler, drop_last replaced, said once on rank 0), batches as the collate returns them; batch
  n's shares are planned when batch n − L starts, L the deepest ``num_workers × prefetch_factor``
  of any rank; an IterableDataset is refused: exactly-once needs indices (`runtime.loader`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from idla.agent import buffers
from idla.agent.agreement import agree_on_job, job_description
from idla.agent.config import AgentConfig
from idla.agent.coverage import TrainableSet, rebuild_exchange, settle_step
from idla.agent.exchange import make_sync
from idla.agent.history import StepHistory, agent_report, stragglers
from idla.agent.lifecycle import mark_closed, warn_unless_closed
from idla.agent.pool_metrics import PoolMetrics
from idla.agent.replicas import check_replicas, replica_report
from idla.agent.window import StepWindow, check_backward, read_step, refuse_open_steps
from idla.errors import ConfigError
from idla.plan.job_planner import JobPlanner, memory_caps
from idla.plan.observer import JobObserver
from idla.plan.topology import Topology
from idla.profile.clock import StepClock
from idla.runtime.data import GlobalBatch
from idla.runtime.group import Group
from idla.runtime.loader import Data, ShareLoader
from idla.runtime.stats import WIDTH, Stat, StepFlag, flags_of, row
from idla.runtime.tree import move_to

REDUCTIONS = ("mean", "sum")
"""What `Agent.backward` accepts as the loss: the mean over this rank's share, or the sum."""


class Agent:
    """Observe, plan, run and compensate for one data-parallel training job."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        dataset: Data,
        *,
        global_batch_size: int | None = None,
        config: AgentConfig | None = None,
        group: Group | None = None,
        initial_state_rank: int | None = 0,
    ) -> None:
        """`initial_state_rank`: the rank whose parameters and buffers all replicas start from
        (None: the caller makes them identical, as `run_elastic` does on the control plane)."""
        if config is None:
            if global_batch_size is None:
                raise ConfigError("give global_batch_size (or a config)")
            config = AgentConfig(global_batch_size=global_batch_size)
        self.config = config
        self.group = group or Group()
        self.model = model.to(self.group.device)
        self.optimizer = optimizer  # stepped by the user's loop; held for checkpoints
        self._loader = ShareLoader(dataset, config.global_batch_size, config.seed, self.rank)
        self.sampler = self._loader.sampler
        agree_on_job(job_description(config, self.model, self.sampler.dataset_size), self.group)
        self._broadcast_initial_state(initial_state_rank)
        limits = self._gather_rank_limits()
        self.sync = make_sync(config, list(self.model.parameters()), self.group, WIDTH)
        self._trainable = TrainableSet(self.model, self.sync.params)
        self._buffers = buffers.BufferSync(self.model, self.group, config.buffers)
        self.min_local_batch = buffers.min_local_batch(self.model, config.min_local_batch)
        self.planner = JobPlanner(
            config.global_batch_size, self.group.world_size,
            caps=memory_caps(limits, config.global_batch_size),
            initial=config.initial_shares, rebalance=config.rebalance,
            nan_drop_after=config.nan_drop_after, leaf_ratio=config.leaf_ratio,
            config=config.planner,
            hub_leaf=self.sync.supports_leaves, min_share=self.min_local_batch,
        )
        self.step = 0
        self._history = StepHistory(config.history_steps)
        self._batch: GlobalBatch | None = None
        self._batch_shares: list[int] = []
        self._window = StepWindow.empty(self.group.world_size)  # the step's micro-batches
        self._no_sync = False
        self._awaiting_backward = False
        self._clock = StepClock(self.group.device)
        self._step_start = 0.0
        self._step_cpu = 0.0
        self._sync_end: float | None = None
        self._prev_sync_s = 0.0
        self._prev_comm_cpu_s = 0.0
        self._prev_other_s = 0.0
        self._last_size = 0  # global samples of the last step
        self.pool_metrics = PoolMetrics.from_env()  # None unless a pool asks for metrics
        self._step_hook = (None if optimizer is None
                           else refuse_open_steps(optimizer, lambda: self.accumulating))
        warn_unless_closed(self, self.rank)

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def shares(self) -> list[int]:
        """Local batch per rank for a full global batch, as the planner holds it now."""
        return self.planner.shares

    @shares.setter
    def shares(self, shares: Sequence[int]) -> None:
        self.planner.shares = list(shares)

    @property
    def topology(self) -> Topology:
        return self.planner.topology

    @property
    def dropped(self) -> set[int]:
        """Ranks planned no more samples (repeat non-finite offenders)."""
        return self.planner.dropped

    @property
    def nonfinite_steps(self) -> list[int]:
        """Steps each rank's contribution was left out as non-finite."""
        return self.planner.nonfinite_steps

    @property
    def observer(self) -> JobObserver:
        return self.planner.observer

    @property
    def history(self) -> Mapping[str, deque[Any]]:
        """The last `AgentConfig.history_steps` steps, one ring buffer per series."""
        return self._history.series

    def _broadcast_initial_state(self, src: int | None) -> None:
        """Every replica starts from rank `src`'s parameters and buffers."""
        if self.group.world_size > 1 and src is not None:
            with torch.no_grad():
                for tensor in [*self.model.parameters(), *self.model.buffers()]:
                    self.group.broadcast(tensor.data, src=src)

    def _gather_rank_limits(self) -> list[int | None]:
        """Every rank's `max_local_batch` (None where it has none); on the way, the job's plan
        lag (the deepest prefetch of any rank's loader) and the replaced-settings warning."""
        mine = -1 if self.config.max_local_batch is None else self.config.max_local_batch
        facts = torch.tensor([mine, self._loader.local_lag], dtype=torch.int64)
        gathered = [t.tolist() for t in self.group.control_all_gather(facts)]
        self._loader.lag = max(lag for _, lag in gathered)
        if self.rank == 0 and self._loader.replaced_note:
            warnings.warn(self._loader.replaced_note, UserWarning, stacklevel=3)
        return [None if c < 0 else c for c, _ in gathered]

    @property
    def accumulating(self) -> bool:
        """Whether the step is open: the last backward ran under `no_sync`, so this rank's
        gradients hold micro-batches that have not been exchanged yet."""
        return self._window.micro_batches > 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward without exchange, for gradient accumulation (DDP's idiom)::

            for i, (x, y) in enumerate(agent.batches(epoch)):
                if (i + 1) % K:
                    with agent.no_sync():
                        agent.backward(loss_fn(model(x), y) / K)
                else:
                    agent.backward(loss_fn(model(x), y) / K)   # exchanges the sum
                    optimizer.step()

        Each micro-batch is a global batch of `agent.batches` (every rank gets its share of
        each); gradients add up in the flat buffer, and the first backward outside `no_sync`
        exchanges their sum and ends the step: the result is what one process gets running
        the same loop over the same global batches. The planner sees one step per exchange,
        with the samples and compute seconds of all its micro-batches; the NaN guard drops a
        rank's whole step if any of its micro-batches was non-finite. ``optimizer.step()``
        while the step is open would apply this rank's own gradients, and is refused
        (`GradientError`)."""
        before = self._no_sync
        self._no_sync = True
        try:
            yield
        finally:
            self._no_sync = before

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        """This rank's part of every global batch of `epoch`, in order, from `start_batch` on
        (a resumed run continues inside the epoch it was saved in): a tuple of tensors for
        tensor data, else what the collate returns; tensors (and objects with ``.to``) on the
        agent's device."""
        for planned, load in self._loader.batches(epoch, start_batch, self.planner.shares_for):
            batch, shares = planned.batch, planned.shares
            if self.accumulating:
                self.sync.continue_step(shares)
            else:
                self._begin_step()
                self.sync.start_step(shares)
            self._window.add(batch.size, shares)
            self._batch, self._batch_shares = batch, shares
            if shares[self.rank] == 0:
                self._buffers.hold()  # an empty forward leaves the buffers as they were
            parts = load()
            self._awaiting_backward = True
            yield move_to(parts, self.group.device, non_blocking=True)
            if self._awaiting_backward:
                raise RuntimeError("call agent.backward(loss) once for every batch")

    def _begin_step(self) -> None:
        """Between steps: last step's timings, the periodic replica check, a rebuild of the
        exchange when parameters were unfrozen; then the step's clocks start."""
        now = time.perf_counter()
        if self._sync_end is not None:
            self._prev_other_s = now - self._sync_end
            self._history.record_rate(self._last_size / (now - self._step_start))
        every = self.config.check_every_steps
        if every and self.step and self.step % every == 0:
            self.check_replicas()
        if self._trainable.rebuild_pending:
            self._rebuild_sync()
        self._step_start = time.perf_counter()
        self._step_cpu = time.process_time()

    def _rebuild_sync(self) -> None:
        config, group = self.config, self.group
        self.sync = rebuild_exchange(
            self.sync, self.model, lambda params: make_sync(config, params, group, WIDTH))
        self.sync.set_topology(self.topology)
        self._trainable = TrainableSet(self.model, self.sync.params)

    def backward(self, loss: torch.Tensor, reduction: Literal["mean", "sum"] = "mean") -> None:
        """Backward of this rank's loss; outside `no_sync`, then the exact weighted exchange of
        all gradients (inside, they accumulate here).

        `reduction`: what `loss` is over this rank's share of the global batch: "mean" (e.g.
        ``F.cross_entropy(..)``'s default), scaled by share / global batch so that the
        exchanged gradient is the gradient of the mean over the global batch; or "sum"
        (``reduction="sum"``), left as it is so that the exchanged gradient is that of the sum
        over the global batch. Either is exact at any shares.

        Raises:
            ConfigError: `reduction` is neither "mean" nor "sum".
        """
        check_backward(loss, reduction, REDUCTIONS,
                       self._awaiting_backward and self._batch is not None)
        assert self._batch is not None
        final = not self._no_sync
        self.sync.begin_backward(final)
        local, window = self._batch_shares[self.rank], self._window
        if local > 0:  # no host synchronization here: the loss is read at the step's end
            value = loss.detach().double().reshape(())
            scaled = loss * (local / self._batch.size) if reduction == "mean" else loss
            scaled.backward()
            window.record(local, value * local if reduction == "mean" else value)
        else:
            self._buffers.restore()
        self._awaiting_backward = False
        if final:
            self._exchange()

    def _exchange(self) -> None:
        """End the step: the NaN guard, the exchange, what every rank learns from it."""
        window, guard = self._window, self.config.nan_guard
        local = window.local
        loss_sum, nonfinite = read_step(window, self.sync.grads if guard else None, self._clock)
        if guard and nonfinite:
            self.sync.drop_local_gradient()
            loss_sum, local = 0.0, 0
        compute_end, compute_cpu_end = self._clock.compute_end(), time.process_time()
        prev_sync_s = self._clock.exchange_s(self._prev_sync_s)
        prev_other_s = max(0.0, self._prev_other_s - (prev_sync_s - self._prev_sync_s))
        flags = StepFlag(0)
        if any(self.sync.views.gradless()):
            flags |= StepFlag.GRADLESS
        if self._trainable.changed():
            flags |= StepFlag.TRAINABLE_CHANGED
        stats_row = row(
            compute_s=compute_end - self._step_start,
            compute_cpu_s=compute_cpu_end - self._step_cpu, prev_sync_s=prev_sync_s,
            prev_comm_cpu_s=self._prev_comm_cpu_s, prev_other_s=prev_other_s,
            samples=local, loss_sum=loss_sum, nonfinite=nonfinite, flags=flags)
        stats = self.sync.finish(stats_row)  # (world size, WIDTH) float64 on the CPU
        table = stats.tolist()
        seen = StepFlag(0)
        for r in table:
            seen |= flags_of(r)
        extra = settle_step(self.sync, self._trainable, self.group, seen, self.step,
                            drop=guard and nonfinite)
        self._buffers.sync([int(r[Stat.SAMPLES]) for r in table], window.shares)
        self._sync_end = self._clock.exchange_end()
        self._prev_sync_s = self._sync_end - compute_end  # on CUDA its launch: `StepClock`
        self._prev_comm_cpu_s = time.process_time() - compute_cpu_end
        if guard:
            self._reweight(int(stats[:, Stat.SAMPLES].sum().item()), window.size, extra)
        self._last_size = window.size
        self._absorb(table, window.shares)
        self._window = StepWindow.empty(self.world_size)
        self.step += 1

    def _reweight(self, valid: int, size: int, extra: Sequence[torch.Tensor] = ()) -> None:
        """Make the summed gradient the mean over the samples that were kept: × size / valid
        (for a "sum" loss: the sum the whole batch would have had at that mean); with none
        kept there is no gradient, and optimizers skip the step."""
        if valid == size:
            return
        if valid == 0:
            for p in [*self.sync.params, *self._trainable.uncovered()]:
                p.grad = None
            return
        self.sync.grads.mul_(size / valid)
        for grad in extra:
            grad.mul_(size / valid)

    def _absorb(self, stats: list[list[float]], shares: list[int]) -> None:
        """Learn from everybody's statistics; identical on every rank, so the plan is too."""
        topology = self.topology.describe()
        plan = self.planner.absorb(self.step, stats, shares)
        if plan.topology_changed:
            self.sync.set_topology(plan.topology)
        self.sync.after_step(self.step, stats)
        total = sum(r[Stat.SAMPLES] for r in stats)
        self._history.record_step(
            self.step, shares, sum(r[Stat.LOSS_SUM] for r in stats) / max(total, 1),
            [r[Stat.COMPUTE_S] for r in stats], topology)
        if self.pool_metrics is not None:
            self.pool_metrics.after_step(self, stats)

    def set_topology(self, topology: Topology) -> None:
        """Fix the reduction topology (all ranks, at the same step, between steps)."""
        self.planner.set_topology(topology)
        self.sync.set_topology(topology)

    def check_replicas(self) -> None:
        """Stop with a clear error if any rank's parameters, or buffers (unless
        ``AgentConfig.buffers`` is "none"), differ from rank 0's."""
        check_replicas(self.model, self.group, self.step, buffers=self._buffers.covered(),
                       mode=self.config.replica_check, tolerance=self.config.replica_tolerance)

    def stragglers(self) -> list[str]:
        return stragglers([m.snapshot() for m in self.observer.meters])

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary of the run so far (identical on every rank)."""
        return agent_report(
            self.planner, self._history, backend=self.group.backend, steps=self.step,
            devices=[r.device for r in self.group.fleet],
            compression=self.sync.report(),
            replica_check=replica_report(self.config.replica_check, self.config.replica_tolerance),
        )

    def close(self) -> None:
        """Finish pending sends, check the replicas one last time, release the group."""
        mark_closed(self)
        if self._sync_end is not None and self._batch is not None:
            self._history.record_rate(
                self._last_size / max(time.perf_counter() - self._step_start, 1e-9))
            self._sync_end = None
        if self._step_hook is not None:
            self._step_hook.remove()
        self.sync.close()
        if self.config.check_every_steps and self.step:
            self.check_replicas()
        self.group.close(together=True)

