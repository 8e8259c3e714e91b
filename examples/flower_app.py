"""A Flower app whose server runs idla's strategy: trust-weighted robust aggregation.

    python examples/flower_app.py --clients 10 --rounds 5 --aggregator trust --bad-clients 2

It runs with Flower's own simulation (``flwr.simulation.run_simulation``, on Ray). The same
``server_app`` and ``client_app`` deploy unchanged on a Flower SuperLink and SuperNodes over gRPC
with TLS and node authentication (see ``idla.fl.flower``). Each node trains idla's small MLP on
its Dirichlet(α) share of scikit-learn's digits (``partition-id`` from its node config). The
first ``--bad-clients`` nodes misbehave: even ones send a wrong-shape update, odd ones NaNs;
idla rejects both with a reason and the rounds go on. With ``--json`` the server's per-round
record (accepted, rejected with reasons, trust) and test accuracy are written there.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
import torch
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context, NDArrays, Scalar
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.simulation import run_simulation

from idla import write_json_atomic
from idla.demo import load_digits_tensors
from idla.fl import (
    ClientProfile,
    FedStrategy,
    FlowerStrategy,
    LocalTraining,
    StrategyConfig,
    build_model,
    client_seed,
    client_update,
    dirichlet_partition,
    evaluate_arrays,
    model_arrays,
)

SEED = 0


def partitions(num_clients: int, alpha: float) -> list[np.ndarray]:
    """The Dirichlet split every node and the server compute alike from the seed."""
    _, labels, _, _ = load_digits_tensors()
    return dirichlet_partition(labels.numpy(), num_clients, alpha, np.random.default_rng(SEED))


class DigitsClient(NumPyClient):
    """A node: idla's local training on its own partition; a bad node corrupts its update."""

    def __init__(self, partition_id: int, num_clients: int, alpha: float, bad: bool) -> None:
        torch.set_num_threads(1)
        self.partition_id = partition_id
        self.bad = bad
        images, labels, _, _ = load_digits_tensors()
        index = torch.as_tensor(partitions(num_clients, alpha)[partition_id])
        self.images, self.labels = images[index], labels[index]
        self.model = build_model("mlp", SEED)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        training = LocalTraining(
            local_epochs=int(config["local_epochs"]), proximal_mu=float(config["proximal_mu"]),
            work_fraction=float(config["work_fraction"]),
        )
        seed = client_seed(SEED, self.partition_id, int(config["server_round"]))
        result = client_update(self.model, parameters, self.images, self.labels, training, seed)
        arrays = result.arrays
        if self.bad and self.partition_id % 2 == 0:
            arrays = [arrays[0].T.copy(), *arrays[1:]]  # wrong shape
        elif self.bad:
            arrays = [np.full_like(a, np.nan) for a in arrays]  # NaN update
        return arrays, result.num_samples, {"compute_s": result.compute_s}


def make_apps(args: argparse.Namespace, record: dict[str, Any]) -> tuple[ServerApp, ClientApp]:
    """The ServerApp (idla's strategy inside Flower's) and the ClientApp."""

    def client_fn(context: Context) -> Client:
        partition_id = int(context.node_config["partition-id"])
        bad = partition_id < args.bad_clients
        return DigitsClient(partition_id, args.clients, args.alpha, bad).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        torch.set_num_threads(1)
        sizes = [len(p) for p in partitions(args.clients, args.alpha)]
        # Every node trains at about the same speed here; in a deployment, measure it.
        profiles = [ClientProfile(c, n, samples_per_s=1000.0, link_bytes_per_s=1e6)
                    for c, n in enumerate(sizes)]
        config = StrategyConfig(aggregator=args.aggregator, clients_per_round=args.clients,
                                local_epochs=3, seed=SEED)
        _, _, test_images, test_labels = load_digits_tensors()
        eval_model = build_model("mlp", SEED)

        def evaluate_fn(server_round: int, arrays: list[np.ndarray]) -> tuple[float, Any]:
            loss, accuracy = evaluate_arrays(eval_model, arrays, test_images, test_labels)
            record["accuracy"].append(accuracy)
            return loss, {"accuracy": accuracy}

        strategy = FlowerStrategy(
            FedStrategy(config, profiles), model_arrays(build_model("mlp", SEED)),
            evaluate_fn=evaluate_fn, min_available_clients=args.clients,
        )
        record["strategy"] = strategy
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--aggregator", default="trust")
    parser.add_argument("--bad-clients", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="Ray CPUs for the clients")
    parser.add_argument("--json", help="write the server's record here")
    args = parser.parse_args()

    record: dict[str, Any] = {"accuracy": []}
    server_app, client_app = make_apps(args, record)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.processes, "num_gpus": 0,
                      "logging_level": logging.ERROR, "log_to_driver": False},
    }
    run_simulation(server_app, client_app, num_supernodes=args.clients,
                   backend_config=backend_config)
    strategy: FlowerStrategy = record["strategy"]
    summary = {"accuracy": record["accuracy"], "rounds": strategy.history,
               "report": strategy.strategy.report()}
    for row in strategy.history:
        print(f"round {row['round']}: {len(row['accepted'])} accepted, rejected "
              f"{row['rejected'] or 'none'}")
    print(f"test accuracy per evaluation: {[round(a, 4) for a in record['accuracy']]}")
    if args.json:
        write_json_atomic(args.json, summary)


if __name__ == "__main__":
    main()
