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
with the most committed steps (among credible claims: a member of the last group, finite, within
the store's signed records; `idla.elastic.adoption`) broadcasts parameters, buffers and
optimizer state, the data cursor follows from the step, the agent re-plans shares for the new
world, and the interrupted global batch is redone by the survivors. So no sample is skipped
or repeated in a committed step, and the work lost per failure is the one step in flight. With
a job secret (``IDLA_JOB_SECRET``) every store entry and claim is signed (`idla.elastic.auth`).

A worker that gets SIGTERM (a scheduler shrinking the job) leaves gracefully: it finishes the
step it is in and commits it; at the next membership check (every
`ElasticConfig.join_check_every_steps` steps) every rank learns who leaves, after the same
commit; the leaver's `run_elastic` returns (``report.left``) and the others re-form without it
and go on from that committed step: no step lost, no sample skipped or repeated. A second
SIGTERM stops the worker at once. Why not torchft: see the README.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from idla.agent.agent import Agent
from idla.agent.config import AgentConfig
from idla.agent.lifecycle import mark_closed
from idla.elastic.adoption import Adoption, Claim, choose_source
from idla.elastic.auth import StoreAuth, job_secret_from_env
from idla.elastic.cursor import CommitLog, advance_cursor, samples_before
from idla.elastic.faults import FaultInjector, injected_fault_time
from idla.elastic.membership import (
    ElasticConfig,
    FailureEvent,
    LeftGroup,
    MembershipChange,
    PeerMissing,
    env_int,
    is_peer_failure,
    membership_check,
    store_prefix,
)
from idla.elastic.rendezvous import Membership, Rendezvous, rendezvous_spec_from_env
from idla.elastic.state_transfer import (
    broadcast_module_,
    broadcast_optimizer_,
    state_is_finite,
)
from idla.errors import IdlaError
from idla.runtime.collectives import all_gather_json
from idla.runtime.devices import ReportTimeout
from idla.runtime.group import Group
from idla.runtime.loader import Data

_log = logging.getLogger("idla.elastic")


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
    log: CommitLog = field(default_factory=CommitLog)
    """The global batch of every committed step this worker saw or adopted, in order."""
    agent: Agent | None = None
    faults: FaultInjector | None = None
    membership_check: Callable[[int], None] | None = None
    """Called with the committed step before each batch; raises MembershipChange to re-form,
    LeftGroup to leave."""
    leaving: bool = False
    """This worker was asked to leave (SIGTERM): it goes at the next agreed step boundary, after
    a commit. A loop may read it (e.g. to skip work that only the last step needs)."""

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
        steps_per_epoch = self.agent.sampler.steps_per_epoch()
        self.log.extend(self.epoch * steps_per_epoch + self.batch)
        self.step += 1
        self.epoch, self.batch = advance_cursor(self.epoch, self.batch, 1, steps_per_epoch)

    @property
    def committed(self) -> list[tuple[int, int]]:
        """(epoch, batch) of every committed step this worker saw or adopted, in order."""
        if self.agent is None:
            return []
        return self.log.cursors(self.agent.sampler.steps_per_epoch())

    def adopt(self, step: int) -> None:
        """Continue from `step` committed steps (a source's): the steps this worker's log
        lacks are the next global batches, those it has beyond are forgotten (a run starts at
        step 0 on batch (0, 0), so step N trains global batch N). O(1) in `step`."""
        assert self.agent is not None
        have = len(self.log)
        if step < have:
            self.log.truncate(step)
        else:
            self.log.extend(self.log.end, step - have)
        self.step = self.started = step
        self.epoch, self.batch = advance_cursor(0, 0, step, self.agent.sampler.steps_per_epoch())

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
    refused_store_entries: int = 0
    """Store entries and claims this worker ignored: unsigned, signed with another secret,
    or malformed."""
    left: bool = False
    """This worker left the job gracefully (it was asked to, by SIGTERM) before the end."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "member": self.member, "world_size": self.world_size, **self.state.as_dict(),
            "refused_store_entries": self.refused_store_entries, "left": self.left,
            "steps_per_epoch": self.state.agent.sampler.steps_per_epoch()
            if self.state.agent else 0,
            "steps_lost": sum(e.steps_lost for e in self.events),
            "events": [e.as_dict() for e in self.events],
            "committed": [list(c) for c in self.state.committed],
            "agent": self.agent_report,
        }


def _choose_source(
    state: ElasticState, model: nn.Module, optimizer: torch.optim.Optimizer | None,
    group: Group, membership: Membership, auth: StoreAuth, label: str,
) -> Adoption:
    """Which rank's state every rank takes: each signs its claim (under `label`) and
    all-gathers it on the control plane, and all choose alike (`choose_source`). Cost: one
    all-gather of ~200 bytes a rank and a finiteness pass over the local state; O(1) in the
    steps claimed."""
    mine = Claim(membership.member, state.step, state.started,
                 state_is_finite(model, optimizer))
    rows = all_gather_json(
        {"claim": auth.seal(label, membership.member, membership.generation, mine.as_json())},
        group=group.control)
    claims: list[Claim | None] = []
    for member, row in zip(membership.members, rows, strict=True):
        sealed = row.get("claim") if isinstance(row, dict) else None
        entry = auth.unseal(label, sealed, member) if isinstance(sealed, str) else None
        claims.append(Claim.from_json(entry.value) if entry is not None else None)
    return choose_source(claims, membership.members, membership.sources,
                         membership.step_limit)


@contextlib.contextmanager
def _leave_on_sigterm(state: ElasticState, enabled: bool) -> Iterator[None]:
    """While inside: SIGTERM sets `state.leaving` (a second one stops the process at once).
    Only the main thread may install a handler; elsewhere, and when not `enabled`, SIGTERM
    keeps its handler."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        if state.leaving:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        state.leaving = True

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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

    Start every worker the usual way (torchrun, or idla's launcher); one process works too,
    and can grow when it is given a store to be found in (``IDLA_RENDEZVOUS``, as a pool does).
    """
    elastic = elastic or ElasticConfig()
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a lost NCCL peer raises here
    world, member = env_int("WORLD_SIZE", 1), env_int("RANK", 0)
    joining = os.environ.get("IDLA_JOIN") == "1"
    secret = job_secret_from_env()
    rdzv = (Rendezvous(rendezvous_spec_from_env(), member, world, prefix=store_prefix(),
                       heartbeat_s=elastic.heartbeat_s, dead_after_s=elastic.dead_after_s,
                       joining=joining, secret=secret,
                       record_every_steps=elastic.record_every_steps)
            if world > 1 or joining or os.environ.get("IDLA_RENDEZVOUS") else None)
    auth = rdzv.auth if rdzv else StoreAuth(secret)
    state = ElasticState(faults=FaultInjector.from_env(rdzv.member if rdzv else member, rdzv))
    try:
        # A newcomer asked to leave while it waits is taken in first (its request may be
        # answered already), then leaves at its first boundary: it never vanishes mid-protocol.
        with _leave_on_sigterm(state, elastic.join_check_every_steps > 0):
            membership = ((rdzv.join() if joining else rdzv.current) if rdzv
                          else Membership(0, (0,), 0, (0,), 0))
            return _generations(train_fn, model, optimizer, dataset, config, elastic,
                                on_event, rdzv, membership, auth, state)
    finally:
        if rdzv is not None:
            rdzv.close()


def _open_group(elastic: ElasticConfig, rdzv: Rendezvous | None, membership: Membership
                ) -> Group:
    """This generation's group; a peer that never reports is a lost peer, not a mistake,
    once a rendezvous can re-form without it."""
    try:
        return Group(elastic.collective_timeout_s,
                     store=rdzv.pg_store(membership) if rdzv else None,
                     rank=membership.rank, world_size=membership.world_size)
    except ReportTimeout as error:
        if rdzv is None:
            raise
        raise PeerMissing(f"generation {membership.generation}: {error}") from None


def _generations(
    train_fn: Callable[[Agent, ElasticState], None], model: nn.Module,
    optimizer: torch.optim.Optimizer | None, dataset: Data, config: AgentConfig,
    elastic: ElasticConfig, on_event: Callable[[FailureEvent], None] | None,
    rdzv: Rendezvous | None, membership: Membership, auth: StoreAuth, state: ElasticState,
) -> ElasticReport:
    """One group after another, until `train_fn` returns or this worker leaves."""
    events: list[FailureEvent] = []
    while True:
        group: Group | None = None
        try:
            group = _open_group(elastic, rdzv, membership)
            state.membership_check = membership_check(rdzv, group, elastic,
                                                      lambda: state.leaving)
            label = rdzv.key(f"g{membership.generation}/claim") if rdzv else "claim"
            adoption = _choose_source(state, model, optimizer, group, membership, auth,
                                      label)
            # Not the agent's broadcast from rank 0: the source's state, on the control plane.
            agent = Agent(model, optimizer, dataset, config=config, group=group,
                          initial_state_rank=None)
            state.agent = agent
            if group.world_size > 1:
                broadcast_module_(model, adoption.source, group)
                if optimizer is not None:
                    broadcast_optimizer_(optimizer, adoption.source, group)
            state.adopt(adoption.step)
            if agent.pool_metrics is not None:
                agent.pool_metrics.start_at(membership.member, state.step, samples_before(
                    state.epoch, state.batch, agent.sampler.dataset_size,
                    config.global_batch_size))
            if adoption.refused and group.rank == 0:
                _log.warning("idla: not adopted: %s", "; ".join(adoption.refused))
            if events:
                events[-1].steps_lost = adoption.lost_steps
                events[-1].refused_claims = list(adoption.refused)
            train_fn(agent, state)
            agent.close()
            if agent.pool_metrics is not None:
                agent.pool_metrics.write(agent, "done")
            return ElasticReport(state, events, agent.report(), membership.member,
                                 group.world_size, len(auth.refused))
        except LeftGroup:
            assert state.agent is not None and group is not None  # only a step boundary raises it
            mark_closed(state.agent)  # the others re-form without it; nothing in flight
            group.close()
            if state.agent.pool_metrics is not None:
                state.agent.pool_metrics.write(state.agent, "left")
            return ElasticReport(state, events, state.agent.report(), membership.member,
                                 group.world_size, len(auth.refused), left=True)
        except RuntimeError as error:
            if rdzv is None or not is_peer_failure(error):
                raise
            if state.agent is not None:
                mark_closed(state.agent)  # its group is gone; the next generation takes over
            failed_at = time.time()
            if group is not None:
                group.close()
            before = set(membership.members)
            leaving = error.leaving if isinstance(error, MembershipChange) else ()
            membership, lost_members = rdzv.next(state.step, leaving)
            event = FailureEvent(
                generation=membership.generation, lost_members=lost_members,
                members=list(membership.members),
                error=f"{type(error).__name__}: {str(error)[:200]}",
                joined_members=sorted(set(membership.members) - before),
                failed_at=failed_at, declared_at=time.time(),
                fault_at=injected_fault_time(rdzv) if lost_members else None,
                left_members=list(leaving),
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
