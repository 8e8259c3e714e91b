"""Trust weights: a per-client memory of how often its updates looked like outliers.

Each round every update is scored against a robust center, the coordinate median of the round's
updates (Yin et al. 2018): its L2 distance to the center divided by the median of those
distances (so honest non-IID spread scores about 1 whatever the model's scale), and the cosine
between its direction (update − global) and the center's direction (center − global), in the
spirit of FLTrust (Cao et al. 2021). A client is an outlier in a round when its normalised
distance exceeds ``outlier_distance`` or its cosine is below ``min_cosine``.

Trust starts at 1, is multiplied by ``decay`` on every outlier round (so a repeated outlier
decays geometrically) and recovers by ``+recovery`` toward 1 on every honest round (so a client
with a transient fault earns its weight back slowly). Aggregation weights are samples × trust.
Cost per round: O(K·P) for the scores after the O(K·P·log K) median.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from idla.errors import ConfigError


@dataclass(frozen=True)
class UpdateScore:
    """How one update relates to the round's robust center."""

    distance: float
    """L2 distance between the update and the center."""
    normalized_distance: float
    """distance / median distance of the round (inf when that median is 0 and this is not)."""
    cosine: float
    """Cosine between the update's and the center's directions from the global model, in
    [-1, 1]; 1 when either direction is zero (nothing to disagree with)."""


def _flat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    if len(arrays) == 0:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def score_updates(
    updates: Sequence[Sequence[np.ndarray]],
    center: Sequence[np.ndarray],
    global_arrays: Sequence[np.ndarray] | None = None,
) -> list[UpdateScore]:
    """Score every update against ``center`` (normally ``coordinate_median(updates)``).

    Args:
        updates: The clients' new weights (or deltas), one list of arrays per client.
        center: The robust center, same shapes.
        global_arrays: The model the round started from; directions are taken from it. None
            measures directions from the origin (right when the updates are deltas).
    """
    center_flat = _flat(center)
    origin = _flat(global_arrays) if global_arrays is not None else np.zeros_like(center_flat)
    center_direction = center_flat - origin
    center_norm = float(np.linalg.norm(center_direction))
    flats = [_flat(update) for update in updates]
    distances = [float(np.linalg.norm(flat - center_flat)) for flat in flats]
    scale = float(np.median(distances)) if distances else 0.0
    tolerance = 1e-12 * (1.0 + float(np.linalg.norm(center_flat)))
    scores = []
    for flat, distance in zip(flats, distances, strict=True):
        if scale > tolerance:
            normalized = distance / scale
        else:
            normalized = 0.0 if distance <= tolerance else math.inf
        direction = flat - origin
        norm = float(np.linalg.norm(direction))
        if norm <= tolerance or center_norm <= tolerance:
            cosine = 1.0
        else:
            cosine = float(np.clip(direction @ center_direction / (norm * center_norm), -1.0, 1.0))
        scores.append(UpdateScore(distance, normalized, cosine))
    return scores


def _check_fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


class TrustTracker:
    """Per-client trust in [floor, 1], updated from each round's ``UpdateScore``s."""

    def __init__(
        self,
        decay: float = 0.5,
        recovery: float = 0.1,
        outlier_distance: float = 3.0,
        min_cosine: float = 0.0,
        floor: float = 0.0,
    ) -> None:
        self.decay = _check_fraction("trust decay", decay)
        self.recovery = _check_fraction("trust recovery", recovery)
        self.outlier_distance = _check_fraction(
            "trust outlier_distance", outlier_distance, 0.0, 1e300
        )
        if self.outlier_distance <= 0:
            raise ConfigError(f"trust outlier_distance must be > 0, got {outlier_distance}")
        self.min_cosine = _check_fraction("trust min_cosine", min_cosine, -1.0, 1.0)
        self.floor = _check_fraction("trust floor", floor)
        self._trust: dict[int, float] = {}
        self._outlier_rounds: dict[int, int] = {}

    def is_outlier(self, score: UpdateScore) -> bool:
        """Whether a score marks its update as an outlier this round."""
        return score.normalized_distance > self.outlier_distance or score.cosine < self.min_cosine

    def update(self, client_ids: Sequence[int], scores: Sequence[UpdateScore]) -> list[bool]:
        """Apply one round's scores; returns which clients were outliers."""
        if len(client_ids) != len(scores):
            raise ValueError(f"{len(client_ids)} client ids for {len(scores)} scores")
        outliers = []
        for client, score in zip(client_ids, scores, strict=True):
            trust = self._trust.get(client, 1.0)
            outlier = self.is_outlier(score)
            if outlier:
                trust = max(self.floor, trust * self.decay)
                self._outlier_rounds[client] = self._outlier_rounds.get(client, 0) + 1
            else:
                trust = min(1.0, trust + self.recovery)
            self._trust[client] = trust
            outliers.append(outlier)
        return outliers

    def trust(self, client_id: int) -> float:
        """The client's trust; 1 for a client never scored."""
        return self._trust.get(client_id, 1.0)

    def weights(self, client_ids: Sequence[int]) -> list[float]:
        """Trust of each client, in order."""
        return [self.trust(client) for client in client_ids]

    def outlier_rounds(self, client_id: int) -> int:
        """Rounds in which the client was an outlier."""
        return self._outlier_rounds.get(client_id, 0)

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state (client ids as string keys)."""
        return {
            "trust": {str(k): v for k, v in sorted(self._trust.items())},
            "outlier_rounds": {str(k): v for k, v in sorted(self._outlier_rounds.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (after a JSON round trip)."""
        try:
            trust = {int(k): float(v) for k, v in state["trust"].items()}
            rounds = {int(k): int(v) for k, v in state.get("outlier_rounds", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"trust state is malformed: {exc}") from exc
        if any(not 0.0 <= v <= 1.0 for v in trust.values()):
            raise ConfigError("trust state values must be in [0, 1]")
        self._trust = trust
        self._outlier_rounds = rounds
