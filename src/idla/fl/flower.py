"""idla's ``FedStrategy`` as a Flower ``Strategy``, for real deployments with Flower.

Flower brings the transport (gRPC between SuperLink and SuperNodes), node authentication, TLS
and the deployment tooling; idla brings deadline- and resource-aware selection, validation with
reasons, robust aggregation with trust weights and server optimizers. Use it in a ``ServerApp``::

    strategy = FlowerStrategy(FedStrategy(StrategyConfig(...), profiles), initial_arrays)
    app = ServerApp(server_fn=lambda context: ServerAppComponents(
        strategy=strategy, config=ServerConfig(num_rounds=20, round_timeout=30.0)))

(``examples/flower_app.py`` is a complete app.) Each selected client gets ``FitIns`` whose config
holds ``server_round``, ``idla_client_id``, ``local_epochs``, ``proximal_mu`` (FedProx: the client
adds μ/2‖w − w_global‖²) and ``work_fraction`` (the share of its local work that meets the
deadline). A client may report ``finish_s`` (seconds from receiving the task to sending its
update) in its fit metrics; the strategy drops updates later than ``deadline_s``. With Flower the
server waits at most ``ServerConfig.round_timeout`` for the stragglers.

Client identity. ``client_ids`` maps Flower node ids (``ClientProxy.cid``, a string) to idla
client ids, e.g. from the public keys registered for node authentication; without it, nodes are
numbered in the order they are first seen (sorted by node id within a round).

Hostile results. No client can make ``aggregate_fit`` raise: malformed ``Parameters`` (not
``numpy.ndarray`` tensors; bytes that are not ``.npy``; a header declaring another dtype or shape
than the model's, 10¹² elements, an object dtype (pickle); truncated or padded data) are refused
by ``idla.fl.wire.arrays_from_npy`` *before* any array is allocated, and updates that
``FedStrategy`` rejects (NaN, not selected, two updates) are rejected too, each with its reason in
``history[round]["rejected"]`` (keyed by idla client id) and in the strategy's report, while the
round goes on with the others. Results from nodes without an idla id, and exceptions Flower
passes as failures, are listed in ``history[round]["unmapped"]`` (keyed by node id).

Arrays go out as Flower ``Parameters`` made by Flower's own ``ndarrays_to_parameters``
(``np.save(allow_pickle=False)``); the clients' come back through ``arrays_from_npy``, which
reads the same format without ``np.load``.

Security in deployment is Flower's, configured on its command line, not here:

- TLS: start the SuperLink with ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile
  server.pem --ssl-keyfile server.key`` and every SuperNode with ``flower-supernode
  --root-certificates ca.crt`` (never ``--insecure`` outside a test).
- Node authentication: ``flower-superlink --enable-supernode-auth`` (needs TLS), register each
  node's public key with ``flwr supernode register``, and start each node with
  ``flower-supernode --auth-supernode-private-key node_key``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from idla.fl.strategy import ClientUpdate, Failure, FedStrategy
from idla.fl.wire import WireError, arrays_from_npy

EvaluateFn = Callable[[int, list[np.ndarray]], tuple[float, dict[str, Scalar]]]
_NUMPY_TENSOR_TYPE = "numpy.ndarray"


class FlowerStrategy(Strategy):
    """Flower ``Strategy`` that delegates every decision to an idla ``FedStrategy``."""

    def __init__(
        self,
        strategy: FedStrategy,
        initial_arrays: list[np.ndarray],
        *,
        evaluate_fn: EvaluateFn | None = None,
        client_ids: Mapping[str, int] | None = None,
        min_available_clients: int = 1,
        wait_timeout_s: int = 600,
    ) -> None:
        """
        Args:
            strategy: The idla strategy; its known clients are the ones that can be selected.
            initial_arrays: The starting global weights.
            evaluate_fn: Server-side evaluation ``(round, arrays) -> (loss, metrics)``.
            client_ids: Flower node id (``ClientProxy.cid``) → idla client id.
            min_available_clients: Nodes to wait for before the first round.
            wait_timeout_s: How long to wait for them.
        """
        super().__init__()
        self.strategy = strategy
        self._global = [np.asarray(a) for a in initial_arrays]
        self._initial = ndarrays_to_parameters(self._global)
        self._evaluate_fn = evaluate_fn
        self._fixed_ids = dict(client_ids) if client_ids is not None else None
        self._ids: dict[str, int] = dict(client_ids or {})
        self._known = {int(c) for c in strategy.report()["participation"]}
        self._min_available = min_available_clients
        self._wait_timeout_s = wait_timeout_s
        self._missing: list[Failure] = []
        self.history: list[dict[str, Any]] = []
        """Per round: accepted / rejected (with reasons) / late / failed clients, trust."""

    def __repr__(self) -> str:
        return f"FlowerStrategy({self.strategy.config.aggregator})"

    def _map_nodes(self, client_manager: ClientManager) -> dict[int, ClientProxy]:
        """idla id → connected proxy; new nodes take free idla ids unless ids are fixed."""
        proxies = client_manager.all()
        if self._fixed_ids is None:
            free = sorted(self._known - set(self._ids.values()))
            for cid in sorted((c for c in proxies if c not in self._ids), key=_node_order):
                if not free:
                    break
                self._ids[cid] = free.pop(0)
        return {self._ids[cid]: proxy for cid, proxy in proxies.items() if cid in self._ids}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self._initial

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)
        client_manager.wait_for(self._min_available, self._wait_timeout_s)
        connected = self._map_nodes(client_manager)
        model_bytes = sum(a.nbytes for a in self._global)
        tasks = self.strategy.configure_round(server_round, self._global, model_bytes)
        self._missing = []
        instructions: list[tuple[ClientProxy, FitIns]] = []
        for task in tasks:
            proxy = connected.get(task.client_id)
            if proxy is None:
                self._missing.append(Failure(task.client_id, "not connected"))
                continue
            config: dict[str, Scalar] = {
                "server_round": server_round, "idla_client_id": task.client_id,
                "local_epochs": task.local_epochs, "proximal_mu": task.proximal_mu,
                "work_fraction": task.work_fraction,
            }
            instructions.append((proxy, FitIns(parameters, config)))
        return instructions

    def _update(self, client: int, res: FitRes) -> ClientUpdate | str:
        """The idla update in a Flower result, or why it cannot be one."""
        parameters = res.parameters
        if not isinstance(parameters, Parameters):
            return f"parameters are a {type(parameters).__name__}, not Flower Parameters"
        if parameters.tensor_type != _NUMPY_TENSOR_TYPE:
            return f"tensor_type {parameters.tensor_type!r} is not {_NUMPY_TENSOR_TYPE!r}"
        try:
            arrays = arrays_from_npy(parameters.tensors, self._global)
        except WireError as error:
            return f"unreadable parameters: {error}"
        samples = res.num_examples
        if isinstance(samples, bool) or not isinstance(samples, int):
            return f"num_examples must be an integer, got {samples!r}"
        # Flower delivers only results that beat its round_timeout: without a report, on time.
        metrics = res.metrics if isinstance(res.metrics, dict) else {}
        finish = metrics.get("finish_s", 0.0)
        finish_s = float(finish) if isinstance(finish, (int, float)) else -1.0
        return ClientUpdate(client, samples, arrays, finish_s)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        updates: list[ClientUpdate] = []
        refused: dict[int, str] = {}
        unmapped: dict[str, str] = {}
        for proxy, res in results:
            client = self._ids.get(proxy.cid)
            if client is None:
                unmapped[proxy.cid] = f"node {proxy.cid} has no idla client id"
                continue
            update = self._update(client, res)
            if isinstance(update, str):
                refused.setdefault(client, update)  # with another result: both rejected
            else:
                updates.append(update)
        failed = list(self._missing)
        for failure in failures:
            if isinstance(failure, BaseException):
                unmapped[f"exception {len(unmapped)}"] = f"{type(failure).__name__}: {failure}"
                continue
            proxy, res = failure
            client = self._ids.get(proxy.cid)
            reason = f"status {res.status.code.name}: {res.status.message}"
            if client is None:
                unmapped[proxy.cid] = reason
            else:
                failed.append(Failure(client, reason))
        outcome = self.strategy.aggregate_round(
            server_round, self._global, updates, failed, refused)
        self._global = outcome.arrays
        self.history.append({
            "round": server_round, "accepted": outcome.accepted,
            "rejected": {str(c): r for c, r in outcome.rejected.items()},
            "unmapped": unmapped, "late": outcome.late,
            "failed": {str(c): r for c, r in outcome.failed.items()},
            "trust": {str(c): t for c, t in outcome.trust.items()}, "round_s": outcome.round_s,
        })
        metrics: dict[str, Scalar] = {
            "accepted": len(outcome.accepted), "rejected": len(outcome.rejected) + len(unmapped),
            "late": len(outcome.late), "failed": len(outcome.failed),
        }
        return ndarrays_to_parameters(outcome.arrays), metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """No federated evaluation: the server evaluates centrally with ``evaluate_fn``."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Sample-weighted mean loss of any federated evaluation results."""
        total = sum(res.num_examples for _, res in results)
        if total == 0:
            return None, {}
        return sum(res.loss * res.num_examples for _, res in results) / total, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        if self._evaluate_fn is None:
            return None
        return self._evaluate_fn(server_round, parameters_to_ndarrays(parameters))


def _node_order(cid: str) -> tuple[int, int, str]:
    """Numeric node ids in numeric order, then any others by name."""
    return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)
