"""The router's end of one worker connection: requests matched to replies by id, so a batch, a
health check and a model rollout can be outstanding on the same worker at once.

A connection opens with the mutual HMAC handshake of `idla.serve.auth`. A call that gets no
reply in time raises asyncio.TimeoutError and leaves the connection up: whether a slow answer
means a dead worker (a ping, a batch) or only a slow request (a model load) is the caller's call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable
from typing import Any

from idla.errors import IdlaError
from idla.serve import auth, wire

CONNECT_TIMEOUT_S = 10.0


class WorkerLost(ConnectionError):
    """The connection to a worker broke: it died, hung up, or broke the protocol."""


class WorkerError(IdlaError):
    """The worker refused one request and said why (e.g. a model it cannot load); ``code`` is
    its kind: ``load_failed``, ``busy``, ``bad_frame``, ``failed`` or ``auth``."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


class WorkerLink:
    """One TCP connection to a serving worker, read by a background task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 hello: dict[str, Any], on_lost: Callable[[], None] | None = None) -> None:
        self.hello = hello
        self._reader, self._writer = reader, writer
        self._pending: dict[int, asyncio.Future[wire.Frame]] = {}
        self._ids = itertools.count()
        self._on_lost = on_lost
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, secret: bytes,
                      on_lost: Callable[[], None] | None = None,
                      timeout_s: float = CONNECT_TIMEOUT_S) -> WorkerLink:
        """Connect, authenticate both ways and read the worker's hello; an unreachable worker,
        or one that fails the handshake, raises WorkerLost."""
        where = f"worker {host}:{port}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                    timeout_s)
        except (OSError, asyncio.TimeoutError) as error:
            raise WorkerLost(f"cannot reach {where} ({error!r})") from None
        try:
            hello = await asyncio.wait_for(_handshake(reader, writer, secret, where), timeout_s)
        except WorkerLost:  # before OSError, which it is
            writer.close()
            raise
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                wire.WireError) as error:
            writer.close()
            raise WorkerLost(f"cannot reach {where} ({error!r})") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, hello, on_lost)

    def set_on_lost(self, on_lost: Callable[[], None]) -> None:
        self._on_lost = on_lost

    async def _read_loop(self) -> None:
        try:
            while True:
                header, payload = await wire.read_frame(self._reader)
                request_id = wire.request_id(header)
                future = None if request_id is None else self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result((header, payload))
        except (OSError, asyncio.IncompleteReadError, wire.WireError):
            pass
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        if self.closed:
            return
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerLost("worker connection lost"))
        with contextlib.suppress(RuntimeError):
            self._writer.close()
        if self._on_lost is not None:
            self._on_lost()

    async def call(self, header: dict[str, Any], payload: bytes = b"",
                   timeout_s: float | None = None) -> wire.Frame:
        """Send one request and wait for its reply; an ``error`` reply raises WorkerError, a
        broken connection WorkerLost, no reply within ``timeout_s`` asyncio.TimeoutError."""
        if self.closed:
            raise WorkerLost("worker connection lost")
        request_id = next(self._ids)
        future: asyncio.Future[wire.Frame] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(wire.encode({**header, "id": request_id}, payload))
            await self._writer.drain()
            reply = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise  # a slow reply, not a broken connection (TimeoutError is an OSError)
        except (OSError, RuntimeError) as error:
            self._fail_all()
            raise WorkerLost(f"worker connection lost ({error!r})") from None
        finally:
            self._pending.pop(request_id, None)
        if reply[0]["op"] == "error":
            raise WorkerError(str(reply[0].get("message", "worker error")),
                              str(reply[0].get("code", "failed")))
        return reply

    def close(self) -> None:
        """Drop the connection; outstanding calls raise WorkerLost."""
        self._task.cancel()
        self._fail_all()


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                     where: str) -> dict[str, Any]:
    """Answer the worker's challenge, send ours, and return its hello once its proof holds."""
    challenge, _ = await wire.read_frame(reader)
    if challenge.get("op") != "challenge" or not auth.valid_nonce(challenge.get("nonce")):
        raise WorkerLost(f"{where} sent {challenge.get('op')!r}, not an idla worker challenge")
    nonce = auth.new_nonce()
    writer.write(wire.encode({"op": "auth", "mac": auth.proof(secret, "router",
                                                              challenge["nonce"]),
                              "nonce": nonce}))
    await writer.drain()
    hello, _ = await wire.read_frame(reader)
    if hello.get("op") == "error":
        raise WorkerLost(f"{where} refused the connection: {hello.get('message')}")
    if hello.get("op") != "hello" or not auth.verify(secret, "worker", nonce, hello.get("mac")):
        raise WorkerLost(f"{where} did not prove it holds this run's secret")
    return hello
