"""Hostile bytes from Flower clients: refused before allocation, each with its reason, while the
round aggregates the honest clients. Driven with Flower's own ``FitRes`` / ``Parameters``."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.common import (  # noqa: E402
    Code,
    FitRes,
    Parameters,
    Status,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402

from idla.fl.aggregate import weighted_mean  # noqa: E402
from idla.fl.flower import FlowerStrategy  # noqa: E402
from idla.fl.strategy import FedStrategy, StrategyConfig  # noqa: E402
from idla.fl.wire import WireError, array_from_npy, arrays_from_npy  # noqa: E402
from idla.plan.selection import ClientProfile  # noqa: E402

OK = Status(code=Code.OK, message="")
INITIAL = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]


def _header(descr: str, shape: tuple[int, ...], version: tuple[int, int] = (1, 0)) -> bytes:
    """A bare .npy header, written by numpy's own writer."""
    stream = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(stream, header)
    else:
        np.lib.format.write_array_header_2_0(stream, header)
    return stream.getvalue()


def _object_npy() -> bytes:
    """A (3, 2) object array as np.save writes it with allow_pickle: header '|O', then a pickle."""
    values = np.empty((3, 2), dtype=object)
    values[...] = 1.0
    stream = io.BytesIO()
    np.save(stream, values, allow_pickle=True)
    data = stream.getvalue()
    assert pickle.PROTO in data  # the data really is a pickle
    return data


def _crafted() -> dict[str, tuple[list[bytes], str]]:
    """Name → (tensors of a malicious result, words its rejection reason must contain)."""
    good_bias = ndarray_to_bytes(np.ones(2, np.float32))
    good_weight = ndarray_to_bytes(np.ones((3, 2), np.float32))
    huge = _header("<f4", (10**12,))
    assert len(huge) < 200
    return {
        "huge": ([huge, good_bias], "shape (1000000000000,) differs"),
        "huge_v2": ([_header("<f4", (10**6, 10**6), (2, 0)), good_bias], "differs"),
        "wrong_dtype": ([ndarray_to_bytes(np.ones((3, 2), np.float64)), good_bias],
                        "dtype float64 differs"),
        "object": ([_object_npy(), good_bias], "Python objects"),
        "truncated": ([good_weight[:-4], good_bias], "data bytes"),
        "padded": ([good_weight + b"\0" * 8, good_bias], "data bytes"),
        "wrong_shape": ([ndarray_to_bytes(np.ones((2, 3), np.float32)), good_bias],
                        "shape (2, 3) differs"),
        "not_npy": ([b"\x93NUMPZ" + b"\0" * 40, good_bias], "not a .npy"),
        "nested_header": ([b"\x93NUMPY\x01\x00" + (4000).to_bytes(2, "little")
                           + b"(" * 2000 + b")" * 2000, good_bias], "not a .npy header"),
        "too_many": ([good_weight, good_bias, good_bias], "expected 2 arrays, got 3"),
    }


def test_crafted_updates_are_refused_with_reasons_and_the_honest_ones_aggregate() -> None:
    crafted = _crafted()
    honest_values = {0: (1.0, 10), 1: (4.0, 30), 2: (-2.0, 20)}
    clients = len(honest_values) + len(crafted)
    profiles = [ClientProfile(c, 10, samples_per_s=100.0, link_bytes_per_s=1e6)
                for c in range(clients)]
    strategy = FedStrategy(StrategyConfig(clients_per_round=clients), profiles)
    adapter = FlowerStrategy(strategy, INITIAL, client_ids={str(c): c for c in range(clients)})
    manager = SimpleClientManager()
    proxies = {c: GridClientProxy(c, None, 0) for c in range(clients)}  # type: ignore[arg-type]
    for proxy in proxies.values():
        manager.register(proxy)
    parameters = adapter.initialize_parameters(manager)
    assert parameters is not None
    assert len(adapter.configure_fit(1, parameters, manager)) == clients
    honest = {c: [np.full(a.shape, v, np.float32) for a in INITIAL]
              for c, (v, _) in honest_values.items()}
    results = [(proxies[c], FitRes(OK, ndarrays_to_parameters(honest[c]), n, {}))
               for c, (_, n) in honest_values.items()]
    names = {}
    for offset, (name, (tensors, _)) in enumerate(crafted.items()):
        client = len(honest_values) + offset
        names[client] = name
        results.append((proxies[client],
                        FitRes(OK, Parameters(tensors=tensors, tensor_type="numpy.ndarray"),
                               10, {})))

    new_parameters, metrics = adapter.aggregate_fit(1, results, [])

    assert new_parameters is not None
    expected = weighted_mean(list(honest.values()), [n for _, n in honest_values.values()])
    for got, want in zip(parameters_to_ndarrays(new_parameters), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    record = adapter.history[-1]
    assert sorted(record["accepted"]) == sorted(honest)
    assert metrics["accepted"] == len(honest) and metrics["rejected"] == len(crafted)
    for client, name in names.items():
        assert crafted[name][1] in record["rejected"][str(client)], (name, record["rejected"])
    totals = strategy.report()["totals"]
    assert totals["rejected"] == len(crafted) and totals["accepted"] == len(honest)


def test_array_from_npy_reads_what_numpy_writes_in_both_orders_and_formats() -> None:
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    fortran = np.asfortranarray(value)
    stream = io.BytesIO()
    np.lib.format.write_array(stream, value, version=(2, 0))

    for data in (ndarray_to_bytes(value), ndarray_to_bytes(fortran), stream.getvalue()):
        parsed = array_from_npy(data, value)
        np.testing.assert_array_equal(parsed, value)
        assert parsed.flags.writeable and parsed.dtype == value.dtype
    scalar = np.float32(2.5).reshape(())
    assert array_from_npy(ndarray_to_bytes(scalar), scalar).shape == ()


def test_arrays_from_npy_refuses_oversized_input_before_parsing_and_non_bytes() -> None:
    model = [np.zeros(4, np.float32)]

    with pytest.raises(WireError, match="more than the"):
        arrays_from_npy([b"\x93NUMPY\x01\x00" + b" " * 20_000], model)
    with pytest.raises(WireError, match="expected bytes, got str"):
        arrays_from_npy(["not bytes"], model)
    with pytest.raises(WireError, match="expected a list"):
        arrays_from_npy(b"one blob", model)
    version_3 = _header("<f4", (4,)).replace(b"\x01\x00", b"\x03\x00", 1)
    with pytest.raises(WireError, match=r"format 3\.0 is not accepted"):
        arrays_from_npy([version_3 + b"\0" * 16], model)
