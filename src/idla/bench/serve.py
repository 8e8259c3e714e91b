"""`idla bench serve`: routing policies side by side on the same heterogeneous workers, from
light load to saturation, under Poisson and bursty arrivals.

Workers run an MLP under cgroup quotas (speeds × base cores); the router runs in this process
(its own thread and event loop); the load generator runs in its own process
(`idla.bench.loadgen`). First the capacity is measured the way the service is used: closed-loop
clients through the router (its HTTP parsing and routing CPU in the loop) keep every worker's
batches full; that throughput is 100 % load. The summed capacity of the workers' start-up curves
(each measured alone) is printed beside it. Then every load level (50/80/95 % and saturation) ×
every arrival process (`idla.bench.arrivals`: Poisson, an on/off MMPP-2 and a gamma renewal
process, the bursty ones at the same mean rate with a stated CV) × every policy runs open loop
(the policy order rotates per cell), repeated with other seeds; each cell reports medians of the
repeats. Last, idla at 80 % (Poisson) while the slowest worker is killed with SIGKILL halfway
through (at a moment it holds requests; the slowest, so that the others can still carry it).

Every policy runs behind the same router, batching and queue bound. idla, the predictive
policy, also refuses (429 with Retry-After) a request no worker is predicted to answer within
the SLO and lets an idle worker steal queued work (`idla.serve.deadlines`); the baselines do
neither. Cost: about (duration + 2 s) per trial.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from idla.bench.arrivals import ARRIVALS, ArrivalProcess
from idla.bench.serve_report import median_row, summarize, targets
from idla.errors import ConfigError
from idla.serve.metrics import percentile
from idla.serve.router import PIPELINE_DEPTH, POLICIES, RouterConfig

LOADGEN = Path(__file__).with_name("loadgen.py")
DRAIN_TIMEOUT_S = 30.0
LOADGEN_SLACK_S = 120.0  # the load generator's client timeout (30 s) and its start and exit


@dataclass(kw_only=True)
class ServeBenchConfig:
    speeds: list[float]
    """Relative CPU speed per worker (cgroup quota base_cores × speed)."""
    base_cores: float = 0.4
    """CPU cores of a speed-1 worker."""
    duration_s: float = 8.0
    """Seconds of arrivals per trial."""
    loads_pct: list[float] = field(default_factory=lambda: [50.0, 80.0, 95.0])
    """Offered loads, % of the closed-loop capacity."""
    saturation_pct: float = 130.0
    """Offered load of the saturation level, % of the closed-loop capacity."""
    kill_load_pct: float = 80.0
    """Offered load of the kill trial (Poisson, idla)."""
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    """Policies compared at every level."""
    arrivals: list[str] = field(default_factory=lambda: list(ARRIVALS))
    """Arrival processes (`idla.bench.arrivals.ARRIVALS`) run at every level."""
    burst_cv: float = 3.0
    """Coefficient of variation of the bursty processes' inter-arrival times."""
    on_fraction: float = 0.5
    """mmpp: fraction of the time the source is on."""
    repeats: int = 1
    """Runs of every cell (other seeds); each cell reports the medians."""
    capacity_s: float = 8.0
    """Seconds of the closed-loop capacity run."""
    closed_clients: int = 0
    """Closed-loop clients of the capacity run (0: 3 full batches per worker)."""
    request_rows: int = 16
    """Rows (samples) per request."""
    features: int = 64
    """Model input features."""
    hidden: int = 2048
    """MLP width; sets the cost of a request."""
    layers: int = 3
    """MLP hidden layers."""
    classes: int = 10
    """Model outputs."""
    slo_s: float = 0.2
    """Latency objective, seconds: SLO goodput counts answers within it; the router's
    latency target unless its config sets another."""
    warmup_s: float = 3.0
    """Seconds of least-outstanding load at 50 % of the summed capacity first (discarded)."""
    seed: int = 0
    """Seed of the model and of every arrival sequence."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """The router's settings (latency_target_s None: slo_s)."""

    def __post_init__(self) -> None:
        for name in self.arrivals:
            ArrivalProcess(name=name, cv=self.burst_cv, on_fraction=self.on_fraction)
        if not self.arrivals or self.repeats < 1:
            raise ConfigError("arrivals must name at least one process and repeats be >= 1")

    def process(self, name: str) -> ArrivalProcess:
        return ArrivalProcess(name=name, cv=self.burst_cv, on_fraction=self.on_fraction)


def _loadgen(port: int, config: ServeBenchConfig, token: str, duration_s: float, seed: int,
             clients: int | None = None, times_s: list[float] | None = None
             ) -> subprocess.Popen[bytes]:
    """The load generator's process: closed loop with ``clients``, else open loop at
    ``times_s`` (handed over on its stdin from a temporary file)."""
    command = [sys.executable, "-I", str(LOADGEN), "--port", str(port),
               "--duration", f"{duration_s:g}", "--rows", str(config.request_rows),
               "--features", str(config.features), "--seed", str(seed)]
    if clients is not None:
        command += ["--clients", str(clients)]
    with tempfile.TemporaryFile() as stdin:
        stdin.write(json.dumps(times_s or []).encode())
        stdin.seek(0)
        return subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE,
                                env=os.environ | {"IDLA_TOKEN": token})  # not in ps


def _records(loadgen: subprocess.Popen[bytes], duration_s: float) -> list[dict[str, Any]]:
    out, _ = loadgen.communicate(timeout=duration_s + LOADGEN_SLACK_S)
    if loadgen.returncode != 0:
        raise RuntimeError(f"the load generator failed with code {loadgen.returncode}")
    records: list[dict[str, Any]] = json.loads(out)["records"]
    return records


def _trial(serving: Any, config: ServeBenchConfig, token: str, policy: str, arrival: str,
           pct: float, capacity_rps: float, seed: int, kill: tuple[int, int] | None = None,
           duration_s: float | None = None) -> tuple[dict[str, Any], list[float]]:
    """One open-loop trial; ``kill`` = (worker index, pid): SIGKILL that worker halfway
    through, at a moment it holds requests (queued or running), so failover has work to move."""
    duration_s = config.duration_s if duration_s is None else duration_s
    router, metrics = serving.router, serving.running.metrics
    serving.call(lambda: router.set_policy(policy))
    serving.call(metrics.recent_overhead_s.clear)
    rate = capacity_rps * pct / 100
    times_s = config.process(arrival).times_s(rate, duration_s, seed)
    loadgen = _loadgen(serving.running.port, config, token, duration_s, seed, times_s=times_s)
    held = None
    if kill is not None:
        time.sleep(duration_s / 2)
        held = _kill_when_busy(serving, *kill)
    row = summarize(_records(loadgen, duration_s), duration_s, config.slo_s)
    overhead_s = serving.call(lambda: list(metrics.recent_overhead_s))
    row.update(policy=policy, arrivals=arrival, load_pct=pct, offered_rps=rate,
               router_overhead_p50_ms=1e3 * percentile(overhead_s, 0.5))
    if kill is not None:
        row.update(killed_worker=kill[0], requests_held_at_kill=held)
    _drain(serving)
    return row, overhead_s


def _closed_loop_capacity(serving: Any, config: ServeBenchConfig, token: str, clients: int
                          ) -> dict[str, Any]:
    """Throughput of ``clients`` closed-loop clients through the router under idla."""
    serving.call(lambda: serving.router.set_policy("idla"))
    loadgen = _loadgen(serving.running.port, config, token, config.capacity_s,
                       config.seed + 555, clients)
    row = summarize(_records(loadgen, config.capacity_s), config.capacity_s, config.slo_s)
    row.update(clients=clients)
    _drain(serving)
    return row


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


def run_serve_bench(config: ServeBenchConfig,
                    on_trial: Callable[[str, dict[str, Any]], None] | None = None
                    ) -> dict[str, Any]:
    import torch

    from idla.bench.machine import machine_info
    from idla.serve.model_io import MLP, save_model
    from idla.serve.server import ServeOptions, ServingThread
    from idla.serve.worker import WorkerPool

    report = on_trial or (lambda name, row: None)
    router_config = config.router if config.router.latency_target_s is not None else replace(
        config.router, latency_target_s=config.slo_s)
    kwargs = {"in_features": config.features, "hidden": config.hidden,
              "layers": config.layers, "classes": config.classes}
    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="idla-serve-bench-") as model_dir:
        torch.manual_seed(config.seed)
        save_model(model_dir, MLP(**kwargs), "mlp", kwargs, (config.features,), "bench-v1")
        options = ServeOptions(token=token, port=0, router=router_config)
        with WorkerPool(model_dir, len(config.speeds), config.speeds, config.base_cores,
                        max_rows=router_config.max_batch_rows) as pool, \
                ServingThread(pool, options) as serving:
            workers = serving.call(serving.router.stats)
            summed_rps = sum(w["capacity_requests_per_s"] for w in workers)
            _trial(serving, config, token, "least_outstanding", "poisson", 50.0, summed_rps,
                   config.seed + 999, duration_s=config.warmup_s)
            clients = config.closed_clients or sum(
                (PIPELINE_DEPTH + 1) * max(1, w["max_batch_rows"] // config.request_rows)
                for w in workers)
            closed = _closed_loop_capacity(serving, config, token, clients)
            capacity_rps = closed["throughput_rps"]
            settings = {**asdict(config), "model": {"architecture": "mlp", **kwargs},
                        "router": asdict(router_config),
                        "arrival_processes": {a: config.process(a).describe(capacity_rps)
                                              for a in config.arrivals}}
            _print_settings(settings, workers, config, summed_rps, closed)
            runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
            all_overhead_s: list[float] = []
            levels = [(f"load_{pct:g}", pct) for pct in config.loads_pct]
            levels.append(("saturation", config.saturation_pct))
            cell = 0
            for repeat in range(config.repeats):
                for level, (key, pct) in enumerate(levels):
                    for a, arrival in enumerate(config.arrivals):
                        shift = cell % len(config.policies)
                        cell += 1
                        seed = config.seed + 1000 * repeat + 10 * level + a
                        for policy in config.policies[shift:] + config.policies[:shift]:
                            row, overhead_s = _trial(serving, config, token, policy, arrival,
                                                     pct, capacity_rps, seed)
                            runs.setdefault((policy, arrival, key), []).append(row)
                            all_overhead_s += overhead_s
                            report(f"{policy}, {arrival}, {key} (repeat {repeat + 1})", row)
            slowest = min(range(len(workers)), key=lambda i: (config.speeds[i], -i))
            kill, overhead_s = _trial(serving, config, token, "idla", "poisson",
                                      config.kill_load_pct, capacity_rps, config.seed + 88,
                                      kill=(slowest, pool.workers[slowest].pid))
            kill.update(killed_speed=config.speeds[slowest],
                        failovers=serving.call(lambda: serving.router.failovers),
                        retried_requests=serving.call(lambda: serving.router.retried_requests))
            all_overhead_s += overhead_s
            report(f"idla, poisson, {config.kill_load_pct:g}%, worker {slowest} killed", kill)
            stolen = serving.call(lambda: serving.router.stolen_requests)
    policies: dict[str, dict[str, dict[str, Any]]] = {}
    for (policy, arrival, key), rows in runs.items():
        policies.setdefault(policy, {}).setdefault(arrival, {})[key] = median_row(rows)
    result: dict[str, Any] = {
        "settings": settings, "machine": machine_info(),
        "capacity": {"summed_curves_rps": summed_rps, "closed_loop_rps": capacity_rps,
                     "closed_loop_over_summed": capacity_rps / summed_rps,
                     "closed_loop_run": closed},
        "workers": [{"speed": s, "quota_cores": s * config.base_cores,
                     **{k: w[k] for k in ("max_batch_rows", "max_wait_s",
                                          "capacity_requests_per_s", "curve")}}
                    for s, w in zip(config.speeds, workers, strict=True)],
        "policies": policies, "kill_trial": kill, "stolen_requests": stolen,
        "router_overhead_ms": {"p50": 1e3 * percentile(all_overhead_s, 0.5),
                               "p99": 1e3 * percentile(all_overhead_s, 0.99),
                               "samples": len(all_overhead_s)},
    }
    result["targets"] = targets(result)
    return result


def _print_settings(settings: dict[str, Any], workers: list[dict[str, Any]],
                    config: ServeBenchConfig, summed_rps: float, closed: dict[str, Any]) -> None:
    model = settings["model"]
    print(f"idla bench serve: MLP {model['in_features']}-{model['hidden']}x{model['layers']}-"
          f"{model['classes']}, {config.request_rows} rows/request, {config.duration_s:g} s per "
          f"trial, {config.repeats} repeat(s), SLO {1e3 * config.slo_s:g} ms (the latency "
          f"target), batch budget {1e3 * config.router.batch_budget_s:g} ms, queue bound "
          f"{config.router.max_queue_requests} requests/worker")
    for speed, w in zip(config.speeds, workers, strict=True):
        print(f"  worker {w['worker']}: speed {speed:g} ({speed * config.base_cores:.2f} cores), "
              f"max batch {w['max_batch_rows']} rows, max wait {1e3 * w['max_wait_s']:.2f} ms, "
              f"capacity {w['capacity_requests_per_s']:.1f} req/s")
    print(f"  capacity: summed curves {summed_rps:.1f} req/s; closed loop through the router "
          f"({closed['clients']} clients, {closed['refused']} refused) "
          f"{closed['throughput_rps']:.1f} req/s = 100 %")
    for name, described in settings["arrival_processes"].items():
        extra = ", ".join(f"{k} {v:.3g}" for k, v in described.items()
                          if k not in ("name", "target_cv") and isinstance(v, float))
        print(f"  arrivals {name}: CV {described['target_cv']:g}" + (f" ({extra})" if extra
                                                                       else ""), flush=True)
