"""The faults of `idla bench faults --serving`, one function per trial.

Each gets a `Trial` (the pool, the running server, an HTTP client on it) while the steady load
runs, strikes once, waits for what it measures, and returns its observations: what it did
(``fault``), the admin answer and its latency where it posts a rollout (``admin_status``,
``admin_s``), seconds to recover where something must come back (``recover_s``), and what the
service answered to the abuse. `idla.bench.serve_faults` runs them and counts the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from idla.bench.serve_fault_probes import (
    SLOW_KINDS,
    bad_bodies,
    bad_frames,
    is_closed,
    open_slow_clients,
    open_strangers,
    slow_client_states,
)
from idla.serve.link import WorkerError, WorkerLost
from idla.serve.model_server import HANDSHAKE_TIMEOUT_S
from idla.serve.server import ServingThread
from idla.serve.worker import LOAD_DELAY_ENV, WorkerPool

RECOVER_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.05
BUSY_PATIENCE_S = 1.0  # the kill waits at most this long for its victim to hold a request
SETTLE_S = 0.5  # after the injected hang ends, before the workers are asked what they serve


@dataclass
class Trial:
    pool: WorkerPool
    serving: ServingThread
    client: httpx.Client
    """On the server's URL, with the bearer token."""
    token: str
    models: dict[str, str]
    """Model directories: "v1" (served), "v2" (valid), "broken" (raises at build)."""
    hang_s: float
    """Seconds every hot load sleeps first (the worker's test-only hook)."""
    features: int
    slow_clients: int

    @property
    def address(self) -> tuple[str, int]:
        return self.serving.running.host, self.serving.running.port


def worker_versions(serving: ServingThread) -> list[str | None]:
    """What each worker itself says it serves (a ping on each link; None: no answer)."""
    async def ask() -> list[str | None]:
        versions: list[str | None] = []
        for worker in serving.router.workers:
            try:
                header, _ = await worker.link.call({"op": "ping"}, timeout_s=5)
                versions.append(str(header["version"]))
            except (WorkerLost, WorkerError, asyncio.TimeoutError, OSError):
                versions.append(None)
        return versions
    return serving.run(ask(), 30)


def workers_up(client: httpx.Client) -> int:
    try:
        return int(client.get("/healthz").json()["workers_up"])
    except (httpx.HTTPError, ValueError, KeyError):
        return 0


def until(predicate: Callable[[], bool], timeout_s: float = RECOVER_TIMEOUT_S) -> float | None:
    """Seconds until ``predicate()`` holds, polled; None when it did not within ``timeout_s``."""
    start_s = time.monotonic()
    while time.monotonic() - start_s < timeout_s:
        if predicate():
            return time.monotonic() - start_s
        time.sleep(POLL_INTERVAL_S)
    return None


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def clean(trial: Trial) -> dict[str, Any]:
    return {"fault": "none"}


def kill(trial: Trial) -> dict[str, Any]:
    """SIGKILL worker 1 as soon as it holds a request; recovery: every worker up again."""
    index, count = 1, len(trial.pool.workers)
    victim = trial.pool.workers[index].pid
    held = 0
    deadline_s = time.monotonic() + BUSY_PATIENCE_S
    while time.monotonic() < deadline_s:
        stats = trial.serving.call(trial.serving.router.stats)[index]
        held = stats["queued_requests"] + (stats["inflight_rows"] > 0)
        if held:
            break
        time.sleep(0.002)
    os.kill(victim, signal.SIGKILL)
    killed_s = time.monotonic()
    detect_s = until(lambda: workers_up(trial.client) < count)
    back = detect_s is not None and until(lambda: workers_up(trial.client) == count) is not None
    recover_s = time.monotonic() - killed_s if back else None
    samples = metric_samples(trial.client.get("/metrics").text)
    return {"fault": f"SIGKILL worker {index} (pid {victim}) holding {held} request(s)",
            "detect_s": detect_s, "recover_s": recover_s,
            "restarts": int(samples.get(("idla_worker_restarts_total",
                                         (("worker", str(index)),)), -1)),
            "new_pid": trial.pool.workers[index].pid}


def _post_model(trial: Trial, name: str) -> tuple[int, float, str]:
    start_s = time.monotonic()
    answer = trial.client.post("/admin/model", json={"path": trial.models[name]})
    elapsed_s = time.monotonic() - start_s
    try:
        reason = str(answer.json().get("error", ""))
    except ValueError:
        reason = answer.text
    return answer.status_code, elapsed_s, reason[:200]


def rollout_raises(trial: Trial) -> dict[str, Any]:
    status, elapsed_s, reason = _post_model(trial, "broken")
    return {"fault": f"POST /admin/model: a checkpoint that raises at build (every load first "
                     f"sleeps the injected {trial.hang_s:g} s)",
            "admin_status": status, "admin_s": elapsed_s, "admin_error": reason}


def rollout_hangs(trial: Trial) -> dict[str, Any]:
    """Roll a valid model out while every load hangs past the load timeout, then again at once
    (the workers still load the aborted one); ask what they serve once the hang is over."""
    posted_s = time.monotonic()
    status, elapsed_s, reason = _post_model(trial, "v2")
    again, _, again_reason = _post_model(trial, "v2")
    time.sleep(max(0.0, posted_s + trial.hang_s + SETTLE_S - time.monotonic()))
    load_timeout_s = trial.serving.router.config.load_timeout_s
    return {"fault": f"POST /admin/model: loads hang {trial.hang_s:g} s (injected through "
                     f"{LOAD_DELAY_ENV}), load timeout {load_timeout_s:g} s",
            "admin_status": status, "admin_s": elapsed_s, "admin_error": reason,
            "second_status": again, "second_error": again_reason,
            "versions_once_hang_ended": worker_versions(trial.serving)}


def strangers(trial: Trial) -> dict[str, Any]:
    """Strangers on every worker port; the router's link to worker 0 is cut while they hold
    every connection that worker takes (recovery: linked again); then how many silent ones
    the workers still hold after their handshake timeout."""
    opened_s = time.monotonic()
    holders, seen = open_strangers(trial.pool.addresses)
    serving = trial.serving
    serving.call(lambda: serving.router.workers[0].link.close())

    def relinked() -> bool:
        worker = serving.call(serving.router.stats)[0]
        return bool(worker["up"] and worker["reconnects"] >= 1)

    recover_s = until(relinked)
    time.sleep(max(0.0, opened_s + HANDSHAKE_TIMEOUT_S + 1 - time.monotonic()))
    still_open = sum(not is_closed(sock) for sock in holders)
    for sock in holders:
        sock.close()
    return {"fault": f"{seen['silent']} silent strangers, a wrong MAC, no handshake, HTTP on "
                     "a worker port; the router's link to worker 0 cut",
            "strangers": seen, "recover_s": recover_s, "silent_still_open": still_open,
            "handshake_timeout_s": HANDSHAKE_TIMEOUT_S}


def malformed_frames(trial: Trial) -> dict[str, Any]:
    seen = bad_frames(trial.pool.addresses[-1], trial.pool.secret)
    return {"fault": f"{seen['frames']} malformed frames, then 8 bytes of 0xff, from a peer "
                     f"with the secret on worker {len(trial.pool.workers) - 1}",
            "frames": seen,
            "workers_alive": all(w.process.poll() is None for w in trial.pool.workers)}


HEAD_TIMEOUT_S = 3.0
"""The trials' server gives a request line and headers this long (`ServeOptions.head_timeout_s`,
10 s by default), so the slow-clients trial stays short."""


def slow_clients(trial: Trial) -> dict[str, Any]:
    """Half-open HTTP connections, held past the server's keep-alive and head timeouts + 1 s."""
    keep_alive_s = float(trial.serving.running.server.config.timeout_keep_alive)
    held_s = max(keep_alive_s, HEAD_TIMEOUT_S) + 1
    with _counting_exceptions() as exceptions:
        clients = open_slow_clients(trial.address, trial.slow_clients, trial.token)
        time.sleep(held_s)
        states = slow_client_states(clients)
        for _, sock in clients:
            sock.close()
        time.sleep(SETTLE_S)  # the server sees them hang up
    stalled = [kind for kind in SLOW_KINDS if kind != "idle_after_answer"]
    return {"fault": f"{len(clients)} slow HTTP clients ({', '.join(SLOW_KINDS)}) held "
                     f"{held_s:g} s",
            "keep_alive_timeout_s": keep_alive_s, "head_timeout_s": HEAD_TIMEOUT_S,
            "slow_clients": states,
            "stalled_still_open": sum(states.get(k, {}).get("open", 0) for k in stalled),
            "stalled": sum(states.get(k, {}).get("clients", 0) for k in stalled),
            "unhandled_exceptions": exceptions.count}


class _CountExceptions(logging.Filter):
    """Counts (and keeps off stderr) the tracebacks uvicorn logs for unhandled exceptions."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            self.count += 1
            return False
        return True


@contextlib.contextmanager
def _counting_exceptions() -> Iterator[_CountExceptions]:
    counter = _CountExceptions()
    logger = logging.getLogger("uvicorn.error")
    logger.addFilter(counter)
    try:
        yield counter
    finally:
        logger.removeFilter(counter)


def malformed_bodies(trial: Trial) -> dict[str, Any]:
    with _counting_exceptions() as exceptions:
        seen = bad_bodies(trial.address, trial.token, trial.features)
    return {"fault": f"{len(seen)} malformed predict bodies", "bodies": seen,
            "body_codes": dict(Counter(str(b["status"]) for b in seen)),
            "unhandled_exceptions": exceptions.count}


FAULTS: dict[str, Callable[[Trial], dict[str, Any]]] = {
    "clean": clean, "kill": kill, "rollout_raises": rollout_raises,
    "rollout_hangs": rollout_hangs, "strangers": strangers, "bad_frames": malformed_frames,
    "slow_clients": slow_clients, "bad_bodies": malformed_bodies,
}
