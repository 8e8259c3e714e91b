"""The router's settings (`RouterConfig`) and the errors it answers a request with."""

from __future__ import annotations

from dataclasses import dataclass

from idla.errors import ConfigError, IdlaError
from idla.serve.policies import make_policy


class Overloaded(IdlaError):
    """Refused (429): no worker is predicted to answer within the latency target
    (``reason`` "deadline"), or every worker's queue is full ("queue_full"); the client should
    retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float, reason: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class Unavailable(IdlaError):
    """No healthy worker can answer (all died, or a request was retried too often)."""


@dataclass(kw_only=True, slots=True)
class RouterConfig:
    policy: str = "idla"
    """One of POLICIES."""
    max_queue_requests: int = 64
    """Requests a worker may hold queued; when every worker is full a request gets 429."""
    latency_target_s: float | None = None
    """Each request's deadline is its arrival plus this (seconds). A predictive policy (idla)
    refuses with 429 and Retry-After a request that no worker is predicted to answer by then,
    and a backlog is served in batches as big as the oldest deadline allows. None: no deadline
    (admission by the queue bound alone, batches of the budget-sized limit)."""
    work_stealing: bool = True
    """With a predictive policy, an idle worker takes queued requests that another worker would
    answer later than it can (`idla.serve.deadlines.steal_count`)."""
    adaptive_batching: bool = True
    """With a latency target, a worker with a backlog runs the largest batch (up to
    max_batch_rows) that still meets the oldest queued deadline."""
    batch_budget_s: float = 0.05
    """A batch's predicted service time stays within this (sets each worker's max batch)."""
    max_batch_rows: int = 256
    """Upper bound on any worker's batch, in rows (also the cap of adaptive batches)."""
    max_wait_cap_s: float = 0.005
    """Upper bound on the wait for a fuller batch (each worker waits its fixed cost α)."""
    max_wait_s: float | None = None
    """Force this batching wait on every worker instead (seconds)."""
    request_rows: int = 1
    """Rows of a typical request: every batch may hold at least one."""
    health_interval_s: float = 1.0
    """An idle worker is pinged after this many seconds without traffic."""
    health_timeout_s: float = 5.0
    """A ping unanswered this long marks a worker dead."""
    batch_timeout_floor_s: float = 10.0
    """A batch unanswered for max(this, 20 × its predicted time) marks the worker dead."""
    request_timeout_s: float = 30.0
    """A request waits at most this long for its answer (then 504)."""
    max_attempts: int = 3
    """A request is tried on at most this many workers (failover)."""
    load_timeout_s: float = 120.0
    """A model rollout not loaded on every worker within this many seconds is aborted (504)."""
    seed: int = 0

    def __post_init__(self) -> None:
        make_policy(self.policy)
        for name in ("max_queue_requests", "max_batch_rows", "request_rows", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("batch_budget_s", "health_interval_s", "health_timeout_s",
                     "request_timeout_s", "load_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} {getattr(self, name)} must be positive")
        if self.latency_target_s is not None and not 0 < self.latency_target_s < 3600:
            raise ConfigError(f"latency_target_s {self.latency_target_s} must be in (0, 3600)")
