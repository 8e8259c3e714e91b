"""`idla bench hetero --model transformer` end to end, tiny: real throttled worker processes,
every kind of run, the table and the JSON. The one worker's quota is a whole core (the default
half a core only makes each of its three runs slower)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from idla.emulate.cgroup import cgroups_available


@pytest.mark.cgroup
@pytest.mark.skipif(not cgroups_available(), reason="needs a writable cgroup v1 cpu controller")
def test_bench_hetero_runs_the_transformer_and_reports_the_balanced_limit(
        tmp_path: Path) -> None:
    out = tmp_path / "hetero.json"

    result = subprocess.run(
        [sys.executable, "-m", "idla.cli", "bench", "hetero", "--model", "transformer",
         "--speeds", "none", "--base-cores", "1", "--global-batch", "4", "--steps", "11",
         "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "test loss" in result.stdout and "balanced" in result.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["model"] == "transformer"
    assert report["metric"] == "test_loss"
    assert report["balanced"]["same_run_as"] == "ddp"  # one worker: nothing to balance
    for kind in ("ddp", "idla", "balanced"):
        assert report[kind]["samples_per_s"] > 0
        assert 0 < report[kind]["test_loss"] < 7
    assert report["of_balanced"] == pytest.approx(
        report["idla"]["samples_per_s"] / report["balanced"]["samples_per_s"])
