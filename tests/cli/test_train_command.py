"""`idla train` end to end: real worker processes, a report and a plot on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = [sys.executable, "-m", "idla.cli", "train", "--workers", "2", "--emulate-speeds", "none",
         "--global-batch", "256", "--quiet"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-epoch run (each start of `idla train` costs seconds here) that writes its report,
    plot and model to out/ and a checkpoint per epoch to ckpt/; two tests read it."""
    root = tmp_path_factory.mktemp("train")
    result = subprocess.run([*TRAIN, "--epochs", "2", "--checkpoint-dir", str(root / "ckpt"),
                             "--out", str(root / "out")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "stdout.txt").write_text(result.stdout)
    return root


def test_train_writes_report_and_plot(first_run: Path) -> None:
    out = first_run / "out"

    report = json.loads((out / "report.json").read_text())

    assert "test accuracy" in (first_run / "stdout.txt").read_text()
    assert report["world_size"] == 2
    assert sum(report["shares"]) == 256
    assert report["steps"] == 12 and len(report["history"]["shares"]) == report["steps"]
    assert (out / "training.png").stat().st_size > 1000


def test_profile_prints_a_row_per_worker_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"

    result = subprocess.run(
        [sys.executable, "-m", "idla.cli", "profile", "--workers", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["workers"]
    assert [row["rank"] for row in rows] == [0, 1]
    assert all(row["compute_per_sample_s"] > 0 for row in rows)
    assert all(row["link_bandwidth_bytes_per_s"] > 0 for row in rows)


def test_train_in_a_relaxed_sync_mode_reports_staleness_or_rounds(tmp_path: Path) -> None:
    for mode, workers in (("diloco:5", "2"), ("async:2", "3")):
        out = tmp_path / mode.replace(":", "_")

        result = subprocess.run(
            [sys.executable, "-m", "idla.cli", "train", "--workers", workers, "--emulate-speeds",
             "none", "--epochs", "2", "--global-batch", "128", "--sync", mode, "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )

        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["sync"] == mode
        assert 0.1 < report["test_accuracy"] <= 1.0
        if mode.startswith("async"):
            assert report["staleness"]["max"] <= 2 * (2 * 2 + 1)  # (N-1)(2S+1), N=2 workers
            assert report["workers"][0]["role"] == "server"
        else:
            assert all(w["rounds"] == report["workers"][0]["rounds"] for w in report["workers"])


def test_train_checkpoints_every_epoch_and_resumes(first_run: Path, tmp_path: Path) -> None:
    checkpoints = first_run / "ckpt"

    resumed = subprocess.run([*TRAIN, "--epochs", "3", "--resume", str(checkpoints),
                              "--out", str(tmp_path / "b")], capture_output=True, text=True,
                             timeout=300)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (checkpoints / "latest").read_text().strip() == "step-12"  # 2 epochs × 6 steps
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["steps"] == 18  # continued from step 12 through epoch 3
