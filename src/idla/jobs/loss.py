"""The loss the training loops take as a callback, so that a caller can time, dilate or replace
the forward pass without a flag in the loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""(model, inputs, targets) -> the batch's mean loss, the forward pass included."""


def cross_entropy_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The demo's loss: mean cross-entropy of `model(inputs)` against class `targets`."""
    return F.cross_entropy(model(inputs), targets)
