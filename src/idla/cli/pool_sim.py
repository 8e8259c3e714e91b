"""`idla pool simulate` (added to the `idla pool` group by `add_simulate`) and `idla bench pool`.

The `idla pool` group itself (start, submit, status, cancel) lives in `idla.cli.pool`; this
module only adds its `simulate` sub-command there, and registers the benchmark.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from idla.cli.args import positive_int
from idla.errors import ConfigError

_POLICIES = ("fifo", "tiresias", "gavel", "pollux", "idla")
_TRACES_HELP = "folder with workloads/ and models/ (default: ../shared/traces)"


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().removesuffix(".csv") for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return names




def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", default="../shared/traces", metavar="DIR", help=_TRACES_HELP)
    parser.add_argument("--jobs-limit", type=positive_int, default=None, metavar="N",
                        help="replay only each workload's first N jobs (quick runs)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the priority assignment (default: 0)")
    parser.add_argument("--no-alone", action="store_true",
                        help="skip the p=4 jobs' alone-on-the-cluster replays")


def add_simulate(pool_subcommands: Any) -> None:
    """Add `simulate` to an `idla pool` sub-parser group."""
    simulate = pool_subcommands.add_parser(
        "simulate", help="replay a Pollux/Sia workload on a simulated 64-GPU cluster",
        description="Replay a workload of the Pollux/Sia artifacts with their measured step "
        "times on 64 GPUs of three kinds, under idla's policy and the baselines (FIFO, "
        "Tiresias, Gavel-style max-min, Pollux-style); prints JCT, makespan and resizes.",
    )
    simulate.add_argument("--workload", type=_names, default=("philly/workload-1",),
                          metavar="SET/NAME[,..]", help="e.g. philly/workload-1 (default)")
    simulate.add_argument("--policy", type=_names, default=_POLICIES, metavar="NAME[,..]",
                          help="policies to replay (default: all of " + ", ".join(_POLICIES)
                          + ")")
    _common(simulate)
    simulate.add_argument("--json", action="store_true", help="print the results as JSON")
    simulate.set_defaults(handler=_simulate)


def add_commands(commands: Any, benches: Any) -> None:
    """Add `idla bench pool` to ``benches``."""
    bench = benches.add_parser(
        "pool", help="the device-pool policy: simulated cluster replays vs baselines",
        description="Replay every Pollux/Sia workload (philly, saturn) under idla and four "
        "baselines on a simulated 64-GPU cluster and time allocate at 1,000 devices x 200 "
        "jobs; then, live on this machine, run three training jobs and a serving job on "
        "emulated devices under idla, FIFO and a static partition (a fresh `idla pool start` "
        "each); report the issue's targets. --simulate-only skips the live part, --live-only "
        "the replays; --no-alone skips the alone runs of both.",
    )
    bench.add_argument("--simulate-only", action="store_true",
                       help="only the simulated replays (the live part is not run)")
    bench.add_argument("--live-only", action="store_true",
                       help="only the live part on this machine (no replays)")
    bench.add_argument("--quick", action="store_true",
                       help="live: a short smoke run (2 devices, 2 short jobs, idla only)")
    bench.add_argument("--live-policies", type=_names, default=None, metavar="NAME[,..]",
                       help="live: policies, of idla, fifo, static (default: all three)")
    bench.add_argument("--live-speeds", default=None, metavar="LIST",
                       help="live: relative speed per emulated device (default: 1,1,0.5,0.25)")
    bench.add_argument("--live-model", choices=("digits", "resnet"), default="digits",
                       help="live: the training jobs' model (default: digits)")
    bench.add_argument("--workloads", type=_names, default=(), metavar="SET/NAME[,..]",
                       help="workloads to replay (default: every one under the traces)")
    bench.add_argument("--policies", type=_names, default=_POLICIES, metavar="NAME[,..]",
                       help="policies (default: all)")
    _common(bench)
    bench.add_argument("--json", metavar="PATH", help="Write the results as JSON here")
    bench.set_defaults(bench_handler=_bench)


def _config(args: argparse.Namespace, workloads: tuple[str, ...],
            policies: tuple[str, ...]) -> Any:
    from idla.pool.sim.run import PoolSimConfig

    return PoolSimConfig(traces_dir=args.traces, workloads=workloads, policies=policies,
                         jobs_limit=args.jobs_limit, alone=not args.no_alone, seed=args.seed)


def _simulate(args: argparse.Namespace) -> int:
    from idla.pool.sim.run import print_pool_simulations, run_pool_simulations

    result = run_pool_simulations(_config(args, args.workload, args.policy))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_pool_simulations(result)
    return 0


def _progress(workload: str, policy: str, entry: dict[str, Any]) -> None:
    print(f"{workload} {policy}: avg JCT {entry['avg_jct_s'] / 3600:.3f} h, makespan "
          f"{entry['makespan_s'] / 3600:.2f} h ({entry['wall_s']:.1f} s)", flush=True)


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from idla.pool.sim.run import print_pool_simulations, run_pool_simulations, time_policy

    if args.simulate_only and args.live_only:
        raise ConfigError("--simulate-only and --live-only: give at most one")
    result: dict[str, Any] = {}
    if not args.live_only:
        result = run_pool_simulations(_config(args, args.workloads, args.policies),
                                      on_result=_progress)
        result["policy_timing"] = time_policy()
        print_pool_simulations(result)
    if not args.simulate_only:
        result["live"] = _live(args)
    return result


def _live(args: argparse.Namespace) -> dict[str, Any]:
    from idla.bench.pool_live import run_pool_live
    from idla.bench.pool_live_config import PoolLiveConfig, quick_config
    from idla.cli.args import optional_speeds

    overrides: dict[str, Any] = {"model": args.live_model}
    if args.no_alone:
        overrides["alone"] = False
    if args.live_policies is not None:
        overrides["policies"] = args.live_policies
    if args.live_speeds is not None:
        overrides["speeds"] = optional_speeds(args.live_speeds, "--live-speeds")
        if overrides["speeds"] is None:
            raise ConfigError("--live-speeds: give one speed per device, e.g. 1,1,0.5,0.25")
    config = quick_config(**overrides) if args.quick else PoolLiveConfig(**overrides)
    return run_pool_live(config)
