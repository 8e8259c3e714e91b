"""`StepWindow`: the micro-batches of one optimizer step, as the statistics row reports them.

Without accumulation a step has one micro-batch and the window is exactly that batch. With
``Agent.no_sync`` a step spans several global batches: the planner sees one step whose samples
are the sum over its micro-batches (per rank), and the NaN guard's verdict covers all of them.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from idla.errors import ConfigError, GradientError
from idla.profile.clock import StepClock

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
    loss_sum: torch.Tensor | None = None
    """This rank's loss summed over its samples (mean loss × share, or the sum loss): a
    float64 scalar on the device, read once at the end of the step (None: no samples)."""

    @classmethod
    def empty(cls, world_size: int) -> StepWindow:
        return cls(shares=[0] * world_size)

    def add(self, size: int, shares: Sequence[int]) -> None:
        """A global batch of `size` samples split as `shares` joins the step."""
        self.size += size
        self.micro_batches += 1
        self.shares = [a + b for a, b in zip(self.shares, shares, strict=True)]

    def record(self, local: int, loss_sum: torch.Tensor) -> None:
        """This rank's backward over `local` samples (`loss_sum`: their summed loss, a float64
        scalar on the device; a non-finite one stays non-finite in the sum)."""
        self.local += local
        self.loss_sum = loss_sum if self.loss_sum is None else self.loss_sum + loss_sum


def check_backward(
    loss: torch.Tensor, reduction: str, reductions: Sequence[str], after_batch: bool
) -> None:
    """Refuse an `Agent.backward` call that cannot be exact.

    Raises:
        ConfigError: `reduction` is not one of `reductions`, or `loss` is not a scalar.
        RuntimeError: No batch from `Agent.batches` awaits its backward (`after_batch`).
    """
    if reduction not in reductions:
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not after_batch:
        raise RuntimeError("agent.backward() must follow a batch from agent.batches()")
    if loss.numel() != 1:
        raise ConfigError(f"agent.backward needs a scalar loss, got shape {tuple(loss.shape)}")


def read_step(
    window: StepWindow, grads: torch.Tensor | None, clock: StepClock
) -> tuple[float, bool]:
    """This rank's summed loss over the step and whether the step was non-finite (its loss,
    or with `grads` given (the NaN guard) its gradient), in one read from the device: the
    step's one host synchronization, after which backward is complete on any device."""
    if window.loss_sum is None:
        clock.synchronize()
        return 0.0, False
    parts = [window.loss_sum.reshape(1)]
    if grads is not None:
        parts.append(torch.isfinite(grads).all().to(parts[0].device, torch.float64).reshape(1))
    values = torch.cat(parts).tolist()
    return values[0], not math.isfinite(values[0]) or (grads is not None and values[1] == 0.0)


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
