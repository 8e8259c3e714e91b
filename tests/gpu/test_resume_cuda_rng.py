"""Resume on CUDA: dropout after `restore_agent` draws what the uninterrupted run drew.

`save_agent` keeps each rank's own generators, the CPU one (``rank<r>.rng.torch``) and the
CUDA one of its device (``rank<r>.rng.cuda``); `restore_agent` hands each rank its own after
`restore_rng` has set rank 0's process-wide ones. Were the CUDA one not per rank, every rank
but 0 would resume with rank 0's stream, and the two-rank test below would fail. Two ranks
share the one GPU here (over gloo, as idla puts ranks that share a GPU): what one GPU allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gpu import fleet_workers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHARED_GPU = ["cuda:0", "cuda:0"]


@pytest.fixture(scope="module")
def shared_gpu(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    directory = tmp_path_factory.mktemp("resume-shared-gpu")
    return fleet_workers.launch_on_devices(SHARED_GPU, {
        "planes": (fleet_workers.fleet_case, ()),
        "resume": (fleet_workers.resume_with_dropout, (str(directory),)),
    })


def _results(runs: dict[str, list[Any]], case: str) -> list[dict[str, Any]]:
    results = runs[case]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[0]
    return results


def test_one_process_resumes_dropout_on_cuda_exactly(tmp_path: Path) -> None:
    # Execute
    result = fleet_workers.resume_with_dropout(str(tmp_path))

    # Assert
    assert result["device"] == "cuda:0" and result["start"] == [1, 0]
    assert result["equal"], result


def test_two_ranks_on_one_gpu_share_it_over_gloo(shared_gpu: dict[str, list[Any]]) -> None:
    # Execute
    planes = _results(shared_gpu, "planes")

    # Assert: NCCL refuses two ranks on one GPU, so idla agrees on gloo and stages both
    assert {r["fleet"] for r in planes} == {"gloo: 0:cuda:0 1:cuda:0"}
    for rank, r in enumerate(planes):
        assert r["sum_ok"] and r["gathered"] == [0, 10] and r["received"] == float(1 - rank), r
        assert r["staged_ops"] >= 4, r


def test_every_gpu_rank_resumes_its_own_cuda_generator(shared_gpu: dict[str, list[Any]]) -> None:
    # Execute
    resumed = _results(shared_gpu, "resume")

    # Assert
    assert [r["start"] for r in resumed] == [[1, 0], [1, 0]]
    assert all(r["equal"] for r in resumed), (
        "after restore_agent the parameters differ from the uninterrupted run's by "
        f"{[r['max_difference'] for r in resumed]}: some rank's dropout did not resume its own "
        "CUDA generator")
