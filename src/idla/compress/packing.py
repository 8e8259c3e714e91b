"""Packing several payload tensors into one byte buffer, so one collective carries them all.

``pack`` concatenates the raw bytes of its tensors; ``unpack`` cuts them out again given the
``(dtype, numel)`` spec each codec's ``payload_spec`` states. There is no padding and no
header: a buffer is exactly ``sum(numel * itemsize)`` bytes, so every rank can size its
receive buffers from the specs alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The raw bytes of ``tensors``, end to end, as one 1-D uint8 tensor on their device.

    An empty sequence gives an empty uint8 tensor on the CPU.
    """
    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buf: torch.Tensor, spec: Sequence[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Cuts ``buf`` back into 1-D tensors of the given ``(dtype, numel)`` spec.

    The tensors are fresh copies, never views of ``buf``: a slice may start at an offset that
    is not a multiple of its dtype's size, where ``view(dtype)`` is refused, and always copying
    lets the caller reuse ``buf`` for the next collective straight away.

    Raises:
        ValueError: If ``buf`` is not a 1-D uint8 tensor of exactly the bytes the spec needs.
    """
    sizes_bytes = [numel * dtype.itemsize for dtype, numel in spec]
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != sum(sizes_bytes):
        raise ValueError(
            f"unpack needs a 1-D uint8 buffer of {sum(sizes_bytes)} bytes, "
            f"got {buf.dtype} of shape {tuple(buf.shape)}"
        )
    out: list[torch.Tensor] = []
    offset_bytes = 0
    for (dtype, _numel), size_bytes in zip(spec, sizes_bytes, strict=True):
        chunk = buf[offset_bytes : offset_bytes + size_bytes].clone()
        out.append(chunk.view(dtype))
        offset_bytes += size_bytes
    return out
