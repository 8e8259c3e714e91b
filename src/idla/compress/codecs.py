"""Elementwise gradient codecs (none, fp16, top-k, random-k, scaled sign) and ``parse_codec``.

Codecs work on CPU and CUDA tensors alike and return payloads on the input's device. Random
choices come from seeded CPU generators so that ranks on different hardware agree. The
interface lives in ``base``, PowerSGD in ``powersgd`` and byte packing in ``packing``; the
package (``idla.compress``) exports them all.

Inputs may be float16, bfloat16, float32 or float64; the math runs in float32 (`float32_flat`).
A half-precision gradient thus gives exactly the payload of its float32 widening (every bf16
and fp16 value is a float32 value), and a float64 one is first rounded to float32 (relative
error 2^-24, below what any codec here keeps: the wire carries float32 or less). Cost for a
non-float32 input: one float32 copy of it per call.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

from idla.compress.base import CODEC_FORMS, Codec, Payload, PayloadSpec, Transport
from idla.compress.powersgd import DEFAULT_RANK, PowerSGD
from idla.errors import ConfigError

_N = TypeVar("_N", int, float)
_FP16_MAX = 65504.0
_INT32_MAX = 2**31 - 1
_DEFAULT_RATIO = 0.01


def float32_flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened, detached and in float32: the tensor every codec computes on (a view
    of a contiguous float32 input; a widening or rounding copy of any other dtype)."""
    return x.detach().reshape(-1).to(torch.float32)


class NoCompression(Codec):
    """The tensor itself in float32; the reference the other codecs are measured against.

    The payload is a copy, so an in-place all-reduce on it leaves the gradient untouched.
    """

    name = "none"
    transport = Transport.ALLREDUCE

    def eligible(self, shape: torch.Size) -> bool:
        return False  # the payload is the tensor itself: nothing to save

    def payload_spec(self, shape: torch.Size) -> PayloadSpec:
        return [(torch.float32, shape.numel())]

    def compress(self, x: torch.Tensor, *, seed: int = 0) -> list[torch.Tensor]:
        return [x.detach().reshape(-1).to(torch.float32, copy=True)]

    def decompress(self, payload: Payload, shape: torch.Size, *, seed: int = 0) -> torch.Tensor:
        self._check(payload, shape)
        return payload[0].to(torch.float32).reshape(shape)


class Fp16(Codec):
    """Half-precision values: half the bytes of float32, about 3 significant digits.

    The sync layer passes gradients already scaled by each rank's share of the global batch
    (``b_i / B``), i.e. divided *before* the cast, so the sum over ranks does not overflow.
    Values beyond the float16 range are clamped to ±65504 rather than becoming ±inf (and so
    are infinities); NaN stays NaN so that overflow checks downstream still see it.
    """

    name = "fp16"
    transport = Transport.ALLREDUCE

    def payload_spec(self, shape: torch.Size) -> PayloadSpec:
        return [(torch.float16, shape.numel())]

    def compress(self, x: torch.Tensor, *, seed: int = 0) -> list[torch.Tensor]:
        # clamped in float32: bf16 cannot hold 65504 and would round it up to 65536 (= fp16 inf)
        return [float32_flat(x).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)]

    def decompress(self, payload: Payload, shape: torch.Size, *, seed: int = 0) -> torch.Tensor:
        self._check(payload, shape)
        return payload[0].to(torch.float32).reshape(shape)

    def decompress_add_(self, out: torch.Tensor, payload: Payload, *, seed: int = 0) -> None:
        self._check(payload, out.shape)
        out.add_(payload[0].view(out.shape))


def _kept(ratio: float, numel: int) -> int:
    """How many of ``numel`` entries a sparsifier keeps: ceil(ratio·numel), at least one."""
    return min(numel, max(1, math.ceil(ratio * numel)))


def _checked_ratio(kind: str, ratio: float) -> float:
    """``ratio`` as a float, or ConfigError if it is not in (0, 1]."""
    if not 0.0 < float(ratio) <= 1.0:  # also rejects NaN
        raise ConfigError(f"codec {kind}: ratio must be in (0, 1], got {ratio}; {CODEC_FORMS}")
    return float(ratio)


def _scatter_add_(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """``out.view(-1)[indices] += values`` for distinct ``indices``, even if ``out`` is strided."""
    index = indices.to(out.device, torch.int64)
    if out.is_contiguous():
        out.view(-1).index_add_(0, index, values.to(out.dtype))
    else:
        dense = torch.zeros(out.numel(), dtype=out.dtype, device=out.device)
        out.add_(dense.index_add_(0, index, values.to(out.dtype)).view(out.shape))


class TopK(Codec):
    """The k entries of largest magnitude, with their int32 positions (Aji & Heafield 2017).

    Cost: 6 bytes per kept entry (a float16 value, clamped to ±65504, and an int32 position),
    k = max(1, ceil(ratio·numel)): at ratio 0.01 the payload is 1/66.7 of float32. The fp16
    rounding of the kept values is part of what error feedback carries over. Positions differ
    between ranks, so payloads are gathered, not summed. Ties are broken by ``torch.topk``, which is
    deterministic for identical input on the same device.
    """

    transport = Transport.ALLGATHER

    def __init__(self, ratio: float = _DEFAULT_RATIO) -> None:
        self.ratio = _checked_ratio("topk", ratio)
        self.name = f"topk:{self.ratio!r}"

    def payload_spec(self, shape: torch.Size) -> PayloadSpec:
        k = _kept(self.ratio, shape.numel())
        return [(torch.float16, k), (torch.int32, k)]

    def compress(self, x: torch.Tensor, *, seed: int = 0) -> list[torch.Tensor]:
        flat = float32_flat(x)
        if flat.numel() > _INT32_MAX:
            raise ValueError(f"topk: {flat.numel()} entries do not fit int32 indices")
        k = _kept(self.ratio, flat.numel())
        indices = torch.topk(flat.abs(), k, sorted=False).indices
        values = flat[indices].clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        return [values, indices.to(torch.int32)]

    def decompress(self, payload: Payload, shape: torch.Size, *, seed: int = 0) -> torch.Tensor:
        out = torch.zeros(shape, dtype=torch.float32, device=payload[0].device)
        self.decompress_add_(out, payload)
        return out

    def decompress_add_(self, out: torch.Tensor, payload: Payload, *, seed: int = 0) -> None:
        self._check(payload, out.shape)
        _scatter_add_(out, payload[1], payload[0])


def _distinct_draws(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct int64 positions in [0, numel), a uniformly random subset in random order.

    ``randperm`` costs O(numel), which for a 25M-entry tensor is most of a second. For small k
    positions are instead drawn with replacement and each kept at its first draw, which has
    the same law as drawing without replacement and costs O(k log k).
    """
    if 4 * k > numel:
        return torch.randperm(numel, generator=generator)[:k]
    draws = torch.empty(0, dtype=torch.int64)
    distinct = torch.empty(0, dtype=torch.int64)
    while distinct.numel() < k:
        missing = k - distinct.numel()
        more = torch.randint(numel, (missing + missing // 4 + 8,), generator=generator)
        draws = torch.cat([draws, more])
        distinct, inverse = torch.unique(draws, return_inverse=True)
    first_draw = torch.full_like(distinct, draws.numel())
    first_draw.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
    return distinct[first_draw.argsort()][:k]


class RandomK(Codec):
    """k entries at positions every rank draws from the same seed (Stich et al. 2018).

    Only values go on the wire (4 bytes per kept entry): the positions follow from ``seed``,
    which the sync layer makes equal on all ranks, so payloads add up elementwise. Values are
    not rescaled by numel/k: the estimate is biased, and error feedback carries the dropped
    part into later steps instead. Positions come from a CPU generator, so that CPU and CUDA
    ranks pick identical ones, in O(k log k) CPU time per call (see ``_distinct_draws``).
    """

    transport = Transport.ALLREDUCE

    def __init__(self, ratio: float = _DEFAULT_RATIO) -> None:
        self.ratio = _checked_ratio("randk", ratio)
        self.name = f"randk:{self.ratio!r}"

    def indices(
        self, numel: int, *, seed: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The int64 positions kept for a tensor of ``numel`` entries under ``seed``."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        chosen = _distinct_draws(numel, _kept(self.ratio, numel), generator)
        return chosen.to(device) if device is not None else chosen

    def payload_spec(self, shape: torch.Size) -> PayloadSpec:
        return [(torch.float32, _kept(self.ratio, shape.numel()))]

    def compress(self, x: torch.Tensor, *, seed: int = 0) -> list[torch.Tensor]:
        flat = float32_flat(x)
        return [flat[self.indices(flat.numel(), seed=seed, device=x.device)]]

    def decompress(self, payload: Payload, shape: torch.Size, *, seed: int = 0) -> torch.Tensor:
        out = torch.zeros(shape, dtype=torch.float32, device=payload[0].device)
        self.decompress_add_(out, payload, seed=seed)
        return out

    def decompress_add_(self, out: torch.Tensor, payload: Payload, *, seed: int = 0) -> None:
        self._check(payload, out.shape)
        _scatter_add_(out, self.indices(out.numel(), seed=seed), payload[0])


class ScaledSign(Codec):
    """One bit per entry plus one scale: ``mean(|x|) · sign(x)`` (Karimireddy et al. 2019).

    Cost: ceil(numel/8) + 4 bytes, 1/32 of float32. Zero counts as positive. Bits are packed
    little-endian within each byte (entry 8j+i is bit i of byte j).
    """

    name = "sign"
    transport = Transport.ALLGATHER

    def payload_spec(self, shape: torch.Size) -> PayloadSpec:
        return [(torch.float32, 1), (torch.uint8, math.ceil(shape.numel() / 8))]

    def compress(self, x: torch.Tensor, *, seed: int = 0) -> list[torch.Tensor]:
        flat = float32_flat(x)
        scale = flat.abs().sum().div(max(flat.numel(), 1)).reshape(1)
        bits = (flat >= 0).to(torch.uint8)
        bits = torch.nn.functional.pad(bits, (0, -flat.numel() % 8)).view(-1, 8)
        shifts = torch.arange(8, dtype=torch.uint8, device=x.device)
        return [scale, (bits << shifts).sum(dim=1, dtype=torch.uint8)]

    def decompress(self, payload: Payload, shape: torch.Size, *, seed: int = 0) -> torch.Tensor:
        self._check(payload, shape)
        scale, packed = payload
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[: shape.numel()]
        signs = bits.to(torch.float32).mul_(2.0).sub_(1.0)
        return signs.mul_(scale.to(torch.float32)).view(shape)


def parse_codec(spec: str) -> Codec:
    """The codec a spec such as ``"topk:0.01"`` or ``"powersgd:2"`` names.

    ``topk`` and ``randk`` default to ratio 0.01, ``powersgd`` to rank 2. ``"auto"`` is not a
    codec: the caller chooses one per tensor and must not pass it here.

    Raises:
        ConfigError: If the name is unknown or its argument is missing, malformed or out of range.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"codec must be a string, got {spec!r}; {CODEC_FORMS}")
    name, sep, arg = spec.strip().lower().partition(":")
    plain: dict[str, type[Codec]] = {"none": NoCompression, "fp16": Fp16, "sign": ScaledSign}
    if name in plain:
        if sep:
            raise ConfigError(f"codec {spec!r}: {name} takes no argument; {CODEC_FORMS}")
        return plain[name]()
    if name in ("topk", "randk"):
        ratio = _argument(spec, arg, float, "a number") if sep else _DEFAULT_RATIO
        return TopK(ratio) if name == "topk" else RandomK(ratio)
    if name == "powersgd":
        return PowerSGD(_argument(spec, arg, int, "an integer") if sep else DEFAULT_RANK)
    raise ConfigError(f"unknown codec {spec!r}; {CODEC_FORMS}")


def _argument(spec: str, text: str, kind: type[_N], what: str) -> _N:
    """The codec's argument as `kind`, or a ConfigError naming the codec."""
    try:
        return kind(text)
    except ValueError:
        noun = "ratio" if kind is float else "rank"
        raise ConfigError(f"codec {spec!r}: {noun} is not {what}; {CODEC_FORMS}") from None
