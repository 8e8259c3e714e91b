"""`--sync` parsing and the mode the agent suggests from measurements."""

from __future__ import annotations

import pytest

from idla.errors import ConfigError
from idla.sync.modes import SyncMode, SyncSpec, advise_from_history, parse_sync, suggest_mode


@pytest.mark.parametrize(("text", "spec"), [
    ("allreduce", SyncSpec(SyncMode.ALLREDUCE)),
    ("local:8", SyncSpec(SyncMode.LOCAL, period_steps=8)),
    ("DiLoCo:20", SyncSpec(SyncMode.DILOCO, period_steps=20)),
    ("async:0", SyncSpec(SyncMode.ASYNC, staleness_bound=0)),
    ("async:4", SyncSpec(SyncMode.ASYNC, staleness_bound=4)),
])
def test_valid_modes_parse(text: str, spec: SyncSpec) -> None:
    assert parse_sync(text) == spec
    assert parse_sync(spec.describe()) == spec


@pytest.mark.parametrize(("text", "message"), [
    ("bogus", "unknown sync mode"), ("local:0", "at least 1"), ("diloco:-3", "at least 1"),
    ("async:-1", "0 or more"), ("local", "integer"), ("local:1.5", "integer"),
    ("allreduce:2", "no argument"), ("", "unknown sync mode"),
])
def test_bad_modes_give_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_sync(text)


def test_jittery_step_times_suggest_async() -> None:
    advice = suggest_mode(step_time_cv=0.4, comm_fraction=0.1)

    assert advice.spec.mode is SyncMode.ASYNC
    assert "40%" in advice.reason


def test_slow_link_suggests_diloco_and_a_steady_fast_job_stays_exact() -> None:
    assert suggest_mode(step_time_cv=0.05, comm_fraction=0.8).spec.mode is SyncMode.DILOCO
    assert suggest_mode(step_time_cv=0.05, comm_fraction=0.1).spec.mode is SyncMode.ALLREDUCE


def test_advice_from_a_run_history() -> None:
    steady = [[0.010, 0.020]] * 20
    jittery = [[0.010 * (1 + (i % 2)), 0.020] for i in range(20)]

    assert advise_from_history(steady, [0.001, 0.001]).spec.mode is SyncMode.ALLREDUCE
    assert advise_from_history(steady, [0.2, 0.2]).spec.mode is SyncMode.DILOCO
    assert advise_from_history(jittery, [0.001, 0.001]).spec.mode is SyncMode.ASYNC
    assert "too few" in advise_from_history([], []).reason
