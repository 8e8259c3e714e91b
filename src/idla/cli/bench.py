"""`idla bench hetero | comm | sync | plan | faults`: the training benchmarks.

Each parser comes from its benchmark's config dataclass (`idla bench plan` has two options and
no config). Heavy imports (torch, the rigs) stay inside the handlers and the deferred option
builders so that `idla --help` is fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from idla.cli import fields
from idla.cli.args import positive_int

HETERO_OPTIONS = ("model", "speeds", "base_cores", "steps", "repeats", "global_batch_size",
                  "seed")
COMM_OPTIONS = ("hosts", "bandwidth", "steps", "target_accuracy", "repeats", "codecs")
SYNC_OPTIONS = ("speeds", "period_steps", "staleness_bound", "delay_compensation", "budget_s",
                "target_accuracy", "repeats")
FAULT_OPTIONS = ("kills", "kinds", "epochs", "seed")
SERVE_FAULT_OPTIONS = ("workers", "clients", "rate_rps", "trial_s", "load_timeout_s",
                       "slow_clients", "trials")


def _config(module: str, name: str) -> type:
    import importlib

    config: type = getattr(importlib.import_module(module), name)
    return config


_HETERO = ("idla.bench.hetero", "HeteroConfig")
_COMM = ("idla.bench.comm", "CommConfig")
_SYNC = ("idla.bench.sync_setup", "SyncBenchConfig")
_FAULTS = ("idla.bench.faults", "FaultBenchConfig")
_SERVE_FAULTS = ("idla.bench.serve_faults", "ServeFaultsConfig")


def add_commands(commands: Any, benches: Any) -> None:
    """Add `idla bench hetero | comm | sync | plan | data | faults` to ``benches``."""
    hetero = benches.add_parser(
        "hetero", help="idla vs plain DDP under emulated heterogeneous speeds",
        description="Run plain DistributedDataParallel (equal shares) and idla on the same "
        "data, model, global batch, seed and step count under the same emulated speeds; "
        "plain DDP on equal workers at the mean speed (the same total CPU) for the balanced "
        "limit; each worker alone for the ideal. Medians over repeats.",
    )
    _defer(hetero, _HETERO, HETERO_OPTIONS, _hetero)
    comm = benches.add_parser(
        "comm", help="gradient compression vs DDP and PyTorch's hooks on shaped links (root)",
        description="Train to a target accuracy on N network-namespace hosts whose links are "
        "shaped with tc: DDP, PyTorch's fp16 and PowerSGD hooks, idla's codecs with and "
        "without error feedback, and auto.",
    )
    _defer(comm, _COMM, COMM_OPTIONS, _comm)
    sync = benches.add_parser(
        "sync", help="synchronous vs local SGD, DiLoCo and async under speeds and jitter",
        description="Train to a target accuracy with every synchronization mode under the same "
        "cgroup throttling, steady and with ±50%% speed jitter.",
    )
    _defer(sync, _SYNC, SYNC_OPTIONS, _sync)
    plan = benches.add_parser(
        "plan", help="time the share allocator for many workers",
        description="Time allocate_shares on random step-time models (target: 10,000 "
        "workers in at most 10 ms).",
    )
    plan.add_argument("--workers", type=positive_int, default=10_000, metavar="N",
                      help="Number of workers (default: 10000)")
    plan.add_argument("--repeats", type=positive_int, default=50, help="Timed runs (default: 50)")
    _add_json(plan)
    plan.set_defaults(bench_handler=_plan)
    data = benches.add_parser(
        "data", help="time the data order on a large data set",
        description="Time the first global batch of an epoch, its peak extra memory, and an "
        "elastic commit (targets at 10^8 samples: < 0.5 s, < 200 MB, commit < 50 ms).",
    )
    data.add_argument("--samples", type=positive_int, default=10**8, metavar="N",
                      help="Samples in the data set (default: 10^8)")
    data.add_argument("--global-batch", type=positive_int, default=512, metavar="B",
                      help="Samples per global batch (default: 512)")
    data.add_argument("--repeats", type=positive_int, default=20, help="Timed epochs and "
                      "commits (default: 20)")
    _add_json(data)
    data.set_defaults(bench_handler=_data)
    faults = benches.add_parser(
        "faults", help="fault injection: kill -9, cut link, 10× slower, NaN in elastic training "
        "(--serving: faults and abuse against idla serve)",
        description="Train elastically on 4 local workers and inject one fault per trial at a "
        "random (seeded) step; report finished, steps lost, samples skipped/repeated, detection "
        "time and final accuracy beside a clean run. With --serving: under steady load on a "
        "pool of serving workers, kill -9 a worker, roll out a model that raises and one that "
        "hangs, send strangers, malformed frames, slow clients and malformed bodies; report "
        "requests finished/failed/refused, admin answers, recovery times, whether the old model "
        "kept serving and the service stayed up.",
    )
    _defer(faults, _FAULTS, FAULT_OPTIONS, _faults)
    faults.defer(_add_serving_fault_options)


def _defer(parser: Any, config: tuple[str, str], names: tuple[str, ...], handler: Any) -> None:
    def add(parser: argparse.ArgumentParser) -> None:
        fields.add_options(parser, _config(*config), names)
        _add_json(parser)

    parser.defer(add)
    parser.set_defaults(bench_handler=handler)


def _add_serving_fault_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--serving", action="store_true",
                        help="run the serving fault suite instead of elastic training")
    fields.add_options(parser, _config(*_SERVE_FAULTS), SERVE_FAULT_OPTIONS)


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="Write the results as JSON here")


def _hetero(args: argparse.Namespace) -> dict[str, Any]:
    from idla.bench.hetero import print_hetero, run_hetero

    result = run_hetero(fields.build(_config(*_HETERO), args, HETERO_OPTIONS))
    print_hetero(result)
    return result


def _comm(args: argparse.Namespace) -> dict[str, Any]:
    from idla.bench.comm import print_comm, run_comm

    result = run_comm(fields.build(_config(*_COMM), args, COMM_OPTIONS), on_run=_print_run)
    print_comm(result)
    return result


def _sync(args: argparse.Namespace) -> dict[str, Any]:
    from idla.bench.sync import print_sync_bench, run_sync_bench

    config = fields.build(_config(*_SYNC), args, SYNC_OPTIONS)
    result = run_sync_bench(config, on_run=_print_sync_run)
    print_sync_bench(result)
    return result


def _faults(args: argparse.Namespace) -> dict[str, Any]:
    if args.serving:
        return _serve_faults(args)
    from idla.bench.faults import print_fault_bench, run_fault_bench

    config = fields.build(_config(*_FAULTS), args, FAULT_OPTIONS)
    result = run_fault_bench(config, on_trial=_print_trial)
    print_fault_bench(result)
    return result


def _serve_faults(args: argparse.Namespace) -> dict[str, Any]:
    from idla.bench.serve_faults import print_serve_fault_bench, run_serve_fault_bench

    config = fields.build(_config(*_SERVE_FAULTS), args, SERVE_FAULT_OPTIONS, seed=args.seed)
    result = run_serve_fault_bench(config, on_trial=_print_serve_fault_trial)
    print_serve_fault_bench(result)
    return result


def _print_serve_fault_trial(trial: dict[str, Any]) -> None:
    print(f"  trial {trial['name']}: {trial['finished']} finished, {trial['failed']} failed, "
          f"{trial['refused']} refused, up after: {trial['up_after']}", flush=True)


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    from idla.bench.plan_speed import bench_allocate

    result: dict[str, Any] = bench_allocate(args.workers, args.repeats)
    print(json.dumps(result, indent=2))
    return result


def _data(args: argparse.Namespace) -> dict[str, Any]:
    from idla.bench.data_order import bench_data_order

    result = bench_data_order(args.samples, args.global_batch, args.repeats)
    print(json.dumps(result, indent=2))
    return result


def _print_run(name: str, repeat: int, row: dict[str, Any]) -> None:
    ttt = row["time_to_target_s"]
    reached = "not reached" if ttt is None else f"target in {ttt:.1f} s"
    print(f"  {name} (repeat {repeat + 1}): {reached}, final {100 * row['final_accuracy']:.2f}%, "
          f"{row['tx_bytes_per_step']:,.0f} B/step on the wire", flush=True)


def _print_trial(trial: dict[str, Any]) -> None:
    print(f"  trial {trial['name']}: finished={trial['finished']}, "
          f"steps lost {trial.get('steps_lost', '-')}, "
          f"accuracy {100 * trial.get('final_accuracy', 0):.2f}%", flush=True)


def _print_sync_run(scenario: str, name: str, repeat: int, row: dict[str, Any]) -> None:
    ttt = row["time_to_target_s"]
    reached = "not reached" if ttt is None else f"target in {ttt:.1f} s"
    print(f"  {scenario} {name} (repeat {repeat + 1}): {reached}, final "
          f"{100 * row['final_accuracy']:.2f}%", flush=True)
