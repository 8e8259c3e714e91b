"""Exactness of the weighted all-reduce, bit-identical replicas, exactly-once data."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from tests.distributed import workers
from tests.distributed.shared_launch import launch_cases

UNEVEN_LEAVES = {"ring": {}, "hub-leaf": {2: 0, 3: 1}}
CHANGING_LEAVES = {"ring": {}, "hub-leaf": {3: 0, 2: 0}}
PLANS = [[40, 30, 20, 10], [10, 20, 30, 40], [97, 3, 0, 0], [25, 25, 25, 25]]
"""Shares that change every step, so re-plans happen mid-epoch; one share is 0 at times."""


@functools.cache
def _four_ranks() -> dict[str, list[Any]]:
    """Every four-rank case of this module, in one launch."""
    cases: dict[str, Any] = {
        f"uneven/{name}/{opt}": (workers.one_step_uneven, ([300, 150, 50, 12], opt, leaves))
        for name, leaves in UNEVEN_LEAVES.items() for opt in ("sgd", "adam")}
    cases.update({f"changing/{name}": (workers.changing_shares, (PLANS, 3, 7, leaves))
                  for name, leaves in CHANGING_LEAVES.items()})
    return launch_cases(cases, 4)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("leaves", list(UNEVEN_LEAVES))
def test_uneven_step_equals_single_process_step(optimizer_name: str, leaves: str) -> None:
    results = _four_ranks()[f"uneven/{leaves}/{optimizer_name}"]

    assert results[0]["max_abs_diff"] < 1e-6


@pytest.mark.parametrize("leaves", list(CHANGING_LEAVES))
def test_replicas_identical_and_each_sample_once_with_changing_shares(leaves: str) -> None:
    # Execute
    results = _four_ranks()[f"changing/{leaves}"]

    # Assert
    assert len({r["hash"] for r in results}) == 1
    for epoch in range(3):
        samples = sorted(s for r in results for s in r["seen"][epoch])
        assert samples == list(range(300))


def test_same_seed_same_run_other_seed_other_run() -> None:
    plans = [[30, 30, 40], [50, 25, 25]]

    runs = launch_cases({"first": (workers.changing_shares, (plans, 2, 3)),
                         "again": (workers.changing_shares, (plans, 2, 3)),
                         "other": (workers.changing_shares, (plans, 2, 4))}, 3)
    first, again, other = runs["first"], runs["again"], runs["other"]

    assert first[0]["hash"] == again[0]["hash"]
    assert first[0]["seen"] == again[0]["seen"]
    assert first[0]["hash"] != other[0]["hash"]
