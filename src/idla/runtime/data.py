"""Exactly-once data sharding: one seeded permutation per epoch, cut by the current shares; and
the per-rank batches of the relaxed synchronization modes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from idla.errors import ConfigError


@dataclass(frozen=True, slots=True)
class GlobalBatch:
    """One global batch: which samples of the epoch it holds."""

    epoch: int  # epoch number, from 0
    step_in_epoch: int  # index of this batch inside its epoch
    indices: torch.Tensor  # (size,) int64 dataset indices, identical on every rank

    @property
    def size(self) -> int:
        return int(self.indices.numel())


class GlobalBatchSampler:
    """Draws global batches from one permutation per epoch, seeded by (seed, epoch).

    The composition of every global batch depends only on the seed, the epoch and the epoch's
    cursor, never on the shares, so re-planning mid-epoch cannot skip or repeat a sample: each
    sample appears exactly once per epoch. The last batch of an epoch holds the remainder.
    """

    def __init__(self, dataset_size: int, global_batch_size: int, seed: int) -> None:
        if global_batch_size < 1:
            raise ConfigError(f"global batch must be at least 1, got {global_batch_size}")
        if dataset_size < global_batch_size:
            raise ConfigError(
                f"the data set has {dataset_size} samples, fewer than the global batch "
                f"{global_batch_size}"
            )
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed

    def steps_per_epoch(self) -> int:
        return -(-self.dataset_size // self.global_batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def epoch(self, epoch: int) -> list[GlobalBatch]:
        order = self.permutation(epoch)
        return [
            GlobalBatch(epoch, k, order[start : start + self.global_batch_size])
            for k, start in enumerate(range(0, self.dataset_size, self.global_batch_size))
        ]


def local_slice(shares: Sequence[int], rank: int) -> slice:
    """The part of a global batch that `rank` computes: shares are cut in rank order."""
    start = sum(shares[:rank])
    return slice(start, start + shares[rank])


class BatchFetcher:
    """Turns dataset indices into a batch: tensors are indexed directly, other data collated."""

    def __init__(self, dataset: Dataset | Sequence[torch.Tensor]) -> None:
        if isinstance(dataset, TensorDataset):
            self._tensors: tuple[torch.Tensor, ...] | None = tuple(dataset.tensors)
        elif isinstance(dataset, tuple | list) and all(
            isinstance(t, torch.Tensor) for t in dataset
        ):
            self._tensors = tuple(dataset)
        else:
            self._tensors = None
        self._dataset = dataset
        if self._tensors is not None:
            sizes = {int(t.shape[0]) for t in self._tensors}
            if len(sizes) != 1:
                raise ConfigError(f"data set tensors have different lengths: {sorted(sizes)}")
            self.size = sizes.pop()
        else:
            self.size = len(dataset)  # type: ignore[arg-type]

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._tensors is not None:
            return tuple(t[indices] for t in self._tensors)
        # An empty share still needs the right shapes: collate one sample and keep none of it.
        picked = [int(i) for i in indices] or [0]
        batch = default_collate([self._dataset[i] for i in picked])
        parts = tuple(batch) if isinstance(batch, list | tuple) else (batch,)
        return parts if indices.numel() else tuple(t[:0] for t in parts)


def local_batches(
    dataset: TensorDataset, batch_size: int, seed: int, rank: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) batches of exactly `batch_size` samples for one rank.

    Epoch e visits a permutation seeded by (seed, rank, e), so each rank draws its own order and
    a run is reproducible; the tail of an epoch shorter than a batch is dropped. Cost: one
    permutation per epoch and one gather per batch.
    """
    images, labels = dataset.tensors
    if not 1 <= batch_size <= len(labels):
        raise ConfigError(f"async.batch_size must be in 1..{len(labels)}, got {batch_size}")
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_003 + epoch)
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels) - batch_size + 1, batch_size):
            batch = order[start : start + batch_size]
            yield images[batch], labels[batch]
        epoch += 1
