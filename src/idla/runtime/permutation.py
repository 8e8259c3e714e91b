"""A seeded pseudo-random bijection on [0, n), evaluated on demand: the epoch's data order.

A keyed Feistel network permutes [0, 2^k), 2^k the smallest power of two ≥ n (k ≥ 2); values
that land at n or above are walked along their cycle until they fall inside (cycle-walking,
Black & Rogaway, "Ciphers with arbitrary finite domains", CT-RSA 2002), which makes the
restriction to [0, n) a bijection of its own. Luby & Rackoff (1988) show that four rounds of
pseudo-random round functions give a pseudo-random permutation; we take eight.

Cost: positions p_1..p_b are mapped in O(b) torch int64 operations per round and walk; a walk
leaves the domain with probability (2^k − n) / 2^k < 1/2, so the expected walk is under two
passes and the slowest of b positions ~log2(b). No table of size n is ever built.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

ROUNDS = 8
"""Feistel rounds."""
_MASK_31 = (1 << 31) - 1
_MIX_1 = 0x2545F491  # odd constants below 2^31: (value < 2^31) × constant stays below 2^62
_MIX_2 = 0x4CF5AD43


def round_keys(seed: int, epoch: int) -> tuple[int, ...]:
    """ROUNDS 31-bit keys for (seed, epoch), the same in every process (no `hash()`)."""
    digest = hashlib.blake2b(f"idla-order:{seed}:{epoch}".encode(), digest_size=4 * ROUNDS)
    raw = digest.digest()
    return tuple(int.from_bytes(raw[4 * i: 4 * i + 4], "little") & _MASK_31
                 for i in range(ROUNDS))


def _round(half: torch.Tensor, key: int, out_bits: int) -> torch.Tensor:
    """A keyed mix of `half` (values < 2^31) to `out_bits` bits (multiply-xorshift)."""
    x = ((half ^ key) * _MIX_1) & _MASK_31
    x = x ^ (x >> 15)
    x = (x * _MIX_2) & _MASK_31
    x = x ^ (x >> 13)
    return x >> (31 - out_bits)


def _feistel(values: torch.Tensor, bits: int, keys: tuple[int, ...]) -> torch.Tensor:
    """One pass of the (unbalanced, alternating) Feistel network over [0, 2^bits)."""
    left_bits, right_bits = bits // 2, bits - bits // 2
    left, right = values >> right_bits, values & ((1 << right_bits) - 1)
    for key in keys:
        # (L, R) -> (R, L ^ f(R)); the halves swap widths, each step invertible given f.
        left, right = right, left ^ _round(right, key, left_bits)
        left_bits, right_bits = right_bits, left_bits
    return (left << right_bits) | right


@dataclass(frozen=True, slots=True)
class Bijection:
    """A pseudo-random permutation of [0, size) fixed by its keys (see the module)."""

    size: int  # elements permuted
    keys: tuple[int, ...]  # round keys, `round_keys(seed, epoch)`

    def __post_init__(self) -> None:
        if not 1 <= self.size < 1 << 62:
            raise ValueError(f"a bijection needs 1 <= size < 2^62, got {self.size}")

    @property
    def bits(self) -> int:
        return max(2, (self.size - 1).bit_length())

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """The images of `positions` (any shape, int64, each in [0, size))."""
        out = positions.to(torch.int64).clone()
        walking = torch.arange(out.numel())
        flat = out.view(-1)
        while walking.numel():
            flat[walking] = _feistel(flat[walking], self.bits, self.keys)
            walking = walking[flat[walking] >= self.size]
        return out
