"""Elastic membership: what counts as a lost peer, how fast it is noticed, and the re-form
events. The run loop that uses it is `idla.agent.elastic.run_elastic`.

The survivors meet in the store (`idla.elastic.rendezvous`), open a new gloo group and adopt the
most advanced credible replica's state (`idla.elastic.adoption`, `idla.elastic.state_transfer`).
Why not torchft: see the README.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from idla.elastic.rendezvous import Rendezvous
from idla.errors import ConfigError, IdlaError
from idla.runtime.group import Group

# What gloo and the store say when a peer is gone; anything else is a bug, not a failure.
_PEER_FAILURE_MARKS = (
    "gloo", "connection", "read error", "write error", "timed out", "timeout", "broken pipe",
    "reset by peer", "socket", "closed", "aborted",
    "nccl", "watchdog",  # NCCL's (with TORCH_NCCL_BLOCKING_WAIT=1, a DistBackendError anyway)
)


class PeerMissing(RuntimeError):
    """A member of a new generation never reported its device (it died or was stopped before
    the group formed): the others re-form without it."""


class MembershipChange(RuntimeError):
    """Raised at a step boundary on every rank that stays when a newcomer asks to join or a
    member asks to leave."""

    def __init__(self, message: str, leaving: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.leaving = leaving
        """Members that leave at this boundary (they do not come to the re-form)."""


class LeftGroup(Exception):
    """Raised at the agreed step boundary on a member that asked to leave (SIGTERM); caught by
    `run_elastic`, which returns its report with ``left=True``. Not a RuntimeError, so that a
    training loop's ``except RuntimeError`` does not swallow it."""


def is_peer_failure(error: BaseException) -> bool:
    """True for the errors a dead, partitioned or silent peer causes in a collective (and for
    a planned membership change)."""
    if isinstance(error, IdlaError) or not isinstance(error, RuntimeError):
        return False
    if isinstance(error, dist.DistError | MembershipChange | PeerMissing):
        return True
    text = str(error).lower()
    return any(mark in text for mark in _PEER_FAILURE_MARKS)


@dataclass(kw_only=True, slots=True)
class ElasticConfig:
    """How fast failures are noticed and how long survivors wait for each other."""

    collective_timeout_s: float = 5.0
    """A collective that waits longer than this for a peer fails (PyTorch's default: 30 min).
    It must exceed the slowest worker's step; a killed peer is noticed at once (TCP reset)."""
    heartbeat_s: float = 0.5
    """How often each worker bumps its heartbeat counter in the store."""
    dead_after_s: float = 3.0
    """A member whose heartbeat has not moved for this long is declared dead at a re-form."""
    min_workers: int = 1
    """Stop with an error when fewer workers than this survive."""
    join_check_every_steps: int = 5
    """Every this many steps the ranks agree on membership changes: rank 0 looks for newcomers
    asking to join, and members asked to leave (SIGTERM) say so; 0: never (SIGTERM is then not
    caught, and a stopped worker is a lost one)."""
    record_every_steps: int = 5
    """Every worker records its committed step in the store every this many steps; a re-form
    refuses to adopt a claim beyond the latest record plus this many steps."""

    def __post_init__(self) -> None:
        if self.collective_timeout_s <= 0:
            raise ConfigError("collective_timeout_s must be positive")
        if not 0 < self.heartbeat_s < self.dead_after_s:
            raise ConfigError("heartbeat_s must be positive and shorter than dead_after_s")
        if self.min_workers < 1:
            raise ConfigError("min_workers must be at least 1")
        if self.join_check_every_steps < 0:
            raise ConfigError("join_check_every_steps must be 0 or more")
        if self.record_every_steps < 1:
            raise ConfigError("record_every_steps must be at least 1")


@dataclass
class FailureEvent:
    """One re-form: who was lost, when it was noticed, what it cost."""

    generation: int
    lost_members: list[int]
    members: list[int]
    error: str
    joined_members: list[int]
    """Newcomers taken in at this re-form."""
    failed_at: float
    """time.time() when this worker's collective failed (or the change was noticed)."""
    declared_at: float
    """time.time() when the new member list (naming the lost) was known."""
    fault_at: float | None = None
    """time.time() when an injected fault struck (fault-injection runs only)."""
    steps_lost: int = 0
    """Steps whose computation was thrown away (started by some survivor, committed by none)."""
    refused_claims: list[str] = field(default_factory=list)
    """Claims not adopted at this re-form (a newcomer's progress, a non-finite state, more
    steps than the store's records allow), one line each."""
    left_members: list[int] = field(default_factory=list)
    """Members that left gracefully at this re-form (asked to, at an agreed step boundary)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation, "lost_members": self.lost_members,
            "joined_members": self.joined_members, "members": self.members,
            "error": self.error, "failed_at": self.failed_at,
            "declared_at": self.declared_at, "fault_at": self.fault_at,
            "steps_lost": self.steps_lost, "refused_claims": self.refused_claims,
            "left_members": self.left_members,
        }


def env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    if not text.isdigit():
        raise ConfigError(f"environment variable {name}={text!r} is not an integer")
    return int(text)


def store_prefix() -> str:
    """Store keys of this run: torchrun's run id and restart count keep runs apart."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    return f"idla-elastic/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"



_JOIN, _LEAVE = 1, 2  # bits of each rank's word in the membership all-gather


def membership_check(
    rdzv: Rendezvous | None, group: Group, config: ElasticConfig,
    leaving: Callable[[], bool] = lambda: False,
) -> Callable[[int], None] | None:
    """The check before each step of a generation: at its first step and every
    `record_every_steps` steps this worker records its committed step in the store; every
    `join_check_every_steps` steps the ranks all-gather one word each (rank 0: a newcomer asked
    to join; any rank: `leaving()`, it was asked to leave), so that all ranks learn of a change
    at the same step boundary, after the same commit. A leaving rank raises `LeftGroup`, the
    others `MembershipChange` naming the leavers. Cost: one all-gather of one int64 a rank every
    `join_check_every_steps` steps. Without a rendezvous (one process) a leave is local: it is
    seen before the next step."""
    every_steps = config.join_check_every_steps
    if rdzv is None:
        if every_steps == 0:
            return None

        def alone(step: int) -> None:
            if leaving():
                raise LeftGroup(f"left at step {step}")

        return alone
    members = rdzv.current.members
    last_checked: list[int] = []  # the step checked last in this generation

    def check(step: int) -> None:
        if last_checked and last_checked[0] == step:
            return
        if not last_checked or step % config.record_every_steps == 0:
            rdzv.record_commit(step)
        last_checked[:] = [step]
        if every_steps == 0 or step == 0 or step % every_steps:
            return
        mine = ((_JOIN if group.rank == 0 and rdzv.join_pending() else 0)
                | (_LEAVE if leaving() else 0))
        words = [int(t.item()) for t in group.control_all_gather(torch.tensor([mine]))]
        leavers = tuple(m for m, word in zip(members, words, strict=True) if word & _LEAVE)
        if words[group.rank] & _LEAVE:
            raise LeftGroup(f"left at step {step}")
        if leavers:
            raise MembershipChange(f"member(s) {list(leavers)} left at step {step}", leavers)
        if words[0] & _JOIN:
            raise MembershipChange("a newcomer asked to join")

    return check
