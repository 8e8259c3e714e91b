"""`ShareLoader`: this rank's part of every global batch, from tensors, a map-style Dataset or a
user's `DataLoader`, with the shares of prefetched batches planned ahead.

The data argument may be
- tensors (a `TensorDataset`, or a tuple or list of tensors with one row per sample): indexed
  directly, each batch a tuple of tensors;
- a map-style `Dataset` (anything with ``__len__`` and ``__getitem__``): loaded in this process
  and collated by ``default_collate``;
- a `DataLoader`: its dataset, ``collate_fn`` and worker settings (``num_workers``,
  ``prefetch_factor``, ``pin_memory``, ``worker_init_fn``, ``persistent_workers``,
  ``multiprocessing_context``, ``generator``, ``timeout``) are kept; its ``batch_size``,
  ``shuffle``/``sampler``/``batch_sampler`` and ``drop_last`` are replaced by the job's order
  and shares (`replaced_settings` says which, for the one warning).
Batches are what the collate returns (dicts, nested lists and tuples, namedtuples, objects).

An `IterableDataset` is refused: exactly-once coverage cuts every global batch by index, and a
stream has none. Give a map-style Dataset (e.g. an index over the stream's shards) instead.

The plan lag. A DataLoader with workers asks its batch sampler for up to
``num_workers × prefetch_factor`` batches ahead of the one it returns. The job agrees on one lag
L, the largest such depth over its ranks (0 without workers), and the shares of global batch n
of a `batches` call are planned when batch n − L is about to be loaded (batches 0..L when the
call starts), from the planner as it stands then: at a step boundary, identical on every rank,
whenever each rank's loader actually asks. Without workers L = 0: each batch is planned just
before it is loaded. The composition of each global batch never depends on the shares, and
every plan is a partition of its batch; a plan change (a re-plan, a rank dropped for
non-finite gradients, ``agent.shares = ...``) reaches the batches L later: a dropped rank still
computes its samples of the batches planned before, and the NaN guard leaves them out if they
are not finite.

An empty share (0 samples on this rank) from a tensor data set is 0-row tensors; from a Dataset
or DataLoader it is the collate of the batch's first sample passed through
`idla.runtime.tree.empty_batch` (tensors cut to 0 rows, tensor-free lists emptied, other
objects kept): the collate never sees an empty list, and the agent runs no backward for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

from idla.errors import ConfigError
from idla.runtime.data import BatchFetcher, GlobalBatch, GlobalBatchSampler, local_slice
from idla.runtime.tree import empty_batch

Data = Dataset | Sequence[torch.Tensor] | DataLoader
"""What `ShareLoader` (and the Agent) accepts as data."""
Planner = Callable[[int], list[int]]
"""Shares per rank for a global batch of the given size (`JobPlanner.shares_for`)."""


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """A global batch with the shares planned for it and this rank's samples of it."""

    batch: GlobalBatch
    shares: list[int]  # samples per rank, summing to batch.size
    local: torch.Tensor  # (shares[rank],) int64 dataset indices this rank computes


def replaced_settings(loader: DataLoader) -> list[str]:
    """The settings of `loader` the job's order and shares replace, as ``name=value``."""
    replaced = []
    if loader.batch_size is not None:
        replaced.append(f"batch_size={loader.batch_size}")
    else:
        replaced.append(f"batch_sampler={type(loader.batch_sampler).__name__}")
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        replaced.append("shuffle=True")
    elif not isinstance(sampler, SequentialSampler):
        replaced.append(f"sampler={type(sampler).__name__}")
    if loader.drop_last:
        replaced.append("drop_last=True")
    if not getattr(loader, "in_order", True):  # the shares follow the batches in order
        replaced.append("in_order=False")
    return replaced


def prefetch_depth(num_workers: int, prefetch_factor: int | None) -> int:
    """Batches a DataLoader asks its batch sampler for ahead of the one it returns."""
    return num_workers * (prefetch_factor or 0) if num_workers > 0 else 0


class PlannedBatchSampler(Sampler[list[int]]):
    """The batch sampler of the internal DataLoader: this rank's indices of each planned global
    batch, read from the plan when the loader asks (which may be up to the lag ahead)."""

    def __init__(self) -> None:
        self.plan: dict[int, PlannedBatch] = {}
        self.count = 0  # batches in the current `ShareLoader.batches` call
        self.lag = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[int]]:
        for n in range(self.count):
            planned = self.plan.get(n)
            if planned is None:
                raise RuntimeError(f"the DataLoader asked for batch {n} before it was planned: "
                                   f"it prefetches further ahead than the plan lag {self.lag}")
            # An empty share loads the batch's first sample; `empty_batch` drops it after.
            yield planned.local.tolist() or [int(planned.batch.indices[0])]


def _map_style(dataset: Any, what: str) -> Dataset:
    if isinstance(dataset, IterableDataset):
        raise ConfigError(
            f"{what} is an IterableDataset: idla cuts every global batch by sample index so "
            "that each sample is seen exactly once per epoch, and a stream has no indices; "
            "give a map-style Dataset (with __len__ and __getitem__) instead")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ConfigError(f"{what} must be a map-style Dataset with __len__ and __getitem__, "
                          f"tensors, or a DataLoader; got {type(dataset).__name__}")
    return dataset


def _tensor_columns(data: Any) -> bool:
    return isinstance(data, TensorDataset) or (
        isinstance(data, tuple | list) and len(data) > 0
        and all(isinstance(t, torch.Tensor) for t in data))


class ShareLoader:
    """Loads this rank's share of every global batch of an epoch (see the module)."""

    def __init__(self, data: Data, global_batch_size: int, seed: int, rank: int) -> None:
        self.rank = rank
        self.replaced: list[str] = []  # DataLoader settings replaced (for the warning)
        self._fetcher: BatchFetcher | None = None
        self._index = PlannedBatchSampler()
        if _tensor_columns(data):
            self._fetcher = BatchFetcher(data)  # type: ignore[arg-type]
            size, self.local_lag = self._fetcher.size, 0
            self._loader: DataLoader | None = None
        elif isinstance(data, DataLoader):
            dataset = _map_style(data.dataset, "the DataLoader's dataset")
            if data.batch_sampler is None:
                raise ConfigError(
                    "the DataLoader has batch_size=None (its dataset gives whole batches): "
                    "idla cuts global batches by sample, so give any batch_size (it is "
                    "replaced by the shares) and a dataset of samples")
            self.replaced = replaced_settings(data)
            self._loader = DataLoader(
                dataset, batch_sampler=self._index, collate_fn=data.collate_fn,
                num_workers=data.num_workers, pin_memory=data.pin_memory,
                timeout=data.timeout, worker_init_fn=data.worker_init_fn,
                multiprocessing_context=data.multiprocessing_context,
                generator=data.generator, prefetch_factor=data.prefetch_factor,
                persistent_workers=data.persistent_workers)
            size = len(dataset)  # type: ignore[arg-type]
            self.local_lag = prefetch_depth(data.num_workers, data.prefetch_factor)
        else:
            dataset = _map_style(data, "the data set")
            self._loader = DataLoader(dataset, batch_sampler=self._index,
                                      collate_fn=default_collate)
            size, self.local_lag = len(dataset), 0  # type: ignore[arg-type]
        self.sampler = GlobalBatchSampler(size, global_batch_size, seed)

    @property
    def replaced_note(self) -> str:
        """The warning that says which DataLoader settings were replaced ("" for none)."""
        if not self.replaced:
            return ""
        return (f"idla.Agent: the DataLoader's {', '.join(self.replaced)} give way to the "
                f"job's shares of global batch {self.sampler.global_batch_size} (order seeded "
                "by AgentConfig.seed, each sample once per epoch, the last batch smaller); "
                "its dataset, collate_fn and worker settings are kept")

    @property
    def lag(self) -> int:
        """The job's plan lag (the largest `local_lag` over its ranks; set by the agent)."""
        return self._index.lag

    @lag.setter
    def lag(self, batches: int) -> None:
        if batches < self.local_lag:
            raise ValueError(f"the plan lag {batches} is below this rank's prefetch depth "
                             f"{self.local_lag}")
        self._index.lag = batches

    def batches(self, epoch: int, start: int,
                plan: Planner) -> Iterator[tuple[PlannedBatch, Callable[[], Any]]]:
        """(planned batch, load) for each global batch of `epoch` from `start` on; `load()`
        returns this rank's part of it as collated. Shares come from `plan` (called with each
        batch's size, `lag` batches ahead of its load, as the module says)."""
        todo = self.sampler.epoch(epoch)[start:]
        plans, index = self._index.plan, self._index
        plans.clear()
        index.count = len(todo)
        planned_upto = 0  # batches [0, planned_upto) are planned

        def plan_through(last: int) -> None:
            nonlocal planned_upto
            while planned_upto <= min(last, len(todo) - 1):
                batch = todo[planned_upto]
                shares = plan(batch.size)
                plans[planned_upto] = PlannedBatch(
                    batch, shares, batch.indices[local_slice(shares, self.rank)])
                planned_upto += 1

        plan_through(self.lag - 1)
        source = self._source(len(todo))
        for n in range(len(todo)):
            plan_through(n + self.lag)
            planned = plans[n]
            yield planned, functools.partial(self._load, source, planned)
            plans.pop(n, None)

    def _source(self, count: int) -> Iterator[Any]:
        if self._loader is not None:
            return iter(self._loader) if count else iter(())
        fetcher, plans = self._fetcher, self._index.plan
        assert fetcher is not None
        return (fetcher.fetch(plans[n].local) for n in range(count))

    def _load(self, source: Iterator[Any], planned: PlannedBatch) -> Any:
        loaded = next(source)
        if self._loader is not None and planned.local.numel() == 0:
            return empty_batch(loaded)
        return loaded
