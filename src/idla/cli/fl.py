"""`idla fl simulate` and `idla bench fl`: federated learning on the command line.

Heavy imports (torch, flwr) stay inside the handlers so that `idla --help` is fast.
"""

from __future__ import annotations

import argparse
from typing import Any


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=100, metavar="N",
                        help="virtual clients (default: 100)")
    parser.add_argument("--rounds", type=int, default=20, metavar="R",
                        help="federated rounds (default: 20)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Dirichlet α of the non-IID label skew, > 0 (default: 0.5)")
    parser.add_argument("--local-epochs", type=int, default=3, metavar="E",
                        help="local epochs per client and round (default: 3)")
    parser.add_argument("--processes", type=int, default=0, metavar="P",
                        help="worker processes running the clients (default: min(2, cores))")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of partitions, selection, model and client order (default: 0)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")


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
    _add_run_options(simulate)
    simulate.add_argument("--clients-per-round", type=int, default=20, metavar="K",
                          help="clients selected per round (default: 20)")
    simulate.add_argument("--aggregator", default="fedavg",
                          help="fedavg | median | trimmed | krum | multikrum | trust "
                          "(default: fedavg)")
    simulate.add_argument("--server-optimizer", default="none",
                          help="none | adam | yogi (default: none)")
    simulate.add_argument("--proximal-mu", type=float, default=0.0, metavar="MU",
                          help="FedProx μ (default: 0, plain FedAvg)")
    simulate.add_argument("--selection", default="uniform",
                          help="uniform | deadline (default: uniform)")
    simulate.add_argument("--deadline", type=float, metavar="S",
                          help="round deadline in emulated seconds (deadline selection; default: "
                          "the predicted finish of the slowest client that is not slow)")
    simulate.add_argument("--slow-fraction", type=float, default=0.0, metavar="F",
                          help="share of clients that are slow (default: 0)")
    simulate.add_argument("--slow-factor", type=float, default=10.0, metavar="K",
                          help="how many times slower a slow client computes (default: 10)")
    simulate.add_argument("--malicious", type=float, default=0.0, metavar="F",
                          help="share of malicious clients (default: 0)")
    simulate.add_argument("--attack", default="signflip",
                          help="signflip | gaussian | scale | labelflip (default: signflip)")
    simulate.add_argument("--trim-fraction", type=float, default=0.2, metavar="F",
                          help="share cut at each end by --aggregator trimmed (default: 0.2)")
    simulate.add_argument("--availability", type=float, default=1.0, metavar="P",
                          help="probability that a selected client answers (default: 1)")
    simulate.add_argument("--model", default="mlp", help="mlp | cnn (default: mlp)")
    simulate.add_argument("--out", default="runs/fl", metavar="DIR",
                          help="write report.json and fl.png here (default: runs/fl)")
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(handler=_simulate)

    bench = benches.add_parser(
        "fl", help="idla's FL simulation vs Flower's, stragglers and attacks",
        description="Flower's Ray simulation with FedAvg vs idla's simulation on the same "
        "partitions, model, local epochs and seed; then stragglers (uniform vs deadline "
        "selection) and attacks (FedAvg, median, trimmed mean, Krum, trust).",
    )
    _add_run_options(bench)
    bench.add_argument("--clients-per-round", type=int, default=50, metavar="K",
                       help="clients per round in the straggler and attack scenarios "
                       "(default: 50; the Flower comparison uses all clients)")
    bench.add_argument("--no-flower", action="store_true",
                       help="skip Flower's simulation (no flwr installed)")
    bench.set_defaults(bench_handler=_bench)


def _fl_help(parser: argparse.ArgumentParser) -> Any:
    def handler(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return handler


def _simulate(args: argparse.Namespace) -> int:
    from idla.fl.simulate import SimulationConfig, run_simulation
    from idla.fl.summary import RoundProgress, print_summary, write_outputs

    config = SimulationConfig(
        clients=args.clients, rounds=args.rounds, clients_per_round=args.clients_per_round,
        alpha=args.alpha, aggregator=args.aggregator, server_optimizer=args.server_optimizer,
        proximal_mu=args.proximal_mu, selection=args.selection, deadline_s=args.deadline,
        slow_fraction=args.slow_fraction, slow_factor=args.slow_factor,
        malicious_fraction=args.malicious, attack=args.attack, availability=args.availability,
        trim_fraction=args.trim_fraction, local_epochs=args.local_epochs, model=args.model,
        processes=args.processes, seed=args.seed,
    )
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

    config = FlBenchConfig(
        clients=args.clients, rounds=args.rounds, clients_per_round=args.clients_per_round,
        alpha=args.alpha, local_epochs=args.local_epochs, processes=args.processes,
        seed=args.seed, flower=not args.no_flower,
    )
    result = run_fl_bench(config)
    print_fl_bench(result)
    return result
