"""The replica check, exact or within a tolerance, and what a mismatch says: which tensors
differ, and the usual reasons they do.

`check_replicas` compares one digest of the model per rank (one all-gather of an int64 per
kind: parameters, buffers). In the "exact" mode (`ReplicaCheck`) any difference is an error;
only then does `differing_tensors` gather one digest per parameter and buffer (two more
all-gathers: the counts, then the digests), so the error can name the first tensors that
differ; `mismatch_message` adds the likely causes.

The "tolerance" mode is for fleets where bit identity cannot hold: a CPU rank beside GPU ranks
applies the same exchanged gradient with arithmetic that rounds differently, so the replicas
drift apart by a few ulps per step. When the digests differ it gathers `tensor_summary` of
every tensor (two more all-gathers: the counts, then SUMMARY_WIDTH float64 numbers per tensor)
and fails only for the tensors whose summaries differ from rank 0's by more than the tolerance,
relative to the tensor's largest magnitude (`relative_difference`). The summaries are a sketch,
not the tensors: a difference spread over many elements shows at about its root mean square,
one confined to a few of n elements at about its size / √n (see `tensor_summary`).

Every rank gathers the same numbers and reaches the same verdict, so all ranks raise together
or none does. The gathered tensors are CPU tensors.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from idla.agent.buffers import replica_tensors
from idla.errors import ReplicaMismatchError
from idla.runtime.digest import position_multipliers, tensor_digest, tensor_digests
from idla.runtime.group import Group


class ReplicaCheck(str, enum.Enum):
    """How `check_replicas` compares the ranks (`AgentConfig.replica_check`)."""

    EXACT = "exact"
    """Bit identity: any differing bit is an error."""
    TOLERANCE = "tolerance"
    """Differences up to a relative tolerance are accepted (mixed CPU/GPU fleets)."""


DEFAULT_TOLERANCE = 1e-5
"""`AgentConfig.replica_tolerance`'s default: about 80 float32 ulps (2^-23 each) of a tensor's
largest entry. Differently rounded optimizer updates move a copy by at most half an ulp per
step, as a random walk (the exchanged gradient is the same everywhere, so nothing amplifies
it): thousands of steps stay under it. A real divergence (an update missed or applied twice
changes a tensor by about lr·|g|, typically 1e-4 to 1e-2 of it) is far above it."""

SUMMARY_WIDTH = 4
"""Float64 numbers per tensor that the tolerance mode gathers (`tensor_summary`)."""

SUMMARY_CHUNK = 1 << 22
"""Elements `tensor_summary` widens to float64 at a time (bounds its temporaries)."""

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
    "ranks on different devices (a GPU and a CPU) whose optimizer arithmetic rounds differently "
    "(AgentConfig.replica_check='tolerance' accepts differences up to replica_tolerance)",
)
"""Why replicas that received the same exchanged gradients still end up different."""

MAX_NAMED = 5
"""Differing tensors named in one error; more are counted."""


def named_tensors(model: nn.Module, buffers: bool = True) -> list[tuple[str, torch.Tensor]]:
    """Every parameter, then every buffer (marked as one; unless `buffers` is False), by name."""
    held = [(f"{name} (buffer)", b) for name, b in model.named_buffers()] if buffers else []
    return [(name, p.detach()) for name, p in model.named_parameters()] + held


def _same_count(tensors: Sequence[Any], group: Group) -> bool:
    """Whether every rank holds as many tensors as this one (one all-gather of an int64)."""
    count = torch.tensor([len(tensors)], dtype=torch.int64)
    return len({int(t.item()) for t in group.control_all_gather(count)}) == 1


def differing_tensors(model: nn.Module, group: Group,
                      buffers: bool = True) -> list[tuple[str, list[int]]]:
    """The tensors (buffers too, unless `buffers` is False) whose digest differs from rank
    0's, with the ranks they differ on; empty when the ranks hold different numbers of
    tensors (then nothing can be paired)."""
    tensors = named_tensors(model, buffers)
    if not _same_count(tensors, group):
        return []
    unsigned = tensor_digests([t for _, t in tensors])
    digests = torch.tensor([d - (1 << 64) if d >= 1 << 63 else d for d in unsigned],
                           dtype=torch.int64)
    table = [t.tolist() for t in group.control_all_gather(digests)]  # (world size, tensors)
    return [(name, [r for r in range(len(table)) if table[r][i] != table[0][i]])
            for i, (name, _) in enumerate(tensors)
            if any(table[r][i] != table[0][i] for r in range(len(table)))]


def tensor_summary(tensor: torch.Tensor) -> torch.Tensor:
    """What the tolerance mode compares of one tensor of n elements, in float64 on its device:
    (max |t|, ‖t‖/√n, Σ t_i/√n, Σ s_i t_i/√n), s_i = ±1 a fixed pseudo-random sign per
    position (a bit of `idla.runtime.digest.position_multipliers`, the same on every device).

    For a difference d between two ranks' copies, the first two change by at most max |d| and
    rms(d) (triangle inequality); the two sums change by Σ d_i/√n and Σ s_i d_i/√n, whose
    mean square is rms(d)² when d is uncorrelated with the signs (rounding noise, a
    perturbation), and the signed sum catches a d whose elements cancel in the plain sum. The
    float64 sums round at ~1e-16 relative in any order, far below any useful tolerance.

    Cost: ~6 elementwise passes and 4 reductions over the tensor on its device, in chunks of
    SUMMARY_CHUNK elements (two float64 temporaries of a chunk each, 64 MiB at most); the
    position multipliers are the digest's cached ones. 4 float64 numbers leave it.
    """
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    n = flat.numel()
    top, squares, total, signed = torch.zeros(4, dtype=torch.float64, device=flat.device)
    if n == 0:
        return torch.zeros(SUMMARY_WIDTH, dtype=torch.float64, device=flat.device)
    bits = position_multipliers(n, flat.device, torch.int32)
    for start in range(0, n, SUMMARY_CHUNK):
        x = flat[start : start + SUMMARY_CHUNK].to(torch.float64)
        signs = ((bits[start : start + x.numel()] >> 1) & 1).to(torch.float64) * 2.0 - 1.0
        top = torch.maximum(top, x.abs().max())
        squares = squares + x.square().sum()
        total = total + x.sum()
        signed = signed + (signs * x).sum()
    root_n = math.sqrt(n)
    return torch.stack([top, squares.sqrt() / root_n, total / root_n, signed / root_n])


def relative_difference(mine: Sequence[float], reference: Sequence[float]) -> float:
    """The largest difference between two `tensor_summary` values, relative to the larger of
    the two largest magnitudes (0 for equal summaries; inf where only one is finite, or
    NaN)."""
    if any(not math.isfinite(v) for v in (*mine, *reference)):
        same = all(a == b for a, b in zip(mine, reference, strict=True))
        return 0.0 if same else math.inf  # NaN never equals: a NaN tensor differs
    gap = max(abs(a - b) for a, b in zip(mine, reference, strict=True))
    scale = max(abs(mine[0]), abs(reference[0]))
    if gap == 0.0:
        return 0.0
    return gap / scale if scale > 0 else math.inf


def tensors_beyond(model: nn.Module, group: Group, tolerance: float,
                   buffers: bool = True) -> list[tuple[str, list[int], float]] | None:
    """The tensors whose `tensor_summary` differs from rank 0's by more than `tolerance`
    (`relative_difference`), each with the ranks it differs on and the largest difference;
    None when the ranks hold different numbers of tensors (nothing can be paired)."""
    tensors = named_tensors(model, buffers)
    if not _same_count(tensors, group):
        return None
    summaries = [tensor_summary(t) for _, t in tensors]
    if len({s.device for s in summaries}) > 1:
        summaries = [s.cpu() for s in summaries]
    mine = (torch.stack(summaries).cpu() if summaries  # one copy to the host
            else torch.zeros(0, SUMMARY_WIDTH, dtype=torch.float64))
    table = [t.tolist() for t in group.control_all_gather(mine)]  # (world size, tensors, 4)
    far = []
    for i, (name, _) in enumerate(tensors):
        gaps = [relative_difference(table[r][i], table[0][i]) for r in range(len(table))]
        ranks = [r for r, gap in enumerate(gaps) if not gap <= tolerance]
        if ranks:
            far.append((name, ranks, max(gaps)))
    return far


def mismatch_message(step: int, kind: str, ranks: Sequence[int],
                     tensors: Sequence[tuple[str, Sequence[int]]],
                     tolerance: float | None = None,
                     gaps: Sequence[float] | None = None) -> str:
    """The error for replicas whose `kind` ("parameters", "buffers") diverged by `step` on
    `ranks`, naming the replica check's mode (exact, or tolerance with `tolerance`), the
    differing `tensors` (name, ranks; with `gaps`, each one's largest relative difference)
    and the likely causes."""
    check = ("replica check 'exact': bit for bit" if tolerance is None else
             f"replica check 'tolerance': relative difference above {tolerance:g}")
    message = (f"replicas diverged by step {step}: {kind} on rank(s) "
               f"{', '.join(map(str, ranks))} differ from rank 0's ({check})")
    if tensors:
        named = []
        for i, (name, on) in enumerate(tensors[:MAX_NAMED]):
            gap = f"; relative difference {gaps[i]:.2g}" if gaps is not None else ""
            named.append(f"{name!r} (rank {', '.join(map(str, on))}{gap})")
        more = len(tensors) - MAX_NAMED
        message += "; differing: " + ", ".join(named) + (f" and {more} more" if more > 0 else "")
    causes = "".join(f"\n  - {cause}" for cause in LIKELY_CAUSES)
    return f"{message}.\nLikely causes:{causes}"


def parameter_digest(model: nn.Module) -> int:
    """A digest of every parameter's bytes (`idla.runtime.digest.tensor_digest`, computed on
    the parameters' device), as a signed 64-bit integer: replicas that hold the same
    parameters have the same digest, and one differing element gives a different one."""
    return tensor_digest([p.detach() for p in model.parameters()])


def check_replicas(model: nn.Module, group: Group, step: int, buffers: bool,
                   mode: str = ReplicaCheck.EXACT.value,
                   tolerance: float = DEFAULT_TOLERANCE) -> None:
    """One all-gather of a digest per kind (parameters; buffers too when `buffers`); where
    they differ, the "exact" `mode` fails naming the differing tensors, the "tolerance" mode
    compares the tensors' summaries and fails only for those beyond `tolerance`.

    Raises:
        ReplicaMismatchError: Some rank's parameters or buffers differ from rank 0's (beyond
            `tolerance` in the tolerance mode); the message names the mode.
    """
    kinds = replica_tensors(model, buffers=buffers)
    mine = torch.tensor([tensor_digest(t) for t in kinds.values()], dtype=torch.int64)
    hashes = [t.tolist() for t in group.control_all_gather(mine)]
    differ = {kind: [rank for rank, h in enumerate(hashes) if h[column] != hashes[0][column]]
              for column, kind in enumerate(kinds)}
    differ = {kind: ranks for kind, ranks in differ.items() if ranks}
    if not differ:
        return
    if ReplicaCheck(mode) is ReplicaCheck.EXACT:
        kind, ranks = next(iter(differ.items()))
        tensors = differing_tensors(model, group, buffers)
        raise ReplicaMismatchError(mismatch_message(step, kind, ranks, tensors))
    far = tensors_beyond(model, group, tolerance, buffers)
    if far is None:  # different numbers of tensors: beyond any tolerance
        kind, ranks = next(iter(differ.items()))
        raise ReplicaMismatchError(mismatch_message(step, kind, ranks, [], tolerance))
    if far:
        held = {"buffers" if name.endswith(" (buffer)") else "parameters" for name, _, _ in far}
        kind = " and ".join(sorted(held, reverse=True))  # "parameters and buffers"
        ranks = sorted({r for _, on, _ in far for r in on})
        raise ReplicaMismatchError(mismatch_message(
            step, kind, ranks, [(name, on) for name, on, _ in far], tolerance,
            [gap for _, _, gap in far]))


def replica_report(mode: str, tolerance: float) -> dict[str, Any]:
    """How the replicas are checked, for `Agent.report()`: the mode, and its tolerance in the
    tolerance mode."""
    if ReplicaCheck(mode) is ReplicaCheck.EXACT:
        return {"mode": ReplicaCheck.EXACT.value, "compares": "bit for bit"}
    return {"mode": ReplicaCheck.TOLERANCE.value, "tolerance": tolerance,
            "compares": f"{SUMMARY_WIDTH} float64 summaries per tensor, relative to its "
                        "largest magnitude"}
