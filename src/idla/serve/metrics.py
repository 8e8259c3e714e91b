"""What the router counts, and its Prometheus text exposition (format 0.0.4), without a client
library: counters by status code, latency and router-overhead histograms, per-worker gauges."""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0)
OVERHEAD_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)
RECENT_SAMPLES = 100_000  # router-overhead samples kept for percentiles (bounded memory)


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

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip((*self.buckets_s, math.inf), self.counts, strict=True):
            running += count
            label = "+Inf" if math.isinf(bound) else f"{bound:g}"
            lines.append(f'{name}_bucket{{le="{label}"}} {running}')
        lines += [f"{name}_sum {self.sum_s:.9g}", f"{name}_count {self.count}"]
        return lines


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in [0, 1]); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServeMetrics:
    """Counts kept by the HTTP layer; `render` adds the router's live per-worker state."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status code)
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.overhead = Histogram(OVERHEAD_BUCKETS_S)
        self.recent_overhead_s: deque[float] = deque(maxlen=RECENT_SAMPLES)

    def count(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def observe(self, latency_s: float, overhead_s: float) -> None:
        self.latency.observe(latency_s)
        self.overhead.observe(overhead_s)
        self.recent_overhead_s.append(overhead_s)

    def render(self, workers: Sequence[dict[str, Any]], failovers: int, retried: int,
               rollout: dict[str, Any] | None) -> str:
        lines = ["# HELP idla_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE idla_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'idla_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
        lines += self.latency.render("idla_request_latency_seconds",
                                     "Time from a predict request's arrival to its response.")
        lines += self.overhead.render("idla_router_overhead_seconds",
                                      "Time a predict request spends in the router's own code.")
        gauges = {
            "idla_worker_up": ("Whether the worker is healthy.", "up"),
            "idla_queue_requests": ("Requests queued for the worker.", "queued_requests"),
            "idla_queue_rows": ("Rows queued for the worker.", "queued_rows"),
            "idla_worker_max_batch_rows": ("The worker's batch limit.", "max_batch_rows"),
            "idla_worker_capacity_requests_per_second": (
                "Measured capacity with full batches.", "capacity_requests_per_s"),
            "idla_worker_served_requests_total": ("Requests answered.", "served_requests"),
        }
        for name, (help_text, key) in gauges.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{worker="{w["worker"]}"}} {float(w[key]):.9g}' for w in workers]
        lines += ["# HELP idla_model_version_info Model version each worker serves.",
                  "# TYPE idla_model_version_info gauge"]
        lines += [f'idla_model_version_info{{worker="{w["worker"]}",version='
                  f'"{_escape(w["version"])}"}} 1' for w in workers]
        lines += ["# HELP idla_failovers_total Workers declared dead.",
                  "# TYPE idla_failovers_total counter", f"idla_failovers_total {failovers}",
                  "# HELP idla_retried_requests_total Requests moved to another worker.",
                  "# TYPE idla_retried_requests_total counter",
                  f"idla_retried_requests_total {retried}"]
        if rollout is not None:
            lines += ["# HELP idla_rollout_skew_seconds Spread of the workers' switch times in "
                      "the last model rollout.", "# TYPE idla_rollout_skew_seconds gauge",
                      f"idla_rollout_skew_seconds {rollout['skew_s']:.9g}"]
        return "\n".join(lines) + "\n"
