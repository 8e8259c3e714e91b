"""The Flower baseline of `idla bench fl`: Flower's own Ray simulation with Flower's FedAvg.

The ClientApp trains with idla's client code (``idla.fl.client.client_update``) on the same
Dirichlet partitions (``idla.fl.simulate.make_population``), initial weights, local epochs,
batch size, learning rate and per-(client, round) seeds as idla's simulation, so the two differ
only in the machinery around the clients. Every client takes part in every round
(``fraction_fit=1``), as in idla's run it is compared with, so client sampling plays no part.

Timing (wall clock, ``time.time``, comparable across the processes): every client reports when
its ``fit`` started; a FedAvg subclass records when each round's centralized evaluation (test
accuracy, as idla does after every round) ends. In Flower 1.42 the server's round 1 starts at
once and waits for Ray and its actors, so ``rounds_per_s`` = rounds / (last evaluation end − the
first client's fit start in round 1): Ray's start-up is excluded and reported as ``startup_s``.
The other actors' first use of the ClientApp (imports, data) still falls in round 1, which
``steady_rounds_per_s`` (rounds 2..R: last evaluation end − round 1's evaluation end) leaves out.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import (
    Context,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

from idla.demo import load_digits_tensors
from idla.fl.client import (
    LocalTraining,
    build_model,
    client_seed,
    client_update,
    evaluate_arrays,
    model_arrays,
)
from idla.fl.simulate import SimulationConfig, make_population


@dataclass(frozen=True)
class ClientSetup:
    """Everything a Flower client needs to rebuild idla's client exactly (small, hashable)."""

    clients: int
    alpha: float
    seed: int
    model: str
    local_epochs: int
    batch_size: int
    lr: float


_STATE: dict[ClientSetup, tuple[Any, Any, Any, list[Any]]] = {}


def _client_state(setup: ClientSetup) -> tuple[Any, Any, Any, list[Any]]:
    """(model, images, labels, partitions), built once per Ray actor process."""
    if setup not in _STATE:
        import torch

        torch.set_num_threads(1)
        images, labels, _, _ = load_digits_tensors()
        config = SimulationConfig(clients=setup.clients, alpha=setup.alpha, seed=setup.seed,
                                  processes=1)
        population = make_population(config, labels.numpy())
        parts = [torch.as_tensor(p, dtype=torch.int64) for p in population.partitions]
        _STATE[setup] = (build_model(setup.model, 0), images, labels, parts)
    return _STATE[setup]


class DigitsClient(NumPyClient):
    """One Flower client running idla's local training on its partition."""

    def __init__(self, setup: ClientSetup, partition_id: int) -> None:
        self.setup = setup
        self.partition_id = partition_id

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        model, images, labels, parts = _client_state(self.setup)
        index = parts[self.partition_id]
        training = LocalTraining(local_epochs=self.setup.local_epochs,
                                 batch_size=self.setup.batch_size, lr=self.setup.lr)
        seed = client_seed(self.setup.seed, self.partition_id, int(config["server_round"]))
        start_unix_s = time.time()  # wall clock: comparable with the server's, another process
        result = client_update(model, parameters, images[index], labels[index], training, seed)
        return result.arrays, result.num_samples, {"compute_s": result.compute_s,
                                                   "start_unix_s": start_unix_s}


def _client_fn(setup: ClientSetup, context: Context) -> Client:
    return DigitsClient(setup, int(context.node_config["partition-id"])).to_client()


def run_flower(setup: ClientSetup, rounds: int, processes: int) -> dict[str, Any]:
    """Run Flower's simulation; return its timings and test accuracy per round."""
    _, _, test_images, test_labels = load_digits_tensors()
    eval_model = build_model(setup.model, 0)
    initial = model_arrays(build_model(setup.model, setup.seed))
    first_fit: dict[int, float] = {}
    end: dict[int, float] = {}
    accuracy: dict[int, float] = {}

    def evaluate_fn(
        server_round: int, arrays: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        loss, acc = evaluate_arrays(eval_model, arrays, test_images, test_labels)
        accuracy[server_round] = acc
        return loss, {"accuracy": acc}

    class TimedFedAvg(FedAvg):
        def aggregate_fit(
            self,
            server_round: int,
            results: list[tuple[ClientProxy, FitRes]],
            failures: list[tuple[ClientProxy, FitRes] | BaseException],
        ) -> tuple[Parameters | None, dict[str, Scalar]]:
            starts = [float(res.metrics["start_unix_s"]) for _, res in results]
            first_fit[server_round] = min(starts, default=time.time())
            return super().aggregate_fit(server_round, results, failures)

        def evaluate(
            self, server_round: int, parameters: Parameters
        ) -> tuple[float, dict[str, Scalar]] | None:
            result = super().evaluate(server_round, parameters)
            end[server_round] = time.time()
            return result

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = TimedFedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=setup.clients,
            min_available_clients=setup.clients, evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda server_round: {"server_round": server_round},
            initial_parameters=ndarrays_to_parameters(initial),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": processes, "num_gpus": 0, "logging_level": logging.ERROR,
                      "log_to_driver": False},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    call_unix_s = time.time()
    try:
        run_simulation(ServerApp(server_fn=server_fn),
                       ClientApp(client_fn=functools.partial(_client_fn, setup)),
                       num_supernodes=setup.clients, backend_config=backend_config)
    finally:
        flwr_logger.setLevel(level)
    wall_s = time.time() - call_unix_s
    if rounds not in end or 1 not in first_fit:
        raise RuntimeError(f"Flower finished {len(end)} of {rounds} rounds")
    rounds_wall_s = end[rounds] - first_fit[1]
    steady_s = end[rounds] - end[1]
    history = [accuracy[r] for r in range(1, rounds + 1)]
    return {
        "rounds_per_s": rounds / rounds_wall_s,
        "steady_rounds_per_s": (rounds - 1) / steady_s if rounds > 1 else None,
        "rounds_wall_s": rounds_wall_s,
        "startup_s": first_fit[1] - call_unix_s,
        "wall_s": wall_s,
        "final_accuracy": history[-1],
        "accuracy": history,
        "initial_accuracy": accuracy.get(0, float(np.nan)),
    }
