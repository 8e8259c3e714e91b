"""`idla serve` (online serving over local workers) and `idla bench serve`.

Heavy imports (torch, fastapi, uvicorn) stay inside the handlers so that `idla --help` is fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from idla.cli.args import optional_speeds, port, positive_float, positive_int
from idla.errors import ConfigError
from idla.serve.devices import DEVICE_HELP, resolve_devices

_POLICY_HELP = "idla | round_robin | power_of_two | least_outstanding"


def _add_router_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-cores", type=positive_float, default=0.4, metavar="CORES",
                        help="CPU cores of a speed-1 worker when emulating (default: 0.4)")
    parser.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                        help="requests queued per worker before 429 (default: 64)")
    parser.add_argument("--batch-budget-ms", type=positive_float, default=50.0, metavar="MS",
                        help="a batch's predicted service time stays within this; sets each "
                        "worker's max batch from its measured curve (default: 50)")
    parser.add_argument("--max-batch-rows", type=positive_int, default=256, metavar="ROWS",
                        help="largest batch on any worker (default: 256)")


def add_commands(commands: Any, benches: Any) -> None:
    """Add `idla serve` to ``commands`` and `idla bench serve` to ``benches``."""
    serve = commands.add_parser(
        "serve", help="serve a saved model over HTTP from N local workers",
        description="Start N worker processes on a saved model (safetensors + model.json), "
        "measure each one's batch-size curve, and serve POST /v1/predict, GET /healthz, "
        "GET /metrics and POST /admin/model on 127.0.0.1, routing each request to the "
        "worker predicted to answer it first.",
    )
    serve.add_argument("--model", required=True, metavar="DIR",
                       help="model directory (model.safetensors + model.json)")
    serve.add_argument("--workers", type=positive_int, default=2, metavar="N",
                       help="worker processes (default: 2)")
    serve.add_argument("--emulate-speeds", default="none", metavar="LIST",
                       help="relative CPU speed per worker, e.g. 1,0.5,0.25 (cgroup quota "
                       "base-cores × speed); default: none")
    serve.add_argument("--device", default="cpu", metavar="DEVICES", help=DEVICE_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=port, default=8000,
                       help="TCP port; 0 picks a free one (default: 8000)")
    serve.add_argument("--token-file", metavar="PATH",
                       help="file holding the bearer token for /v1 and /admin (mode 600); "
                       "default: $IDLA_TOKEN, else a random one, printed")
    serve.add_argument("--token", help="the bearer token itself; every user of the machine sees "
                       "it in the process list, so prefer --token-file or IDLA_TOKEN")
    serve.add_argument("--link-secret-file", metavar="PATH",
                       help="file (mode 600) holding the workers' link secret, 64 hex digits: "
                       "workers started elsewhere with it can join via POST /admin/workers "
                       "(default: a fresh secret)")
    serve.add_argument("--model-root", metavar="DIR",
                       help="POST /admin/model loads only models inside DIR (paths relative to "
                       "it; symlinks resolved); default: any path the server can read")
    serve.add_argument("--max-connections", type=positive_int, default=1000, metavar="N",
                       help="open HTTP connections at most; one more closes the oldest one "
                       "still waiting for a request (default: 1000)")
    serve.add_argument("--policy", default="idla", help=f"{_POLICY_HELP} (default: idla)")
    serve.add_argument("--max-wait-ms", type=float, metavar="MS",
                       help="batching wait of an idle worker (default: each worker's fixed "
                       "cost, at most 5 ms)")
    serve.add_argument("--latency-target-ms", type=positive_float, metavar="MS",
                       help="each request's deadline: with --policy idla a request no worker "
                       "is predicted to answer within it gets 429 with Retry-After, and a "
                       "backlog runs in batches as big as the oldest deadline allows "
                       "(default: none, admission by the queue bound alone)")
    serve.add_argument("--max-request-rows", type=positive_int, default=1024, metavar="ROWS",
                       help="rows one request may carry (default: 1024)")
    serve.add_argument("--load-timeout", type=positive_float, default=120.0, metavar="S",
                       help="a model rollout (POST /admin/model) not loaded on every worker "
                       "within this many seconds is aborted with 504; the old model keeps "
                       "serving (default: 120)")
    _add_router_options(serve)
    serve.set_defaults(handler=_serve)

    bench = benches.add_parser(
        "serve", help="online serving: idla's routing vs round-robin, power-of-two, least-"
        "outstanding under Poisson and bursty open-loop load, up to saturation",
        description="Start workers at emulated speeds on an MLP; measure the capacity with "
        "closed-loop clients through the router; then drive open-loop load from a separate "
        "process at fractions of it (and past it: saturation), with Poisson and bursty "
        "arrivals, through each routing policy in turn on the same workers, repeated (medians); "
        "then a run where a worker is killed with SIGKILL. Reports p50/p99, SLO goodput, "
        "refused (429) apart from failed.",
    )
    bench.add_argument("--speeds", default="1,0.5,0.25", metavar="LIST",
                       help="relative CPU speed per worker (default: 1,0.5,0.25)")
    bench.add_argument("--duration", type=positive_float, metavar="S",
                       help="seconds of load per trial (default: 8; --quick: 5)")
    bench.add_argument("--loads", metavar="PCTS",
                       help="offered load, %% of the closed-loop capacity (default: 50,80,95; "
                       "--quick: 80,95)")
    bench.add_argument("--saturation", type=positive_float, default=130.0, metavar="PCT",
                       help="offered load of the saturation level (default: 130)")
    bench.add_argument("--arrivals", metavar="LIST",
                       help="arrival processes: poisson, mmpp (on/off MMPP-2), gamma (renewal) "
                       "(default: all three; --quick: poisson,mmpp)")
    bench.add_argument("--burst-cv", type=positive_float, default=3.0, metavar="CV",
                       help="CV of the bursty processes' inter-arrival times (default: 3)")
    bench.add_argument("--repeats", type=positive_int, default=1,
                       help="runs of every cell, other seeds; medians reported (default: 1)")
    bench.add_argument("--capacity-s", type=positive_float, default=8.0, metavar="S",
                       help="seconds of the closed-loop capacity run (default: 8)")
    bench.add_argument("--quick", action="store_true",
                       help="a short run: idla and power_of_two, poisson and mmpp, 80/95%% "
                       "and saturation, 5 s trials (about 3 minutes)")
    bench.add_argument("--policies", metavar="LIST",
                       help="policies to compare (default: all four; --quick: idla,"
                       "power_of_two)")
    bench.add_argument("--rows", type=positive_int, default=16,
                       help="rows (samples) per request (default: 16)")
    bench.add_argument("--hidden", type=positive_int, default=2048,
                       help="MLP width; sets the cost of a request (default: 2048)")
    bench.add_argument("--layers", type=positive_int, default=3,
                       help="MLP hidden layers (default: 3)")
    bench.add_argument("--slo-ms", type=positive_float, default=200.0, metavar="MS",
                       help="latency objective: SLO goodput counts answers within it, and it is "
                       "the router's latency target (default: 200)")
    bench.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    _add_router_options(bench)
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    bench.set_defaults(bench_handler=_bench_serve)


def _router_config(args: argparse.Namespace, policy: str, request_rows: int) -> Any:
    from idla.serve.router import RouterConfig

    max_wait_s = None if getattr(args, "max_wait_ms", None) is None else args.max_wait_ms / 1e3
    if max_wait_s is not None and not 0 <= max_wait_s <= 10:
        raise ConfigError(f"--max-wait-ms {args.max_wait_ms} must be in 0..10000")
    return RouterConfig(policy=policy, max_queue_requests=args.max_queue,
                        batch_budget_s=args.batch_budget_ms / 1e3,
                        max_batch_rows=args.max_batch_rows, max_wait_s=max_wait_s,
                        request_rows=request_rows,
                        load_timeout_s=getattr(args, "load_timeout", 120.0),
                        latency_target_s=None if getattr(args, "latency_target_ms", None) is None
                        else args.latency_target_ms / 1e3)


def _serve(args: argparse.Namespace) -> int:
    from idla.cli.token import resolve_token
    from idla.serve.http import HttpLimits
    from idla.serve.model_path import model_root
    from idla.serve.server import Running, ServeOptions, new_event_loop, serve_until_stopped
    from idla.serve.worker import WorkerPool

    token, source, warnings = resolve_token(args.token, args.token_file, os.environ)
    for warning in warnings:
        print(warning, file=sys.stderr, flush=True)
    root = None if args.model_root is None else model_root(args.model_root)

    speeds = optional_speeds(args.emulate_speeds, "--emulate-speeds")
    if speeds is not None and len(speeds) != args.workers:
        raise ConfigError(f"--emulate-speeds lists {len(speeds)} speeds for {args.workers} "
                          "workers")
    devices = resolve_devices(args.device, args.workers)
    secret_file = getattr(args, "link_secret_file", None)
    secret = None if secret_file is None else _link_secret(secret_file)
    options = ServeOptions(token=token, host=args.host, port=args.port,
                           router=_router_config(args, args.policy, 1),
                           limits=HttpLimits(max_request_rows=args.max_request_rows),
                           model_root=root, max_connections=args.max_connections)

    def ready(running: Running) -> None:
        print(f"idla serve: {running.url}  (policy {running.router.policy.name})")
        for worker in running.router.stats():
            print(f"  worker {worker['worker']}: pid {worker['pid']}, {worker['device']}, model "
                  f"{worker['version']}, max batch {worker['max_batch_rows']} rows, max wait "
                  f"{1e3 * worker['max_wait_s']:.2f} ms, capacity "
                  f"{worker['capacity_requests_per_s']:.0f} req/s (1-row requests)")
        if source == "generated":
            print(f"  token: {token}  (choose one with --token-file or IDLA_TOKEN)")
        if root is not None:
            print(f"  POST /admin/model loads models under {root}")
        print("  POST /v1/predict, GET /healthz, GET /metrics, POST /admin/model; Ctrl-C stops",
              flush=True)

    print(f"idla serve: starting {args.workers} worker(s) on {args.model} ...", flush=True)
    # SIGTERM ends the server like Ctrl-C, but with exit code 0 and the workers stopped.
    signal.signal(signal.SIGTERM, _exit_quietly)
    with WorkerPool(args.model, args.workers, speeds, args.base_cores,
                    max_rows=args.max_batch_rows, devices=devices, secret=secret) as pool:
        loop = new_event_loop()
        try:
            loop.run_until_complete(serve_until_stopped(pool, options, ready))
        finally:
            loop.close()
    return 0


def _link_secret(path: str) -> bytes:
    from idla.serve.auth import read_secret

    try:
        with open(path, "rb") as file:
            return read_secret(file)
    except OSError as error:
        raise ConfigError(f"--link-secret-file {path}: cannot be read ({error.strerror})"
                          ) from None
    except ConfigError:
        raise ConfigError(f"--link-secret-file {path}: not one line of 64 hex digits") from None


def _exit_quietly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _names(text: str, option: str, known: tuple[str, ...]) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in known]
    if unknown or not names:
        raise ConfigError(f"{option} {text!r}: choose from {', '.join(known)}")
    return names


def _bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    from idla.bench.arrivals import ARRIVALS
    from idla.bench.serve import ServeBenchConfig, run_serve_bench
    from idla.bench.serve_report import print_serve_bench
    from idla.serve.policies import POLICIES

    quick = args.quick
    speeds = optional_speeds(args.speeds, "--speeds") or [1.0]
    policies = _names(args.policies or ("idla,power_of_two" if quick else ",".join(POLICIES)),
                      "--policies", POLICIES)
    arrivals = _names(args.arrivals or ("poisson,mmpp" if quick else ",".join(ARRIVALS)),
                      "--arrivals", ARRIVALS)
    loads_text = args.loads or ("80,95" if quick else "50,80,95")
    try:
        loads = [float(p) for p in loads_text.split(",")]
    except ValueError:
        raise ConfigError(f"--loads {loads_text!r} is not a list of percentages") from None
    if not loads or any(not 0 < p <= 500 for p in loads):
        raise ConfigError(f"--loads {loads_text!r}: each must be in (0, 500]")
    duration_s = args.duration if args.duration is not None else (5.0 if quick else 8.0)
    config = ServeBenchConfig(
        speeds=speeds, base_cores=args.base_cores, duration_s=duration_s, loads_pct=loads,
        saturation_pct=args.saturation, policies=policies, arrivals=arrivals,
        burst_cv=args.burst_cv, repeats=args.repeats, capacity_s=args.capacity_s,
        request_rows=args.rows, hidden=args.hidden, layers=args.layers,
        slo_s=args.slo_ms / 1e3, seed=args.seed, router=_router_config(args, "idla", args.rows),
    )
    result = run_serve_bench(config, on_trial=_print_trial)
    print_serve_bench(result)
    return result


def _print_trial(name: str, row: dict[str, Any]) -> None:
    print(f"  {name}: {row['throughput_rps']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, p99 "
          f"{row['p99_ms']:.1f} ms, SLO goodput {100 * row['slo_goodput']:.1f}%, refused "
          f"{row['refused']}, failed {row['failed']}", flush=True)
