"""A user's DataLoader under idla: dict samples of variable length, a padding collate_fn and two
worker processes per rank train exactly like one process over the same global batches
(float64, 1e-9), with every sample seen once per epoch, at uneven, idle, re-planned and
accumulated shares. One launch of two ranks runs every case."""

from __future__ import annotations

from typing import Any

import pytest

from idla.runtime.launch import launch_local
from tests.distributed import data_workers
from tests.distributed.data_workers import CASES, EPOCHS, SIZE

_results: list[dict[str, Any]] = []


def _run() -> list[dict[str, Any]]:
    if not _results:
        _results.extend(launch_local(data_workers.run_cases, (list(CASES),), 2))
    return _results


@pytest.mark.parametrize("case", list(CASES))
def test_a_data_loader_trains_like_one_process(case: str) -> None:
    # Execute
    results = _run()

    # Assert: rank 0 equals one process; the replicas agree
    assert results[0][case]["max_abs_diff"] < 1e-9
    assert results[1][case]["params"] == results[0][case]["params"]


@pytest.mark.parametrize("case", list(CASES))
def test_every_sample_is_seen_once_per_epoch(case: str) -> None:
    results = _run()

    for epoch in range(EPOCHS):
        seen = [i for r in results for i in r[case]["seen"][epoch]]
        assert sorted(seen) == list(range(SIZE))


def test_the_plan_lag_is_the_deepest_prefetch() -> None:
    results = _run()

    assert all(r[case]["lag"] == 2 * 2 for r in results for case in CASES)


def test_shares_were_uneven_and_the_short_batch_was_split() -> None:
    shares = _run()[0]["uneven"]["shares"]

    assert shares[0] == [9, 3] and len(shares) == EPOCHS * 6
    assert all(sum(s) == 2 for s in shares[5::6])


def test_replaced_settings_are_told_once_on_rank_0() -> None:
    results = _run()

    for case in CASES:
        assert len(results[0][case]["warnings"]) == 1 and results[1][case]["warnings"] == []
    assert "batch_size=5, shuffle=True" in results[0]["uneven"]["warnings"][0]


def test_an_iterable_data_set_is_refused_with_what_to_do() -> None:
    message = _run()[0]["iterable_refused"]

    assert "IterableDataset" in message and "map-style Dataset" in message


def test_rebalancing_changed_the_shares_planned_ahead() -> None:
    # rank 1 sleeps per sample, so the planner moves samples off it (4 batches late)
    shares = _run()[0]["rebalance"]["shares"]

    assert len({tuple(s) for s in shares if sum(s) == 12}) > 1
