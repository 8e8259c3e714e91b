"""The data argument: tensors, Datasets and DataLoaders; batch structures; planning ahead."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from idla.errors import ConfigError
from idla.runtime.loader import ShareLoader, prefetch_depth, replaced_settings
from idla.runtime.tree import empty_batch, map_tensors, move_to

Pair = namedtuple("Pair", ["x", "y"])


class _Words(Dataset):
    """Variable-length items as dicts: sample i is i + 1 tokens."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": torch.arange(index + 1.0), "label": index, "name": f"w{index}"}


def _pad(items: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = torch.nn.utils.rnn.pad_sequence([i["tokens"] for i in items], batch_first=True)
    return {"tokens": tokens, "label": torch.tensor([i["label"] for i in items]),
            "names": [i["name"] for i in items]}


class _Moves:
    def __init__(self) -> None:
        self.moved_to: torch.device | None = None

    def to(self, device: torch.device) -> _Moves:
        self.moved_to = device
        return self


def test_move_to_rebuilds_containers_and_asks_objects() -> None:
    batch = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": Pair(torch.ones(1), "s"),
             "c": _Moves()}

    moved = move_to(batch, torch.device("cpu"))

    assert isinstance(moved["b"], Pair) and moved["b"].y == "s"
    assert isinstance(moved["a"], list) and isinstance(moved["a"][1], tuple)
    assert moved["a"][1][1] == 3 and moved["c"].moved_to == torch.device("cpu")


def test_map_tensors_reaches_every_tensor() -> None:
    batch = Pair([torch.ones(2)], {"k": torch.ones(3)})

    doubled = map_tensors(lambda t: t * 2, batch)

    assert doubled.x[0].tolist() == [2.0, 2.0] and doubled.y["k"].tolist() == [2.0] * 3


def test_empty_batch_cuts_tensors_and_empties_per_sample_lists() -> None:
    batch = _pad([_Words()[3]])
    marker = _Moves()

    empty = empty_batch({**batch, "extra": marker})

    assert empty["tokens"].shape == (0, 4) and empty["label"].shape == (0,)
    assert empty["names"] == [] and empty["extra"] is marker


def _run(loader: ShareLoader, plan: Any, epoch: int = 0) -> list[tuple[list[int], Any]]:
    out = []
    for planned, load in loader.batches(epoch, 0, plan):
        out.append((planned.shares, load()))
    return out


def test_a_data_loader_keeps_its_collate_and_loses_its_batching() -> None:
    user = DataLoader(_Words(), batch_size=3, shuffle=True, drop_last=True, collate_fn=_pad)
    loader = ShareLoader(user, global_batch_size=4, seed=0, rank=1)

    got = _run(loader, lambda size: [1, size - 1])

    assert replaced_settings(user) == ["batch_size=3", "shuffle=True", "drop_last=True"]
    assert "batch_size=3, shuffle=True, drop_last=True" in loader.replaced_note
    assert [len(batch["names"]) for _, batch in got] == [3, 3, 1]
    rank_0 = _run(ShareLoader(user, global_batch_size=4, seed=0, rank=0), lambda s: [1, s - 1])
    seen = [name for part in [rank_0, got] for _, batch in part for name in batch["names"]]
    assert sorted(seen) == sorted(f"w{i}" for i in range(10))


def test_an_empty_share_is_a_well_formed_empty_batch() -> None:
    user = DataLoader(_Words(), collate_fn=_pad)
    loader = ShareLoader(user, global_batch_size=5, seed=0, rank=1)

    got = _run(loader, lambda size: [size, 0])

    for shares, batch in got:
        assert shares[1] == 0 and batch["tokens"].shape[0] == 0 and batch["names"] == []


class _Squares(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([float(index * index)]), "y": torch.tensor(index)}


def test_a_plain_data_set_is_default_collated_and_tensors_stay_a_tuple() -> None:
    columns = (torch.arange(20.0).reshape(10, 2), torch.arange(10))

    dicts = _run(ShareLoader(_Squares(), 4, 0, rank=0), lambda size: [size])
    tuples = _run(ShareLoader(columns, 4, 0, rank=0), lambda size: [size])

    assert isinstance(dicts[0][1], dict) and dicts[0][1]["x"].shape == (4, 1)
    assert isinstance(tuples[0][1], tuple) and tuples[-1][1][0].shape == (2, 2)


def test_shares_are_planned_lag_batches_ahead() -> None:
    loader = ShareLoader(_Squares(), global_batch_size=2, seed=0, rank=0)
    loader.lag = 2
    loads, planned_at = [0], {}

    def plan(size: int) -> list[int]:
        planned_at[len(planned_at)] = loads[0]
        return [size]

    for _, load in loader.batches(0, 0, plan):
        load()
        loads[0] += 1

    assert planned_at == {0: 0, 1: 0, 2: 0, 3: 1, 4: 2}


def test_the_lag_covers_a_prefetching_data_loader() -> None:
    user = DataLoader(_Squares(), num_workers=1, prefetch_factor=3)
    loader = ShareLoader(user, global_batch_size=2, seed=0, rank=0)
    loader.lag = loader.local_lag

    got = _run(loader, lambda size: [size])

    assert loader.local_lag == prefetch_depth(1, 3) == 3
    assert sorted(int(v) for _, b in got for v in b["y"]) == list(range(10))


class _Stream(IterableDataset):
    def __iter__(self) -> Any:
        return iter(range(3))


@pytest.mark.parametrize("data", [_Stream(), DataLoader(_Stream())])
def test_an_iterable_data_set_is_refused(data: Any) -> None:
    with pytest.raises(ConfigError, match=r"IterableDataset.*exactly once.*map-style"):
        ShareLoader(data, global_batch_size=2, seed=0, rank=0)


def test_a_data_loader_without_batching_is_refused_and_in_order_is_kept() -> None:
    with pytest.raises(ConfigError, match="batch_size=None"):
        ShareLoader(DataLoader(_Squares(), batch_size=None), global_batch_size=2, seed=0, rank=0)

    assert replaced_settings(DataLoader(_Squares(), in_order=False)) == [
        "batch_size=1", "in_order=False"]
