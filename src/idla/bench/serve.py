"""`idla bench serve`: routing policies side by side on the same heterogeneous workers.

Workers run an MLP under cgroup quotas (speeds × base cores); the router runs in this process
(its own thread and event loop); an open-loop Poisson load generator runs in its own process
(`idla.bench.loadgen`) at fractions of the workers' summed measured capacity. Each load level
runs every policy in turn (the order rotates per level), then idla alone at saturation, then
idla at 80 % while the slowest worker is killed with SIGKILL halfway through (at a moment it
holds requests; the slowest, so that the others can still carry 80 % of the total).

Capacity: each worker's requests/s with full batches of its start-up curve (measured alone,
throttled); on a shared 2-core machine the router and the load generator take CPU from the
workers while serving, so the capacity under load can be lower.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from idla.serve.metrics import percentile
from idla.serve.router import POLICIES, RouterConfig

TARGET_P99_RATIO = 0.5  # idla's p99 at 80 % load vs power-of-two's
TARGET_SATURATION = 0.95  # throughput at saturation vs summed capacity
TARGET_OVERHEAD_MS = 1.0  # router overhead p50
DRAIN_TIMEOUT_S = 30.0
STEADY_FROM = 0.1  # throughput is counted over arrivals' [10 %, 100 %] window


@dataclass(kw_only=True)
class ServeBenchConfig:
    speeds: list[float]
    """Relative CPU speed per worker (cgroup quota base_cores × speed)."""
    base_cores: float = 0.4
    duration_s: float = 15.0
    """Seconds of arrivals per trial."""
    loads_pct: list[float] = field(default_factory=lambda: [50.0, 80.0, 95.0])
    saturation_pct: float = 130.0
    kill_load_pct: float = 80.0
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    request_rows: int = 16
    """Rows (samples) per request."""
    features: int = 64
    hidden: int = 2048
    layers: int = 3
    classes: int = 10
    slo_s: float = 0.2
    """Latency objective: goodput counts answers within it."""
    warmup_s: float = 3.0
    """Seconds of least-outstanding load at 50 % before the trials (discarded)."""
    seed: int = 0
    router: RouterConfig = field(default_factory=RouterConfig)


def summarize(records: Sequence[dict[str, Any]], duration_s: float, slo_s: float
              ) -> dict[str, Any]:
    """Throughput, latency percentiles (of answered requests), goodput and failures of one
    trial's records (``t``: scheduled send, ``latency_s``, ``status``, ``worker``).

    Throughput and goodput count answers completed in the steady window [10 %, 100 %] of the
    arrivals, so neither the empty queues at the start nor the drain after the last arrival
    (bounded queues take seconds to drain at saturation) enter the rate.
    """
    ok = [r for r in records if r["status"] == 200]
    latencies_ms = [1e3 * r["latency_s"] for r in ok]
    start_s = STEADY_FROM * duration_s
    steady = [r for r in ok if start_s <= r["t"] + r["latency_s"] <= duration_s]
    span_s = duration_s - start_s
    outside_ms = [1e3 * r["latency_s"] - r["queue_ms"] - r["service_ms"] for r in ok]
    shares = Counter(str(r.get("worker")) for r in ok)
    return {
        "sent": len(records), "ok": len(ok), "failed": len(records) - len(ok),
        "codes": dict(sorted(Counter(str(r["status"]) for r in records).items())),
        "client_reconnects": sum(1 for r in records if r.get("reconnected")),
        "throughput_rps": len(steady) / span_s,
        "goodput_rps": sum(1 for r in steady if r["latency_s"] <= slo_s) / span_s,
        "p50_ms": percentile(latencies_ms, 0.50), "p90_ms": percentile(latencies_ms, 0.90),
        "p99_ms": percentile(latencies_ms, 0.99),
        "outside_workers_p50_ms": percentile(outside_ms, 0.50),
        "share_by_worker": {k: v / max(1, len(ok)) for k, v in sorted(shares.items())},
    }


def _trial(serving: Any, config: ServeBenchConfig, token: str, policy: str, pct: float,
           capacity_rps: float, seed: int, kill: tuple[int, int] | None = None,
           duration_s: float | None = None) -> tuple[dict[str, Any], list[float]]:
    """One trial; ``kill`` = (worker index, pid): SIGKILL that worker halfway through, at a
    moment it holds requests (queued or running), so failover has work to move."""
    duration_s = config.duration_s if duration_s is None else duration_s
    router, metrics = serving.router, serving.running.metrics
    serving.call(lambda: router.set_policy(policy))
    serving.call(metrics.recent_overhead_s.clear)
    rate = capacity_rps * pct / 100
    command = [sys.executable, "-m", "idla.bench.loadgen", "--port", str(serving.running.port),
               "--rate", f"{rate:.6g}", "--duration", f"{duration_s:g}",
               "--rows", str(config.request_rows), "--features", str(config.features),
               "--seed", str(seed)]
    loadgen = subprocess.Popen(command, stdout=subprocess.PIPE,
                               env=os.environ | {"IDLA_TOKEN": token})  # not in ps
    held = None
    if kill is not None:
        time.sleep(duration_s / 2)
        held = _kill_when_busy(serving, *kill)
    out, _ = loadgen.communicate(timeout=duration_s + 120)
    if loadgen.returncode != 0:
        raise RuntimeError(f"the load generator failed with code {loadgen.returncode}")
    row = summarize(json.loads(out)["records"], duration_s, config.slo_s)
    overhead_s = serving.call(lambda: list(metrics.recent_overhead_s))
    row.update(policy=policy, load_pct=pct, offered_rps=rate,
               router_overhead_p50_ms=1e3 * percentile(overhead_s, 0.5))
    if kill is not None:
        row.update(killed_worker=kill[0], requests_held_at_kill=held)
    _drain(serving)
    return row, overhead_s


def _kill_when_busy(serving: Any, index: int, pid: int, patience_s: float = 3.0) -> int:
    """SIGKILL ``pid`` as soon as its worker holds a request (or after ``patience_s``);
    returns how many requests it held."""
    deadline_s = time.monotonic() + patience_s
    held = 0
    while time.monotonic() < deadline_s:
        worker = serving.call(serving.router.stats)[index]
        held = worker["queued_requests"] + (worker["inflight_rows"] > 0)
        if held:
            break
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    return int(held)


def _drain(serving: Any) -> None:
    """Wait until every queue is empty, so trials do not overlap."""
    deadline_s = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline_s:
        stats = serving.call(serving.router.stats)
        if all(w["queued_requests"] == 0 and w["inflight_rows"] == 0 for w in stats):
            break
        time.sleep(0.1)
    time.sleep(0.5)


def _targets(result: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    policies = result["policies"]
    if "load_80" in policies.get("idla", {}) and "load_80" in policies.get("power_of_two", {}):
        idla_p99_ms = policies["idla"]["load_80"]["p99_ms"]
        ratio = idla_p99_ms / policies["power_of_two"]["load_80"]["p99_ms"]
        targets["p99_idla_over_power_of_two_at_80"] = {
            "value": ratio, "target": f"<= {TARGET_P99_RATIO}", "met": ratio <= TARGET_P99_RATIO}
    fraction = result["saturation"]["fraction_of_capacity"]
    targets["saturation_throughput_fraction"] = {
        "value": fraction, "target": f">= {TARGET_SATURATION}",
        "met": fraction >= TARGET_SATURATION}
    p50 = result["router_overhead_ms"]["p50"]
    targets["router_overhead_p50_ms"] = {
        "value": p50, "target": f"< {TARGET_OVERHEAD_MS}", "met": p50 < TARGET_OVERHEAD_MS}
    failed = result["kill_trial"]["failed"]
    targets["failed_with_worker_killed"] = {"value": failed, "target": "== 0", "met": failed == 0}
    return targets


def run_serve_bench(config: ServeBenchConfig,
                    on_trial: Callable[[str, dict[str, Any]], None] | None = None
                    ) -> dict[str, Any]:
    import torch

    from idla.bench.machine import machine_info
    from idla.serve.model_io import MLP, save_model
    from idla.serve.server import ServeOptions, ServingThread
    from idla.serve.worker import WorkerPool

    report = on_trial or (lambda name, row: None)
    kwargs = {"in_features": config.features, "hidden": config.hidden,
              "layers": config.layers, "classes": config.classes}
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="idla-serve-bench-") as model_dir:
        torch.manual_seed(config.seed)
        save_model(model_dir, MLP(**kwargs), "mlp", kwargs, (config.features,), "bench-v1")
        options = ServeOptions(token=token, port=0, router=config.router)
        with WorkerPool(model_dir, len(config.speeds), config.speeds, config.base_cores,
                        max_rows=config.router.max_batch_rows) as pool, \
                ServingThread(pool, options) as serving:
            workers = serving.call(serving.router.stats)
            capacity_rps = sum(w["capacity_requests_per_s"] for w in workers)
            settings = {**asdict(config), "model": {"architecture": "mlp", **kwargs},
                        "router": asdict(config.router), "summed_capacity_rps": capacity_rps}
            _print_settings(settings, workers, config)
            _trial(serving, config, token, "least_outstanding", 50.0, capacity_rps,
                   config.seed + 999, duration_s=config.warmup_s)
            policies: dict[str, dict[str, Any]] = {p: {} for p in config.policies}
            all_overhead_s: list[float] = []
            for level, pct in enumerate(config.loads_pct):
                order = config.policies[level % len(config.policies):] + \
                    config.policies[:level % len(config.policies)]
                for policy in order:
                    row, overhead_s = _trial(serving, config, token, policy, pct,
                                             capacity_rps, config.seed + level)
                    policies[policy][f"load_{pct:g}"] = row
                    all_overhead_s += overhead_s
                    report(f"{policy} at {pct:g}%", row)
            saturation, overhead_s = _trial(serving, config, token, "idla",
                                            config.saturation_pct, capacity_rps, config.seed + 77)
            saturation["fraction_of_capacity"] = saturation["throughput_rps"] / capacity_rps
            all_overhead_s += overhead_s
            report(f"idla at {config.saturation_pct:g}% (saturation)", saturation)
            slowest = min(range(len(workers)), key=lambda i: (config.speeds[i], -i))
            kill, overhead_s = _trial(serving, config, token, "idla", config.kill_load_pct,
                                      capacity_rps, config.seed + 88,
                                      kill=(slowest, pool.workers[slowest].pid))
            kill.update(killed_speed=config.speeds[slowest],
                        failovers=serving.call(lambda: serving.router.failovers),
                        retried_requests=serving.call(lambda: serving.router.retried_requests))
            all_overhead_s += overhead_s
            report(f"idla at {config.kill_load_pct:g}%, worker {slowest} killed", kill)
    result: dict[str, Any] = {
        "settings": settings, "machine": machine_info(), "capacity_rps": capacity_rps,
        "workers": [{"speed": s, "quota_cores": s * config.base_cores,
                     **{k: w[k] for k in ("max_batch_rows", "max_wait_s",
                                          "capacity_requests_per_s", "curve")}}
                    for s, w in zip(config.speeds, workers, strict=True)],
        "policies": policies, "saturation": saturation, "kill_trial": kill,
        "router_overhead_ms": {"p50": 1e3 * percentile(all_overhead_s, 0.5),
                               "p99": 1e3 * percentile(all_overhead_s, 0.99),
                               "samples": len(all_overhead_s)},
    }
    result["targets"] = _targets(result)
    return result


def _print_settings(settings: dict[str, Any], workers: list[dict[str, Any]],
                    config: ServeBenchConfig) -> None:
    model = settings["model"]
    print(f"idla bench serve: MLP {model['in_features']}-{model['hidden']}x{model['layers']}-"
          f"{model['classes']}, {config.request_rows} rows/request, {config.duration_s:g} s per "
          f"trial, SLO {1e3 * config.slo_s:g} ms, batch budget "
          f"{1e3 * config.router.batch_budget_s:g} ms, queue bound "
          f"{config.router.max_queue_requests} requests/worker")
    for speed, w in zip(config.speeds, workers, strict=True):
        print(f"  worker {w['worker']}: speed {speed:g} ({speed * config.base_cores:.2f} cores), "
              f"max batch {w['max_batch_rows']} rows, max wait {1e3 * w['max_wait_s']:.2f} ms, "
              f"capacity {w['capacity_requests_per_s']:.1f} req/s")
    print(f"  summed capacity {settings['summed_capacity_rps']:.1f} req/s", flush=True)


def print_serve_bench(result: dict[str, Any]) -> None:
    print(f"\n{'policy':<18}{'load':>6}{'offered':>9}{'thru':>8}{'p50 ms':>9}{'p90 ms':>9}"
          f"{'p99 ms':>9}{'goodput':>9}{'failed':>8}")
    rows = [(name, row) for name, levels in result["policies"].items() for row in levels.values()]
    rows += [("idla (saturation)", result["saturation"]), ("idla (kill)", result["kill_trial"])]
    for name, row in rows:
        print(f"{name:<18}{row['load_pct']:>5g}%{row['offered_rps']:>9.1f}"
              f"{row['throughput_rps']:>8.1f}{row['p50_ms']:>9.1f}{row['p90_ms']:>9.1f}"
              f"{row['p99_ms']:>9.1f}{row['goodput_rps']:>9.1f}{row['failed']:>8}")
    overhead = result["router_overhead_ms"]
    print(f"router overhead per request: p50 {overhead['p50']:.3f} ms, "
          f"p99 {overhead['p99']:.3f} ms")
    for name, target in result["targets"].items():
        print(f"  {name}: {target['value']:.3g} (target {target['target']}) "
              f"{'met' if target['met'] else 'NOT met'}")
