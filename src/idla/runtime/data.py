"""Exactly-once data sharding: one seeded bijection per epoch, cut by the current shares; and
the per-rank batches of the relaxed synchronization modes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch.utils.data import TensorDataset

from idla.errors import ConfigError
from idla.runtime.permutation import Bijection, round_keys


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
    """Draws global batches from one pseudo-random order per epoch, seeded by (seed, epoch).

    The composition of every global batch depends only on the seed, the epoch and the epoch's
    cursor, never on the shares, so re-planning mid-epoch cannot skip or repeat a sample: each
    sample appears exactly once per epoch. The last batch of an epoch holds the remainder.
    Batch k of epoch e is computed on its own (`idla.runtime.permutation`): O(global batch)
    time and memory, whatever the size of the data set.
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

    def order(self, epoch: int) -> Bijection:
        """Epoch `epoch`'s order: position p of the epoch visits sample ``order(p)``."""
        return Bijection(self.dataset_size, round_keys(self.seed, epoch))

    def permutation(self, epoch: int) -> torch.Tensor:
        """The whole order of `epoch` (O(data set): for tests and small data)."""
        return self.order(epoch)(torch.arange(self.dataset_size))

    def batch(self, epoch: int, step_in_epoch: int) -> GlobalBatch:
        """Global batch `step_in_epoch` of `epoch`, computed directly."""
        start = step_in_epoch * self.global_batch_size
        stop = min(start + self.global_batch_size, self.dataset_size)
        return GlobalBatch(epoch, step_in_epoch, self.order(epoch)(torch.arange(start, stop)))

    def epoch(self, epoch: int) -> EpochBatches:
        """The global batches of `epoch`, as a lazy sequence (no batch is built until asked)."""
        return EpochBatches(self, epoch, range(self.steps_per_epoch()))


class EpochBatches(Sequence[GlobalBatch]):
    """The global batches of one epoch (or a slice of them): `len`, indexing, slicing and
    iteration, each batch computed when it is asked for."""

    def __init__(self, sampler: GlobalBatchSampler, epoch: int, steps: range) -> None:
        self.sampler, self.epoch, self.steps = sampler, epoch, steps

    def __len__(self) -> int:
        return len(self.steps)

    @overload
    def __getitem__(self, index: int) -> GlobalBatch: ...

    @overload
    def __getitem__(self, index: slice) -> EpochBatches: ...

    def __getitem__(self, index: int | slice) -> GlobalBatch | EpochBatches:
        if isinstance(index, slice):
            return EpochBatches(self.sampler, self.epoch, self.steps[index])
        return self.sampler.batch(self.epoch, self.steps[index])

    def __iter__(self) -> Iterator[GlobalBatch]:
        for step in self.steps:
            yield self.sampler.batch(self.epoch, step)


def local_slice(shares: Sequence[int], rank: int) -> slice:
    """The part of a global batch that `rank` computes: shares are cut in rank order."""
    start = sum(shares[:rank])
    return slice(start, start + shares[rank])


class BatchFetcher:
    """Turns dataset indices into a batch of tensor columns, indexed directly."""

    def __init__(self, dataset: TensorDataset | Sequence[torch.Tensor]) -> None:
        self._tensors = tuple(dataset.tensors if isinstance(dataset, TensorDataset) else dataset)
        sizes = {int(t.shape[0]) for t in self._tensors}
        if len(sizes) != 1:
            raise ConfigError(f"data set tensors have different lengths: {sorted(sizes)}")
        self.size = sizes.pop()

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(len(indices), ...) rows of every column; 0 rows for an empty share."""
        return tuple(t[indices] for t in self._tensors)


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
