"""idla's strategy behind Flower's Strategy interface, driven with Flower's own types."""

from __future__ import annotations

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.common import (  # noqa: E402
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402

from idla.fl.flower import FlowerStrategy  # noqa: E402
from idla.fl.strategy import FedStrategy, StrategyConfig  # noqa: E402
from idla.plan.selection import ClientProfile  # noqa: E402

OK = Status(code=Code.OK, message="")
INITIAL = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]


def _adapter(client_ids: dict[str, int] | None, known: int = 3) -> FlowerStrategy:
    profiles = [ClientProfile(c, 10, samples_per_s=100.0, link_bytes_per_s=1e6)
                for c in range(known)]
    strategy = FedStrategy(StrategyConfig(clients_per_round=known), profiles)
    return FlowerStrategy(strategy, INITIAL, client_ids=client_ids)


def _manager(node_ids: list[int]) -> tuple[SimpleClientManager, dict[str, GridClientProxy]]:
    manager = SimpleClientManager()
    proxies = {str(n): GridClientProxy(n, None, 0) for n in node_ids}  # type: ignore[arg-type]
    for proxy in proxies.values():
        manager.register(proxy)
    return manager, proxies


def _result(value: float, samples: int) -> FitRes:
    arrays = [np.full(a.shape, value, np.float32) for a in INITIAL]
    return FitRes(OK, ndarrays_to_parameters(arrays), samples, {})


def test_a_round_aggregates_good_updates_and_rejects_bad_ones_with_reasons() -> None:
    adapter = _adapter({"101": 0, "102": 1, "103": 2})
    manager, proxies = _manager([101, 102, 103, 999])
    parameters = adapter.initialize_parameters(manager)
    assert parameters is not None

    instructions = adapter.configure_fit(1, parameters, manager)

    assert sorted(p.cid for p, _ in instructions) == ["101", "102", "103"]  # 999 has no id
    ids = {p.cid: int(ins.config["idla_client_id"]) for p, ins in instructions}
    assert ids == {"101": 0, "102": 1, "103": 2}
    assert all(ins.config["server_round"] == 1 for _, ins in instructions)

    garbage = FitRes(OK, Parameters(tensors=[b"not an npy file"], tensor_type="numpy.ndarray"),
                     10, {})
    results = [(proxies["101"], _result(1.0, 10)), (proxies["102"], _result(4.0, 30)),
               (proxies["103"], garbage), (proxies["999"], _result(9.0, 10))]
    new_parameters, metrics = adapter.aggregate_fit(1, results, [])

    assert new_parameters is not None
    new = parameters_to_ndarrays(new_parameters)
    for array in new:
        np.testing.assert_allclose(array, (1.0 * 10 + 4.0 * 30) / 40, rtol=1e-6)
    assert metrics["accepted"] == 2 and metrics["rejected"] == 2
    record = adapter.history[-1]
    assert "no idla client id" in record["unmapped"]["999"]
    assert "unreadable parameters" in record["rejected"]["2"]  # node 103 is idla client 2


def test_wrong_shape_nan_and_foreign_tensor_types_are_rejected_and_the_round_goes_on() -> None:
    adapter = _adapter({"1": 0, "2": 1, "3": 2})
    manager, proxies = _manager([1, 2, 3])
    parameters = adapter.initialize_parameters(manager)
    assert parameters is not None
    adapter.configure_fit(1, parameters, manager)
    wrong_shape = FitRes(OK, ndarrays_to_parameters([np.ones((2, 3), np.float32),
                                                     np.ones(2, np.float32)]), 10, {})
    nan = FitRes(OK, ndarrays_to_parameters([np.full((3, 2), np.nan, np.float32),
                                             np.ones(2, np.float32)]), 10, {})
    foreign = FitRes(OK, Parameters(tensors=[b"x"], tensor_type="torch.Tensor"), 10, {})

    new_parameters, metrics = adapter.aggregate_fit(
        1, [(proxies["1"], wrong_shape), (proxies["2"], nan), (proxies["3"], _result(2.0, 5))],
        [RuntimeError("node 4 vanished")])
    second, _ = adapter.aggregate_fit(1, [(proxies["3"], foreign)], [])

    assert new_parameters is not None
    np.testing.assert_allclose(parameters_to_ndarrays(new_parameters)[0], 2.0)
    rejected = adapter.history[0]["rejected"]
    assert "shape" in rejected["0"]
    assert "non-finite" in rejected["1"]
    assert any("node 4 vanished" in reason for reason in adapter.history[0]["unmapped"].values())
    assert metrics["accepted"] == 1
    assert "torch.Tensor" in adapter.history[1]["rejected"]["2"]  # node 3 is idla client 2
    assert second is not None  # no usable update: the global weights stay
    np.testing.assert_allclose(parameters_to_ndarrays(second)[0], 2.0)


def test_nodes_without_a_fixed_mapping_take_free_ids_in_node_order() -> None:
    adapter = _adapter(None, known=2)
    manager, _ = _manager([30, 10, 20])
    parameters = adapter.initialize_parameters(manager)
    assert parameters is not None

    instructions = adapter.configure_fit(1, parameters, manager)

    ids = {p.cid: int(ins.config["idla_client_id"]) for p, ins in instructions}
    assert ids == {"10": 0, "20": 1}  # node "30" came third: no idla id left for it
