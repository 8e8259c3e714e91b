"""Elastic training: survivors of a failed worker re-form the group and go on, losing ≤ 1 step.

    def train(agent, state):
        for x, y in state.batches(epochs=3):         # resumes at the committed cursor
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            state.commit()                            # the in-memory commit

    report = idla.run_elastic(train, model, optimizer, train_set, AgentConfig(...))

The commit is Horovod's elastic `State.commit`, without a copy: replicas are identical after
every synchronous step, so the committed state *is* the model and optimizer in memory. When a
collective fails (a peer died, its link is down, it stopped answering within the group
timeout), no replica has applied a partial step: the exception comes before `optimizer.step`.
The survivors meet in the store (`idla.elastic.rendezvous`), open a new gloo group, the one
with the most committed steps broadcasts parameters, buffers, optimizer state and the data
cursor, the agent re-plans shares for the new world, and the interrupted global batch is
redone by the survivors. So no sample is skipped or repeated in a committed step, and the
work lost per failure is the one step in flight. Why not torchft: see the README.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from idla.agent.agent import Agent
from idla.agent.config import AgentConfig
from idla.agent.lifecycle import mark_closed
from idla.elastic.faults import FaultInjector, injected_fault_time
from idla.elastic.membership import (
    ElasticConfig,
    FailureEvent,
    env_int,
    is_peer_failure,
    join_check,
    store_prefix,
)
from idla.elastic.rendezvous import Rendezvous, rendezvous_spec_from_env
from idla.elastic.state_transfer import broadcast_module_, broadcast_optimizer_
from idla.errors import IdlaError
from idla.runtime.collectives import all_gather_json
from idla.runtime.group import Group
from idla.runtime.loader import Data


@dataclass
class ElasticState:
    """The committed position of the run: optimizer steps and the data cursor."""

    step: int = 0
    """Committed optimizer steps."""
    epoch: int = 0
    batch: int = 0
    """Next global batch index within `epoch`."""
    started: int = 0
    """The step being computed (step + 1 while a batch is out, else step)."""
    committed: list[tuple[int, int]] = field(default_factory=list)
    """(epoch, batch) of every committed step this worker saw or adopted, in order."""
    agent: Agent | None = None
    faults: FaultInjector | None = None
    membership_check: Callable[[int], None] | None = None
    """Called with the committed step before each batch; raises MembershipChange to re-form."""

    def batches(self, epochs: int) -> Iterator[Any]:
        """This rank's part of every remaining global batch, from the cursor to `epochs`."""
        if self.agent is None:
            raise RuntimeError("ElasticState.batches() is only valid inside run_elastic")
        agent = self.agent
        while self.epoch < epochs:
            epoch = self.epoch
            for parts in agent.batches(epoch, self.batch):
                if self.started != self.step:
                    raise RuntimeError("call state.commit() after every optimizer step")
                if self.membership_check is not None:
                    self.membership_check(self.step)
                self.started = self.step + 1
                if self.faults is not None:
                    parts = self.faults.before_step(self.step, parts)
                yield parts
            if self.epoch == epoch:  # the epoch had no batch left (cursor at its end)
                self.epoch, self.batch = epoch + 1, 0

    def commit(self) -> None:
        """Record one finished optimizer step: the cursor moves past its global batch."""
        if self.agent is None or self.started != self.step + 1:
            raise RuntimeError("state.commit() must follow a batch from state.batches()")
        self.committed.append((self.epoch, self.batch))
        self.step += 1
        self.epoch, self.batch = self.next_cursor(self.epoch, self.batch)

    def next_cursor(self, epoch: int, batch: int) -> tuple[int, int]:
        """The (epoch, batch) after global batch `batch` of `epoch`."""
        assert self.agent is not None
        if batch + 1 >= len(self.agent.sampler.epoch(epoch)):
            return epoch + 1, 0
        return epoch, batch + 1

    def as_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch,
                "started": self.started}


@dataclass
class ElasticReport:
    state: ElasticState
    events: list[FailureEvent]
    agent_report: dict[str, Any]
    member: int
    world_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "member": self.member, "world_size": self.world_size, **self.state.as_dict(),
            "steps_per_epoch": self.state.agent.sampler.steps_per_epoch()
            if self.state.agent else 0,
            "steps_lost": sum(e.steps_lost for e in self.events),
            "events": [e.as_dict() for e in self.events],
            "committed": [list(c) for c in self.state.committed],
            "agent": self.agent_report,
        }


def _adopt_most_advanced(
    state: ElasticState, model: nn.Module, optimizer: torch.optim.Optimizer | None,
    group: Group,
) -> int:
    """Every rank takes the state of the rank with the most committed steps (on the control
    plane); return the number of started-but-uncommitted steps this re-form throws away."""
    rows = all_gather_json(state.as_dict(), group=group.control)
    best = max(row["step"] for row in rows)
    src = next(rank for rank, row in enumerate(rows) if row["step"] == best)
    lost = max(0, max(row["started"] for row in rows) - best)
    if len(rows) > 1:
        broadcast_module_(model, src, group)
        if optimizer is not None:
            broadcast_optimizer_(optimizer, src, group)
    missing = best - state.step
    cursor = (state.epoch, state.batch)
    for _ in range(missing):  # adopted steps: their cursors follow ours in order
        state.committed.append(cursor)
        cursor = state.next_cursor(*cursor)
    state.step, state.epoch, state.batch = best, rows[src]["epoch"], rows[src]["batch"]
    state.started = state.step
    return lost


def run_elastic(
    train_fn: Callable[[Agent, ElasticState], None],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    dataset: Data,
    config: AgentConfig,
    elastic: ElasticConfig | None = None,
    on_event: Callable[[FailureEvent], None] | None = None,
) -> ElasticReport:
    """Run `train_fn(agent, state)` until it returns, re-forming the group after failures.

    Start every worker the usual way (torchrun, or idla's launcher); one process works too.
    """
    elastic = elastic or ElasticConfig()
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a lost NCCL peer raises here
    world, member = env_int("WORLD_SIZE", 1), env_int("RANK", 0)
    joining = os.environ.get("IDLA_JOIN") == "1"
    rdzv = (Rendezvous(rendezvous_spec_from_env(), member, world, prefix=store_prefix(),
                       heartbeat_s=elastic.heartbeat_s, dead_after_s=elastic.dead_after_s,
                       joining=joining)
            if world > 1 or joining else None)
    membership = (rdzv.join() if joining else rdzv.current) if rdzv else None
    state = ElasticState(faults=FaultInjector.from_env(rdzv.member if rdzv else member, rdzv))
    events: list[FailureEvent] = []
    try:
        while True:
            group = Group(
                elastic.collective_timeout_s,
                store=rdzv.pg_store(membership) if rdzv and membership else None,
                rank=membership.rank if membership else 0,
                world_size=membership.world_size if membership else 1,
            )
            state.membership_check = join_check(rdzv, group, elastic.join_check_every_steps)
            try:
                agent = Agent(model, optimizer, dataset, config=config, group=group)
                state.agent = agent
                lost = _adopt_most_advanced(state, model, optimizer, group)
                if events:
                    events[-1].steps_lost = lost
                train_fn(agent, state)
                agent.close()
                return ElasticReport(state, events, agent.report(),
                                     rdzv.member if rdzv else member, group.world_size)
            except RuntimeError as error:
                if rdzv is None or membership is None or not is_peer_failure(error):
                    raise
                if state.agent is not None:
                    mark_closed(state.agent)  # its group is gone; the next generation takes over
                failed_at = time.time()
                group.close()
                before = set(membership.members)
                membership, lost_members = rdzv.next(state.step)
                event = FailureEvent(
                    generation=membership.generation, lost_members=lost_members,
                    members=list(membership.members),
                    error=f"{type(error).__name__}: {str(error)[:200]}",
                    joined_members=sorted(set(membership.members) - before),
                    failed_at=failed_at, declared_at=time.time(),
                    fault_at=injected_fault_time(rdzv) if lost_members else None,
                )
                events.append(event)
                if on_event is not None:
                    on_event(event)
                if membership.world_size < elastic.min_workers:
                    raise IdlaError(
                        f"only {membership.world_size} workers left (members "
                        f"{list(membership.members)}), fewer than min_workers "
                        f"{elastic.min_workers}"
                    ) from None
    finally:
        if rdzv is not None:
            rdzv.close()
