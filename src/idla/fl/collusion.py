"""Colluding attacks: the malicious clients of a round craft one update together from the honest
updates' statistics, so that it hides inside their spread, as pure functions.

Threat model: omniscient colluders. Each round the attackers see every honest update of the
round (w_k − w for the honest clients k), know how many clients the server aggregates, and all
send the same crafted update; they do not know which aggregator runs. This is the standard
setting of the papers below (Baruch et al. also estimate the statistics from the colluders' own
honest updates; seeing the real ones only makes the attack stronger).

- ``alie`` ("A Little Is Enough", Baruch, Baruch & Goldberg, NeurIPS 2019): Δ = μ − z·σ per
  coordinate, μ and σ the mean and standard deviation of the honest updates and z the largest
  value for which the attackers can still expect the majority on their side:
  s = ⌊n/2 + 1⌋ − m honest supporters needed, z = Φ⁻¹((n − s) / n) for n clients, m of them
  malicious (n = 10, m = 3: z = 0.52). Every coordinate stays within z standard deviations of
  the mean, inside the honest spread, so coordinate median, trimmed mean and Krum keep it.
- ``ipm`` (Inner-Product Manipulation, Xie, Koyejo & Gupta, UAI 2019): Δ = −ε·μ, whose inner
  product with the true mean is −ε‖μ‖² < 0; ε = ``IPM_EPSILON`` (0.1, the value of
  Karimireddy et al. 2021 and 2022) keeps it small enough to sit among the honest updates.
- ``minmax`` (Min-Max, Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine"):
  Δ = μ − γ·σ with the largest γ for which Δ is no farther from any honest update than the two
  farthest honest updates are from each other (their "inverse standard deviation" direction);
  γ by bisection.

Cost, for h honest updates of P parameters: ALIE and IPM O(h·P); Min-Max O(h²·P) for the largest
pairwise distance plus O(h·P) per bisection step (``_BISECTION_STEPS``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from idla.fl.attacks import COLLUDING, Attack

IPM_EPSILON = 0.1
_BISECTION_STEPS = 40
_Float64 = npt.NDArray[np.float64]


def alie_z(num_clients: int, num_malicious: int) -> float:
    """ALIE's z for n clients of which m are malicious (Baruch et al. 2019, §3):
    s = ⌊n/2 + 1⌋ − m, z = Φ⁻¹((n − s) / n); s is held ≥ 1 so that z stays finite when the
    attackers already hold a majority. 0 for fewer than 2 clients."""
    if num_clients < 2:
        return 0.0
    if not 0 <= num_malicious <= num_clients:
        raise ValueError(f"num_malicious must be in [0, {num_clients}], got {num_malicious}")
    supporters = max(1, math.floor(num_clients / 2 + 1) - num_malicious)
    return NormalDist().inv_cdf((num_clients - supporters) / num_clients)


def _deltas(
    global_arrays: Sequence[np.ndarray], honest: Sequence[Sequence[np.ndarray]]
) -> _Float64:
    """(h, P): every honest update w_k − w flattened."""
    if len(honest) == 0:
        raise ValueError("a colluding attack needs at least one honest update")
    origin = np.concatenate([np.asarray(g, dtype=np.float64).ravel() for g in global_arrays])
    rows = []
    for index, update in enumerate(honest):
        if len(update) != len(global_arrays):
            raise ValueError(f"update {index} has {len(update)} arrays, expected "
                             f"{len(global_arrays)}")
        flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in update])
        if flat.size != origin.size:
            raise ValueError(f"update {index} has {flat.size} values, expected {origin.size}")
        rows.append(flat - origin)
    return np.stack(rows)


def _weights(global_arrays: Sequence[np.ndarray], delta: _Float64) -> list[np.ndarray]:
    """w + Δ cut into arrays shaped and typed like the global model."""
    result = []
    offset = 0
    for reference in global_arrays:
        ref = np.asarray(reference)
        part = delta[offset : offset + ref.size].reshape(ref.shape)
        result.append((ref.astype(np.float64) + part).astype(ref.dtype))
        offset += ref.size
    return result


def alie(
    global_arrays: Sequence[np.ndarray],
    honest: Sequence[Sequence[np.ndarray]],
    num_clients: int,
    num_malicious: int,
) -> list[np.ndarray]:
    """The ALIE update w + μ − z·σ (see the module docstring); z from ``alie_z``."""
    deltas = _deltas(global_arrays, honest)
    z = alie_z(num_clients, num_malicious)
    return _weights(global_arrays, deltas.mean(axis=0) - z * deltas.std(axis=0))


def ipm(
    global_arrays: Sequence[np.ndarray],
    honest: Sequence[Sequence[np.ndarray]],
    epsilon: float = IPM_EPSILON,
) -> list[np.ndarray]:
    """The IPM update w − ε·μ (see the module docstring)."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return _weights(global_arrays, -epsilon * _deltas(global_arrays, honest).mean(axis=0))


def min_max_gamma(deltas: _Float64) -> float:
    """Min-Max's γ for honest updates ``deltas`` (h, P): the largest γ ≥ 0 with
    max_k ‖μ − γσ − Δ_k‖ ≤ max_{k,l} ‖Δ_k − Δ_l‖.

    The left side is convex in γ and meets the bound at γ = 0 (μ lies in the honest hull), so
    the feasible γ form an interval from 0; its end is bracketed by doubling, then bisected.
    """
    mean = deltas.mean(axis=0)
    direction = deltas.std(axis=0)
    squared = np.einsum("ij,ij->i", deltas, deltas)
    pairwise = squared[:, None] + squared[None, :] - 2.0 * deltas @ deltas.T
    bound = math.sqrt(max(float(pairwise.max()), 0.0))
    if bound == 0.0 or not np.any(direction):
        return 0.0

    def fits(gamma: float) -> bool:
        return float(np.linalg.norm(mean - gamma * direction - deltas, axis=1).max()) <= bound

    low, high = 0.0, 1.0
    while fits(high):
        low, high = high, 2.0 * high
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def min_max(
    global_arrays: Sequence[np.ndarray], honest: Sequence[Sequence[np.ndarray]]
) -> list[np.ndarray]:
    """The Min-Max update w + μ − γ·σ, γ from ``min_max_gamma`` (see the module docstring)."""
    deltas = _deltas(global_arrays, honest)
    gamma = min_max_gamma(deltas)
    return _weights(global_arrays, deltas.mean(axis=0) - gamma * deltas.std(axis=0))


def collude(
    attack: Attack,
    global_arrays: Sequence[np.ndarray],
    honest: Sequence[Sequence[np.ndarray]],
    num_clients: int,
    num_malicious: int,
) -> list[np.ndarray]:
    """The one update every colluder sends this round.

    Args:
        attack: ``alie``, ``ipm`` or ``minmax``.
        global_arrays: The round's global weights w.
        honest: The new weights of the round's honest clients.
        num_clients: Updates the server aggregates this round (honest and malicious), ALIE's n.
        num_malicious: Colluders among them, ALIE's m.
    """
    if attack not in COLLUDING:
        raise ValueError(f"{attack.value!r} is not a colluding attack")
    if attack is Attack.ALIE:
        return alie(global_arrays, honest, num_clients, num_malicious)
    if attack is Attack.IPM:
        return ipm(global_arrays, honest)
    return min_max(global_arrays, honest)
