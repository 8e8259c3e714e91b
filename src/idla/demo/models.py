"""The demo models: a small CNN and an MLP for 8×8 digits (training, federated, serving)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions (32 and 64 channels), a 2×2 max-pool and two linear layers."""

    def __init__(self, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 1, 8, 8)
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten, then ``layers`` hidden Linear+ReLU blocks of width ``hidden``, then a classifier.

    Cost per sample: about 2·(in_features·hidden + (layers-1)·hidden² + hidden·classes) FLOPs,
    so ``hidden`` and ``layers`` tune how heavy a serving benchmark's model is.
    """

    def __init__(
        self, in_features: int = 64, hidden: int = 256, layers: int = 2, classes: int = 10
    ) -> None:
        super().__init__()
        if min(in_features, hidden, classes) < 1 or layers < 0:
            raise ValueError(
                f"MLP: in_features {in_features}, hidden {hidden} and classes {classes} must be "
                f"at least 1 and layers {layers} at least 0"
            )
        blocks: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        blocks.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, *input_shape)
        return self.net(x)
