"""Resource- and deadline-aware client selection for a federated round, pure and seeded.

Each client has a profile (compute speed, link speed, availability). With a round deadline
``D`` the agent predicts every client's finish time ``T_i`` (``predict_finish_s``) and gives it a
size score

    s_i = a_i · b_i · (1 if T_i ≤ D else ε)        b_i = ((p̄ + 1) / (p_i + 1))^γ

where ``a_i`` is the availability, ``p_i`` the client's past participation, ``p̄`` the mean
participation, ``γ`` the fairness exponent and ``ε`` the late weight (small but > 0). Inclusion
probabilities are proportional to size, ``π_i = k s_i / Σ s``, with the ones above 1 capped at 1
and the rest redistributed (the usual πps capping, at most k passes). Because every ``π_i > 0`` and
the fairness boost grows for a client that is never picked, every client is picked now and then;
in the long run a late client's share settles near ε^(1/(1+γ)) of an on-time client's.

Exactly k clients are then drawn without replacement by randomized systematic sampling (Madow
1949; Tillé 2006, "Sampling Algorithms", §7.2): shuffle the clients, lay the π_i end to end on
[0, k) and take the clients under the points u, u + 1, ..., u + k − 1 for one u ~ U[0, 1). Each
client is then drawn with probability exactly π_i, so the Horvitz–Thompson estimator
Σ_{i∈S} y_i / π_i of a population total Σ_i y_i is unbiased whatever the π_i; aggregation
weights ∝ samples / π_i make a federated aggregate an estimate of the full-population FedAvg.
Conditioned on the history, each round's estimate is unbiased, so the sequence is too.

Cost per round: O(N) for the predictions and scores, O(N·c) for capping (c ≤ k passes, usually
1), O(N) for the shuffle and the systematic draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_Float64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ClientProfile:
    """What the agent knows about one federated client."""

    client_id: int
    num_samples: int
    """Training samples the client holds."""
    samples_per_s: float
    """Local training throughput, samples per second."""
    link_bytes_per_s: float
    """Bandwidth of the client's link, bytes per second (the same up and down)."""
    availability: float = 1.0
    """Probability that the client is reachable in a round, in (0, 1]."""


@dataclass(frozen=True)
class Selection:
    """The clients drawn for one round and every client's inclusion probability."""

    client_ids: list[int]
    inclusion_probability: dict[int, float]


def predict_finish_s(profile: ClientProfile, local_epochs: int, model_bytes: int) -> float:
    """Predicted seconds from round start to the client's update arriving: local training
    (epochs × samples / samples_per_s) plus the model's download and upload over the link."""
    compute_s = local_epochs * profile.num_samples / profile.samples_per_s
    transfer_s = 2.0 * model_bytes / profile.link_bytes_per_s
    return compute_s + transfer_s


def work_fraction(
    profile: ClientProfile, local_epochs: int, model_bytes: int, deadline_s: float
) -> float:
    """Share of the local work (in [0, 1]) the client can do and still meet the deadline: the
    FedProx way of letting stragglers send a partial solution (Li et al. 2020, "Federated
    Optimization in Heterogeneous Networks"). 0 when the transfers alone miss it."""
    compute_s = local_epochs * profile.num_samples / profile.samples_per_s
    spare_s = deadline_s - 2.0 * model_bytes / profile.link_bytes_per_s
    if compute_s <= 0:
        return 1.0 if spare_s >= 0 else 0.0
    return float(min(1.0, max(0.0, spare_s / compute_s)))


def capped_probabilities(sizes: Sequence[float], sample_size: int) -> _Float64:
    """π_i ∝ sizes with Σ π = min(k, N) and every π_i ≤ 1 (πps with capping).

    Sizes must be positive. Cost: O(N) per pass, at most k passes.
    """
    size = np.asarray(sizes, dtype=np.float64)
    if size.size == 0:
        return size
    if np.any(~np.isfinite(size)) or np.any(size <= 0):
        raise ValueError("sizes must be finite and positive")
    k = min(sample_size, size.size)
    probability = np.zeros_like(size)
    capped = np.zeros(size.size, dtype=bool)
    while True:
        free = ~capped
        remaining = k - int(capped.sum())
        probability[capped] = 1.0
        probability[free] = remaining * size[free] / size[free].sum()
        over = free & (probability >= 1.0)
        if not np.any(over):
            return probability
        capped |= over


def systematic_sample(probability: _Float64, rng: np.random.Generator) -> list[int]:
    """Indices drawn by randomized systematic sampling: index i with probability exactly π_i,
    round(Σ π) indices in all, without replacement (needs every π_i ≤ 1). Cost O(N)."""
    count = round(float(probability.sum()))
    if count == 0:
        return []
    order = rng.permutation(probability.size)
    cumulative = np.cumsum(probability[order])
    cumulative *= count / cumulative[-1]  # remove rounding drift so that the points stay inside
    points = rng.random() + np.arange(count)
    positions = np.minimum(np.searchsorted(cumulative, points, side="right"), probability.size - 1)
    return sorted(int(order[p]) for p in positions)


def select_clients(
    profiles: Sequence[ClientProfile],
    clients_per_round: int,
    deadline_s: float | None,
    rng: np.random.Generator,
    participation: Mapping[int, int] | None = None,
    *,
    local_epochs: int = 1,
    model_bytes: int = 0,
    late_weight: float = 0.05,
    fairness: float = 1.0,
) -> Selection:
    """Draw ``clients_per_round`` clients (all of them when there are fewer).

    Without a deadline every client has π = k / N (uniform sampling without replacement, as
    Flower does). With one, sizes follow the module docstring and the draw is systematic.

    Args:
        profiles: Every known client.
        clients_per_round: k, the clients to draw (≥ 1).
        deadline_s: Round deadline in seconds, or None for uniform selection.
        rng: The seeded generator that makes the draw reproducible.
        participation: Rounds each client took part in so far (missing ids count 0).
        local_epochs: Epochs each client trains, for the finish-time prediction.
        model_bytes: Size of the model on the wire, for the finish-time prediction.
        late_weight: ε, the size factor of a client predicted to miss the deadline, in (0, 1].
        fairness: γ ≥ 0, how strongly under-represented clients are boosted (0: not at all).
    """
    if clients_per_round < 1:
        raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
    if not profiles:
        return Selection([], {})
    ids = [profile.client_id for profile in profiles]
    if deadline_s is None:
        k = min(clients_per_round, len(profiles))
        chosen = rng.choice(len(profiles), size=k, replace=False)
        uniform = k / len(profiles)
        return Selection(sorted(ids[i] for i in chosen), dict.fromkeys(ids, uniform))
    if not 0.0 < late_weight <= 1.0:
        raise ValueError(f"late_weight must be in (0, 1], got {late_weight}")
    counts = np.array([(participation or {}).get(i, 0) for i in ids], dtype=np.float64)
    boost = ((counts.mean() + 1.0) / (counts + 1.0)) ** fairness
    on_time = np.array(
        [predict_finish_s(p, local_epochs, model_bytes) <= deadline_s for p in profiles]
    )
    availability = np.array([min(1.0, max(p.availability, 1e-6)) for p in profiles])
    sizes = availability * boost * np.where(on_time, 1.0, late_weight)
    probability = capped_probabilities(sizes.tolist(), clients_per_round)
    chosen_positions = systematic_sample(probability, rng)
    return Selection(
        sorted(ids[i] for i in chosen_positions),
        {client: float(pi) for client, pi in zip(ids, probability, strict=True)},
    )
