"""A rank with a non-finite loss is left out of the weighted sum; the model stays finite."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from tests.distributed import workers
from tests.distributed.shared_launch import launch_cases


@functools.cache
def _rank_1_nan() -> dict[str, list[Any]]:
    """Rank 1 of three non-finite in one step, under each optimizer; one launch."""
    return launch_cases({opt: (workers.nan_step, ([100, 60, 40], [1], opt))
                         for opt in ("sgd", "adam")}, 3)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_nan_rank_is_left_out_and_the_rest_reweighted(optimizer_name: str) -> None:
    result = _rank_1_nan()[optimizer_name][0]

    assert result["finite"]
    # Adam's first step is lr·g/(|g|+eps): for gradient entries near eps the extra rounding of
    # the re-weighting (× 200/140) shows up at 1e-6 of an lr of 1e-3, so Adam gets 1e-5
    assert result["max_abs_diff"] < (1e-6 if optimizer_name == "sgd" else 1e-5)
    assert result["nonfinite_steps"] == [0, 1, 0]


@functools.cache
def _two_ranks() -> dict[str, list[Any]]:
    """Both ranks non-finite in one step, and rank 1 non-finite at every step; one launch."""
    return launch_cases({"all-nan": (workers.nan_step, ([50, 50], [0, 1], "adam")),
                         "repeat-offender": (workers.nan_every_step_on_rank_1, (8,))}, 2)


def test_all_ranks_nan_leaves_the_model_unchanged() -> None:
    result = _two_ranks()["all-nan"][0]

    assert result["unchanged"]
    assert result["finite"]


def test_a_repeat_offender_is_dropped_from_the_plan() -> None:
    result = _two_ranks()["repeat-offender"][0]

    assert result["dropped"] == [1]
    assert result["shares"] == [40, 0]
    assert result["nonfinite_steps"] == [0, 3]  # no samples after the third: nothing to drop
    assert result["finite"]
