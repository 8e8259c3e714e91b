"""Exactly-once sharding of global batches, independent of the shares; the epoch order as a
bijection evaluated on demand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from idla.errors import ConfigError
from idla.runtime.data import BatchFetcher, GlobalBatchSampler, local_slice
from idla.runtime.permutation import Bijection, round_keys


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 3000), seed=st.integers(0, 2**40), epoch=st.integers(0, 1000))
def test_the_order_is_a_permutation_of_the_data_set(size: int, seed: int, epoch: int) -> None:
    order = Bijection(size, round_keys(seed, epoch))(torch.arange(size))

    assert torch.equal(order.sort().values, torch.arange(size))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 1023, 1024, 1025, 65536, 100_003])
def test_the_order_is_a_permutation_at_power_of_two_edges(size: int) -> None:
    order = Bijection(size, round_keys(7, 1))(torch.arange(size))

    assert torch.equal(order.sort().values, torch.arange(size))


def test_any_batch_of_positions_maps_like_the_whole_order() -> None:
    bijection = Bijection(10_000, round_keys(3, 2))
    whole = bijection(torch.arange(10_000))

    part = bijection(torch.tensor([[9999, 0], [4321, 17]]))

    assert part.tolist() == [[int(whole[9999]), int(whole[0])], [int(whole[4321]), int(whole[17])]]


def test_the_order_shuffles() -> None:
    order = Bijection(10_000, round_keys(0, 0))(torch.arange(10_000)).double()

    fixed_points = int((order == torch.arange(10_000)).sum())
    correlation = torch.corrcoef(torch.stack([order, torch.arange(10_000.0)]))[0, 1]
    assert fixed_points < 10 and abs(float(correlation)) < 0.05


def test_batches_are_computed_alone_and_lazily() -> None:
    sampler = GlobalBatchSampler(10**12 + 7, 256, seed=1)
    epoch = sampler.epoch(0)

    tail = epoch[len(epoch) - 2:]

    assert len(epoch) == -(-(10**12 + 7) // 256) and len(tail) == 2
    assert tail[0].step_in_epoch == len(epoch) - 2 and tail[0].size == 256
    assert tail[1].size == 7
    assert torch.equal(epoch[5].indices, sampler.batch(0, 5).indices)
    assert int(tail[1].indices.max()) < 10**12


@settings(max_examples=50, deadline=None)
@given(size=st.integers(1, 500), batch=st.integers(1, 500), seed=st.integers(0, 100))
def test_every_sample_once_per_epoch_for_any_global_batch(size: int, batch: int,
                                                           seed: int) -> None:
    batch = min(batch, size)
    sampler = GlobalBatchSampler(size, batch, seed)

    seen = torch.cat([b.indices for b in sampler.epoch(seed)])

    assert sorted(seen.tolist()) == list(range(size))
    assert all(b.size == batch for b in sampler.epoch(0)[:-1])


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
    assert torch.equal(torch.cat([b.indices for b in a.epoch(2)]), a.permutation(2))


def test_last_batch_holds_the_remainder() -> None:
    batches = GlobalBatchSampler(1437, 512, seed=0).epoch(0)

    assert [b.size for b in batches] == [512, 512, 413]


def test_data_set_smaller_than_the_batch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fewer than the global batch"):
        GlobalBatchSampler(100, 512, seed=0)


def test_tensor_columns_are_indexed_and_empty_shares_have_zero_rows() -> None:
    fetcher = BatchFetcher((torch.arange(10.0).reshape(5, 2), torch.arange(5)))

    x, y = fetcher.fetch(torch.tensor([4, 1]))
    empty_x, empty_y = fetcher.fetch(torch.tensor([], dtype=torch.int64))

    assert x.tolist() == [[8.0, 9.0], [2.0, 3.0]] and y.tolist() == [4, 1]
    assert empty_x.shape == (0, 2) and empty_y.shape == (0,)
