"""The federated strategy, the Flower way: ``configure_round`` picks the clients and says what
they do, ``aggregate_round`` combines what came back (with the failures). It never opens a socket:
the simulation runtime and the Flower adapter move the arrays.

A round: selection (``idla.plan.selection``) → clients train from the global weights →
every update is validated (``idla.fl.wire.validate_update``, known id, selected this round, one
update per client) and a bad one is rejected with a reason while the round goes on → with a
deadline, updates that finish after it are **dropped** (listed in ``late``; they are not folded
into the next round: a late update was trained from an older global model, and dropping keeps
the round's aggregate a function of one global model; ``work_fraction`` in the task lets a slow
client send a partial solution in time instead, as FedProx does) → the robust center, trust
scores and the aggregator (``idla.fl.combine``) → the server optimizer (none: x + lr·Δ;
FedAdam / FedYogi).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

from idla.errors import ConfigError
from idla.fl.aggregate import ServerOptState, server_opt_step
from idla.fl.combine import combine_updates
from idla.fl.strategy_config import (
    AGGREGATORS,
    SELECTIONS,
    SERVER_OPTIMIZERS,
    StrategyConfig,
    check_profile,
)
from idla.fl.trust import TrustTracker
from idla.fl.wire import validate_update
from idla.plan.selection import ClientProfile, select_clients, work_fraction


@dataclass(frozen=True)
class ClientTask:
    """What one selected client does this round."""

    client_id: int
    weight_scale: float
    """Horvitz–Thompson factor 1 / (inclusion × availability), normalised so uniform is 1.0."""
    local_epochs: int = 1
    proximal_mu: float = 0.0
    """FedProx μ: the client adds μ/2 ‖w − w_global‖² to its loss (0: plain FedAvg)."""
    work_fraction: float = 1.0
    """Share of the local work to do so the update arrives by the deadline (1.0: all of it)."""


@dataclass(frozen=True, eq=False)
class ClientUpdate:
    """A client's new weights (not a delta) and when it finished."""

    client_id: int
    num_samples: int
    arrays: list[np.ndarray]
    finish_s: float = 0.0
    """Seconds from round start until the update arrived (emulated or measured)."""


@dataclass(frozen=True)
class Failure:
    """A selected client that sent nothing (unreachable, crashed)."""

    client_id: int
    reason: str


@dataclass
class RoundResult:
    """The new global weights and what happened to every client of the round."""

    arrays: list[np.ndarray]
    accepted: list[int]
    rejected: dict[int, str]
    late: list[int]
    round_s: float
    """The deadline when an update was late, else the last arrival (0 with no arrivals)."""
    trust: dict[int, float]
    failed: dict[int, str] = field(default_factory=dict)
    outliers: list[int] = field(default_factory=list)


class FedStrategy:
    """Selection, validation, robust aggregation, trust and the server optimizer for FL rounds."""

    def __init__(self, config: StrategyConfig, known_clients: Sequence[ClientProfile]) -> None:
        self.config = config
        self._profiles: dict[int, ClientProfile] = {}
        for profile in known_clients:
            check_profile(profile)
            if profile.client_id in self._profiles:
                raise ConfigError(f"client id {profile.client_id} appears twice")
            self._profiles[profile.client_id] = profile
        self._rng = np.random.default_rng(config.seed)
        self._trust = TrustTracker(
            decay=config.trust_decay,
            recovery=config.trust_recovery,
            outlier_distance=config.trust_outlier_distance,
            min_cosine=config.trust_min_cosine,
            floor=config.trust_floor,
        )
        self._opt_state = ServerOptState()
        self._round_index: int | None = None
        self._tasks: dict[int, ClientTask] = {}
        self._counts: dict[str, dict[int, int]] = {
            key: dict.fromkeys(self._profiles, 0)
            for key in ("selected", "accepted", "rejected", "late", "failed", "outlier")
        }
        self._rounds = 0
        self._selection_stats: list[dict[str, float]] = []

    @property
    def trust(self) -> TrustTracker:
        """The per-client trust tracker."""
        return self._trust

    def configure_round(
        self, round_index: int, initial_or_global: list[np.ndarray], model_bytes: int
    ) -> list[ClientTask]:
        """Draw this round's clients and their tasks (the global weights go to each of them)."""
        del initial_or_global  # every client gets the same weights; kept for Flower's shape
        cfg = self.config
        profiles = list(self._profiles.values())
        deadline = cfg.deadline_s if cfg.selection == "deadline" else None
        selection = select_clients(
            profiles,
            cfg.clients_per_round,
            deadline,
            self._rng,
            self._counts["selected"],
            local_epochs=cfg.local_epochs,
            model_bytes=model_bytes,
            late_weight=cfg.late_weight,
            fairness=cfg.fairness,
        )
        uniform = len(selection.client_ids) / max(1, len(profiles))
        tasks = []
        on_time = 0
        for client in selection.client_ids:
            profile = self._profiles[client]
            scale = 1.0
            if deadline is not None and cfg.reweight:
                response = selection.inclusion_probability[client] * profile.availability
                scale = uniform / response
            fraction = 1.0
            if deadline is not None:
                fraction = work_fraction(profile, cfg.local_epochs, model_bytes, deadline)
            on_time += fraction >= 1.0
            tasks.append(ClientTask(client, scale, cfg.local_epochs, cfg.proximal_mu, fraction))
            self._counts["selected"][client] += 1
        self._round_index = round_index
        self._tasks = {task.client_id: task for task in tasks}
        probabilities = list(selection.inclusion_probability.values()) or [0.0]
        self._selection_stats.append(
            {
                "selected": float(len(tasks)),
                "predicted_on_time": float(on_time),
                "min_inclusion_probability": float(min(probabilities)),
                "max_inclusion_probability": float(max(probabilities)),
            }
        )
        return tasks

    def _screen(
        self,
        round_index: int,
        reference: list[np.ndarray],
        updates: Sequence[ClientUpdate],
        refused: Mapping[int, str],
    ) -> tuple[list[ClientUpdate], dict[int, str], list[int]]:
        """Split the updates into usable, rejected (with reasons) and late. A client that sent
        several updates (the refused ones count) has all of them rejected: nothing says which
        one is its own."""
        counts: dict[int, int] = dict.fromkeys(refused, 1)
        for update in updates:
            counts[update.client_id] = counts.get(update.client_id, 0) + 1
        usable: list[ClientUpdate] = []
        rejected: dict[int, str] = {int(c): str(r) for c, r in refused.items()}
        late: list[int] = []
        for update in updates:
            client = update.client_id
            reason = self._reject_reason(round_index, reference, update)
            if reason is None and counts[client] > 1:
                reason = f"client {client} sent {counts[client]} updates in round {round_index}"
            if reason is not None:
                rejected.setdefault(client, reason)
            elif self.config.deadline_s is not None and update.finish_s > self.config.deadline_s:
                late.append(client)
            else:
                usable.append(update)
        return usable, rejected, late

    def _reject_reason(
        self, round_index: int, reference: list[np.ndarray], update: ClientUpdate
    ) -> str | None:
        client = update.client_id
        if client not in self._profiles:
            return f"unknown client id {client!r}"
        if round_index != self._round_index or client not in self._tasks:
            return f"client {client} was not selected for round {round_index}"
        samples = update.num_samples
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            return f"num_samples must be a positive integer, got {samples!r}"
        finish = update.finish_s
        if (
            isinstance(finish, bool)
            or not isinstance(finish, (int, float))
            or not (math.isfinite(finish) and finish >= 0)
        ):
            return f"finish_s must be a finite number >= 0, got {finish!r}"
        if not isinstance(update.arrays, (list, tuple)):
            return f"arrays must be a list of numpy arrays, got {type(update.arrays).__name__}"
        return validate_update(update.arrays, reference)

    def aggregate_round(
        self,
        round_index: int,
        global_arrays: list[np.ndarray],
        updates: Sequence[ClientUpdate],
        failures: Sequence[Failure],
        refused: Mapping[int, str] | None = None,
    ) -> RoundResult:
        """Combine this round's updates into new global weights; bad updates are rejected with a
        reason (never raised), late ones dropped. No usable update: the global weights stay.

        ``refused``: client → reason for updates that the transport could not even decode
        (``idla.fl.wire``); they are rejected and counted like the others.
        """
        cfg = self.config
        reference = [np.asarray(a) for a in global_arrays]
        usable, rejected, late = self._screen(round_index, reference, updates, refused or {})
        failed = {f.client_id: str(f.reason) for f in failures}
        if late and cfg.deadline_s is not None:
            round_s = float(cfg.deadline_s)
        else:
            round_s = max((_arrival_s(u) for u in updates), default=0.0)
        accepted = [u.client_id for u in usable]
        outliers: list[int] = []
        if usable:
            new_arrays, outliers = self._combine(reference, usable)
        else:
            new_arrays = [a.copy() for a in reference]
        self._record(accepted, rejected, late, failed, outliers)
        self._rounds += 1
        self._tasks = {}
        trust = {client: self._trust.trust(client) for client in (*accepted, *late, *rejected)}
        return RoundResult(new_arrays, accepted, rejected, late, round_s, trust, failed, outliers)

    def _combine(
        self, reference: list[np.ndarray], usable: list[ClientUpdate]
    ) -> tuple[list[np.ndarray], list[int]]:
        ids = [u.client_id for u in usable]
        samples = [float(u.num_samples) * self._tasks[u.client_id].weight_scale for u in usable]
        aggregate, outliers = combine_updates(
            self.config, reference, [u.arrays for u in usable], ids, samples, self._trust)
        return self._server_step(reference, aggregate), outliers

    def _server_step(
        self, reference: list[np.ndarray], aggregate: list[np.ndarray]
    ) -> list[np.ndarray]:
        cfg = self.config
        lr = float(cfg.server_lr if cfg.server_lr is not None else 1.0)
        if cfg.server_optimizer == "none":
            if lr == 1.0:
                return aggregate
            return [
                (x.astype(np.float64) + lr * (a.astype(np.float64) - x)).astype(x.dtype)
                for x, a in zip(reference, aggregate, strict=True)
            ]
        kind: Literal["adam", "yogi"] = "adam" if cfg.server_optimizer == "adam" else "yogi"
        delta = [
            a.astype(np.float64) - x.astype(np.float64)
            for x, a in zip(reference, aggregate, strict=True)
        ]
        new_arrays, self._opt_state = server_opt_step(
            reference,
            delta,
            self._opt_state,
            kind,
            lr,
            cfg.server_beta1,
            cfg.server_beta2,
            cfg.server_tau,
        )
        return new_arrays

    def _record(
        self,
        accepted: list[int],
        rejected: dict[int, str],
        late: list[int],
        failed: dict[int, str],
        outliers: list[int],
    ) -> None:
        for key, clients in (
            ("accepted", accepted),
            ("rejected", list(rejected)),
            ("late", late),
            ("failed", list(failed)),
            ("outlier", outliers),
        ):
            for client in clients:
                if client in self._profiles:
                    self._counts[key][client] += 1

    def report(self) -> dict[str, Any]:
        """JSON-safe summary: participation and trust per client, totals, selection stats."""
        stats = self._selection_stats
        selected = sum(s["selected"] for s in stats)
        return {
            "rounds": self._rounds,
            "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
            "participation": {
                str(client): {key: counts[client] for key, counts in self._counts.items()}
                for client in self._profiles
            },
            "trust": {str(client): self._trust.trust(client) for client in self._profiles},
            "totals": {key: sum(counts.values()) for key, counts in self._counts.items()},
            "selection": {
                "rounds": len(stats),
                "mean_selected": selected / len(stats) if stats else 0.0,
                "predicted_on_time_fraction": (
                    sum(s["predicted_on_time"] for s in stats) / selected if selected else 1.0
                ),
                "min_inclusion_probability": min(
                    (s["min_inclusion_probability"] for s in stats), default=0.0
                ),
                "never_selected": sum(1 for n in self._counts["selected"].values() if n == 0),
            },
        }


def _arrival_s(update: ClientUpdate) -> float:
    finish = update.finish_s
    if isinstance(finish, (int, float)) and math.isfinite(finish) and finish >= 0:
        return float(finish)
    return 0.0


__all__ = [
    "AGGREGATORS",
    "SELECTIONS",
    "SERVER_OPTIMIZERS",
    "ClientTask",
    "ClientUpdate",
    "Failure",
    "FedStrategy",
    "RoundResult",
    "StrategyConfig",
]
