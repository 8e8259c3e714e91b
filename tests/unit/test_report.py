"""Straggler diagnosis, atomic JSON writes and the history plot."""

import json
from pathlib import Path

import pytest

from idla.report import diagnose_stragglers, plot_history, write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_balanced_ranks_give_no_lines() -> None:
    lines = diagnose_stragglers([1.0, 1.1, 0.95, 1.05], [0.2, 0.21, 0.19, 0.2], [0.1] * 4)

    assert lines == []


def test_all_zero_timings_give_no_lines() -> None:
    assert diagnose_stragglers([0.0] * 3, [0.0] * 3, [0.0] * 3) == []


def test_slow_compute_is_named() -> None:
    compute_s = [1.0, 1.0, 1.0, 4.1]
    wait_s = [3.1, 3.1, 3.1, 0.0]

    lines = diagnose_stragglers(compute_s, [0.1] * 4, wait_s)

    assert lines == ["rank 3: compute 4.1× the median"]


def test_slow_link_is_named() -> None:
    comm_s = [0.2, 0.2, 0.46, 0.2]

    lines = diagnose_stragglers([1.0] * 4, comm_s, [0.3, 0.3, 0.0, 0.3])

    assert lines == ["rank 2: communication 2.3× the median (its link)"]


def test_zero_median_communication_is_reported_in_seconds() -> None:
    lines = diagnose_stragglers([1.0] * 3, [0.0, 0.0, 0.5], [0.5, 0.5, 0.0])

    assert lines == ["rank 2: communication 0.5 s while the median is 0 s (its link)"]


def test_write_json_atomic_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    write_json_atomic(target, {"samples_per_s": 12.5, "ranks": [0, 1]})

    assert json.loads(target.read_text()) == {"samples_per_s": 12.5, "ranks": [0, 1]}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_json_atomic_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})

    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_plot_history_writes_png(tmp_path: Path) -> None:
    history = {
        "step": [0, 1, 2],
        "shares": [[16, 16], [20, 12], [22, 10]],
        "samples_per_s": [100.0, 120.0, 130.0],
        "loss": [2.3, 2.0, 1.8],
    }
    target = tmp_path / "history.png"

    plot_history(history, target)

    assert target.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["history.png"]


def test_plot_empty_history_writes_png(tmp_path: Path) -> None:
    target = tmp_path / "empty.png"

    plot_history({"step": [], "shares": [], "samples_per_s": [], "loss": []}, target)

    assert target.read_bytes().startswith(PNG_MAGIC)


def test_a_planned_split_is_not_a_straggler() -> None:
    # fast ranks compute longer on bigger shares, slow leaves compute less and send: equally busy
    lines = diagnose_stragglers([0.030, 0.030, 0.020, 0.012], [0.004, 0.004, 0.014, 0.022],
                                [0.001, 0.001, 0.010, 0.018])

    assert lines == []
