"""The façade a user's training script touches: `Agent`.

    agent = idla.Agent(model, optimizer, train_set, global_batch_size=512)
    for epoch in range(3):
        for x, y in agent.batches(epoch):
            loss = F.cross_entropy(model(x), y)   # mean over this rank's share
            agent.backward(loss)
            optimizer.step()

Run as one process, or under `torchrun --nproc-per-node N`: the agent measures every worker,
gives each the share of the global batch it can carry, and keeps the replicas exactly in sync.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from idla.agent.config import AgentConfig
from idla.agent.exchange import make_sync
from idla.errors import ConfigError, PlanError, ReplicaMismatchError
from idla.plan.observer import JobObserver
from idla.plan.planner import SharePlanner
from idla.plan.shares import allocate_shares
from idla.plan.topology import Topology, choose_topology
from idla.profile.perf_model import StepModel
from idla.report import diagnose_stragglers
from idla.runtime.data import BatchFetcher, GlobalBatch, GlobalBatchSampler, local_slice
from idla.runtime.group import Group
from idla.runtime.stats import WIDTH, Stat, row
from idla.sync.modes import advise_from_history


class Agent:
    """Observe, plan, run and compensate for one data-parallel training job."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        dataset: Dataset | Sequence[torch.Tensor],
        *,
        global_batch_size: int | None = None,
        config: AgentConfig | None = None,
        group: Group | None = None,
    ) -> None:
        if config is None:
            if global_batch_size is None:
                raise ConfigError("give global_batch_size (or a config)")
            config = AgentConfig(global_batch_size=global_batch_size)
        self.config = config
        self.group = group or Group()
        self.model = model.to(self.group.device)
        self.optimizer = optimizer  # stepped by the user's loop; held for checkpoints
        world = self.group.world_size
        if config.global_batch_size < world:
            raise ConfigError(
                f"the global batch {config.global_batch_size} is smaller than the number of "
                f"workers {world}"
            )
        self._fetcher = BatchFetcher(dataset)
        self.sampler = GlobalBatchSampler(
            self._fetcher.size, config.global_batch_size, config.seed
        )
        self._broadcast_initial_state()
        self.caps = self._gather_caps()
        self.sync = make_sync(config, list(self.model.parameters()), self.group, WIDTH)
        equal = [StepModel(compute_fixed_s=0.0, compute_per_sample_s=1.0)] * world
        self.shares = allocate_shares(config.global_batch_size, equal, self.caps)
        if config.initial_shares is not None:
            if len(config.initial_shares) != world:
                raise ConfigError(
                    f"initial_shares lists {len(config.initial_shares)} shares for {world} ranks"
                )
            self.shares = list(config.initial_shares)
        self.topology = Topology.ring(world)
        self.planner = SharePlanner(world, config.planner)
        self._topology_votes = 0  # consecutive steps that asked for the same new topology
        self.observer = JobObserver(world)
        self.nonfinite_steps = [0] * world  # steps each rank's contribution was dropped
        self._nonfinite_streak = [0] * world
        self.dropped: set[int] = set()  # ranks planned no more samples (repeat offenders)
        self.step = 0
        self.history: dict[str, list[Any]] = {
            "step": [], "shares": [], "samples_per_s": [], "loss": [], "compute_s": [],
            "topology": [],
        }
        self._batch: GlobalBatch | None = None
        self._batch_shares: list[int] = []
        self._awaiting_backward = False
        self._step_start = 0.0
        self._step_cpu = 0.0
        self._sync_end: float | None = None
        self._prev_sync_s = 0.0
        self._prev_comm_cpu_s = 0.0
        self._prev_other_s = 0.0
        self._prev_topology = self.topology

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    def _broadcast_initial_state(self) -> None:
        """Every replica starts from rank 0's parameters and buffers."""
        if self.group.world_size == 1:
            return
        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def _gather_caps(self) -> list[int] | None:
        mine = -1 if self.config.max_local_batch is None else self.config.max_local_batch
        cap = torch.tensor([mine], dtype=torch.int64, device=self.group.device)
        caps = [int(t.item()) for t in self.group.all_gather(cap)]
        if all(c < 0 for c in caps):
            return None
        big = self.config.global_batch_size
        result = [big if c < 0 else c for c in caps]
        if sum(result) < big:
            raise PlanError(
                f"memory caps hold at most {sum(result)} samples but the global batch is {big}"
            )
        return result

    def _shares_for(self, batch_size: int) -> list[int]:
        if batch_size == self.config.global_batch_size:
            return list(self.shares)
        if self.config.rebalance:
            return self.planner.plan_now(batch_size, self.shares, self.caps)
        return self.planner.plan_now(batch_size, self.shares, self.caps, measured=False)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """This rank's part of every global batch of `epoch`, in order, from `start_batch` on
        (a resumed run continues inside the epoch it was saved in)."""
        for global_batch in self.sampler.epoch(epoch)[start_batch:]:
            shares = self._shares_for(global_batch.size)
            now = time.perf_counter()
            if self._sync_end is not None:
                self._prev_other_s = now - self._sync_end
                self.history["samples_per_s"].append(
                    self._batch.size / (now - self._step_start) if self._batch else 0.0
                )
            every = self.config.check_every_steps
            if every and self.step and self.step % every == 0:
                self.check_replicas()
            self._step_start = time.perf_counter()
            self._step_cpu = time.process_time()
            self._batch, self._batch_shares = global_batch, shares
            self.sync.start_step(shares)
            indices = global_batch.indices[local_slice(shares, self.rank)]
            parts = self._fetcher.fetch(indices)
            self._awaiting_backward = True
            yield tuple(t.to(self.group.device, non_blocking=True) for t in parts)
            if self._awaiting_backward:
                raise RuntimeError("call agent.backward(loss) once for every batch")

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's mean loss, then the exact weighted sync of all gradients."""
        if not self._awaiting_backward or self._batch is None:
            raise RuntimeError("agent.backward() must follow a batch from agent.batches()")
        local = self._batch_shares[self.rank]
        loss_sum, nonfinite = 0.0, False
        guard = self.config.nan_guard
        if local > 0:
            loss_sum = float(loss.detach()) * local
            nonfinite = not math.isfinite(loss_sum)
            if not (guard and nonfinite):
                (loss * (local / self._batch.size)).backward()
            if guard and not nonfinite:
                nonfinite = not bool(torch.isfinite(self.sync.grads).all())
            if guard and nonfinite:
                self.sync.drop_local_gradient()
                loss_sum, local = 0.0, 0
        compute_end, compute_cpu_end = time.perf_counter(), time.process_time()
        stats_row = row(
            compute_s=compute_end - self._step_start,
            compute_cpu_s=compute_cpu_end - self._step_cpu,
            prev_sync_s=self._prev_sync_s,
            prev_comm_cpu_s=self._prev_comm_cpu_s,
            prev_other_s=self._prev_other_s,
            samples=local,
            loss_sum=loss_sum,
            nonfinite=nonfinite,
        )
        stats = self.sync.finish(stats_row.to(self.sync.grads.device))
        self._sync_end = time.perf_counter()
        self._prev_sync_s = self._sync_end - compute_end
        self._prev_comm_cpu_s = time.process_time() - compute_cpu_end
        self._awaiting_backward = False
        if guard:
            self._reweight(int(stats[:, Stat.SAMPLES].sum().item()), self._batch.size)
        self._absorb(stats.double().cpu().tolist())
        self.step += 1

    def _reweight(self, valid: int, size: int) -> None:
        """Make the summed gradient the mean over the samples that were kept: × size / valid;
        with none kept there is no gradient, and optimizers skip the step."""
        if valid == size:
            return
        if valid == 0:
            for p in self.sync.params:
                p.grad = None
            return
        self.sync.grads.mul_(size / valid)

    def _absorb(self, stats: list[list[float]]) -> None:
        """Learn from everybody's statistics; identical on every rank, so the plan is too."""
        shares = self._batch_shares
        costs = self.observer.absorb(stats, shares, self._prev_topology, self.step == 0)
        compute = [r[Stat.COMPUTE_S] for r in stats]
        for rank in range(self.world_size):
            self.planner.observe(rank, shares[rank], compute[rank], costs[rank])
        self._prev_topology = self.topology
        self._drop_repeat_offenders(stats)
        self.sync.after_step(self.step, stats)
        total = sum(r[Stat.SAMPLES] for r in stats)
        self.history["step"].append(self.step)
        self.history["shares"].append(list(shares))
        self.history["loss"].append(sum(r[Stat.LOSS_SUM] for r in stats) / max(total, 1))
        self.history["compute_s"].append(compute)
        self.history["topology"].append(self.topology.describe())
        if self.config.rebalance and self.world_size > 1:
            self._replan()

    def _drop_repeat_offenders(self, stats: list[list[float]]) -> None:
        """Count non-finite steps per rank; a repeat offender is planned no more samples."""
        limit = self.config.nan_drop_after
        for rank, r in enumerate(stats):
            if r[Stat.NONFINITE]:
                self.nonfinite_steps[rank] += 1
                self._nonfinite_streak[rank] += 1
            else:
                self._nonfinite_streak[rank] = 0
            if limit and self._nonfinite_streak[rank] >= limit and rank not in self.dropped:
                self.dropped.add(rank)
                big = self.config.global_batch_size
                self.caps = [0 if q in self.dropped else (self.caps[q] if self.caps else big)
                             for q in range(self.world_size)]
                if sum(self.caps) < big:
                    raise PlanError(f"rank {rank} was dropped for non-finite gradients and the "
                                    "remaining ranks cannot hold the global batch")
                weights = [0 if q in self.dropped else s for q, s in enumerate(self.shares)]
                self.shares = self.planner.plan_now(big, weights, self.caps,
                                                    measured=self.config.rebalance)

    def _replan(self) -> None:
        models = self.planner.models()
        forced = False
        ring_only = not self.sync.supports_leaves  # compressed exchanges have no leaves
        if not ring_only and self.step >= 2 and all(f.count >= 2 for f in self.planner.fits):
            # Compute time per sample at an equal share is the role-independent measure of a
            # worker's speed (robust to how a noisy fit splits α from β); a worker several times
            # slower than the fastest stalls every ring phase.
            equal = self.config.global_batch_size / self.world_size
            slowness = [
                (m.compute_fixed_s + m.compute_per_sample_s * equal) / equal  # type: ignore[union-attr]
                for m in models
            ]
            topology = choose_topology(slowness, self.config.leaf_ratio, previous=self.topology)
            self._topology_votes = self._topology_votes + 1 if topology != self.topology else 0
            if self._topology_votes >= 5:  # a new topology must persist before it is applied
                self._topology_votes = 0
                self.set_topology(topology)
                forced = True
        if forced and all(m is not None for m in models):
            self.shares = allocate_shares(
                self.config.global_batch_size, models, self.caps  # type: ignore[arg-type]
            )
            return
        new = self.planner.decide(self.step, self.shares, self.config.global_batch_size,
                                  self.caps)
        if new is not None:
            self.shares = list(new)

    def set_topology(self, topology: Topology) -> None:
        """Fix the reduction topology (all ranks, at the same step, between steps)."""
        self.topology = topology
        self.sync.set_topology(topology)

    def check_replicas(self) -> None:
        """Stop with a clear error if any rank's parameters differ from rank 0's."""
        mine = torch.tensor([parameter_digest(self.model)], dtype=torch.int64,
                            device=self.group.device)
        hashes = [int(t.item()) for t in self.group.all_gather(mine)]
        differ = [rank for rank, h in enumerate(hashes) if h != hashes[0]]
        if differ:
            raise ReplicaMismatchError(
                f"replicas diverged by step {self.step}: parameters on rank(s) "
                f"{', '.join(map(str, differ))} differ from rank 0's"
            )

    def stragglers(self) -> list[str]:
        return _stragglers([m.snapshot() for m in self.observer.meters])

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary of the run so far (identical on every rank)."""
        snaps = [m.snapshot() for m in self.observer.meters]
        return {
            "world_size": self.world_size,
            "backend": self.group.backend,
            "global_batch_size": self.config.global_batch_size,
            "steps": self.step,
            "shares": list(self.shares),
            "topology": self.topology.describe(),
            "replan_steps": self.planner.controller.changes,
            "workers": [
                {"rank": rank, "share": self.shares[rank], **snap,
                 "own_comm_s": self.observer.own_comm[rank].value,
                 "cpu_fraction": self.observer.cpu_fraction[rank].value}
                for rank, snap in enumerate(snaps)
            ],
            "stragglers": _stragglers(snaps),
            "nonfinite_steps": list(self.nonfinite_steps),
            "dropped_ranks": sorted(self.dropped),
            "compression": self.sync.report(),
            "sync_advice": advise_from_history(
                self.history["compute_s"], [s["comm_s"] for s in snaps]).as_dict(),
            "history": self.history,
        }

    def close(self) -> None:
        """Finish pending sends, check the replicas one last time, release the group."""
        if self._sync_end is not None and self._batch is not None:
            self.history["samples_per_s"].append(
                self._batch.size / max(time.perf_counter() - self._step_start, 1e-9)
            )
            self._sync_end = None
        self.sync.close()
        if self.config.check_every_steps and self.step:
            self.check_replicas()
        self.group.close()


def _stragglers(snaps: list[dict[str, float]]) -> list[str]:
    return diagnose_stragglers(
        [s["compute_s"] for s in snaps], [s["comm_s"] for s in snaps],
        [s["wait_s"] for s in snaps],
    )


def parameter_digest(model: nn.Module) -> int:
    """A blake2b digest of every parameter's bytes, as a signed 64-bit integer: replicas that
    hold the same parameters have the same digest."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    digest = hashlib.blake2b(flat.cpu().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
