"""The demo workload: scikit-learn's digits (8×8 images, shipped offline) and a small CNN."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


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


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Digits as (train, test) tensors: images scaled to [0, 1], a stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=test_fraction, random_state=seed,
        stratify=digits.target,
    )
    train = TensorDataset(images[train_idx], labels[train_idx])
    test = TensorDataset(images[test_idx], labels[test_idx])
    return train, test


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    """Fraction of `data` the model classifies correctly."""
    images, labels = (t.to(device) for t in data.tensors)
    model.eval()
    predicted = model(images).argmax(dim=1)
    model.train()
    return float((predicted == labels).float().mean())
