"""The interface every gradient codec implements, and how their payloads travel.

A codec turns a tensor into a *payload*, a list of 1-D tensors whose dtypes and sizes depend
only on the input's shape (``payload_spec``), so the sync layer can pack payloads of many
tensors into fixed-size buffers and size its collectives before any data exists. How the
payloads of all ranks are combined is the codec's ``transport``. Codecs hold no state: what
compression drops is carried to the next step by ``ErrorFeedback``, which wraps any of them.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence

import torch

CODEC_FORMS = (
    "valid forms: none, fp16, sign, topk[:RATIO], randk[:RATIO], powersgd[:RANK] "
    "with RATIO a number in (0, 1] and RANK an integer >= 1"
)
"""The specs ``parse_codec`` accepts, quoted in every error about a codec's configuration."""

Payload = Sequence[torch.Tensor]
PayloadSpec = list[tuple[torch.dtype, int]]


class Transport(str, enum.Enum):
    """How the payloads of all ranks are combined."""

    ALLREDUCE = "allreduce"
    """Payloads are linear: their elementwise sum decompresses to the sum of the inputs."""
    ALLGATHER = "allgather"
    """Every rank gathers all payloads, decompresses each and sums the results."""
    LOWRANK = "lowrank"
    """PowerSGD: all-reduce P, orthonormalize, then all-reduce Q; run by the sync layer."""


class Codec(abc.ABC):
    """One way to compress a tensor; subclasses set ``name`` and ``transport``."""

    name: str
    """The spec ``parse_codec`` reads back, e.g. ``"topk:0.01"``."""
    transport: Transport

    @abc.abstractmethod
    def payload_spec(self, shape: torch.Size) -> PayloadSpec:
        """The ``(dtype, numel)`` of each payload tensor for an input of ``shape``."""

    def eligible(self, shape: torch.Size) -> bool:
        """Whether compressing a tensor of ``shape`` can save anything (most codecs: always)."""
        return True

    def wire_bytes(self, shape: torch.Size) -> int:
        """Bytes of one rank's payload for an input of ``shape``."""
        return sum(numel * dtype.itemsize for dtype, numel in self.payload_spec(shape))

    @abc.abstractmethod
    def compress(self, x: torch.Tensor, *, seed: int = 0) -> list[torch.Tensor]:
        """The payload of ``x`` (float16, bfloat16, float32 or float64; computed in float32):
        1-D contiguous tensors matching ``payload_spec(x.shape)``."""

    @abc.abstractmethod
    def decompress(self, payload: Payload, shape: torch.Size, *, seed: int = 0) -> torch.Tensor:
        """The float32 tensor of ``shape`` that ``payload`` stands for."""

    def decompress_add_(self, out: torch.Tensor, payload: Payload, *, seed: int = 0) -> None:
        """Adds ``decompress(payload, out.shape)`` into ``out`` in place (rounded to ``out``'s
        dtype; sum into a float32 ``out`` to keep a half-precision model's sum in float32)."""
        out.add_(self.decompress(payload, out.shape, seed=seed))

    def _check(self, payload: Payload, shape: torch.Size) -> None:
        """Raises ValueError if ``payload`` does not match ``payload_spec(shape)``."""
        got = [(t.dtype, t.numel()) for t in payload]
        if got != self.payload_spec(shape):
            raise ValueError(f"{self.name}: payload {got} does not fit shape {tuple(shape)}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def compresses(codec: Codec, shape: torch.Size, min_compress_numel: int) -> bool:
    """The size rule: a tensor is compressed only when it has at least ``min_compress_numel``
    elements and ``codec`` can shrink it; the others travel uncompressed."""
    return shape.numel() >= min_compress_numel and codec.eligible(shape)
