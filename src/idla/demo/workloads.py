"""The benchmark workloads by name: data, model, loss, held-out metric and default batch.

`idla bench hetero --model NAME` picks one; "digits" is the demo CNN on 8×8 digits, whose step
is dominated by fixed per-step costs, "resnet" and "transformer" (demo/synthetic.py) are
compute-dominated steps on synthetic data generated from the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from idla.demo.data import accuracy, load_digits_split
from idla.demo.models import DigitsCNN
from idla.demo.synthetic import (
    SmallResNet,
    TinyTransformerLM,
    markov_tokens_split,
    mean_token_loss,
    pattern_images_split,
    token_cross_entropy,
)

Split = tuple[TensorDataset, TensorDataset]


def class_cross_entropy(model: nn.Module, inputs: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `model(inputs)` (batch, classes) against class `labels`."""
    return F.cross_entropy(model(inputs), labels)


@dataclass(frozen=True, slots=True)
class Workload:
    """One benchmark job: what trains on what, and how it is judged."""

    name: str
    split: Callable[[int], Split]
    """(train, test) from the seed."""
    model: Callable[[], nn.Module]
    """A fresh model; seed torch first, as the initial weights come from its global RNG."""
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    """(model, inputs, targets) -> the mean loss over the batch's samples."""
    metric: str
    """Name of the held-out figure: "test_accuracy" (higher is better) or "test_loss"."""
    evaluate: Callable[[nn.Module, TensorDataset, torch.device], float]
    """The held-out figure of a model on the test set."""
    global_batch_size: int
    """Default samples per step (resnet, transformer: a training step of about 0.1–0.15 s on one
    full core, so a throttled worker's step is mostly compute)."""


WORKLOADS: dict[str, Workload] = {
    "digits": Workload("digits", lambda seed: load_digits_split(seed=seed), DigitsCNN,
                       class_cross_entropy, "test_accuracy", accuracy, 512),
    "resnet": Workload("resnet", lambda seed: pattern_images_split(seed=seed), SmallResNet,
                       class_cross_entropy, "test_accuracy", accuracy, 256),
    "transformer": Workload("transformer", lambda seed: markov_tokens_split(seed=seed),
                            TinyTransformerLM, token_cross_entropy, "test_loss",
                            mean_token_loss, 48),
}
