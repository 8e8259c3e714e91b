"""`idla fl simulate`: a fast federated simulation on one machine, without Ray.

N virtual clients hold Dirichlet(α) non-IID shares of scikit-learn's digits; ≤ 2 worker
processes (``idla.fl.pool``) run each round's selected clients; the server side is idla's
``FedStrategy`` (selection, validation, robust aggregation, trust, server optimizer).

Emulated time. A client's finish time is its measured compute (CPU seconds of its training,
``time.thread_time``) × its slow factor (``--slow-factor`` for the ``--slow-fraction`` of clients
drawn as slow, 1 for the others) + 2 × model bytes / its link speed (download and upload). The
strategy is told each client's profile: its throughput, measured once before the first round by
training a few clients (``calibrate_samples_per_s``), divided by its slow factor, and its link.
A round's emulated duration is ``RoundResult.round_s``: the last arrival, or the deadline when an
update came late (late updates are dropped). Wall time is measured apart: ``rounds_per_s`` counts
from the first round's start to the last round's end (worker start-up excluded; the evaluation of
the global model on the test set after every round included).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from idla.demo import load_digits_tensors
from idla.errors import ConfigError, IdlaError
from idla.fl.attacks import COLLUDING, Attack, parse_attack
from idla.fl.client import (
    MODEL_KINDS,
    build_model,
    evaluate_arrays,
    model_arrays,
)
from idla.fl.collusion import collude
from idla.fl.data import dirichlet_partition
from idla.fl.pool import ClientPool, Job, PoolSettings
from idla.fl.strategy import ClientUpdate, Failure, FedStrategy, StrategyConfig
from idla.fl.strategy_config import AGGREGATORS, SELECTIONS, SERVER_OPTIMIZERS
from idla.plan.selection import ClientProfile, predict_finish_s

RoundCallback = Callable[[dict[str, Any]], None]


def default_processes() -> int:
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(kw_only=True)
class SimulationConfig:
    """Settings of one simulation; invalid values raise ConfigError naming the CLI option."""

    clients: int = field(default=100, metadata={"metavar": "N"})
    """Virtual clients."""
    rounds: int = field(default=20, metadata={"metavar": "R"})
    """Federated rounds."""
    clients_per_round: int = field(default=20, metadata={"metavar": "K"})
    """Clients selected per round."""
    alpha: float = 0.5
    """Dirichlet α of the non-IID label skew, > 0 (small: very non-IID)."""
    aggregator: str = "fedavg"
    """fedavg | median | trimmed | krum | multikrum | trust | cclip | trustclip."""
    server_optimizer: str = "none"
    """none | adam | yogi."""
    proximal_mu: float = field(default=0.0, metadata={"metavar": "MU"})
    """FedProx μ (0: plain FedAvg)."""
    selection: str = "uniform"
    """uniform | deadline."""
    deadline_s: float | None = field(default=None, metadata={
        "flag": "--deadline", "metavar": "S",
        "default_text": "the predicted finish of the slowest client that is not slow"})
    """Round deadline in emulated seconds (deadline selection)."""
    slow_fraction: float = field(default=0.0, metadata={"metavar": "F"})
    """Share of clients that are slow."""
    slow_factor: float = field(default=10.0, metadata={"metavar": "K"})
    """How many times slower a slow client computes."""
    malicious_fraction: float = field(default=0.0, metadata={"flag": "--malicious",
                                                             "metavar": "F"})
    """Share of malicious clients."""
    attack: str = "signflip"
    """signflip | gaussian | scale | labelflip (each attacker alone) | alie | ipm | minmax
    (colluding: one update crafted from the round's honest updates, ``idla.fl.collusion``)."""
    availability: float = field(default=1.0, metadata={"metavar": "P"})
    """Probability that a selected client answers in a round, in (0, 1]."""
    trim_fraction: float = field(default=0.2, metadata={"metavar": "F"})
    """Share cut at each end by the trimmed aggregator."""
    krum_malicious: int = 0
    """f assumed by Krum (0: the largest it tolerates)."""
    local_epochs: int = field(default=3, metadata={"metavar": "E"})
    """Local epochs per client and round."""
    batch_size: int = 8
    lr: float = 0.3
    model: str = "mlp"
    """mlp | cnn."""
    link_bytes_per_s: float = 20e6
    processes: int = field(default=0, metadata={"metavar": "P"})
    """Worker processes running the clients; 0 picks min(2, cores)."""
    seed: int = field(default=0, metadata={"metavar": "S"})
    """Seed of partitions, selection, model and client order."""

    def __post_init__(self) -> None:
        _at_least("--clients", self.clients, 1)
        _at_least("--rounds", self.rounds, 1)
        _at_least("--clients-per-round", self.clients_per_round, 1)
        _at_least("--local-epochs", self.local_epochs, 1)
        _at_least("--batch-size", self.batch_size, 1)
        _at_least("--processes", self.processes, 0)
        _at_least("--seed", self.seed, 0)
        _at_least("--krum-malicious", self.krum_malicious, 0)
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"--alpha must be > 0, got {self.alpha}")
        for option, value in (("--slow-fraction", self.slow_fraction),
                              ("--malicious", self.malicious_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{option} must be a fraction in [0, 1], got {value}")
        if not 0.0 < self.availability <= 1.0:
            raise ConfigError(f"--availability must be in (0, 1], got {self.availability}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"--trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not (math.isfinite(self.slow_factor) and self.slow_factor >= 1):
            raise ConfigError(f"--slow-factor must be >= 1, got {self.slow_factor}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not self.proximal_mu >= 0:
            raise ConfigError(f"--proximal-mu must be >= 0, got {self.proximal_mu}")
        if self.proximal_mu * self.lr >= 2:
            # SGD on μ/2‖w − w_g‖² alone multiplies w − w_g by (1 − lr·μ) each step.
            raise ConfigError(f"--proximal-mu {self.proximal_mu} × lr {self.lr} must be < 2, "
                              "or local SGD diverges")
        if not self.link_bytes_per_s > 0:
            raise ConfigError(f"--link-bytes-per-s must be > 0, got {self.link_bytes_per_s}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ConfigError(f"--deadline must be > 0 seconds, got {self.deadline_s}")
        for option, name, choices in (
            ("--aggregator", self.aggregator, AGGREGATORS),
            ("--selection", self.selection, SELECTIONS),
            ("--server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS),
            ("--model", self.model, MODEL_KINDS),
        ):
            if name not in choices:
                raise ConfigError(f"{option}: unknown {name!r}; choose {'|'.join(choices)}")
        self.attack = parse_attack(self.attack).value
        if self.processes == 0:
            self.processes = default_processes()


def _at_least(option: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{option} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Population:
    """Who holds what, who is slow and who is malicious: fixed for a run, drawn from the seed."""

    partitions: list[np.ndarray]
    slow: frozenset[int]
    malicious: frozenset[int]


def make_population(config: SimulationConfig, train_labels: np.ndarray) -> Population:
    """Partitions from (seed, α); slow and malicious clients as independent random subsets."""
    rng = np.random.default_rng([config.seed, 1])
    partitions = dirichlet_partition(train_labels, config.clients, config.alpha, rng)
    slow = rng.permutation(config.clients)[: round(config.slow_fraction * config.clients)]
    malicious = rng.permutation(config.clients)[: round(config.malicious_fraction * config.clients)]
    return Population(partitions, frozenset(int(c) for c in slow),
                      frozenset(int(c) for c in malicious))


def pool_settings(config: SimulationConfig, population: Population) -> PoolSettings:
    return PoolSettings([p.tolist() for p in population.partitions], config.model,
                        config.batch_size, config.lr)


def calibrate_samples_per_s(
    pool: ClientPool, global_arrays: list[np.ndarray], local_epochs: int, seed: int
) -> float:
    """Training throughput of an ordinary client (samples × epochs per CPU second), measured
    on up to 8 of the largest clients, training from the initial weights (thrown away)."""
    largest = sorted(range(len(pool.sizes)), key=lambda c: -pool.sizes[c])[:8]
    results = pool.run_round(0, seed, global_arrays, [Job(c, local_epochs) for c in largest])
    work = sum(r.num_samples * local_epochs for r in results)
    compute_s = sum(r.compute_s for r in results)
    return work / max(compute_s, 1e-6)


def run_simulation(
    config: SimulationConfig,
    pool: ClientPool | None = None,
    population: Population | None = None,
    on_round: RoundCallback | None = None,
) -> dict[str, Any]:
    """Run ``config.rounds`` rounds and return the report (see ``idla.fl.summary``).

    ``pool`` and ``population`` may be shared by several runs (the benchmark does); a pool
    built here is closed before returning.
    """
    import torch

    torch.set_num_threads(1)
    start_s = time.perf_counter()
    _, train_labels, test_images, test_labels = load_digits_tensors()
    population = population or make_population(config, train_labels.numpy())
    settings = pool_settings(config, population)
    if pool is not None and pool.settings != settings:
        raise IdlaError("the client pool was built for other partitions or training settings")
    own_pool = pool is None
    pool = pool or ClientPool(config.processes, settings)
    try:
        return _run(config, pool, population, (test_images, test_labels), start_s, on_round)
    finally:
        if own_pool:
            pool.close()


def _collude(
    attack: Attack,
    global_arrays: list[np.ndarray],
    updates: list[ClientUpdate],
    malicious: frozenset[int],
) -> list[ClientUpdate]:
    """The round's updates with every colluder's replaced by the one they craft from the honest
    ones (omniscient colluders; from their own honest updates when no honest client answered)."""
    colluders = [u for u in updates if u.client_id in malicious]
    if not colluders:
        return updates
    honest = [u.arrays for u in updates if u.client_id not in malicious]
    crafted = collude(attack, global_arrays, honest or [u.arrays for u in colluders],
                      len(updates), len(colluders))
    return [ClientUpdate(u.client_id, u.num_samples, [a.copy() for a in crafted], u.finish_s)
            if u.client_id in malicious else u for u in updates]


def _run(
    config: SimulationConfig,
    pool: ClientPool,
    population: Population,
    test: tuple[Any, Any],
    start_s: float,
    on_round: RoundCallback | None,
) -> dict[str, Any]:
    model = build_model(config.model, config.seed)
    global_arrays = model_arrays(model)
    model_bytes = sum(a.nbytes for a in global_arrays)
    base_samples_per_s = calibrate_samples_per_s(pool, global_arrays, config.local_epochs,
                                                 config.seed)
    factor = {c: config.slow_factor if c in population.slow else 1.0
              for c in range(config.clients)}
    profiles = [
        ClientProfile(c, len(population.partitions[c]), base_samples_per_s / factor[c],
                      config.link_bytes_per_s, config.availability)
        for c in range(config.clients)
    ]
    deadline_s = config.deadline_s
    if config.selection == "deadline" and deadline_s is None:
        deadline_s = max(predict_finish_s(p, config.local_epochs, model_bytes)
                         for p in profiles if p.client_id not in population.slow)
    strategy = FedStrategy(StrategyConfig(
        aggregator=config.aggregator, server_optimizer=config.server_optimizer,
        proximal_mu=config.proximal_mu, local_epochs=config.local_epochs,
        selection=config.selection, clients_per_round=config.clients_per_round,
        deadline_s=deadline_s, trim_fraction=config.trim_fraction,
        num_malicious=config.krum_malicious, seed=config.seed,
    ), profiles)
    transfer_s = 2.0 * model_bytes / config.link_bytes_per_s
    reachable = np.random.default_rng([config.seed, 2])
    attack = Attack(config.attack)
    history: dict[str, list[Any]] = {key: [] for key in (
        "round", "accuracy", "loss", "round_s", "accepted", "rejected", "late", "failed",
        "outliers", "wall_s")}
    initial_loss, initial_accuracy = evaluate_arrays(model, global_arrays, *test)
    rounds_start_s = time.perf_counter()
    for round_index in range(1, config.rounds + 1):
        tasks = strategy.configure_round(round_index, global_arrays, model_bytes)
        failures: list[Failure] = []
        jobs: list[Job] = []
        for task in tasks:
            if reachable.random() >= config.availability:
                failures.append(Failure(task.client_id, "unreachable this round"))
                continue
            malicious = task.client_id in population.malicious and attack not in COLLUDING
            bad = attack.value if malicious else "none"
            jobs.append(Job(task.client_id, task.local_epochs, task.proximal_mu,
                            task.work_fraction, bad))
        updates: list[ClientUpdate] = []
        for result in pool.run_round(round_index, config.seed, global_arrays, jobs):
            if result.error is not None:
                failures.append(Failure(result.client_id, result.error))
                continue
            finish_s = result.compute_s * factor[result.client_id] + transfer_s
            updates.append(ClientUpdate(result.client_id, result.num_samples, result.arrays,
                                        finish_s))
        if attack in COLLUDING:
            updates = _collude(attack, global_arrays, updates, population.malicious)
        outcome = strategy.aggregate_round(round_index, global_arrays, updates, failures)
        global_arrays = outcome.arrays
        loss, accuracy = evaluate_arrays(model, global_arrays, *test)
        row = {"round": round_index, "accuracy": accuracy, "loss": loss,
               "round_s": outcome.round_s, "accepted": len(outcome.accepted),
               "rejected": len(outcome.rejected), "late": len(outcome.late),
               "failed": len(outcome.failed), "outliers": len(outcome.outliers),
               "wall_s": time.perf_counter() - rounds_start_s}
        for key, value in row.items():
            history[key].append(value)
        if on_round is not None:
            on_round({**row, "rounds": config.rounds})
    rounds_wall_s = time.perf_counter() - rounds_start_s
    strategy_report = strategy.report()
    return {
        "settings": {**asdict(config), "deadline_s": deadline_s},
        "history": history,
        "initial_accuracy": initial_accuracy,
        "initial_loss": initial_loss,
        "final_accuracy": history["accuracy"][-1],
        "wall_s": time.perf_counter() - start_s,
        "rounds_wall_s": rounds_wall_s,
        "rounds_per_s": config.rounds / rounds_wall_s,
        "mean_round_s": float(np.mean(history["round_s"])),
        "model_bytes": model_bytes,
        "samples_per_s": base_samples_per_s,
        "slow_clients": sorted(population.slow),
        "malicious_clients": sorted(population.malicious),
        "client_samples": [len(p) for p in population.partitions],
        "trust": strategy_report["trust"],
        "participation": strategy_report["participation"],
        "totals": strategy_report["totals"],
        "selection": strategy_report["selection"],
        "processes": pool.processes,
    }
