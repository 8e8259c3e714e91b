"""`idla bench pool --live-only --quick` end to end: a real agent process (`idla pool start`),
a serving job under a real open-loop load, two training jobs on two devices; the JSON has the
issue's keys and sane numbers. The devices run at speed 1.8 (0.9 of a core each, the most two
fit on a 2-CPU machine) rather than --quick's 1 (half a core): the same run, about a third
shorter (some 20 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def test_quick_live_run_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "pool_live.json"
    done = subprocess.run([sys.executable, "-m", "idla.cli", "bench", "pool", "--live-only",
                           "--quick", "--live-speeds", "1.8,1.8", "--json", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "makespan" in done.stdout and "serving p99" in done.stdout
    live = json.loads(out.read_text())["live"]
    run = live["idla"]
    assert [j["priority"] for j in run["jobs"]] == [1, 4]
    for job in run["jobs"]:
        assert job["state"] == "done", job
        assert job["jct_s"] > 0 and job["steps"] > 0
        assert job["steps_lost"] >= 0 and job["resizes"] >= 0
        assert "alone_s" not in job  # --quick runs no alone runs
    assert run["makespan_s"] >= max(j["jct_s"] for j in run["jobs"])
    serving = run["serving"]
    assert serving["requests"] > 0 and serving["windows"] > 0
    assert serving["failed"] >= 0 and serving["refused"] >= 0
    assert 0 <= serving["target_held_fraction"] <= 1 and serving["p99_ms"] > 0
    assert set(live["targets"]) >= {"max_steps_lost_per_resize", "serving_target_held_fraction"}
    assert live["settings"]["speeds"] == [1.8, 1.8] and live["machine"]["cpu_count"]
