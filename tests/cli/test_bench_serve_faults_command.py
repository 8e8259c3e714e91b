"""`idla bench faults --serving` end to end, in its smallest form: a real pool of 2 CPU workers
behind a real HTTP server, open-loop load from another process, the table and the JSON.

The trials that wait out the servers' own timeouts (strangers: the workers' 5 s handshake
timeout; slow clients: uvicorn's 5 s keep-alive timeout) are left out, and each trial's load
lasts 1 s (the kill and the rollouts run as long as they need), to stay within ~20 s;
tests/distributed/test_serve_recovery.py covers the workers' side of both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TRIALS = ("kill", "rollout_raises", "rollout_hangs", "bad_frames", "bad_bodies")


def test_serving_faults_fail_no_request_keep_the_old_model_and_leave_the_service_up(
        tmp_path: Path) -> None:
    out = tmp_path / "serve_faults.json"

    result = subprocess.run(
        [sys.executable, "-m", "idla.cli", "bench", "faults", "--serving", "--workers", "2",
         "--duration", "1", "--rate", "20", "--load-timeout", "0.5",
         "--trials", ",".join(TRIALS), "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "recover s" in result.stdout and "IDLA_TEST_ONLY_LOAD_DELAY_S" in result.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["workers"] == 2 and report["machine"]["cpu_count"] >= 1
    trials = {t["name"]: t for t in report["trials"]}
    assert tuple(trials) == TRIALS
    kill = trials["kill"]
    assert kill["failed"] == 0 and kill["finished"] > 0
    assert kill["recover_s"] is not None and kill["restarts"] == 1
    for name in ("rollout_raises", "rollout_hangs"):
        assert 400 <= trials[name]["admin_status"] < 600, trials[name]
        assert trials[name]["old_model_kept"], trials[name]
    assert trials["rollout_hangs"]["admin_s"] < 0.5 + 1.0
    assert set(trials["rollout_hangs"]["versions_once_hang_ended"]) == {"v1"}
    frames = trials["bad_frames"]["frames"]
    assert frames["error_replies"] == frames["frames"] and frames["pong_after"]
    assert all(t["up_after"] and t["workers_up_after"] == 2 for t in trials.values())
    assert report["summary"]["up_after_every_trial"]
