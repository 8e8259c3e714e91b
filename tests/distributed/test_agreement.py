"""Ranks that disagree on the job all stop at construction, naming what differs."""

from __future__ import annotations

from typing import Any

import pytest

from idla.runtime.launch import launch_local
from tests.distributed import agreement_workers

EXPECTED = {
    "global_batch": "global_batch_size differs: rank 0 has 16, rank 1 has 8",
    "seed": "seed differs: rank 0 has 0, rank 1 has 1",
    "model_shape": "parameter 2 '2.weight' has shape (4, 8) on rank 1, (3, 8) on rank 0",
    "compress": "compress differs: rank 0 has 'none', rank 1 has 'fp16'",
}
_results: list[dict[str, Any]] = []


def _run() -> list[dict[str, Any]]:
    if not _results:
        _results.extend(launch_local(agreement_workers.disagreements, (), 2, timeout_s=240))
    return _results


@pytest.mark.parametrize("scenario", agreement_workers.SCENARIOS)
def test_every_rank_raises_naming_what_differs(scenario: str) -> None:
    # Execute
    results = _run()

    # Assert: both ranks raise the same message, quickly (no hang until a timeout)
    messages = [r[scenario]["error"] for r in results]
    assert EXPECTED[scenario] in messages[0]
    assert messages[0] == messages[1]
    assert all(r[scenario]["elapsed_s"] < 5.0 for r in results)


def test_ranks_that_agree_run_and_may_differ_in_their_memory_cap() -> None:
    results = _run()

    assert all("error" not in r["agreed"] for r in results)
    assert results[0]["agreed"]["shares"] == [8, 8]
