"""The Flower example app end to end: Flower's real simulation (Ray), idla's strategy inside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower_app.py"


def test_flower_app_trains_and_rejects_malformed_updates(tmp_path: Path) -> None:
    out = tmp_path / "record.json"
    start_s = time.monotonic()

    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--clients", "5", "--rounds", "2", "--bad-clients", "2",
         "--aggregator", "trust", "--processes", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )

    elapsed_s = time.monotonic() - start_s
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    rounds = record["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for row in rounds:
        reasons = list(row["rejected"].values())
        assert len(row["accepted"]) == 3
        assert len(reasons) == 2
        assert any("shape" in reason for reason in reasons)
        assert any("non-finite" in reason for reason in reasons)
    accuracy = record["accuracy"]  # initial model, then after each round
    assert len(accuracy) == 3
    assert accuracy[-1] > accuracy[0] + 0.3
    assert record["report"]["totals"]["rejected"] == 4
    print(f"flower app: {elapsed_s:.1f} s")
