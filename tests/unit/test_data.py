"""Exactly-once sharding of global batches, independent of the shares."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from idla.errors import ConfigError
from idla.runtime.data import BatchFetcher, GlobalBatchSampler, local_slice


def test_every_sample_once_per_epoch_whatever_the_shares() -> None:
    sampler = GlobalBatchSampler(1000, 128, seed=5)
    plans = [[64, 32, 32], [1, 1, 126], [100, 28, 0]]

    seen: list[int] = []
    for step, batch in enumerate(sampler.epoch(3)):
        shares = plans[step % len(plans)]
        if batch.size != sum(shares):
            shares = [batch.size, 0, 0]
        for rank in range(3):
            seen.extend(batch.indices[local_slice(shares, rank)].tolist())

    assert sorted(seen) == list(range(1000))


def test_order_depends_on_seed_and_epoch_only() -> None:
    a, b = GlobalBatchSampler(100, 10, seed=1), GlobalBatchSampler(100, 10, seed=1)

    assert torch.equal(a.permutation(2), b.permutation(2))
    assert not torch.equal(a.permutation(2), a.permutation(3))
    assert not torch.equal(a.permutation(2), GlobalBatchSampler(100, 10, 2).permutation(2))


def test_last_batch_holds_the_remainder() -> None:
    batches = GlobalBatchSampler(1437, 512, seed=0).epoch(0)

    assert [b.size for b in batches] == [512, 512, 413]


def test_data_set_smaller_than_the_batch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fewer than the global batch"):
        GlobalBatchSampler(100, 512, seed=0)


class _Squares(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(index * index)]), index


def test_generic_data_sets_are_collated_and_empty_shares_keep_shapes() -> None:
    fetcher = BatchFetcher(_Squares())

    x, y = fetcher.fetch(torch.tensor([2, 3]))
    empty_x, empty_y = fetcher.fetch(torch.tensor([], dtype=torch.int64))

    assert x.tolist() == [[4.0], [9.0]] and y.tolist() == [2, 3]
    assert empty_x.shape == (0, 1) and empty_y.shape == (0,)
