"""`idla bench fl`: idla's federated simulation against Flower's, then stragglers and attacks.

1. **Speed.** Flower's Ray simulation with Flower's FedAvg (``idla.bench.fl_flower``) and idla's
   simulation with FedAvg, on the same partitions, model, initial weights, local epochs, batch,
   learning rate and seeds, every client in every round. rounds/s runs from the first round's
   start to the last round's evaluation (start-up excluded on both sides).
2. **Stragglers** (``--clients-per-round`` clients a round): ``no_stragglers``; then 20% of the
   clients 10× slower with uniform selection (``stragglers_uniform``) and with deadline-aware
   selection (``stragglers_deadline``; deadline = the predicted finish of the slowest client
   that is not a straggler, i.e. what the round takes without stragglers).
3. **Attacks**: 30% malicious clients, each attack, with every aggregator; ``clean`` is FedAvg
   without attackers. Krum assumes f = the expected malicious count per round, the trimmed mean
   cuts the malicious share at each end: the defender knows an upper bound on the attackers'
   share, as these rules require. Centered clipping (``cclip``, ``trustclip``) is told
   nothing: its radius comes from each round's updates. The attackers act alone (signflip,
   gaussian, scale, labelflip) or collude (alie, ipm, minmax: one update crafted from the
   round's honest ones, ``idla.fl.collusion``); ``targets["defences"]`` gives each
   aggregator's worst gap to clean FedAvg over the lone and over the colluding attacks.

All idla runs share one worker pool (same partitions). Accuracies are on the digits test set
after the last round; ``mean_round_s`` is the mean emulated round time (``idla.fl.simulate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from idla.bench.machine import machine_info
from idla.demo import load_digits_tensors
from idla.errors import ConfigError
from idla.fl.pool import ClientPool
from idla.fl.simulate import SimulationConfig, make_population, pool_settings, run_simulation
from idla.fl.summary import trust_split

LONE_ATTACKS = ("signflip", "gaussian", "scale", "labelflip")
COLLUDING_ATTACKS = ("alie", "ipm", "minmax")
ATTACKS = LONE_ATTACKS + COLLUDING_ATTACKS
AGGREGATORS = ("fedavg", "median", "trimmed", "krum", "multikrum", "trust", "cclip",
               "trustclip")
ROBUST = tuple(a for a in AGGREGATORS if a != "fedavg")


@dataclass(kw_only=True)
class FlBenchConfig:
    """Settings of one `idla bench fl` run."""

    clients: int = field(default=100, metadata={"metavar": "N"})
    """Virtual clients."""
    rounds: int = field(default=20, metadata={"metavar": "R"})
    """Federated rounds."""
    clients_per_round: int = field(default=50, metadata={"metavar": "K"})
    """Clients per round in the straggler and attack scenarios (the Flower comparison uses all
    clients)."""
    alpha: float = 0.5
    """Dirichlet α of the non-IID label skew, > 0."""
    local_epochs: int = field(default=3, metadata={"metavar": "E"})
    """Local epochs per client and round."""
    batch_size: int = 8
    lr: float = 0.3
    model: str = "mlp"
    slow_fraction: float = 0.2
    slow_factor: float = 10.0
    malicious_fraction: float = 0.3
    attacks: tuple[str, ...] = ATTACKS
    aggregators: tuple[str, ...] = AGGREGATORS
    processes: int = field(default=0, metadata={"metavar": "P"})
    """Worker processes running the clients; 0 picks min(2, cores)."""
    seed: int = field(default=0, metadata={"metavar": "S"})
    """Seed of partitions, selection, model and client order."""
    flower: bool = True
    """Run Flower's simulation as the baseline (off: no flwr needed)."""
    scenarios: bool = True

    def __post_init__(self) -> None:
        if self.clients_per_round > self.clients:
            raise ConfigError(f"--clients-per-round {self.clients_per_round} is more than "
                              f"--clients {self.clients}")
        self.base()  # validates the shared settings

    def base(self, **changes: Any) -> SimulationConfig:
        """The simulation settings shared by every idla run, with ``changes``."""
        settings: dict[str, Any] = dict(
            clients=self.clients, rounds=self.rounds, clients_per_round=self.clients_per_round,
            alpha=self.alpha, local_epochs=self.local_epochs, batch_size=self.batch_size,
            lr=self.lr, model=self.model, processes=self.processes, seed=self.seed,
        )
        settings.update(changes)
        return SimulationConfig(**settings)


def _row(report: dict[str, Any]) -> dict[str, Any]:
    settings = report["settings"]
    split = trust_split(report)
    return {
        "final_accuracy": report["final_accuracy"],
        "mean_round_s": report["mean_round_s"],
        "rounds_per_s": report["rounds_per_s"],
        "aggregator": settings["aggregator"],
        "selection": settings["selection"],
        "attack": settings["attack"] if settings["malicious_fraction"] > 0 else "none",
        "deadline_s": settings["deadline_s"],
        "late": report["totals"]["late"],
        "rejected": report["totals"]["rejected"],
        "outliers": report["totals"]["outlier"],
        "trust_malicious": split["malicious"],
        "trust_honest": split["honest"],
        "accuracy": report["history"]["accuracy"],
    }


def _steady_rounds_per_s(report: dict[str, Any]) -> float | None:
    wall = report["history"]["wall_s"]
    return (len(wall) - 1) / (wall[-1] - wall[0]) if len(wall) > 1 else None


def scenario_settings(config: FlBenchConfig) -> dict[str, dict[str, Any]]:
    """Name → SimulationConfig changes of every straggler and attack scenario."""
    runs: dict[str, dict[str, Any]] = {
        "no_stragglers": {},
        "stragglers_uniform": {"slow_fraction": config.slow_fraction,
                               "slow_factor": config.slow_factor},
        "stragglers_deadline": {"slow_fraction": config.slow_fraction,
                                "slow_factor": config.slow_factor, "selection": "deadline"},
        "clean": {},
    }
    expected_malicious = round(config.malicious_fraction * config.clients_per_round)
    for attack in config.attacks:
        for aggregator in config.aggregators:
            runs[f"{attack}_{aggregator}"] = {
                "malicious_fraction": config.malicious_fraction, "attack": attack,
                "aggregator": aggregator, "krum_malicious": expected_malicious,
                "trim_fraction": min(0.49, max(0.2, config.malicious_fraction)),
            }
    return runs


def run_fl_bench(
    config: FlBenchConfig, on_run: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run every part of the benchmark; return the JSON-safe result."""
    on_run = on_run or _print_run
    base = config.base(clients_per_round=config.clients)
    _, train_labels, _, _ = load_digits_tensors()
    population = make_population(base, train_labels.numpy())
    result: dict[str, Any] = {
        "settings": {**asdict(config), "processes": base.processes,
                     "model_parameters_bytes": None},
        "machine": machine_info(),
    }
    pool_start_s = time.perf_counter()
    with ClientPool(base.processes, pool_settings(base, population)) as pool:
        startup_s = time.perf_counter() - pool_start_s
        report = run_simulation(base, pool, population)
        result["settings"]["model_parameters_bytes"] = report["model_bytes"]
        result["idla"] = {
            "rounds_per_s": report["rounds_per_s"],
            "steady_rounds_per_s": _steady_rounds_per_s(report),
            "rounds_wall_s": report["rounds_wall_s"],
            "startup_s": startup_s,
            "final_accuracy": report["final_accuracy"],
            "accuracy": report["history"]["accuracy"],
        }
        on_run("idla_fedavg_all_clients", result["idla"])
        if config.flower:
            result["flower"] = _flower(config, base)
            on_run("flower_fedavg_all_clients", result["flower"])
            result["speedup_vs_flower"] = (result["idla"]["rounds_per_s"]
                                           / result["flower"]["rounds_per_s"])
            steady = (result["idla"]["steady_rounds_per_s"],
                      result["flower"]["steady_rounds_per_s"])
            result["steady_speedup_vs_flower"] = (steady[0] / steady[1]
                                                  if None not in steady else None)
            result["accuracy_gap_vs_flower_pp"] = 100 * (result["idla"]["final_accuracy"]
                                                         - result["flower"]["final_accuracy"])
        scenarios: dict[str, Any] = {}
        if config.scenarios:
            for name, changes in scenario_settings(config).items():
                settings = config.base(**changes)
                # Same seed, same partitions; the slow and malicious clients differ per run.
                scenario_population = make_population(settings, train_labels.numpy())
                scenarios[name] = _row(run_simulation(settings, pool, scenario_population))
                on_run(name, scenarios[name])
        result["scenarios"] = scenarios
    result["targets"] = check_targets(result, config)
    return result


def _flower(config: FlBenchConfig, base: SimulationConfig) -> dict[str, Any]:
    try:
        from idla.bench.fl_flower import ClientSetup, run_flower
    except ImportError as error:
        raise ConfigError(f"idla bench fl needs Flower (pip install 'idla[flower]'), or pass "
                          f"--no-flower: {error}") from None
    setup = ClientSetup(clients=config.clients, alpha=config.alpha, seed=config.seed,
                        model=config.model, local_epochs=config.local_epochs,
                        batch_size=config.batch_size, lr=config.lr)
    return run_flower(setup, config.rounds, base.processes)


def check_targets(result: dict[str, Any], config: FlBenchConfig) -> dict[str, Any]:
    """Which of the issue's targets the numbers meet (None: not measured in this run)."""
    targets: dict[str, Any] = {}
    if "flower" in result:
        targets["speedup_at_least_10x"] = result["speedup_vs_flower"] >= 10.0
        targets["same_accuracy_as_flower_1pp"] = abs(result["accuracy_gap_vs_flower_pp"]) <= 1.0
    scenarios = result["scenarios"]
    if {"no_stragglers", "stragglers_deadline"} <= scenarios.keys():
        reference, deadline = scenarios["no_stragglers"], scenarios["stragglers_deadline"]
        ratio = deadline["mean_round_s"] / reference["mean_round_s"]
        gap_pp = 100 * (deadline["final_accuracy"] - reference["final_accuracy"])
        targets["deadline_round_ratio"] = ratio
        targets["deadline_accuracy_gap_pp"] = gap_pp
        targets["deadline_met"] = ratio <= 1.2 and abs(gap_pp) <= 1.0
        # The same with "equal accuracy" read as "at most 1 pp worse" (better is no failure).
        targets["deadline_met_one_sided"] = ratio <= 1.2 and gap_pp >= -1.0
    if "clean" in scenarios:
        clean = scenarios["clean"]["final_accuracy"]
        per_attack: dict[str, Any] = {}
        for attack in config.attacks:
            robust = {a: scenarios[f"{attack}_{a}"]["final_accuracy"] for a in ROBUST
                      if f"{attack}_{a}" in scenarios}
            if not robust:
                continue
            best = max(robust, key=robust.__getitem__)
            fedavg = scenarios.get(f"{attack}_fedavg", {}).get("final_accuracy")
            per_attack[attack] = {
                "best": best, "best_gap_pp": 100 * (robust[best] - clean),
                "within_2pp": 100 * (clean - robust[best]) <= 2.0,
                "fedavg_drop_pp": None if fedavg is None else 100 * (clean - fedavg),
            }
        targets["attacks"] = per_attack
        targets["defences"] = defence_gaps(scenarios, config)
    return targets


def defence_gaps(scenarios: dict[str, Any], config: FlBenchConfig) -> dict[str, Any]:
    """Per aggregator: its worst gap (pp, negative = below clean FedAvg) over the lone and over
    the colluding attacks that ran, and whether the colluding one is within 3 pp."""
    clean = scenarios["clean"]["final_accuracy"]
    gaps: dict[str, Any] = {}
    for aggregator in config.aggregators:
        row: dict[str, Any] = {}
        for group, attacks in (("lone", LONE_ATTACKS), ("colluding", COLLUDING_ATTACKS)):
            ran = [100 * (scenarios[f"{a}_{aggregator}"]["final_accuracy"] - clean)
                   for a in attacks if a in config.attacks and f"{a}_{aggregator}" in scenarios]
            row[f"worst_{group}_gap_pp"] = min(ran) if ran else None
        colluding = row["worst_colluding_gap_pp"]
        row["colluding_within_3pp"] = None if colluding is None else colluding >= -3.0
        gaps[aggregator] = row
    return gaps


def _print_run(name: str, row: dict[str, Any]) -> None:
    extra = f", mean emulated round {row['mean_round_s']:.4f} s" if "mean_round_s" in row else ""
    print(f"  {name}: final accuracy {100 * row['final_accuracy']:.2f}%, "
          f"{row['rounds_per_s']:.2f} rounds/s{extra}", flush=True)


def print_fl_bench(result: dict[str, Any]) -> None:
    console = Console()
    settings = result["settings"]
    console.print(
        f"settings: {settings['clients']} clients, {settings['rounds']} rounds, α = "
        f"{settings['alpha']}, model {settings['model']} ({settings['model_parameters_bytes']} "
        f"bytes), {settings['local_epochs']} local epochs, batch {settings['batch_size']}, "
        f"lr {settings['lr']}, {settings['clients_per_round']} clients/round in the scenarios, "
        f"{settings['processes']} worker processes, seed {settings['seed']}")
    if "flower" in result:
        table = Table(title="FedAvg, every client every round")
        for column in ("runner", "rounds/s", "steady rounds/s", "start-up s", "final accuracy"):
            table.add_column(column, justify="right")
        for name in ("flower", "idla"):
            row = result[name]
            steady = row["steady_rounds_per_s"]
            table.add_row(name, f"{row['rounds_per_s']:.2f}",
                          "-" if steady is None else f"{steady:.2f}", f"{row['startup_s']:.1f}",
                          f"{100 * row['final_accuracy']:.2f}%")
        console.print(table)
        console.print(f"speedup vs Flower: {result['speedup_vs_flower']:.1f}×")
    if result["scenarios"]:
        table = Table(title="idla scenarios")
        for column in ("scenario", "final accuracy", "mean round s", "late", "trust bad/good"):
            table.add_column(column, justify="right")
        for name, row in result["scenarios"].items():
            bad, good = row["trust_malicious"], row["trust_honest"]
            trust = "-" if bad is None or good is None else f"{bad:.2f}/{good:.2f}"
            table.add_row(name, f"{100 * row['final_accuracy']:.2f}%",
                          f"{row['mean_round_s']:.4f}", str(row["late"]), trust)
        console.print(table)
    console.print(f"targets: {result['targets']}")
