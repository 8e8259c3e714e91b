"""`idla train | profile | bench`: the command line.

User mistakes end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from idla.cli.args import optional_speeds, positive_int
from idla.errors import ConfigError, IdlaError

_COMM_CODECS = "fp16,topk:0.01,randk:0.01,sign,powersgd:2"
# Parts that add their own commands: each module has `add_commands(commands, benches)`, which
# adds sub-parsers with `set_defaults(handler=f)` (f(args) -> exit code) for commands and
# `set_defaults(bench_handler=f)` (f(args) -> result dict) for benchmarks. Heavy imports stay
# inside the handlers so that `idla --help` is fast.
_COMMAND_MODULES = ("idla.cli.fl", "idla.cli.serve", "idla.cli.infer")


def _caps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        caps = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--max-local-batch: {text!r} is not a comma-separated list of integers"
        ) from None
    if any(c < 0 for c in caps):
        raise ConfigError(f"--max-local-batch: {text!r} has a negative cap")
    return caps


def _add_emulation(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--emulate-speeds", default=default, metavar="LIST",
        help="relative CPU speed per local worker, e.g. 1,1,0.5,0.25: each worker runs in its "
        "own cgroup with quota base-cores × speed (real OS throttling; the agent is not told). "
        f"'none' disables it. Default: {default}",
    )
    parser.add_argument(
        "--base-cores", type=float, default=0.5, metavar="CORES",
        help="CPU cores a speed-1 worker gets when emulating (default: 0.5)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idla",
        description="idla, an intelligent deep-learning agent: measures every worker, gives "
        "each the share of the global batch it can carry, and keeps replicas exactly in sync.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train the demo CNN on digits with N local workers",
        description="Train the demo CNN (scikit-learn digits) on local workers with "
        "heterogeneity-aware shares. With no options: 4 workers at speeds 1,1,0.5,0.25.",
    )
    train.add_argument("--workers", type=positive_int, default=4, metavar="N",
                       help="local worker processes (default: 4)")
    _add_emulation(train, "1,1,0.5,0.25")
    train.add_argument("--global-batch", type=positive_int, default=512, metavar="B",
                       help="samples per optimizer step summed over workers (default: 512)")
    train.add_argument("--epochs", type=positive_int, default=20, metavar="E",
                       help="passes over the training set (default: 20)")
    train.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    train.add_argument("--seed", type=int, default=0, metavar="S",
                       help="seed for the model, the split and the data order (default: 0)")
    train.add_argument("--max-local-batch", metavar="LIST",
                       help="memory cap on each worker's local batch, e.g. 256,256,128,64")
    train.add_argument("--no-rebalance", action="store_true",
                       help="keep equal shares (what DDP does) instead of planning them")
    train.add_argument("--out", default="runs/train", metavar="DIR",
                       help="write report.json and training.png here (default: runs/train)")
    train.add_argument("--compress", default="none", metavar="CODEC",
                       help="gradient codec: auto|none|fp16|topk:0.01|randk:0.01|sign|powersgd:2 "
                       "(default: none)")
    train.add_argument("--no-error-feedback", action="store_true",
                       help="drop what the codec loses instead of carrying it to the next step")
    train.add_argument("--sync", default="allreduce", metavar="MODE",
                       help="allreduce | local:H | diloco:H | async:S (default: allreduce)")
    train.add_argument("--delay-compensation", type=float, default=0.0, metavar="LAMBDA",
                       help="DC-ASGD λ for --sync async (default: 0, off)")
    train.add_argument("--checkpoint-dir", metavar="DIR",
                       help="save a checkpoint (safetensors + JSON) here after every epoch")
    train.add_argument("--resume", metavar="DIR",
                       help="continue from a checkpoint directory (or its parent, via 'latest')")
    train.add_argument("--elastic", action="store_true",
                       help="survive lost workers: the others re-form the group and go on")
    train.add_argument("--faults", default="", metavar="LIST",
                       help="with --elastic, inject faults: kill:2@30, nan:1@20+5, slow:3@10x10")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    profile = commands.add_parser(
        "profile", help="probe local workers: CPU, memory, GPU, link bandwidth, step time",
        description="Start N local workers, probe each (CPU, memory, GPU, measured link "
        "bandwidth) and fit its step time as a function of batch size; print a table.",
    )
    profile.add_argument("--workers", type=positive_int, default=4, metavar="N",
                         help="local worker processes (default: 4)")
    _add_emulation(profile, "none")
    profile.add_argument("--json", metavar="PATH", help="also write the table as JSON here")

    bench = commands.add_parser("bench", help="benchmarks (each prints a table; --json)")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH")
    hetero = benches.add_parser(
        "hetero", help="idla vs plain DDP under emulated heterogeneous speeds",
        description="Run plain DistributedDataParallel (equal shares) and idla on the same "
        "data, model, global batch, seed and step count under the same emulated speeds; "
        "measure each worker alone for the ideal. Medians over repeats.",
    )
    hetero.add_argument("--speeds", default="1,1,0.5,0.25", metavar="LIST",
                        help="relative CPU speed per worker (default: 1,1,0.5,0.25)")
    hetero.add_argument("--base-cores", type=float, default=0.5, metavar="CORES",
                        help="CPU cores a speed-1 worker gets (default: 0.5)")
    hetero.add_argument("--steps", type=positive_int, default=60,
                        help="optimizer steps per run (default: 60)")
    hetero.add_argument("--repeats", type=positive_int, default=3,
                        help="runs of each kind; the table shows medians (default: 3)")
    hetero.add_argument("--global-batch", type=positive_int, default=512, metavar="B",
                        help="global batch (default: 512)")
    hetero.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    hetero.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    comm = benches.add_parser(
        "comm", help="gradient compression vs DDP and PyTorch's hooks on shaped links (root)",
        description="Train to a target accuracy on N network-namespace hosts whose links are "
        "shaped with tc: DDP, PyTorch's fp16 and PowerSGD hooks, idla's codecs with and "
        "without error feedback, and auto.",
    )
    comm.add_argument("--hosts", type=positive_int, default=4, metavar="N",
                      help="hosts (network namespaces), one worker each (default: 4)")
    comm.add_argument("--bandwidth", default="10mbit", metavar="RATE",
                      help="link rate each way, tc syntax (default: 10mbit)")
    comm.add_argument("--steps", type=positive_int, default=100,
                      help="optimizer steps per run (default: 100)")
    comm.add_argument("--target", type=float, default=0.95,
                      help="test accuracy that stops the clock (default: 0.95)")
    comm.add_argument("--repeats", type=positive_int, default=3,
                      help="runs of each setting (default: 3)")
    comm.add_argument("--codecs", default=_COMM_CODECS, metavar="LIST",
                      help=f"idla codecs to compare (default: {_COMM_CODECS})")
    comm.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    sync = benches.add_parser(
        "sync", help="synchronous vs local SGD, DiLoCo and async under speeds and jitter",
        description="Train to a target accuracy with every synchronization mode under the same "
        "cgroup throttling, steady and with ±50%% speed jitter.",
    )
    sync.add_argument("--speeds", default="1,1,0.5,0.25", metavar="LIST",
                      help="relative CPU speed per worker (default: 1,1,0.5,0.25)")
    sync.add_argument("--period", type=positive_int, default=20, metavar="H",
                      help="H of local SGD and DiLoCo (default: 20)")
    sync.add_argument("--staleness", type=int, default=4, metavar="S",
                      help="staleness bound of async (default: 4)")
    sync.add_argument("--delay-compensation", type=float, default=2.0, metavar="LAMBDA",
                      help="DC-ASGD λ of the async_dc run (default: 2.0)")
    sync.add_argument("--budget", type=float, default=10.0, metavar="SECONDS",
                      help="training seconds per run (default: 10)")
    sync.add_argument("--target", type=float, default=0.97,
                      help="test accuracy that stops the clock (default: 0.97)")
    sync.add_argument("--repeats", type=positive_int, default=3,
                      help="runs of each mode and scenario (default: 3)")
    sync.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    plan = benches.add_parser(
        "plan", help="time the share allocator for many workers",
        description="Time allocate_shares on random step-time models (target: 10,000 "
        "workers in at most 10 ms).",
    )
    plan.add_argument("--workers", type=positive_int, default=10_000, metavar="N",
                      help="number of workers (default: 10000)")
    plan.add_argument("--repeats", type=positive_int, default=50, help="timed runs (default: 50)")
    plan.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    faults = benches.add_parser(
        "faults", help="fault injection: kill -9, cut link, 10× slower, NaN in elastic training",
        description="Train elastically on 4 local workers and inject one fault per trial at a "
        "random (seeded) step; report finished, steps lost, samples skipped/repeated, detection "
        "time and final accuracy beside a clean run.",
    )
    faults.add_argument("--kills", type=int, default=3, help="kill -9 trials (default: 3)")
    faults.add_argument("--kinds", default="kill,link,slow,nan", metavar="LIST",
                        help="faults to inject (default: kill,link,slow,nan)")
    faults.add_argument("--epochs", type=positive_int, default=4, help="epochs (default: 4)")
    faults.add_argument("--seed", type=int, default=0, help="seeds the fault steps and the run")
    faults.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(commands, benches)
    return parser


def _train(args: argparse.Namespace) -> int:
    from idla.jobs.summary import TrainProgress, print_summary
    from idla.jobs.train import TrainConfig, train_worker, write_outputs
    from idla.runtime.launch import launch_local

    speeds = optional_speeds(args.emulate_speeds)
    config = TrainConfig(
        workers=args.workers, emulate_speeds=speeds, base_cores=args.base_cores,
        global_batch=args.global_batch, epochs=args.epochs, lr=args.lr, seed=args.seed,
        rebalance=not args.no_rebalance, out=args.out,
        max_local_batch=_caps(args.max_local_batch), compress=args.compress,
        error_feedback=not args.no_error_feedback, sync=args.sync,
        delay_compensation=args.delay_compensation, checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
    )
    _check_dataset_size(config.global_batch)
    if args.faults and not args.elastic:
        raise ConfigError("--faults needs --elastic")
    if args.elastic:
        from idla.jobs.elastic import launch_elastic

        return launch_elastic(config, speeds, args.faults)
    if config.sync != "allreduce":
        return _train_mode(config, speeds, args)
    if args.quiet:
        reports = launch_local(train_worker, (config,), config.workers, speeds, config.base_cores)
    else:
        with TrainProgress() as progress:
            reports = launch_local(train_worker, (config,), config.workers, speeds,
                                   config.base_cores, on_progress=progress.update)
    report = reports[0]
    out = write_outputs(report, args.out) if args.out else None
    print_summary(report, out)
    return 0


def _train_mode(config: Any, speeds: list[float] | None, args: argparse.Namespace) -> int:
    from idla.jobs.sync_modes import mode_summary, mode_worker, print_mode_summary
    from idla.runtime.launch import launch_local

    results = launch_local(mode_worker, (config,), config.workers, speeds, config.base_cores)
    report = mode_summary(results)
    print_mode_summary(report)
    if args.out:
        from pathlib import Path

        from idla.report import write_json_atomic

        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out) / "report.json", report)
    return 0


def _check_dataset_size(global_batch: int) -> None:
    from idla.demo import load_digits_split

    train_set, _ = load_digits_split()
    if len(train_set) < global_batch:
        raise ConfigError(
            f"--global-batch {global_batch} is larger than the data set "
            f"({len(train_set)} training samples)"
        )


def _profile(args: argparse.Namespace) -> int:
    from idla.jobs.profile_survey import print_profiles, survey_workers

    speeds = optional_speeds(args.emulate_speeds)
    rows = survey_workers(args.workers, speeds, args.base_cores)
    print_profiles(rows)
    if args.json:
        from idla.report import write_json_atomic

        write_json_atomic(args.json, {"workers": rows})
    return 0


def _bench(args: argparse.Namespace) -> int:
    if getattr(args, "bench_handler", None) is not None:
        result: dict[str, Any] = args.bench_handler(args)
    elif args.bench == "hetero":
        from idla.bench.hetero import HeteroConfig, print_hetero, run_hetero

        config = HeteroConfig(
            speeds=optional_speeds(args.speeds, "--speeds") or [1.0], base_cores=args.base_cores,
            steps=args.steps, repeats=args.repeats, global_batch=args.global_batch, seed=args.seed,
        )
        result = run_hetero(config)
        print_hetero(result)
    elif args.bench == "comm":
        from idla.bench.comm import CommConfig, print_comm, run_comm

        comm_config = CommConfig(
            hosts=args.hosts, bandwidth=args.bandwidth, steps=args.steps,
            target_accuracy=args.target, repeats=args.repeats,
            codecs=[c.strip() for c in args.codecs.split(",") if c.strip()],
        )
        result = run_comm(comm_config, on_run=_print_run)
        print_comm(result)
    elif args.bench == "sync":
        from idla.bench.sync import SyncBenchConfig, print_sync_bench, run_sync_bench

        sync_config = SyncBenchConfig(
            speeds=optional_speeds(args.speeds, "--speeds") or [1.0], period_steps=args.period,
            staleness_bound=args.staleness, delay_compensation=args.delay_compensation,
            budget_s=args.budget, target_accuracy=args.target, repeats=args.repeats,
        )
        result = run_sync_bench(sync_config, on_run=_print_sync_run)
        print_sync_bench(result)
    elif args.bench == "faults":
        from idla.bench.faults import FaultBenchConfig, print_fault_bench, run_fault_bench

        fault_config = FaultBenchConfig(
            kills=args.kills, epochs=args.epochs, seed=args.seed,
            kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        )
        result = run_fault_bench(fault_config, on_trial=_print_trial)
        print_fault_bench(result)
    elif args.bench == "plan":
        from idla.bench.plan_speed import bench_allocate

        result = bench_allocate(args.workers, args.repeats)
        print(json.dumps(result, indent=2))
    else:
        raise ConfigError(
            "name a benchmark: idla bench hetero | comm | sync | plan | fl | serve | infer "
            "(see idla bench --help)")
    if args.json:
        from idla.report import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": _train, "profile": _profile, "bench": _bench}
    if args.command is None:
        parser.print_help()
        return 2
    handler = handlers.get(args.command) or getattr(args, "handler", None)
    if handler is None:
        parser.parse_args([args.command, "--help"])
        return 2
    try:
        return int(handler(args))
    except IdlaError as error:
        print(f"idla: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idla: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
