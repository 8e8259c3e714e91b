"""The pure parts of the worker link's safety: frame parsing, ids, read deadlines, the HMAC
proofs, the secret hand-over, failure messages, backoff, and the config fields that bound them.
Sockets here are real (socketpair), never mocked."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import threading
import time

import pytest

from idla.errors import ConfigError
from idla.serve import auth, wire
from idla.serve.link import WorkerLink, WorkerLost
from idla.serve.model_server import describe_failure
from idla.serve.router import RouterConfig
from idla.serve.supervisor import SupervisorConfig, backoff_s


@pytest.mark.parametrize("raw", [
    b'{"op": "ping", "id": NaN}', b'{"op": "ping", "id": -Infinity}', b"[" * 50_000,
    b"\xff\xfe", b'["op"]', b'{"id": 1}', b'{"op": null}',
])
def test_a_bad_header_is_a_wire_error(raw: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_header(raw)


@pytest.mark.parametrize(("value", "valid"), [
    (0, True), (wire.MAX_ID, True), (wire.MAX_ID + 1, False), (-1, False), (1.0, False),
    (float("inf"), False), (True, False), ("1", False), (None, False), ([1], False),
])
def test_only_integer_ids_in_range_are_valid(value: object, valid: bool) -> None:
    assert wire.request_id({"op": "ping", "id": value}) == (value if valid else None)


def test_an_oversize_frame_is_skipped_when_small_enough_and_fatal_when_not() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">II", 100, 0) + b"x" * 100 + wire.encode({"op": "ping"}))
        with pytest.raises(wire.OversizeFrame) as skipped:
            wire.recv_raw(right, max_header_bytes=10, skip_limit_bytes=1000)
        assert skipped.value.skippable
        assert wire.recv_raw(right) == (b'{"op":"ping"}', b"")  # still in step
        left.sendall(struct.pack(">II", 1 << 31, 0))
        with pytest.raises(wire.OversizeFrame) as fatal:
            wire.recv_raw(right, skip_limit_bytes=1000)
        assert not fatal.value.skippable


def test_a_stalled_frame_times_out() -> None:
    left, right = socket.socketpair()
    with left, right:
        start_s = time.monotonic()
        with pytest.raises(TimeoutError):
            wire.recv_raw(right, idle_timeout_s=0.05)
        left.sendall(struct.pack(">II", 10, 0) + b"{")  # starts, then stalls
        with pytest.raises(TimeoutError):
            wire.recv_raw(right, idle_timeout_s=1.0, frame_timeout_s=0.05)
        assert time.monotonic() - start_s < 1.0
        assert right.gettimeout() is None  # blocking as before: other threads send on it


def test_proofs_bind_the_secret_the_role_and_the_nonce() -> None:
    secret, nonce = auth.new_secret(), auth.new_nonce()
    mac = auth.proof(secret, "router", nonce)
    assert auth.verify(secret, "router", nonce, mac)
    assert not auth.verify(secret, "worker", nonce, mac)
    assert not auth.verify(secret, "router", auth.new_nonce(), mac)
    assert not auth.verify(auth.new_secret(), "router", nonce, mac)
    assert not auth.verify(secret, "router", nonce, None)
    assert not auth.verify(secret, "router", nonce, "é" * 64)
    assert auth.valid_nonce(nonce) and not auth.valid_nonce("zz" * 32)


def test_the_secret_is_read_from_one_line_of_hex() -> None:
    secret = auth.new_secret()
    assert auth.read_secret(io.BytesIO(secret.hex().encode() + b"\n")) == secret
    for bad in (b"", b"abc\n", b"zz" * 32 + b"\n", secret.hex()[:-2].encode()):
        with pytest.raises(ConfigError, match="stdin"):
            auth.read_secret(io.BytesIO(bad))


def test_failures_name_their_cause_without_paths_outside_the_model() -> None:
    error = RuntimeError("[enforce fail at /opt/torch/c10/alloc_cpu.cpp:83] data. "
                         "DefaultCPUAllocator: not enough memory\nsecond line /etc/passwd")
    text = describe_failure(error, "building the model", "/models/m1")
    assert text.startswith("building the model failed (RuntimeError: [enforce fail at <path>")
    assert "/opt" not in text and "second line" not in text
    inside = describe_failure(OSError("cannot read /models/m1/model.json"), "loading", "/models/m1")
    assert "/models/m1/model.json" in inside
    assert describe_failure(ConfigError("x" * 1000), "loading") == "x" * 300


def test_backoff_doubles_from_half_a_second_to_ten() -> None:
    assert [backoff_s(i, 0.5, 10.0) for i in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff_s(10_000, 0.5, 10.0) == 10.0


def test_timeouts_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="load_timeout_s"):
        RouterConfig(load_timeout_s=0)
    with pytest.raises(ConfigError, match="backoff_max_s"):
        SupervisorConfig(backoff_max_s=-1)


def test_the_router_refuses_a_worker_that_cannot_prove_the_secret() -> None:
    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire.encode({"op": "challenge", "nonce": auth.new_nonce()}))
        await wire.read_frame(reader)  # the router's auth: its proof is useless to us
        writer.write(wire.encode({"op": "hello", "mac": "00" * 32, "version": "fake"}))
        await writer.drain()

    async def attempt() -> str:
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(WorkerLost) as refused:
                await WorkerLink.connect("127.0.0.1", port, auth.new_secret(), timeout_s=5)
        return str(refused.value)

    assert "did not prove" in asyncio.run(attempt())


def test_a_connection_that_does_not_authenticate_in_time_is_closed() -> None:
    from idla.serve.model_io import MLP, ModelInfo
    from idla.serve.model_server import Loaded, ModelServer

    info = ModelInfo("mlp", {}, (4,), "v1", "0" * 64)
    loaded = Loaded(MLP(in_features=4, hidden=4, layers=1, classes=2), info, 2, "cpu")
    server = ModelServer(loaded, [[1, 0.001]], auth.new_secret(), handshake_timeout_s=0.2)
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever, args=(listener,), daemon=True).start()
    with socket.create_connection(listener.getsockname(), timeout=5) as sock:
        challenge = wire.recv_frame(sock)
        start_s = time.monotonic()
        assert challenge is not None and challenge[0]["op"] == "challenge"
        assert sock.recv(1) == b""  # closed by the worker, not by us
        assert 0.1 < time.monotonic() - start_s < 2.0
