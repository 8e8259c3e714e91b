"""Buffers (BatchNorm statistics, a registered buffer read in forward) are identical on every
replica after each step and equal the one-process reference of their mode (float64, 1e-9);
at equal shares "broadcast" is DDP's broadcast_buffers=True; the replica check names buffers.

One two-rank launch runs every case (shared processes keep the module fast).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from idla.runtime.launch import launch_local
from tests.distributed import buffer_workers
from tests.distributed.buffer_workers import CASES, MODES

_results: list[dict[str, Any]] = []


def _run() -> list[dict[str, Any]]:
    if not _results:
        _results.extend(launch_local(buffer_workers.run_cases, (), 2))
    return _results


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_replicas_hold_the_references_parameters_and_buffers(case: str, mode: str) -> None:
    # Execute (every step also ran the replica check, buffers included)
    results = _run()
    run = results[0][f"{case}/{mode}"]

    # Assert
    assert run["max_abs_diff"]["parameters"] < 1e-9
    assert run["max_abs_diff"]["buffers"] < 1e-9
    assert all(r[f"{case}/{mode}"]["state"] == run["state"] for r in results)


@pytest.mark.parametrize("case", list(CASES))
def test_no_rank_is_planned_one_sample_with_batchnorm(case: str) -> None:
    run = _run()[0][f"{case}/broadcast"]

    assert run["min_local_batch"] == 2
    assert all(s == 0 or s >= 2 for shares in run["planned"] for s in shares)
    assert run["planned"][-1] == [3, 0]  # the short last batch of 3 goes whole to one rank


def test_rebalancing_moved_samples() -> None:
    planned = _run()[0]["rebalance/broadcast"]["planned"]

    assert any(shares != [6, 6] for shares in planned if sum(shares) == 12)


@pytest.mark.parametrize("mode", MODES)
def test_a_rank_left_out_as_non_finite_ends_the_step_with_finite_buffers(mode: str) -> None:
    run = _run()[1][f"nan_on_rank_1/{mode}"]

    assert run["nonfinite_steps"] == [0, 1]
    assert all(math.isfinite(v) for v in run["state"]["buffers"])


def test_equal_shares_broadcast_is_ddp_broadcast_buffers() -> None:
    results = _run()
    ddp_rank_0 = results[0]["ddp"]["ddp"]

    for r in results:
        for kind in ("parameters", "buffers"):
            diff = max(abs(a - b) for a, b in zip(r["ddp"]["idla"][kind], ddp_rank_0[kind],
                                                  strict=True))
            assert diff < 1e-9


def test_the_replica_check_names_a_perturbed_buffer_or_parameter() -> None:
    messages = _run()[0]["perturbed"]

    assert "buffers on rank(s) 1 differ" in messages["broadcast/buffer"]
    assert "parameters on rank(s) 1 differ" in messages["broadcast/parameter"]
    assert messages["none/buffer"] == ""  # buffers="none" leaves them per rank, unchecked
