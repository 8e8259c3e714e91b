"""Exactness of the weighted all-reduce, bit-identical replicas, exactly-once data."""

from __future__ import annotations

import pytest

from idla.runtime.launch import launch_local
from tests.distributed import workers


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("leaves", [{}, {2: 0, 3: 1}], ids=["ring", "hub-leaf"])
def test_uneven_step_equals_single_process_step(
    optimizer_name: str, leaves: dict[int, int]
) -> None:
    # Prepare
    shares = [300, 150, 50, 12]

    # Execute
    results = launch_local(workers.one_step_uneven, (shares, optimizer_name, leaves), 4)

    # Assert
    assert results[0]["max_abs_diff"] < 1e-6


@pytest.mark.parametrize("leaves", [{}, {3: 0, 2: 0}], ids=["ring", "hub-leaf"])
def test_replicas_identical_and_each_sample_once_with_changing_shares(
    leaves: dict[int, int]
) -> None:
    # Prepare: shares change every step, so re-plans happen mid-epoch; one share is 0 at times
    plans = [[40, 30, 20, 10], [10, 20, 30, 40], [97, 3, 0, 0], [25, 25, 25, 25]]

    # Execute
    results = launch_local(workers.changing_shares, (plans, 3, 7, leaves), 4)

    # Assert
    assert len({r["hash"] for r in results}) == 1
    for epoch in range(3):
        samples = sorted(s for r in results for s in r["seen"][epoch])
        assert samples == list(range(300))


def test_same_seed_same_run_other_seed_other_run() -> None:
    plans = [[30, 30, 40], [50, 25, 25]]

    first = launch_local(workers.changing_shares, (plans, 2, 3), 3)
    again = launch_local(workers.changing_shares, (plans, 2, 3), 3)
    other = launch_local(workers.changing_shares, (plans, 2, 4), 3)

    assert first[0]["hash"] == again[0]["hash"]
    assert first[0]["seen"] == again[0]["seen"]
    assert first[0]["hash"] != other[0]["hash"]
