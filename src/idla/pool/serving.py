"""How the pool follows a serving job: its `idla serve` router's latency, read from /metrics.

The pool starts one `idla serve` process for a serving job (``--latency-target-ms`` from the
spec's ``p99_ms``, ``--port 0``, a token file under the run dir). A `ServeWatch` finds the
router's URL in the job's log (``idla serve: http://host:port``), then scrapes ``GET /metrics``
(with the job's token) every ``interval_s`` on a thread of its own, so a slow router never
stalls the agent's loop. Between two scrapes it takes the difference of the cumulative latency
histogram (``idla_request_latency_seconds``) and of the request counters:

- ``p99_ms``: the 99th percentile of that interval's answered predict requests, interpolated
  linearly inside its histogram bucket (as Prometheus' ``histogram_quantile``);
- the interval *holds* its target when that p99 is within ``p99_ms`` and at most 1 % of its
  predict requests were refused (429: predicted to miss the target) or failed (5xx);
- ``target_held_fraction``: the time-weighted fraction of intervals with requests that held.

It also resizes the deployment: a worker the pool started on a new device (`add`) is added to
the router with ``POST /admin/workers {"add": "host:port"}`` once its log says it is ready; a
worker to take away (`retire`) is retired with ``{"retire": index}`` first — the router stops
sending it requests and its queue goes to the others, so no request fails — and only then
stopped. Each worker's measured capacity (``idla_worker_capacity_requests_per_second``) is
kept per device for the pool's models. Cost: one HTTP GET and O(metric lines) parsing per
scrape; one POST per membership change.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_URL = re.compile(r"idla serve: (http://[\w.\-\[\]:]+)")
_LINE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
LATENCY = "idla_request_latency_seconds_bucket"
MAX_METRICS_BYTES = 1 << 20
"""A /metrics answer larger than this is not parsed."""


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition → {(name, sorted labels): value}; comments and lines that do
    not parse are skipped."""
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        values[(name, tuple(sorted(_LABEL.findall(labels or ""))))] = number
    return values


def latency_buckets(values: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]
                    ) -> list[tuple[float, float]]:
    """The latency histogram as sorted (upper bound seconds, cumulative count) pairs."""
    buckets = []
    for (name, labels), count in values.items():
        if name == LATENCY:
            bound = dict(labels).get("le", "")
            buckets.append((math.inf if bound == "+Inf" else float(bound), count))
    return sorted(buckets)


def quantile_s(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram, linear within its bucket (the last finite
    bound when it falls in +Inf); None with no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_s, below = 0.0, 0.0
    for bound_s, count in buckets:
        if count >= rank:
            if math.isinf(bound_s):
                return lower_s
            inside = count - below
            return lower_s + (bound_s - lower_s) * ((rank - below) / inside if inside else 1.0)
        lower_s, below = bound_s, count
    return lower_s


def _total(values: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **match: str) -> float:
    return sum(v for (n, labels), v in values.items() if n == name
               and all(dict(labels).get(k) == want for k, want in match.items()))


def interval_summary(before: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
                     after: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
                     target_ms: float) -> dict[str, Any]:
    """What happened between two scrapes: requests, refusals, failures, p99 and whether the
    target held (module docstring)."""
    old = dict(latency_buckets(before))
    delta = [(bound, count - old.get(bound, 0.0)) for bound, count in latency_buckets(after)]
    requests = (_total(after, "idla_requests_total", endpoint="predict")
                - _total(before, "idla_requests_total", endpoint="predict"))
    refused = (_total(after, "idla_refused_requests_total")
               - _total(before, "idla_refused_requests_total"))
    failed = (_total(after, "idla_failed_requests_total")
              - _total(before, "idla_failed_requests_total"))
    p99_s = quantile_s(delta, 0.99)
    held = (p99_s is None or 1e3 * p99_s <= target_ms) and refused + failed <= 0.01 * requests
    return {"requests": requests, "refused": refused, "failed": failed,
            "p99_ms": None if p99_s is None else 1e3 * p99_s, "held": held}


class ServeWatch:
    """Follows one serving job's router and changes its membership (module docstring); every
    method is safe from any thread, the HTTP calls run on the watch's own.

    Args:
        log_path: The router's log, where `idla serve` prints its URL.
        token_path: The job's token file.
        target_ms: The spec's p99 target.
        anchor: The device of the router's own worker (slot 0).
        log_offset: Where this attempt's output starts in the log (bytes).
        interval_s: Seconds between two scrapes.
    """

    def __init__(self, log_path: Path, token_path: Path, target_ms: float, anchor: str,
                 log_offset: int = 0, interval_s: float = 1.0) -> None:
        self.log_path, self.token_path, self.log_offset = log_path, token_path, log_offset
        self.target_ms, self.interval_s = target_ms, interval_s
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"url": None, "requests": 0.0, "refused": 0.0,
                                       "failed": 0.0, "p99_ms": None, "workers_up": 0,
                                       "target_held_fraction": None, "p99_target_ms": target_ms}
        self._held_s = self._observed_s = 0.0
        self._slots: dict[str, int] = {anchor: 0}  # device → the router's worker index
        self._joining: dict[str, tuple[Path, int]] = {}  # device → (its log, tries left)
        self._retiring: list[tuple[str, Callable[[], None]]] = []
        self._capacity: dict[str, float] = {}  # device → requests/s (1-row requests)
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idla-pool-serve-watch",
                                        daemon=True)
        self._thread.start()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def add(self, device_id: str, log_path: Path) -> None:
        """Add the worker started on ``device_id`` once its log says it is ready."""
        with self._lock:
            self._joining[device_id] = (log_path, _JOIN_TRIES)

    def retire(self, device_id: str, stop: Callable[[], None]) -> None:
        """Retire the worker on ``device_id`` from the router, then call ``stop``."""
        with self._lock:
            self._joining.pop(device_id, None)
            self._retiring.append((device_id, stop))

    def forget(self, device_id: str) -> None:
        """The worker on ``device_id`` is gone (killed with its device)."""
        with self._lock:
            self._joining.pop(device_id, None)
            self._slots.pop(device_id, None)
            self._capacity.pop(device_id, None)

    def joined(self, devices: Iterable[str]) -> bool:
        """The router is up and serves with a worker on each of ``devices``."""
        with self._lock:
            return self._state["url"] is not None and all(d in self._slots for d in devices)

    def capacities(self) -> dict[str, float]:
        """Measured capacity (requests/s) of each device's worker."""
        with self._lock:
            return dict(self._capacity)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """Membership changes since the last call (for the store's history)."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _url(self) -> str | None:
        with contextlib.suppress(OSError):
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                found = _URL.search(log.read(64 << 10).decode("utf-8", errors="replace"))
            if found:
                return found.group(1)
        return None

    def _call(self, url: str, path: str, body: Mapping[str, Any] | None = None
              ) -> tuple[int, bytes]:
        """(status, body) of one call to the router with the job's token; (0, b"") when it
        cannot be reached."""
        try:
            token = self.token_path.read_text(encoding="utf-8").strip()
            request = urllib.request.Request(
                f"{url}{path}", data=None if body is None else json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30.0) as answer:
                return int(answer.status), answer.read(MAX_METRICS_BYTES + 1)
        except urllib.error.HTTPError as error:
            return int(error.code), error.read(4096)
        except (OSError, ValueError):
            return 0, b""

    def _run(self) -> None:
        url: str | None = None
        last: tuple[float, dict[tuple[str, tuple[tuple[str, str], ...]], float]] | None = None
        next_scrape_s = 0.0
        while not self._stop.wait(0.2):
            url = url or self._url()
            self._membership(url)
            if url is None:
                continue
            with self._lock:
                self._state["url"] = url
            if time.monotonic() < next_scrape_s:
                continue
            next_scrape_s = time.monotonic() + self.interval_s
            status, text = self._call(url, "/metrics")
            if status != 200 or len(text) > MAX_METRICS_BYTES:
                continue
            values = parse_metrics(text.decode("utf-8", errors="replace"))
            now_s = time.monotonic()
            if last is not None:
                self._count(now_s - last[0], interval_summary(last[1], values, self.target_ms))
            last = (now_s, values)
            self._measure(values)

    def _membership(self, url: str | None) -> None:
        """Retire, then add; a router not up yet has nothing to retire (stop at once)."""
        with self._lock:
            retiring, self._retiring = self._retiring, []
            joining = dict(self._joining)
        for device_id, stop in retiring:
            with self._lock:
                slot = self._slots.pop(device_id, None)
                self._capacity.pop(device_id, None)
            if slot is not None and url is not None:
                status, _ = self._call(url, "/admin/workers", {"retire": slot})
                self._note("serve_worker_retired", device_id, slot, status)
            stop()
        if url is None:
            return
        for device_id, (log_path, tries) in joining.items():
            port = _ready_port(log_path)
            if port is None:
                continue
            status, body = self._call(url, "/admin/workers", {"add": f"127.0.0.1:{port}"})
            with self._lock:
                if device_id not in self._joining:
                    continue  # retired meanwhile
                if status == 200:
                    del self._joining[device_id]
                    self._slots[device_id] = int(json.loads(body)["worker"])
                elif tries <= 1:
                    del self._joining[device_id]
                else:
                    self._joining[device_id] = (log_path, tries - 1)
            self._note("serve_worker_joined" if status == 200 else "serve_join_refused",
                       device_id, self._slots.get(device_id), status)

    def _note(self, kind: str, device_id: str, slot: int | None, status: int) -> None:
        with self._lock:
            self._events.append((kind, {"device": device_id, "slot": slot, "status": status}))

    def _measure(self, values: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
        with self._lock:
            for device_id, slot in self._slots.items():
                capacity = values.get(("idla_worker_capacity_requests_per_second",
                                       (("worker", str(slot)),)))
                if capacity is not None and capacity > 0:
                    self._capacity[device_id] = capacity
            self._state["workers_up"] = int(values.get(("idla_workers_up", ()), 0))

    def _count(self, seconds: float, summary: Mapping[str, Any]) -> None:
        with self._lock:
            for key in ("requests", "refused", "failed"):
                self._state[key] += summary[key]
            if summary["requests"] > 0:
                self._observed_s += seconds
                self._held_s += seconds if summary["held"] else 0.0
                self._state["p99_ms"] = summary["p99_ms"]
                self._state["target_held_fraction"] = self._held_s / self._observed_s


_JOIN_TRIES = 5
"""Calls to add a ready worker before the pool gives up on it (the router may be rolling out)."""


def _ready_port(log_path: Path) -> int | None:
    """The port a standalone serving worker printed (``{"ready": true, "port": P}``)."""
    with contextlib.suppress(OSError), open(log_path, "rb") as log:
        for line in log.read(64 << 10).splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                message = json.loads(line)
                if message.get("ready") is True and isinstance(message.get("port"), int):
                    return int(message["port"])
    return None
