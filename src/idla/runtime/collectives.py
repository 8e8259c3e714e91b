"""Collectives that carry structured data between ranks without pickle.

``torch.distributed.all_gather_object`` unpickles what peers send, which lets any peer run code
on this process. Here payloads travel as UTF-8 JSON in uint8 tensors, so a peer can at worst send
malformed text. Cost: two all_gathers (lengths, then bytes padded to the longest payload).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_json(payload: dict[str, Any], group: Any = None) -> list[dict[str, Any]]:
    """Gather one JSON-serializable dict from every rank, in rank order.

    Without an initialized process group this returns ``[payload]``, so callers keep one code
    path for 1 worker and N. Tensors stay on the CPU, which gloo requires.
    """
    if not _is_distributed() or dist.get_world_size(group) == 1:
        return [payload]  # no peer: no collective (and nothing meets a one-rank NCCL group)
    world_size = dist.get_world_size(group)
    encoded = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    local = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)  # (n_bytes,)

    length = torch.tensor([local.numel()], dtype=torch.int64)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(lengths, length, group=group)
    max_len = max(int(n.item()) for n in lengths)

    # all_gather needs equal shapes on every rank; pad to the longest payload (at least 1 byte).
    padded = torch.zeros(max(max_len, 1), dtype=torch.uint8)
    padded[: local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)

    result: list[dict[str, Any]] = []
    for buf, n in zip(gathered, lengths, strict=True):
        text = buf[: int(n.item())].numpy().tobytes().decode("utf-8")
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise TypeError(f"all_gather_json: a peer sent {type(obj).__name__}, expected dict")
        result.append(obj)
    return result
