"""Model buffers (BatchNorm running statistics, a module's registered buffers) kept identical on
every replica, the smallest share a BatchNorm model may be given, and what the replica check
compares.

Each rank's forward updates its own buffers from its own share, so without a sync they drift
apart (the parameters stay identical; the buffers do not). `BufferSync` ends every step, after
the gradient exchange, by making them identical again, as `AgentConfig.buffers` says:

- ``"broadcast"`` (default): every rank takes the buffers of the step's *source*, the lowest
  rank among those that put the most samples into the step (after the NaN guard; when no rank
  put any in, the lowest rank with the largest planned share). `source_rank` is a pure function
  of the step's statistics, which every rank holds after the exchange, so all agree without a
  message. This is DDP's ``broadcast_buffers=True`` with the source chosen so that it always
  ran a forward: DDP broadcasts rank 0's buffers before each forward, and under idla rank 0
  may have a share of 0 or be left out as non-finite. At equal shares the source is rank 0
  (it holds the largest share), and since every rank starts the next forward from the same
  buffers either way, the model (parameters, and the buffers rank 0 holds) is DDP's exactly;
  under ``no_sync`` DDP does not broadcast before the accumulating forwards, so a model whose
  forward reads its buffers in training may differ there (BatchNorm in training does not).
- ``"average"``: every floating-point buffer becomes the share-weighted mean over the ranks
  that put samples into the step, ``Σ_r n_r b_r / Σ_r n_r``; integer and boolean buffers
  (``num_batches_tracked``, exact below 2⁵³) come from the source. For BatchNorm with a fixed
  momentum ``m``, each rank's running mean is ``(1 - m) μ + m x̄_r`` from the same ``μ``, so
  the weighted mean is ``(1 - m) μ + m x̄``, with ``x̄`` the mean over the whole global batch:
  exactly what one process running the global batch through BatchNorm would hold (with
  accumulation: when every micro-batch is split in the same proportions). The running
  variance is not: it averages each rank's unbiased variance ``s_r²`` around its own mean,
  while the whole batch's variance also holds the spread of the ``x̄_r`` (and its own
  ``n/(n-1)`` correction). With ``momentum=None`` (a cumulative mean) the same holds step by
  step, since every rank counts the same ``num_batches_tracked``. torch's `SyncBatchNorm`
  computes the whole batch's statistics inside the forward, but needs CUDA (NCCL), so it is
  not an option on gloo/CPU workers.
- ``"none"``: buffers stay per rank, as DDP's ``broadcast_buffers=False``; the replica check
  then compares parameters only.

A rank given no samples of a batch runs its forward on an empty batch (or skips it: the agent
ignores the loss of an empty share); whatever that forward did to the buffers is undone when
`Agent.backward` is called (BatchNorm would count it in ``num_batches_tracked``, and a mean
over it is NaN), so such a rank's buffers are as if it had run nothing. A rank with no samples
in the whole step (a share of 0, or dropped by the NaN guard) ends it with the source's
buffers like every other rank.

Cost: at most one collective per step, none when the model has no buffers or runs alone.
"broadcast" sends every buffer's bytes in one uint8 tensor (the buffers' own size);
"average" all-reduces one float64 vector of every buffer's elements (twice the bytes of
float32 buffers). Both also copy the buffers into and out of that one flat tensor.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from idla.runtime.group import Group


class BufferMode(str, enum.Enum):
    """How the replicas' buffers agree at the end of a step (`AgentConfig.buffers`)."""

    BROADCAST = "broadcast"
    AVERAGE = "average"
    NONE = "none"


BATCHNORM_MIN_LOCAL_BATCH = 2
"""Fewest samples BatchNorm takes in training ("Expected more than 1 value per channel")."""


def min_local_batch(model: nn.Module, configured: int | None) -> int:
    """`AgentConfig.min_local_batch` as the planner takes it: `configured`, or when it is None
    2 if the model holds a BatchNorm layer in training mode, else 1."""
    if configured is not None:
        return configured
    batch_norm = any(isinstance(m, _BatchNorm) and m.training for m in model.modules())
    return BATCHNORM_MIN_LOCAL_BATCH if batch_norm else 1


def source_rank(samples: Sequence[int], planned: Sequence[int]) -> int:
    """The rank whose buffers every rank takes: the lowest among those with the most `samples`
    in the step (what each put into it after the NaN guard), or, when none put any in, among
    those with the largest `planned` share."""
    weights = samples if any(s > 0 for s in samples) else planned
    return max(range(len(weights)), key=lambda r: (weights[r], -r))


def average_weights(samples: Sequence[int], planned: Sequence[int]) -> list[float]:
    """Each rank's weight in the "average" mode: its fraction of the samples put into the step
    (of the planned shares when none were); 0 for a rank without samples."""
    weights = samples if any(s > 0 for s in samples) else planned
    total = sum(weights)
    if total <= 0:
        return [1.0 if r == source_rank(samples, planned) else 0.0 for r in range(len(weights))]
    return [w / total for w in weights]


class BufferSync:
    """Makes the model's buffers identical on every rank at the end of each step.

    The buffers are read from the model at every sync (as DDP does), so a buffer the user
    replaced between steps is the one synced.
    """

    def __init__(self, model: nn.Module, group: Group, mode: BufferMode | str) -> None:
        self.model = model
        self.group = group
        self.mode = BufferMode(mode)
        self._held: list[torch.Tensor] | None = None  # the buffers before an empty forward

    def hold(self) -> None:
        """Keep a copy of the buffers: this rank's next forward is of an empty batch."""
        self._held = [b.detach().clone() for b in self.model.buffers()]

    def restore(self) -> None:
        """Undo what the forward of an empty batch did to the buffers (after `hold`)."""
        if self._held is None:
            return
        with torch.no_grad():
            for b, value in zip(self.model.buffers(), self._held, strict=False):
                b.copy_(value)
        self._held = None

    def sync(self, samples: Sequence[int], planned: Sequence[int]) -> None:
        """End the step's buffer sync; `samples`: what each rank put into the step (the
        statistics matrix's column, identical on every rank), `planned`: its planned shares."""
        if self.mode is BufferMode.NONE or self.group.world_size == 1:
            return
        buffers = list(self.model.buffers())
        if not buffers:
            return
        with torch.no_grad():
            if self.mode is BufferMode.BROADCAST:
                self._broadcast(buffers, source_rank(samples, planned))
            else:
                self._average(buffers, samples, planned)

    def _broadcast(self, buffers: list[torch.Tensor], source: int) -> None:
        flat = torch.cat([_bytes(b) for b in buffers])  # (total bytes,) uint8
        self.group.broadcast(flat, src=source)
        if self.group.rank != source:
            _unpack(flat, buffers)

    def _average(self, buffers: list[torch.Tensor], samples: Sequence[int],
                 planned: Sequence[int]) -> None:
        weight = average_weights(samples, planned)[self.group.rank]
        mine = self.group.rank == source_rank(samples, planned)
        parts = []
        for b in buffers:
            values = b.detach().reshape(-1).to(torch.float64)
            if b.is_floating_point():
                parts.append(values * weight if weight > 0.0 else torch.zeros_like(values))
            else:
                parts.append(values if mine else torch.zeros_like(values))
        flat = torch.cat(parts)  # (total elements,) float64
        work = self.group.all_reduce(flat)
        if work is not None:
            self.group.wait(work)
        sizes = [b.numel() for b in buffers]
        for b, part in zip(buffers, torch.split(flat, sizes), strict=True):
            b.copy_(part.view_as(b))

    def covered(self) -> bool:
        """Whether the buffers are kept identical (so the replica check compares them)."""
        return self.mode is not BufferMode.NONE


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def _unpack(flat: torch.Tensor, buffers: list[torch.Tensor]) -> None:
    """Copy `flat`'s bytes back into `buffers`, in order (each slice is cloned first: viewing
    bytes as a wider dtype needs an aligned start)."""
    offset = 0
    for b in buffers:
        size = b.numel() * b.element_size()
        b.copy_(flat[offset:offset + size].clone().view(b.dtype).view_as(b))
        offset += size


def replica_tensors(model: nn.Module, buffers: bool = True) -> dict[str, list[torch.Tensor]]:
    """What must be identical on every replica, by kind: "parameters", and "buffers" (when
    `buffers` is True and the model has any)."""
    kinds = {"parameters": [p.detach() for p in model.parameters()]}
    held = [b.detach() for b in model.buffers()]
    if buffers and held:
        kinds["buffers"] = held
    return kinds
