"""Resuming from a checkpoint in fresh processes continues the run bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest

from idla.runtime.checkpoint import load_checkpoint
from idla.runtime.launch import launch_local
from tests.distributed import resume_workers

CODECS = ["none", "topk:0.05"]


@pytest.mark.parametrize("mid_batches", [0, 5], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_bit_identical(tmp_path: Path, mid_batches: int) -> None:
    # Prepare: run A (3 epochs straight) and run B up to batch `mid_batches` of epoch 2,
    # checkpointed by rank 0
    first = launch_local(resume_workers.straight_then_first_part,
                         (CODECS, str(tmp_path), mid_batches), 2)

    # Execute: new processes load the checkpoints and train the third epoch
    second = launch_local(resume_workers.resumed_second_part, (CODECS, str(tmp_path)), 2)

    # Assert: every rank of the resumed run ends where the uninterrupted run did
    for codec in CODECS:
        straight = first[0]["hashes"][codec]
        assert all(r["hashes"][codec] == straight for r in first)
        assert [r["hashes"][codec] for r in second] == [straight, straight], codec
        assert second[0]["steps"][codec] == 36  # 3 epochs of ceil(1437 / 128) batches
    saved = load_checkpoint(tmp_path / "topk_0.05")
    assert (saved.step, saved.epoch, saved.batch_in_epoch) == (24 + mid_batches, 2, mid_batches)
    assert {k.split(".")[0] for k in saved.extra_tensors} == {"rank0", "rank1"}
