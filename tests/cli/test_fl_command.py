"""`idla fl simulate` end to end through the CLI: real worker processes, report and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idla.cli import main


def test_simulate_with_attackers_and_stragglers_writes_report_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "run"
    json_path = tmp_path / "report.json"

    code = main([
        "fl", "simulate", "--clients", "8", "--rounds", "3", "--clients-per-round", "4",
        "--processes", "2", "--local-epochs", "1", "--selection", "deadline",
        "--slow-fraction", "0.25", "--malicious", "0.25", "--attack", "scale",
        "--aggregator", "trust", "--out", str(out), "--json", str(json_path), "--quiet",
    ])

    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert json.loads(json_path.read_text()) == report
    assert (out / "fl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = report["history"]
    assert history["round"] == [1, 2, 3]
    assert all(0.0 <= a <= 1.0 for a in history["accuracy"])
    assert report["final_accuracy"] == history["accuracy"][-1]
    assert len(report["slow_clients"]) == 2 and len(report["malicious_clients"]) == 2
    assert report["settings"]["deadline_s"] > 0  # derived from the profiles
    assert report["processes"] == 2 and report["rounds_per_s"] > 0
    assert sorted(int(c) for c in report["trust"]) == list(range(8))
    assert all(0.0 <= t <= 1.0 for t in report["trust"].values())
    totals = report["totals"]
    handled = totals["accepted"] + totals["rejected"] + totals["late"] + totals["failed"]
    assert handled == totals["selected"] == sum(
        row["selected"] for row in report["participation"].values())
    # Every round's emulated length is the last arrival or the deadline, never beyond it.
    assert max(history["round_s"]) <= report["settings"]["deadline_s"] + 1e-12


def test_same_seed_same_accuracy_curve(tmp_path: Path) -> None:
    args = ["fl", "simulate", "--clients", "6", "--rounds", "2", "--clients-per-round", "6",
            "--processes", "2", "--local-epochs", "1", "--quiet", "--seed", "3"]

    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--processes", "1", "--out", str(tmp_path / "b")]) == 0

    first = json.loads((tmp_path / "a" / "report.json").read_text())
    second = json.loads((tmp_path / "b" / "report.json").read_text())
    assert first["history"]["accuracy"] == second["history"]["accuracy"]
    assert first["history"]["accuracy"][-1] > first["initial_accuracy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha", "0"], "--alpha must be > 0"),
        (["--alpha", "-0.5"], "--alpha must be > 0"),
        (["--malicious", "1.5"], "--malicious must be a fraction in [0, 1]"),
        (["--slow-fraction", "-0.1"], "--slow-fraction must be a fraction in [0, 1]"),
        (["--attack", "poison"], "--attack: unknown attack 'poison'"),
        (["--aggregator", "mean"], "--aggregator: unknown 'mean'"),
        (["--slow-factor", "0.5"], "--slow-factor must be >= 1"),
        (["--clients", "0"], "--clients must be an integer >= 1"),
        (["--clients", "5000"], "more than the 1437 training samples"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["fl", "simulate", "--quiet", "--out", str(tmp_path / "out"), *args])

    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("idla: error: ")
    assert message in lines[0]
    assert "Traceback" not in captured.err
