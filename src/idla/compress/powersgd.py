"""PowerSGD: a rank-r approximation of each gradient matrix by one power iteration per step.

The math is a handful of pure functions the sync layer calls between its two all-reduces;
``PowerSGD`` adds the codec interface, the eligibility rule and the seeded initial Q.

Bit-identical replicas across hardware, without another collective: the all-reduced P and Q
are the same bits on every rank, so the two steps each rank computes from them alone,
orthonormalizing P and reconstructing P̂ Qᵀ, run as fixed sequences of IEEE elementwise
operations (`idla.compress.fixed_order`) and give the same bits on a CPU rank, an A100 and an
H100 alike; `torch.linalg.qr` and a matmul would round differently on each. The local products
P = M Q and Q = Mᵀ P̂ stay matmuls: only their all-reduced sums are used by every rank.
"""

from __future__ import annotations

import math

import torch

from idla.compress.base import CODEC_FORMS, Codec, Payload, PayloadSpec, Transport
from idla.compress.fixed_order import orthonormalize, outer_sum
from idla.errors import ConfigError

DEFAULT_RANK = 2


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The (m, n) matrix PowerSGD sees: m = shape[0], n = the product of the rest."""
    if len(shape) < 2:
        raise ValueError(f"powersgd needs a tensor of 2 or more dims, got shape {tuple(shape)}")
    return shape[0], math.prod(shape[1:])


def p_of(m_matrix: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P = M Q.  ``m_matrix``: (m, n), ``q``: (n, r) -> (m, r)."""
    return m_matrix @ q


def q_of(m_matrix: torch.Tensor, p_hat: torch.Tensor) -> torch.Tensor:
    """Q = Mᵀ P̂.  ``m_matrix``: (m, n), ``p_hat``: (m, r) -> (n, r)."""
    return m_matrix.T @ p_hat


def reconstruct(p_hat: torch.Tensor, q: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The rank-r approximation P̂ Qᵀ, reshaped to ``shape``.  (m, r), (n, r) -> shape.

    Computed by `outer_sum` (r elementwise multiply-adds, the same bits on every device):
    2r − 1 passes over the m·n output where a matmul makes one."""
    return outer_sum(p_hat, q).view(shape)


class PowerSGD(Codec):
    """Rank-r approximation by one power iteration per step (Vogels et al. 2019).

    For a gradient viewed as an m×n matrix M the sync layer all-reduces P = M Q (m·r floats),
    orthonormalizes it, then all-reduces Q = Mᵀ P̂ (n·r floats) and applies P̂ Qᵀ: both
    exchanges are linear, so the result approximates the sum of the ranks' gradients.
    Cost: (m+n)·r·4 bytes against m·n·4, worth it only where ``eligible``. The codec holds no
    state: the exchange that runs it (``idla.sync.powersgd``) warm-starts Q from the last step
    and keeps the error feedback, one float32 copy of M.

    ``compress``/``decompress`` run the single-worker version (one iteration from
    ``initial_q(seed)``, payload [P̂, Q]) so the codec can be tested on its own.
    """

    transport = Transport.LOWRANK

    def __init__(self, rank: int = DEFAULT_RANK) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(
                f"codec powersgd: rank must be an integer >= 1, got {rank!r}; {CODEC_FORMS}"
            )
        self.rank = rank
        self.name = f"powersgd:{rank}"

    def eligible(self, shape: torch.Size) -> bool:
        """Whether a tensor of ``shape`` is worth compressing: 2+ dims and (m+n)·r < m·n."""
        if len(shape) < 2:
            return False
        m, n = matrix_shape(shape)
        return (m + n) * self.rank < m * n

    def initial_q(
        self, shape: torch.Size, *, seed: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """A standard normal (n, r) float32 Q, identical on every rank given ``seed``."""
        _, n = matrix_shape(shape)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(n, self.rank, generator=generator, dtype=torch.float32)
        return q.to(device) if device is not None else q

    matrix_shape = staticmethod(matrix_shape)
    p_of = staticmethod(p_of)
    orthonormalize = staticmethod(orthonormalize)
    q_of = staticmethod(q_of)
    reconstruct = staticmethod(reconstruct)

    def payload_spec(self, shape: torch.Size) -> PayloadSpec:
        m, n = matrix_shape(shape)
        return [(torch.float32, m * self.rank), (torch.float32, n * self.rank)]

    def compress(self, x: torch.Tensor, *, seed: int = 0) -> list[torch.Tensor]:
        if not self.eligible(x.shape):
            raise ValueError(f"{self.name}: shape {tuple(x.shape)} is not eligible")
        m, n = matrix_shape(x.shape)
        m_matrix = x.detach().reshape(m, n).to(torch.float32)
        p_hat = orthonormalize(p_of(m_matrix, self.initial_q(x.shape, seed=seed, device=x.device)))
        return [p_hat.reshape(-1).contiguous(), q_of(m_matrix, p_hat).reshape(-1).contiguous()]

    def decompress(self, payload: Payload, shape: torch.Size, *, seed: int = 0) -> torch.Tensor:
        self._check(payload, shape)
        m, n = matrix_shape(shape)
        p_hat = payload[0].to(torch.float32).view(m, self.rank)
        q = payload[1].to(torch.float32).view(n, self.rank)
        return reconstruct(p_hat, q, shape)
