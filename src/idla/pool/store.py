"""The pool's memory: jobs, their states, the allocation history and events, in one SQLite file.

stdlib `sqlite3` in WAL mode (readers never block the one writer), every change in one
transaction, so a crash leaves the database as it was before or after a change, never between.
A restarted agent reads it and resumes: a job that was running when the agent stopped has lost
its workers with it, so it goes back to the queue (`requeue_running`) and is started again, in a
fresh rendezvous, from its checkpoint when its script keeps one under its run dir
(``IDLA_POOL_RUN_DIR``, the same folder across restarts) and from the start otherwise.
Nothing is pickled: specs and allocations are JSON.

Each job's latest measurements (training: step, samples done, rate; serving: p99, the
fraction of time its target held, failed requests) are kept in ``job_metrics``, one row per job
replaced on each write, so that they outlive the job and the agent.

States: queued → running → done | failed | cancelled (running → queued on preemption or an
agent restart). Cost: one indexed row write per change; `allocations` reads O(history).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idla.errors import ConfigError
from idla.pool.spec import JobSpec, spec_from_mapping

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    priority REAL NOT NULL,
    submitted_s REAL NOT NULL,
    started_s REAL,
    finished_s REAL,
    starts INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS allocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time_s REAL NOT NULL,
    job TEXT NOT NULL,
    devices TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time_s REAL NOT NULL,
    job TEXT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job_metrics (
    job TEXT PRIMARY KEY,
    time_s REAL NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as stored."""

    job_id: str
    spec: JobSpec
    state: str
    submitted_s: float
    """Wall-clock time (Unix seconds) of the submission."""
    started_s: float | None
    """When it last started running (None if never)."""
    finished_s: float | None
    starts: int
    """How many times it was started (1 + restarts after preemption or an agent restart)."""
    message: str
    """Why it ended, for failed jobs; '' otherwise."""

    def as_json(self) -> dict[str, Any]:
        return {"id": self.job_id, "name": self.spec.name, "kind": self.spec.kind.value,
                "priority": self.spec.priority, "state": self.state,
                "submitted_s": self.submitted_s, "started_s": self.started_s,
                "finished_s": self.finished_s, "starts": self.starts,
                "message": self.message, "spec": self.spec.as_json()}


class Store:
    """The SQLite database of one pool agent; safe to share between the agent's threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise ConfigError(f"--db {path}: not a usable SQLite database ({error})") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def submit(self, spec: JobSpec, now_s: float | None = None) -> str:
        """Queue ``spec``; return its new id (``job-N``, never reused)."""
        now_s = time.time() if now_s is None else now_s
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO jobs (id, spec, state, priority, submitted_s) "
                "VALUES ('pending', ?, 'queued', ?, ?)",
                (json.dumps(spec.as_json()), spec.priority, now_s))
            job_id = f"job-{cursor.lastrowid}"
            db.execute("UPDATE jobs SET id = ? WHERE seq = ?", (job_id, cursor.lastrowid))
            self._event(db, now_s, job_id, "submitted", {"name": spec.name})
        return job_id

    def set_state(self, job_id: str, state: str, now_s: float | None = None,
                  message: str = "") -> None:
        """Move ``job_id`` to ``state`` (a final state is kept: a late change is ignored)."""
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        now_s = time.time() if now_s is None else now_s
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row[0] in FINAL_STATES:
                return
            if state == "running":
                db.execute("UPDATE jobs SET state = ?, started_s = ?, starts = starts + 1 "
                           "WHERE id = ?", (state, now_s, job_id))
            elif state in FINAL_STATES:
                db.execute("UPDATE jobs SET state = ?, finished_s = ?, message = ? WHERE id = ?",
                           (state, now_s, message, job_id))
            else:
                db.execute("UPDATE jobs SET state = ? WHERE id = ?", (state, job_id))
            self._event(db, now_s, job_id, state, {"message": message} if message else {})

    def requeue_running(self, now_s: float | None = None) -> list[str]:
        """After a restart: every job stored as running goes back to the queue."""
        now_s = time.time() if now_s is None else now_s
        with self._transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'")]
            db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'")
            for job_id in ids:
                self._event(db, now_s, job_id, "requeued", {"why": "agent restarted"})
        return ids

    def record_allocation(self, allocation: Mapping[str, Sequence[str]],
                          now_s: float | None = None) -> None:
        """Append the devices of every job whose devices changed (() for a job that lost all)."""
        now_s = time.time() if now_s is None else now_s
        with self._transaction() as db:
            last = self._last_allocation(db)
            for job_id in sorted(set(allocation) | set(last)):
                devices = sorted(allocation.get(job_id, ()))
                if devices != last.get(job_id, []):
                    db.execute("INSERT INTO allocations (time_s, job, devices) VALUES (?, ?, ?)",
                               (now_s, job_id, json.dumps(devices)))

    @staticmethod
    def _last_allocation(db: sqlite3.Connection) -> dict[str, list[str]]:
        last: dict[str, list[str]] = {}
        for job_id, devices in db.execute("SELECT job, devices FROM allocations ORDER BY seq"):
            last[job_id] = json.loads(devices)
        return {job: held for job, held in last.items() if held}

    def allocations(self) -> list[tuple[float, str, tuple[str, ...]]]:
        """The history: (time, job, its devices from then on), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT time_s, job, devices FROM allocations ORDER BY seq")
            return [(t, job, tuple(json.loads(d))) for t, job, d in rows]

    def add_event(self, job_id: str | None, kind: str, detail: Mapping[str, Any],
                  now_s: float | None = None) -> None:
        with self._transaction() as db:
            self._event(db, time.time() if now_s is None else now_s, job_id, kind, detail)

    @staticmethod
    def _event(db: sqlite3.Connection, now_s: float, job_id: str | None, kind: str,
               detail: Mapping[str, Any]) -> None:
        db.execute("INSERT INTO events (time_s, job, kind, detail) VALUES (?, ?, ?, ?)",
                   (now_s, job_id, kind, json.dumps(dict(detail))))

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT time_s, job, kind, detail FROM events "
                + ("WHERE job = ? " if job_id is not None else "") + "ORDER BY seq",
                (job_id,) if job_id is not None else ())
            return [{"time_s": t, "job": job, "kind": kind, **json.loads(detail)}
                    for t, job, kind, detail in rows]

    def set_metrics(self, job_id: str, values: Mapping[str, Any],
                    now_s: float | None = None) -> None:
        """Replace ``job_id``'s latest measurements (JSON-ready values)."""
        now_s = time.time() if now_s is None else now_s
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO job_metrics (job, time_s, detail) "
                       "VALUES (?, ?, ?)", (job_id, now_s, json.dumps(dict(values))))

    def metrics(self, job_id: str) -> dict[str, Any]:
        """``job_id``'s latest measurements with their time (``{}`` when none)."""
        with self._lock:
            row = self._db.execute("SELECT time_s, detail FROM job_metrics WHERE job = ?",
                                   (job_id,)).fetchone()
        return {} if row is None else {"time_s": row[0], **json.loads(row[1])}

    def job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        return None if row is None else _record(row)

    def jobs(self, states: Sequence[str] | None = None) -> list[JobRecord]:
        """Jobs in submission order, those in ``states`` only when given."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq").fetchall()
        records = [_record(row) for row in rows]
        return [r for r in records if states is None or r.state in states]


_COLUMNS = "id, spec, state, submitted_s, started_s, finished_s, starts, message"


def _record(row: tuple[Any, ...]) -> JobRecord:
    job_id, spec, state, submitted_s, started_s, finished_s, starts, message = row
    return JobRecord(job_id=job_id, spec=spec_from_mapping(json.loads(spec), f"stored {job_id}"),
                     state=state, submitted_s=submitted_s, started_s=started_s,
                     finished_s=finished_s, starts=starts, message=message)
