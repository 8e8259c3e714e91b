"""What the router counts, exposed in Prometheus' text format (0.0.4) through prometheus-client:
counters by status code, latency and router-overhead histograms, per-worker gauges.

Each `ServeMetrics` has its own `CollectorRegistry` (never the process-wide one, so two servers
in one process, or a user's own metrics, do not collide) holding one collector: itself. At each
scrape it turns its counts and the router's live per-worker state into metric families, so what
`/metrics` reports is read at that moment, never copied into gauges in between.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0)
OVERHEAD_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)
RECENT_SAMPLES = 100_000  # router-overhead samples kept for percentiles (bounded memory)
WORKER_GAUGES = {  # metric: (help, key of the router's per-worker stats)
    "idla_worker_up": ("Whether the worker is healthy.", "up"),
    "idla_worker_retired": ("Whether the worker was taken out of service.", "retired"),
    "idla_worker_lateness_seconds": (
        "How much later than predicted its answers came, as its predictions add it.",
        "lateness_s"),
    "idla_queue_requests": ("Requests queued for the worker.", "queued_requests"),
    "idla_queue_rows": ("Rows queued for the worker.", "queued_rows"),
    "idla_worker_max_batch_rows": ("The worker's batch limit.", "max_batch_rows"),
    "idla_worker_capacity_requests_per_second": (
        "Measured capacity with full batches.", "capacity_requests_per_s"),
    "idla_worker_served_requests_total": ("Requests answered.", "served_requests"),
    "idla_worker_restarts_total": ("Times the worker's process was replaced by a new one.",
                                   "restarts"),
    "idla_worker_reconnects_total": ("Times the worker came back after being lost.",
                                     "reconnects"),
}


class Histogram:
    """Cumulative-bucket histogram of seconds; O(log buckets) per observation."""

    def __init__(self, buckets_s: Sequence[float]) -> None:
        self.buckets_s = tuple(sorted(buckets_s))
        self.counts = [0] * (len(self.buckets_s) + 1)  # the last one is +Inf
        self.sum_s = 0.0
        self.count = 0

    def observe(self, value_s: float) -> None:
        self.counts[bisect.bisect_left(self.buckets_s, value_s)] += 1
        self.sum_s += value_s
        self.count += 1

    def family(self, name: str, help_text: str) -> HistogramMetricFamily:
        buckets, running = [], 0
        for bound, count in zip((*self.buckets_s, math.inf), self.counts, strict=True):
            running += count  # `le` as before the client library: "1", not its "1.0"
            buckets.append(("+Inf" if math.isinf(bound) else f"{bound:g}", float(running)))
        return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=self.sum_s)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in [0, 1]); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


class ServeMetrics:
    """Counts kept by the HTTP layer; `render` adds the router's live per-worker state."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status code)
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.overhead = Histogram(OVERHEAD_BUCKETS_S)
        self.recent_overhead_s: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self.closed_connections: Counter[str] = Counter()  # by reason, see serve/connections.py
        self.registry = CollectorRegistry()
        self._router: tuple[Sequence[dict[str, Any]], int, int, dict[str, Any] | None] = (
            (), 0, 0, None)  # workers' stats, failovers, retried requests, last rollout
        self._refused: Mapping[str, int] = {}
        self._stolen = 0
        self.registry.register(self)

    def count(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def close_connection(self, reason: str) -> None:
        self.closed_connections[reason] += 1

    def observe(self, latency_s: float, overhead_s: float) -> None:
        self.latency.observe(latency_s)
        self.overhead.observe(overhead_s)
        self.recent_overhead_s.append(overhead_s)

    def render(self, workers: Sequence[dict[str, Any]], failovers: int, retried: int,
               rollout: dict[str, Any] | None, refused: Mapping[str, int] | None = None,
               stolen: int = 0) -> str:
        """The text exposition of the counts and of this router state (``refused``: 429s by
        reason; ``stolen``: requests an idle worker took from another's queue)."""
        self._router = (workers, failovers, retried, rollout)
        self._refused, self._stolen = dict(refused or {}), stolen
        return generate_latest(self.registry).decode()

    def failed_requests(self) -> int:
        """Predict requests answered with a 5xx: failures (a 429 is a refusal, a 4xx the
        client's mistake)."""
        return sum(n for (endpoint, status), n in self.requests.items()
                   if endpoint == "predict" and status >= 500)

    def collect(self) -> Iterator[Metric]:
        """The metric families, for the registry (prometheus-client's collector protocol)."""
        requests = CounterMetricFamily("idla_requests", "HTTP requests by endpoint and status "
                                       "code.", labels=["endpoint", "code"])
        for (endpoint, status), n in sorted(self.requests.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        closed = CounterMetricFamily("idla_http_connections_closed", "Connections the server "
                                     "closed: head_timeout, unread_body, evicted, over_limit.",
                                     labels=["reason"])
        for reason, n in sorted(self.closed_connections.items()):
            closed.add_metric([reason], n)
        yield closed
        refused = CounterMetricFamily("idla_refused_requests", "Predict requests refused with "
                                      "429 and Retry-After: deadline (no worker predicted to "
                                      "answer within the latency target), queue_full.",
                                      labels=["reason"])
        for reason, n in sorted(self._refused.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily("idla_failed_requests", "Predict requests answered with a 5xx "
                                  "(refusals are counted apart).", value=self.failed_requests())
        yield CounterMetricFamily("idla_stolen_requests", "Queued requests an idle worker took "
                                  "from a slower one's queue.", value=self._stolen)
        yield self.latency.family("idla_request_latency_seconds",
                                  "Time from a predict request's arrival to its response.")
        yield self.overhead.family("idla_router_overhead_seconds",
                                   "Time a predict request spends in the router's own code.")
        workers, failovers, retried, rollout = self._router
        for name, (help_text, key) in WORKER_GAUGES.items():
            kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            family = kind(name, help_text, labels=["worker"])
            for worker in workers:
                family.add_metric([str(worker["worker"])], float(worker[key]))
            yield family
        versions = GaugeMetricFamily("idla_model_version_info", "Model version each worker "
                                     "serves.", labels=["worker", "version"])
        for worker in workers:
            versions.add_metric([str(worker["worker"]), str(worker["version"])], 1)
        yield versions
        devices = GaugeMetricFamily("idla_worker_device_info", "Device each worker runs its "
                                    "model on (cpu, cuda:N).", labels=["worker", "device"])
        for worker in workers:
            devices.add_metric([str(worker["worker"]), str(worker.get("device") or "unknown")], 1)
        yield devices
        yield GaugeMetricFamily("idla_workers_up", "Workers healthy now.",
                                value=sum(1 for worker in workers if worker["up"]))
        yield GaugeMetricFamily("idla_workers", "Workers the router serves with, up or not.",
                                value=len(workers))
        yield CounterMetricFamily("idla_failovers", "Workers declared dead.", value=failovers)
        yield CounterMetricFamily("idla_retried_requests", "Requests moved to another worker.",
                                  value=retried)
        if rollout is not None:
            yield GaugeMetricFamily("idla_rollout_skew_seconds", "Spread of the workers' switch "
                                    "times in the last model rollout.", value=rollout["skew_s"])
