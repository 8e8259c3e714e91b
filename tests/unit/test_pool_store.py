"""The pool's SQLite store: jobs survive a reopen, running jobs are requeued, history is kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from idla.errors import ConfigError
from idla.pool.spec import parse_spec
from idla.pool.store import Store

SPEC = ('name = "a"\nkind = "train"\npriority = 2\nmax_workers = 2\n'
        '[train]\nscript = "/srv/train.py"\n')


def test_a_reopened_store_has_every_job_and_requeues_the_running_ones(tmp_path: Path) -> None:
    store = Store(tmp_path / "pool.db")
    first = store.submit(parse_spec(SPEC, "a.toml"), now_s=10.0)
    second = store.submit(parse_spec(SPEC.replace('"a"', '"b"'), "b.toml"), now_s=11.0)
    store.set_state(first, "running", now_s=12.0)
    store.set_state(second, "cancelled", now_s=13.0)
    store.close()

    reopened = Store(tmp_path / "pool.db")
    requeued = reopened.requeue_running(now_s=20.0)

    assert requeued == [first]
    records = {r.job_id: r for r in reopened.jobs()}
    assert [r.spec.name for r in records.values()] == ["a", "b"]
    assert records[first].state == "queued" and records[first].starts == 1
    assert records[second].state == "cancelled" and records[second].finished_s == 13.0
    assert [e["kind"] for e in reopened.events(first)] == ["submitted", "running", "requeued"]
    third = reopened.submit(parse_spec(SPEC, "c.toml"))
    assert third not in (first, second)  # ids are never reused


def test_a_final_state_is_kept_and_unknown_states_or_jobs_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "pool.db")
    job = store.submit(parse_spec(SPEC, "a.toml"))
    store.set_state(job, "cancelled")

    store.set_state(job, "done")  # e.g. a worker that exited after the cancel

    assert store.job(job) is not None and store.job(job).state == "cancelled"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown job state"):
        store.set_state(job, "paused")
    with pytest.raises(KeyError):
        store.set_state("job-99", "done")


def test_the_allocation_history_records_changes_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "pool.db")

    store.record_allocation({"job-1": ("cpu1", "cpu0")}, now_s=1.0)
    store.record_allocation({"job-1": ("cpu0", "cpu1")}, now_s=2.0)  # the same: nothing new
    store.record_allocation({"job-1": ("cpu0",), "job-2": ("cpu1",)}, now_s=3.0)
    store.record_allocation({"job-2": ("cpu1",)}, now_s=4.0)

    assert store.allocations() == [(1.0, "job-1", ("cpu0", "cpu1")),
                                   (3.0, "job-1", ("cpu0",)), (3.0, "job-2", ("cpu1",)),
                                   (4.0, "job-1", ())]


def test_a_failed_transaction_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    store = Store(tmp_path / "pool.db")
    store.submit(parse_spec(SPEC, "a.toml"))
    before = [r.as_json() for r in store.jobs()]

    with pytest.raises(sqlite3.Error), store._transaction() as db:
        db.execute("INSERT INTO jobs (id, spec, state, priority, submitted_s) "
                   "VALUES ('job-x', '{}', 'queued', 1, 0)")
        db.execute("INSERT INTO no_such_table VALUES (1)")

    assert [r.as_json() for r in store.jobs()] == before


def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    path.write_bytes(b"this is not sqlite" * 100)

    with pytest.raises(ConfigError, match="not a usable SQLite database"):
        Store(path)


def test_a_job_s_latest_measurements_replace_the_last_and_survive_a_reopen(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "pool.db")
    job = store.submit(parse_spec(SPEC, "a.toml"))
    store.set_metrics(job, {"step": 3, "samples_done": 384.0}, now_s=5.0)
    store.set_metrics(job, {"step": 9, "samples_done": 1152.0}, now_s=6.0)
    store.close()

    reopened = Store(tmp_path / "pool.db")

    assert reopened.metrics(job) == {"time_s": 6.0, "step": 9, "samples_done": 1152.0}
    assert reopened.metrics("job-99") == {}
