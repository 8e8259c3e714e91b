"""Aggregation math for federated and data-parallel rounds, as pure functions.

A model is "NDArrays": a list of numpy arrays, one per layer, in a fixed order. Every function
takes one such list per client, computes in float64 and returns arrays cast back to the dtype of
the first client's arrays (integer layers such as counters are rounded). On float inputs they
match Flower's ``flwr.server.strategy.aggregate`` functions (``aggregate``, ``aggregate_median``,
``aggregate_trimmed_avg``, ``aggregate_krum``) and the FedAdam / FedYogi update rules of
``flwr.server.strategy.fedadam`` / ``fedyogi``; ``tests/unit/test_fl_aggregate.py`` checks this
against the real package.

Costs, with K clients and P parameters in all: weighted mean O(K·P); coordinate median and
trimmed mean O(K·P·log K) (a sort per coordinate); Krum O(K²·P) for the pairwise distances;
centered clipping O(L·K·P) for L iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

NDArrays = list[np.ndarray]
_Float64 = npt.NDArray[np.float64]


def _check(updates: Sequence[Sequence[np.ndarray]]) -> None:
    if len(updates) == 0:
        raise ValueError("at least one update is needed")
    num_layers = len(updates[0])
    for index, update in enumerate(updates):
        if len(update) != num_layers:
            raise ValueError(f"update {index} has {len(update)} arrays, expected {num_layers}")


def _matrix(updates: Sequence[Sequence[np.ndarray]]) -> _Float64:
    """Every client's arrays flattened into one float64 row: (K, P)."""
    _check(updates)
    sizes = [int(np.size(a)) for a in updates[0]]
    matrix = np.empty((len(updates), sum(sizes)), dtype=np.float64)
    for row, update in enumerate(updates):
        offset = 0
        for array, size in zip(update, sizes, strict=True):
            if int(np.size(array)) != size:
                raise ValueError(
                    f"update {row} has an array of {np.size(array)} values, not {size}"
                )
            matrix[row, offset : offset + size] = np.asarray(array, dtype=np.float64).ravel()
            offset += size
    return matrix


def _unflatten(vector: _Float64, like: Sequence[np.ndarray]) -> NDArrays:
    """Cut a (P,) vector back into arrays shaped and typed like ``like``."""
    result: NDArrays = []
    offset = 0
    for reference in like:
        ref = np.asarray(reference)
        result.append(_like(vector[offset : offset + ref.size].reshape(ref.shape), ref))
        offset += ref.size
    return result


def _like(values: _Float64, reference: np.ndarray) -> np.ndarray:
    """Cast back to the reference dtype; integer layers (counters) are rounded, not truncated."""
    if np.issubdtype(reference.dtype, np.floating):
        return np.asarray(values, dtype=reference.dtype)
    if reference.dtype.kind in "iub":
        return np.asarray(np.rint(values), dtype=reference.dtype)
    return np.asarray(values, dtype=np.float64)


def weighted_mean(updates: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> NDArrays:
    """Σ_k w_k x_k / Σ_k w_k per layer (FedAvg, McMahan et al. 2017, when w_k = samples).

    Args:
        updates: One list of arrays per client, all with the same shapes.
        weights: One non-negative weight per client, with a positive sum.

    Cost: O(K·P) time (one matrix-vector product), O(K·P) memory.
    """
    _check(updates)
    if len(weights) != len(updates):
        raise ValueError(f"{len(weights)} weights for {len(updates)} updates")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and sum to more than 0")
    return _unflatten((w / w.sum()) @ _matrix(updates), updates[0])


def coordinate_median(updates: Sequence[Sequence[np.ndarray]]) -> NDArrays:
    """Median of every coordinate across clients (Yin et al. 2018, "Byzantine-Robust
    Distributed Learning"); the mean of the two middle values for an even client count.

    Cost: O(K·P·log K) time (a sort per coordinate, faster here than numpy's partition-based
    median along the strided axis), O(K·P) memory.
    """
    ordered = np.sort(_matrix(updates), axis=0)
    count = ordered.shape[0]
    middle = ordered[count // 2]
    if count % 2 == 0:
        middle = 0.5 * (ordered[count // 2 - 1] + middle)
    return _unflatten(middle, updates[0])


def trimmed_mean(updates: Sequence[Sequence[np.ndarray]], trim_fraction: float) -> NDArrays:
    """Coordinate-wise mean after cutting ⌊trim_fraction·K⌋ clients at each end (Yin et al. 2018).

    Args:
        updates: One list of arrays per client.
        trim_fraction: Share of the clients cut at each end, in [0, 0.5).

    Cost: O(K·P·log K) time (a sort per coordinate), O(K·P) memory.
    """
    _check(updates)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    ordered = np.sort(_matrix(updates), axis=0)
    count = ordered.shape[0]
    cut = int(trim_fraction * count)
    return _unflatten(ordered[cut : count - cut].mean(axis=0), updates[0])


def krum_scores(updates: Sequence[Sequence[np.ndarray]], num_malicious: int) -> _Float64:
    """Krum score of each client: the sum of squared L2 distances to its K − f − 2 nearest
    other clients (at least one), as in Blanchard et al. 2017, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent".

    The distances come from one Gram matrix of the rows centered on their mean, which keeps the
    ‖a‖² + ‖b‖² − 2a·b form free of cancellation when the updates are close together.
    Cost: O(K²·P) time in one matrix product, O(K·P + K²) memory.
    """
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    flat = _matrix(updates)
    flat -= flat.mean(axis=0)
    gram = flat @ flat.T
    squared_norms = np.diag(gram)
    distances = np.maximum(squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram, 0.0)
    num_clients = len(updates)
    num_closest = max(1, num_clients - num_malicious - 2)
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, :num_closest]
    return np.where(np.isfinite(nearest), nearest, 0.0).sum(axis=1)


def krum(
    updates: Sequence[Sequence[np.ndarray]],
    num_malicious: int,
    num_selected: int = 1,
    weights: Sequence[float] | None = None,
) -> tuple[NDArrays, list[int]]:
    """Krum / multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018).

    Krum (``num_selected`` = 1) returns the update with the lowest score; multi-Krum returns the
    mean of the ``num_selected`` lowest-scored updates, weighted by ``weights`` when given (Flower's
    ``aggregate_krum`` weights them by their sample counts) and plain otherwise.

    Returns:
        The aggregate and the indices of the chosen updates, best first.

    Cost: O(K²·P) time (see ``krum_scores``).
    """
    scores = krum_scores(updates, num_malicious)
    if not 1 <= num_selected <= len(updates):
        raise ValueError(f"num_selected must be in [1, {len(updates)}], got {num_selected}")
    chosen = [int(i) for i in np.argsort(scores, kind="stable")[:num_selected]]
    chosen_weights = [1.0] * len(chosen) if weights is None else [weights[i] for i in chosen]
    aggregate = weighted_mean([updates[i] for i in chosen], chosen_weights)
    return aggregate, chosen


def clipping_radius(updates: Sequence[Sequence[np.ndarray]], center: Sequence[np.ndarray]) -> float:
    """τ for ``centered_clipping`` from the round itself: the median L2 distance of the updates
    to ``center``. At least half of the updates reach the center unclipped whatever their
    scale, and fewer than half (the attackers) cannot move the radius past the honest range.

    Cost: O(K·P).
    """
    flat = _matrix(updates)
    start = _matrix([center])[0]
    return float(np.median(np.linalg.norm(flat - start, axis=1)))


def centered_clipping(
    updates: Sequence[Sequence[np.ndarray]],
    center: Sequence[np.ndarray],
    radius: float,
    iterations: int = 3,
    weights: Sequence[float] | None = None,
) -> NDArrays:
    """Centered clipping (Karimireddy, He & Jaggi 2021, "Learning from History for Byzantine
    Robust Optimization", ICML): L times, v ← v + (1/K) Σ_k clip_τ(x_k − v) with
    clip_τ(d) = d · min(1, τ / ‖d‖), starting from ``center``.

    Every client moves v by at most τ/K per iteration however far it is, so f attackers move it
    by at most f·τ/K; clients within τ of v count fully, so with a large radius this is the
    plain mean. Clients count equally (a client's sample count is its own claim).

    Args:
        updates: One list of arrays per client.
        center: Where v starts (a robust estimate, e.g. the coordinate median).
        radius: τ ≥ 0 (see ``clipping_radius``); 0 returns ``center``.
        iterations: L ≥ 1.

    Cost: O(L·K·P) time, O(K·P) memory.
    """
    if not (np.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    flat = _matrix(updates)
    value = _matrix([center])[0]
    if value.size != flat.shape[1]:
        raise ValueError(f"center has {value.size} values, the updates {flat.shape[1]}")
    share = np.full(len(updates), 1.0 / len(updates))
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != share.shape or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("weights must be one finite, non-negative value per update, sum > 0")
        share = w / w.sum()
    for _ in range(iterations):
        offsets = flat - value
        norms = np.linalg.norm(offsets, axis=1)
        scale = np.minimum(1.0, radius / np.maximum(norms, np.finfo(np.float64).tiny))
        value = value + (share * scale) @ offsets
    return _unflatten(value, updates[0])


@dataclass
class ServerOptState:
    """Moments of the server optimizer, one array per layer (empty before the first step)."""

    first_moment: list[_Float64] = field(default_factory=list)
    """m_t: exponential average of the pseudo-gradients."""
    second_moment: list[_Float64] = field(default_factory=list)
    """v_t: (Adam) exponential average or (Yogi) additive estimate of their squares."""
    step: int = 0
    """Steps taken so far."""


def server_opt_step(
    params: Sequence[np.ndarray],
    pseudo_gradient: Sequence[np.ndarray],
    state: ServerOptState,
    kind: Literal["adam", "yogi"],
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[NDArrays, ServerOptState]:
    """One FedAdam / FedYogi server step (Reddi et al. 2021, "Adaptive Federated Optimization").

    ``pseudo_gradient`` is Reddi's Δ_t = aggregate − params (the direction to move, not a loss
    gradient). With m, v starting at 0:

        m_t = β₁ m + (1 − β₁) Δ
        Adam: v_t = β₂ v + (1 − β₂) Δ²
        Yogi: v_t = v − (1 − β₂) Δ² sign(v − Δ²)
        x_t = x + η_t m_t / (√v_t + τ)

    Yogi uses η_t = lr. Adam uses Flower's bias-corrected rate η_t = lr √(1 − β₂^(t+1)) /
    (1 − β₁^(t+1)) with t the 1-based step (Flower passes its server round, which starts at 1);
    the client learning rate η_l is the client's business and plays no part here.

    Cost: O(P) time and 2·P floats of state.
    """
    if len(params) != len(pseudo_gradient):
        raise ValueError(f"{len(params)} params but {len(pseudo_gradient)} pseudo-gradient arrays")
    deltas = [np.asarray(d, dtype=np.float64) for d in pseudo_gradient]
    first = state.first_moment or [np.zeros_like(d) for d in deltas]
    second = state.second_moment or [np.zeros_like(d) for d in deltas]
    new_first = [beta1 * m + (1.0 - beta1) * d for m, d in zip(first, deltas, strict=True)]
    if kind == "adam":
        new_second = [
            beta2 * v + (1.0 - beta2) * d * d for v, d in zip(second, deltas, strict=True)
        ]
    elif kind == "yogi":
        new_second = [
            v - (1.0 - beta2) * d * d * np.sign(v - d * d)
            for v, d in zip(second, deltas, strict=True)
        ]
    else:
        raise ValueError(f"kind must be 'adam' or 'yogi', got {kind!r}")
    step = state.step + 1
    rate = lr
    if kind == "adam":
        rate = lr * np.sqrt(1.0 - beta2 ** (step + 1.0)) / (1.0 - beta1 ** (step + 1.0))
    new_params = [
        _like(np.asarray(x, dtype=np.float64) + rate * m / (np.sqrt(v) + tau), np.asarray(x))
        for x, m, v in zip(params, new_first, new_second, strict=True)
    ]
    return new_params, ServerOptState(new_first, new_second, step)
