"""Resuming from a checkpoint in fresh processes continues the run bit for bit."""

from __future__ import annotations

from typing import Any

import pytest

from idla.runtime.checkpoint import load_checkpoint
from tests.distributed import resume_workers
from tests.distributed.shared_launch import launch_cases

CODECS = ["none", "topk:0.05"]
MID_BATCHES = {"epoch-boundary": 0, "mid-epoch": 5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run A (3 epochs straight) and run B up to batch `mid` of epoch 2, checkpointed by rank
    0, for both cases in one launch; then new processes (one more launch) load the
    checkpoints and train the third epoch."""
    root = tmp_path_factory.mktemp("resume")
    dirs = {name: root / name for name in MID_BATCHES}
    first = launch_cases({name: (resume_workers.straight_then_first_part,
                                 (CODECS, str(dirs[name]), mid))
                          for name, mid in MID_BATCHES.items()}, 2)
    second = launch_cases({name: (resume_workers.resumed_second_part,
                                  (CODECS, str(dirs[name])))
                           for name in MID_BATCHES}, 2)
    return {name: (dirs[name], first[name], second[name]) for name in MID_BATCHES}


@pytest.mark.parametrize("case", list(MID_BATCHES))
def test_resume_is_bit_identical(runs: dict[str, Any], case: str) -> None:
    # Execute
    tmp_path, first, second = runs[case]
    mid_batches = MID_BATCHES[case]

    # Assert: every rank of the resumed run ends where the uninterrupted run did
    for codec in CODECS:
        straight = first[0]["hashes"][codec]
        assert all(r["hashes"][codec] == straight for r in first)
        assert [r["hashes"][codec] for r in second] == [straight, straight], codec
        assert second[0]["steps"][codec] == 36  # 3 epochs of ceil(1437 / 128) batches
    saved = load_checkpoint(tmp_path / "topk_0.05")
    assert (saved.step, saved.epoch, saved.batch_in_epoch) == (24 + mid_batches, 2, mid_batches)
    assert {k.split(".")[0] for k in saved.extra_tensors} == {"rank0", "rank1"}
