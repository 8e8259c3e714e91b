"""`StepWindow`: the micro-batches of one optimizer step, as the statistics row reports them.

Without accumulation a step has one micro-batch and the window is exactly that batch. With
``Agent.no_sync`` a step spans several global batches: the planner sees one step whose samples
are the sum over its micro-batches (per rank), and the NaN guard's verdict covers all of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from idla.errors import GradientError

_STEP_HOOKS: weakref.WeakKeyDictionary[torch.optim.Optimizer, RemovableHandle] = (
    weakref.WeakKeyDictionary())
"""The step pre-hook of the agent that last took each optimizer."""


@dataclass(slots=True)
class StepWindow:
    """What this rank and the plan did in the micro-batches of the current step."""

    shares: list[int]
    """Samples per rank, summed over the micro-batches."""
    size: int = 0
    """Global samples, summed over the micro-batches."""
    micro_batches: int = 0
    """Global batches the step has taken from `Agent.batches` so far."""
    local: int = 0
    """This rank's samples that went through backward (summed)."""
    loss_sum: float = 0.0
    """This rank's loss summed over its samples (mean loss × share, or the sum loss)."""
    nonfinite: bool = False
    """Whether any of this rank's micro-batches had a non-finite loss."""

    @classmethod
    def empty(cls, world_size: int) -> StepWindow:
        return cls(shares=[0] * world_size)

    def add(self, size: int, shares: Sequence[int]) -> None:
        """A global batch of `size` samples split as `shares` joins the step."""
        self.size += size
        self.micro_batches += 1
        self.shares = [a + b for a, b in zip(self.shares, shares, strict=True)]

    def record(self, local: int, loss_sum: float, nonfinite: bool) -> None:
        """This rank's backward over `local` samples."""
        self.local += local
        self.loss_sum += loss_sum
        self.nonfinite = self.nonfinite or nonfinite


def refuse_open_steps(
    optimizer: torch.optim.Optimizer, is_open: Callable[[], bool]
) -> RemovableHandle:
    """Make ``optimizer.step()`` raise `GradientError` while `is_open()` (micro-batches under
    ``no_sync`` not exchanged yet: the gradients are this rank's own). Replaces the hook an
    earlier agent put on the same optimizer (an agent rebuilt after a lost worker)."""
    old = _STEP_HOOKS.pop(optimizer, None)
    if old is not None:
        old.remove()

    def refuse(*_: Any) -> None:
        if is_open():
            raise GradientError(
                "optimizer.step() after a backward under agent.no_sync(): the gradients hold "
                "this rank's own micro-batches only; call agent.backward() outside no_sync "
                "first (it exchanges the accumulated sum)"
            )

    handle = optimizer.register_step_pre_hook(refuse)
    _STEP_HOOKS[optimizer] = handle
    return handle
