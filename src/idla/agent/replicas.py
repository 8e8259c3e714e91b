"""What a replica mismatch says: which tensors differ, and the usual reasons they do.

`Agent.check_replicas` compares one digest of the model per rank (one all-gather of an
int64). Only when they differ does `differing_tensors` gather one digest per parameter and
buffer (two more all-gathers: the counts, then the digests), so the error can name the first
tensors that differ; `mismatch_message` adds the likely causes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from idla.agent.buffers import replica_tensors
from idla.errors import ReplicaMismatchError
from idla.runtime.digest import tensor_digest, tensor_digests
from idla.runtime.group import Group

LIKELY_CAUSES = (
    "optimizer.step() on gradients that were not exchanged (loss.backward() instead of "
    "agent.backward(loss), or a no_sync() block with no agent.backward after it)",
    "a parameter changed outside the loop on some ranks only (an in-place edit, a checkpoint "
    "loaded on one rank, a rank-dependent re-initialisation after the Agent was built)",
    "random operations that differ per rank (noise added to weights, a per-rank seed) or "
    "non-deterministic kernels (see torch.use_deterministic_algorithms)",
    "a buffer (e.g. BatchNorm running statistics) updated from each rank's own share",
    "optimizer state or settings that differ between ranks (a resume that restored the "
    "optimizer on some ranks only, another learning rate or schedule per rank)",
    "ranks on different devices (a GPU and a CPU) whose optimizer arithmetic rounds differently",
)
"""Why replicas that received the same exchanged gradients still end up different."""

MAX_NAMED = 5
"""Differing tensors named in one error; more are counted."""


def named_tensors(model: nn.Module, buffers: bool = True) -> list[tuple[str, torch.Tensor]]:
    """Every parameter, then every buffer (marked as one; unless `buffers` is False), by name."""
    held = [(f"{name} (buffer)", b) for name, b in model.named_buffers()] if buffers else []
    return [(name, p.detach()) for name, p in model.named_parameters()] + held


def differing_tensors(model: nn.Module, group: Group,
                      buffers: bool = True) -> list[tuple[str, list[int]]]:
    """The tensors (buffers too, unless `buffers` is False) whose digest differs from rank
    0's, with the ranks they differ on; empty when the ranks hold different numbers of
    tensors (then nothing can be paired)."""
    tensors = named_tensors(model, buffers)
    count = torch.tensor([len(tensors)], dtype=torch.int64)
    if len({int(t.item()) for t in group.control_all_gather(count)}) > 1:
        return []
    unsigned = tensor_digests([t for _, t in tensors])
    digests = torch.tensor([d - (1 << 64) if d >= 1 << 63 else d for d in unsigned],
                           dtype=torch.int64)
    table = [t.tolist() for t in group.control_all_gather(digests)]  # (world size, tensors)
    return [(name, [r for r in range(len(table)) if table[r][i] != table[0][i]])
            for i, (name, _) in enumerate(tensors)
            if any(table[r][i] != table[0][i] for r in range(len(table)))]


def mismatch_message(step: int, kind: str, ranks: Sequence[int],
                     tensors: Sequence[tuple[str, Sequence[int]]]) -> str:
    """The error for replicas whose `kind` ("parameters", "buffers") diverged by `step` on
    `ranks`, naming the differing `tensors` (name, ranks) and the likely causes."""
    message = (f"replicas diverged by step {step}: {kind} on rank(s) "
               f"{', '.join(map(str, ranks))} differ from rank 0's")
    if tensors:
        named = [f"{name!r} (rank {', '.join(map(str, on))})"
                 for name, on in tensors[:MAX_NAMED]]
        more = len(tensors) - MAX_NAMED
        message += "; differing: " + ", ".join(named) + (f" and {more} more" if more > 0 else "")
    causes = "".join(f"\n  - {cause}" for cause in LIKELY_CAUSES)
    return f"{message}.\nLikely causes:{causes}"


def parameter_digest(model: nn.Module) -> int:
    """A digest of every parameter's bytes (`idla.runtime.digest.tensor_digest`, computed on
    the parameters' device), as a signed 64-bit integer: replicas that hold the same
    parameters have the same digest, and one differing element gives a different one."""
    return tensor_digest([p.detach() for p in model.parameters()])


def check_replicas(model: nn.Module, group: Group, step: int, buffers: bool) -> None:
    """One all-gather of a digest per kind (parameters; buffers too when `buffers`); on a
    mismatch, the error names the differing tensors and the likely causes.

    Raises:
        ReplicaMismatchError: Some rank's parameters or buffers differ from rank 0's.
    """
    kinds = replica_tensors(model, buffers=buffers)
    mine = torch.tensor([tensor_digest(t) for t in kinds.values()], dtype=torch.int64)
    hashes = [t.tolist() for t in group.control_all_gather(mine)]
    for column, kind in enumerate(kinds):
        differ = [rank for rank, h in enumerate(hashes) if h[column] != hashes[0][column]]
        if differ:
            tensors = differing_tensors(model, group, buffers)
            raise ReplicaMismatchError(mismatch_message(step, kind, differ, tensors))
