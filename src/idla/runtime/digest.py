"""Exact digests of tensors, computed where the tensors live: `tensor_digest`.

Each tensor's bytes are read as integers of the element's width (fp32 as int32, fp16/bf16 as
int16, fp64 as int64, bool and int8 as uint8), multiplied elementwise by odd multipliers that
depend on the position, with wrapping arithmetic (elements of up to 4 bytes in int32, wider ones
in int64), and summed modulo 2^64: one integer per tensor, computed on the tensor's device.
Only those per-tensor sums reach the host (one copy), where they are mixed with each tensor's
index, dtype and shape into one signed 64-bit integer.

Exact: changing one element by any amount (one ulp, a sign bit) changes its integer by δ, with
δ ≠ 0 modulo 2^32 (2^64 for wide elements); an odd multiplier is invertible modulo a power of
two, so the product changes too, and with it the sum. Several changes at once may cancel with
probability about 2^-32 for unstructured changes (a checksum against accidents, not a
cryptographic hash). Deterministic: integer addition modulo 2^64 is associative, so the
reduction order (threads, device) does not matter, and a CPU rank and a GPU rank holding the
same bytes agree (both little-endian, which the int32 → int64 pairing below relies on).

Cost: per tensor of n elements, one int32 product (4 n bytes of temporaries; fp16 and int8
tensors are first widened to int32) and an int64 sum over n / 2 pairs of products, all on the
device; the position multipliers are computed once per device, grown to the largest tensor
seen, and cached (4 and, once an 8-byte tensor is seen, 8 bytes per element of the largest
tensor). On one CPU thread a 10M-parameter fp32 model digests in about a tenth of the time of
a host copy and blake2b.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment (Steele, Lea & Flood, OOPSLA 2014)

_READ_AS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""The integer dtype that reads an element of this many bytes."""

_multipliers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
"""Odd position multipliers per device and integer dtype, as long as the largest tensor seen."""


def _splitmix64(x: np.ndarray) -> np.ndarray:  # uint64 in, uint64 out
    """splitmix64's finaliser, elementwise (numpy's uint64 arithmetic wraps, as it must)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _mix(value: int) -> int:
    """splitmix64 of one Python integer, modulo 2^64."""
    z = (value + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def position_multipliers(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The first `numel` odd multipliers (`dtype`: int32 or int64, on `device`): the low bits of
    splitmix64 of the position, with the lowest bit set."""
    cached = _multipliers.get((device, dtype))
    if cached is None or cached.numel() < numel:
        size = 1 << max(numel - 1, 0).bit_length()  # grow by powers of two
        odd = _splitmix64(np.arange(size, dtype=np.uint64)) | np.uint64(1)
        wide = odd.astype(np.uint32).view(np.int32) if dtype == torch.int32 else odd.view(np.int64)
        cached = torch.from_numpy(wide).to(device)
        _multipliers[(device, dtype)] = cached
    return cached[:numel]


def _as_integers(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat int32 tensor (elements of up to 4 bytes, one integer each)
    or int64 tensor (wider elements, one integer per 8 bytes)."""
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    width = flat.element_size()
    values = flat.contiguous().view(_READ_AS.get(width, torch.int64 if width % 8 == 0
                                                 else torch.uint8))
    if values.element_size() < 4:
        values = values.to(torch.int32)
    return values


def _weighted_sum(values: torch.Tensor) -> torch.Tensor:
    """Σ multiplier_i × value_i modulo 2^64 as a (1,) int64 tensor on the values' device. The
    int32 products are summed in pairs read as one int64 (low + 2^32 × high), which keeps every
    product's 32 bits in the sum without widening each one."""
    products = values * position_multipliers(values.numel(), values.device, values.dtype)
    if products.dtype == torch.int64:
        return products.sum().reshape(1)
    even = products.numel() - products.numel() % 2
    total = products[:even].view(torch.int64).sum()
    if even < products.numel():
        total = total + products[even:].to(torch.int64).sum()
    return total.reshape(1)


def bytes_digest(data: bytes) -> int:
    """A blake2b digest of `data` as a signed 64-bit integer (fits an int64 tensor)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def tensor_sums(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Each tensor's position-weighted integer sum modulo 2^64 (unsigned), computed on its
    device; one copy to the host for all of them."""
    sums = [_weighted_sum(_as_integers(tensor)) for tensor in tensors]
    if not sums:
        return []
    if len({s.device for s in sums}) > 1:
        sums = [s.cpu() for s in sums]
    return [s & _MASK64 for s in torch.cat(sums).tolist()]


def tensor_digests(tensors: Sequence[torch.Tensor]) -> list[int]:
    """One unsigned 64-bit digest per tensor, mixing its sum with its dtype and shape (the same
    bytes read as another dtype or shape digest differently)."""
    out = []
    for tensor, total in zip(tensors, tensor_sums(tensors), strict=True):
        name = hashlib.blake2b(str(tensor.dtype).encode(), digest_size=8).digest()
        kind = _mix(int.from_bytes(name, "little"))
        for extent in (tensor.dim(), *tensor.shape):
            kind = _mix(kind ^ extent)
        out.append(_mix(total ^ kind))
    return out


def tensor_digest(tensors: Sequence[torch.Tensor]) -> int:
    """A digest of every tensor's bytes, dtype, shape and position in `tensors`, as a signed
    64-bit integer: equal tensors give equal digests on every rank and device, and any one
    changed element (by one ulp or more) changes it."""
    combined = _mix(len(tensors))
    for index, digest in enumerate(tensor_digests(tensors)):
        combined = _mix(combined ^ _mix(index) ^ digest)
    return combined - (1 << 64) if combined >= 1 << 63 else combined
