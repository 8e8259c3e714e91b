"""The demo data: scikit-learn's digits (8×8 images, shipped offline) and accuracy on it."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


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


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels) of the demo digits split."""
    train, test = load_digits_split()
    train_images, train_labels = train.tensors
    test_images, test_labels = test.tensors
    return train_images, train_labels, test_images, test_labels
