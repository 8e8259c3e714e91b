"""`idla fl simulate` and `idla bench fl`: federated learning on the command line.

Heavy imports (torch, flwr) stay inside the handlers so that `idla --help` is fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from idla.cli import fields

# Options shared by `idla fl simulate` and `idla bench fl` (listed first, then --json).
RUN_OPTIONS = ("clients", "rounds", "alpha", "local_epochs", "processes", "seed")
SIMULATE_OPTIONS = (
    "clients_per_round", "aggregator", "server_optimizer", "proximal_mu", "selection",
    "deadline_s", "slow_fraction", "slow_factor", "malicious_fraction", "attack",
    "trim_fraction", "availability", "model",
)
BENCH_OPTIONS = ("clients_per_round", "flower")


def _simulation_config() -> type:
    from idla.fl.simulate import SimulationConfig

    return SimulationConfig


def _bench_config() -> type:
    from idla.bench.fl import FlBenchConfig

    return FlBenchConfig


def add_commands(commands: Any, benches: Any) -> None:
    """Add `idla fl simulate` (to ``commands``) and `idla bench fl` (to ``benches``)."""
    fl = commands.add_parser("fl", help="federated learning: fast local simulation",
                             description="Federated learning with idla's strategies.")
    fl_commands = fl.add_subparsers(dest="fl_command", metavar="COMMAND")
    fl.set_defaults(handler=_fl_help(fl))
    simulate = fl_commands.add_parser(
        "simulate", help="simulate N clients on this machine (no Ray)",
        description="Simulate federated rounds: N virtual clients with Dirichlet non-IID "
        "digits, ≤ 2 worker processes, emulated slow clients and attackers.",
    )
    simulate.defer(_simulate_options)
    simulate.set_defaults(handler=_simulate)

    bench = benches.add_parser(
        "fl", help="idla's FL simulation vs Flower's, stragglers and attacks",
        description="Flower's Ray simulation with FedAvg vs idla's simulation on the same "
        "partitions, model, local epochs and seed; then stragglers (uniform vs deadline "
        "selection) and lone and colluding attacks (FedAvg, median, trimmed mean, Krum, "
        "trust, centered clipping).",
    )
    bench.defer(_bench_options)
    bench.set_defaults(bench_handler=_bench)


def _simulate_options(parser: argparse.ArgumentParser) -> None:
    fields.add_options(parser, _simulation_config(), RUN_OPTIONS)
    parser.add_argument("--json", metavar="PATH", help="Write the results as JSON here")
    fields.add_options(parser, _simulation_config(), SIMULATE_OPTIONS)
    parser.add_argument("--out", default="runs/fl", metavar="DIR",
                        help="Write report.json and fl.png here (default: runs/fl)")
    parser.add_argument("--quiet", action="store_true", help="No progress bar")


def _bench_options(parser: argparse.ArgumentParser) -> None:
    fields.add_options(parser, _bench_config(), RUN_OPTIONS)
    parser.add_argument("--json", metavar="PATH", help="Write the results as JSON here")
    fields.add_options(parser, _bench_config(), BENCH_OPTIONS)


def _fl_help(parser: argparse.ArgumentParser) -> Any:
    def handler(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return handler


def _simulate(args: argparse.Namespace) -> int:
    from idla.fl.simulate import SimulationConfig, run_simulation
    from idla.fl.summary import RoundProgress, print_summary, write_outputs

    config = fields.build(SimulationConfig, args, RUN_OPTIONS + SIMULATE_OPTIONS)
    if args.quiet:
        report = run_simulation(config)
    else:
        with RoundProgress(config.rounds) as progress:
            report = run_simulation(config, on_round=progress.update)
    out = write_outputs(report, args.out) if args.out else None
    if args.json:
        from idla.report import write_json_atomic

        write_json_atomic(args.json, report)
    print_summary(report, out)
    return 0


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from idla.bench.fl import FlBenchConfig, print_fl_bench, run_fl_bench

    config = fields.build(FlBenchConfig, args, RUN_OPTIONS + BENCH_OPTIONS)
    result = run_fl_bench(config)
    print_fl_bench(result)
    return result
