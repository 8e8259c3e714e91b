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

Serving jobs are placed rigidly: the router's own `POST /admin/workers` can grow and shrink it
with no failed request, but a worker started by the pool would need the router's link secret,
which `idla serve` draws for itself. Cost: one HTTP GET and O(metric lines) parsing per scrape.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
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
    """Follows one serving job's router (module docstring); `snapshot` is safe from any thread.

    Args:
        log_path: The job's log, where `idla serve` prints its URL.
        token_path: The job's token file.
        target_ms: The spec's p99 target.
        log_offset: Where this attempt's output starts in the log (bytes).
        interval_s: Seconds between two scrapes.
    """

    def __init__(self, log_path: Path, token_path: Path, target_ms: float, log_offset: int = 0,
                 interval_s: float = 1.0) -> None:
        self.log_path, self.token_path, self.log_offset = log_path, token_path, log_offset
        self.target_ms, self.interval_s = target_ms, interval_s
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"url": None, "requests": 0.0, "refused": 0.0,
                                       "failed": 0.0, "p99_ms": None,
                                       "target_held_fraction": None, "p99_target_ms": target_ms}
        self._held_s = self._observed_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idla-pool-serve-watch",
                                        daemon=True)
        self._thread.start()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _url(self) -> str | None:
        with contextlib.suppress(OSError):
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                found = _URL.search(log.read(64 << 10).decode("utf-8", errors="replace"))
            if found:
                return found.group(1)
        return None

    def _scrape(self, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        try:
            token = self.token_path.read_text(encoding="utf-8").strip()
            request = urllib.request.Request(f"{url}/metrics",
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=2.0) as answer:
                text = answer.read(MAX_METRICS_BYTES + 1)
        except (OSError, ValueError):
            return None
        if len(text) > MAX_METRICS_BYTES:
            return None
        return parse_metrics(text.decode("utf-8", errors="replace"))

    def _run(self) -> None:
        url: str | None = None
        last: tuple[float, dict[tuple[str, tuple[tuple[str, str], ...]], float]] | None = None
        while not self._stop.wait(self.interval_s):
            url = url or self._url()
            values = self._scrape(url) if url else None
            if values is None:
                continue
            now_s = time.monotonic()
            if last is not None:
                self._count(now_s - last[0], interval_summary(last[1], values, self.target_ms))
            last = (now_s, values)
            with self._lock:
                self._state["url"] = url

    def _count(self, seconds: float, summary: Mapping[str, Any]) -> None:
        with self._lock:
            for key in ("requests", "refused", "failed"):
                self._state[key] += summary[key]
            if summary["requests"] > 0:
                self._observed_s += seconds
                self._held_s += seconds if summary["held"] else 0.0
                self._state["p99_ms"] = summary["p99_ms"]
                self._state["target_held_fraction"] = self._held_s / self._observed_s
