"""A serving worker's side of the protocol (`idla.serve.wire`): authenticated connections, each
on its own thread, sharing the model being served and the loads of hot swaps.

Several connections may be open at once (a router that reconnects while its old connection is
still held, or a stranger holding one), up to `MAX_CONNECTIONS`. When they are all open, a new
one takes the place of the oldest that has not authenticated yet (so strangers cannot lock the
router out), or is refused with an ``error`` frame when every one has. A connection must
authenticate (`idla.serve.auth`) within
`HANDSHAKE_TIMEOUT_S`, and every frame must arrive whole within `FRAME_TIMEOUT_S` of its start;
an authenticated connection silent for `IDLE_TIMEOUT_S` is closed (a router pings an idle worker
every second or so). A frame that breaks the protocol (bad JSON, NaN, a bad id, the wrong
types, too large) gets an ``error`` frame and the connection goes on where the stream is still
in step; nothing a peer sends ends the process.

A hot swap loads the new model on a thread while batches keep running (one load at a time),
then switches on ``commit`` between two batches: every batch runs on one version, which its
reply names. A load is dropped by ``abort``, or when its connection closes.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from idla.errors import IdlaError
from idla.serve import auth, wire
from idla.serve.devices import load_on, run_on

MAX_CONNECTIONS = 16
HANDSHAKE_TIMEOUT_S = 5.0
FRAME_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 300.0
HANDSHAKE_MAX_BYTES = 4096
SKIP_LIMIT_BYTES = 64 << 20  # an oversize frame up to this is read and dropped, not fatal
MAX_MESSAGE_CHARS = 300
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s'\",:;()\[\]]+")


@dataclass
class Loaded:
    model: Any
    info: Any  # idla.serve.model_io.ModelInfo
    output_features: int
    device: str
    """Where ``model`` lives; a hot swap loads the new model onto the same device."""


def load(path: str, device: str) -> Loaded:
    import torch

    model, info = load_on(path, device)
    with torch.no_grad():
        out = run_on(model, torch.zeros((1, *info.input_shape)), device)
    return Loaded(model, info, int(out.shape[1]), device)


def describe_failure(error: BaseException, doing: str, model_dir: str | None = None) -> str:
    """One line naming why a load (or a batch) failed, for the router: idla's own errors as
    they are (they name only the model directory the caller gave); anything else by its type
    and first line, with absolute paths outside ``model_dir`` (torch's sources, site-packages)
    hidden."""
    if isinstance(error, IdlaError):
        return str(error)[:MAX_MESSAGE_CHARS]
    first = str(error).splitlines()[0] if str(error) else ""
    root = os.path.join(os.path.abspath(model_dir), "") if model_dir else None

    def hide(match: re.Match[str]) -> str:
        path = match.group(0)
        return path if root is not None and path.startswith(root) else "<path>"

    text = f"{doing} failed ({type(error).__name__}: {first})"
    return _ABSOLUTE_PATH.sub(hide, text)[:MAX_MESSAGE_CHARS]


@dataclass(eq=False)
class _Load:
    owner: _Connection
    started_s: float
    done: bool = False
    cancelled: bool = False
    result: Loaded | None = None


class _Connection:
    """One peer's socket; replies from a load thread and the reader thread share its lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def evict(self) -> None:
        """End this connection from another thread: its reader sees the end of the stream."""
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        frame = wire.encode(header, payload)
        with self._send_lock:
            self.sock.sendall(frame)

    def error(self, request_id: int | None, code: str, message: str) -> None:
        self.send({"op": "error", "id": request_id, "code": code, "message": message})


class ModelServer:
    """The model a worker serves and the loads in progress, shared by its connections."""

    def __init__(self, loaded: Loaded, curve: list[list[float]], secret: bytes,
                 load_delay_s: float = 0.0,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.active = loaded
        self.curve = curve
        self._secret = secret
        self._load_delay_s = load_delay_s
        self._handshake_timeout_s = handshake_timeout_s
        self._lock = threading.Lock()  # guards _loads and _connections
        self._loads: dict[int, _Load] = {}
        self._tokens = itertools.count(1)
        self._open: set[_Connection] = set()
        self._unproven: list[_Connection] = []  # open, not authenticated yet; oldest first

    def serve_forever(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:  # e.g. out of file descriptors: wait for some to close
                time.sleep(0.1)
                continue
            connection, evicted = _Connection(sock), None
            with self._lock:
                if len(self._open) >= MAX_CONNECTIONS and self._unproven:
                    evicted = self._unproven.pop(0)
                    self._open.discard(evicted)
                admitted = len(self._open) < MAX_CONNECTIONS
                if admitted:
                    self._open.add(connection)
                    self._unproven.append(connection)
            if evicted is not None:
                evicted.evict()
            if not admitted:
                with suppress(OSError):
                    connection.error(None, "busy", f"{MAX_CONNECTIONS} connections are open")
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: _Connection) -> None:
        sock = connection.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            proven = self._authenticate(connection)
            with self._lock:
                proven = proven and connection in self._unproven  # not evicted meanwhile
                if proven:
                    self._unproven.remove(connection)
            if proven:
                self._handle(connection)
        except (OSError, wire.WireError):
            pass  # the peer went away, stalled, or broke the stream: drop this connection
        finally:
            with self._lock:
                self._open.discard(connection)
                if connection in self._unproven:
                    self._unproven.remove(connection)
                for token, load_ in list(self._loads.items()):
                    if load_.owner is connection:
                        self._drop(token, load_)
            sock.close()

    def _authenticate(self, connection: _Connection) -> bool:
        nonce = auth.new_nonce()
        connection.send({"op": "challenge", "nonce": nonce})
        try:
            raw = wire.recv_raw(connection.sock, self._handshake_timeout_s,
                                self._handshake_timeout_s, HANDSHAKE_MAX_BYTES)
            if raw is None:
                return False
            header: dict[str, Any] | None = wire.parse_header(raw[0])
        except wire.WireError:
            header = None
        if (header is None or header["op"] != "auth" or not auth.valid_nonce(header.get("nonce"))
                or not auth.verify(self._secret, "router", nonce, header.get("mac"))):
            connection.error(None, "auth", "authentication failed")
            return False
        connection.send({**self._hello(), "mac": auth.proof(self._secret, "worker",
                                                              header["nonce"])})
        return True

    def _hello(self) -> dict[str, Any]:
        info = self.active.info
        return {"op": "hello", "version": info.version, "sha256": info.sha256,
                "architecture": info.architecture, "input_shape": list(info.input_shape),
                "output_features": self.active.output_features, "curve": self.curve,
                "pid": os.getpid(), "device": self.active.device}

    def _handle(self, connection: _Connection) -> None:
        while True:
            try:
                raw = wire.recv_raw(connection.sock, IDLE_TIMEOUT_S, FRAME_TIMEOUT_S,
                                    skip_limit_bytes=SKIP_LIMIT_BYTES)
            except wire.OversizeFrame as error:
                connection.error(None, "bad_frame", str(error))
                if not error.skippable:
                    return
                continue
            if raw is None:
                return
            try:
                header = wire.parse_header(raw[0])
            except wire.WireError as error:
                connection.error(None, "bad_frame", str(error))
                continue
            request_id = wire.request_id(header)
            if request_id is None:
                connection.error(None, "bad_frame", "a request needs an 'id': an integer in "
                                 f"0..{wire.MAX_ID}")
                continue
            self._dispatch(connection, request_id, header, raw[1])

    def _dispatch(self, connection: _Connection, request_id: int, header: dict[str, Any],
                  payload: bytes) -> None:
        op = header["op"]
        if op == "batch":
            self._batch(connection, request_id, header, payload)
        elif op == "ping":
            connection.send({"op": "pong", "id": request_id,
                             "version": self.active.info.version})
        elif op == "prepare":
            self._prepare(connection, request_id, header.get("path"))
        elif op == "commit":
            token = header.get("prepare")
            if not isinstance(token, int) or isinstance(token, bool):
                connection.error(request_id, "bad_frame", "commit needs 'prepare': the token "
                                 "of a prepared reply")
            else:
                self._commit(connection, request_id, token)
        elif op == "abort":
            with self._lock:
                for token, load_ in list(self._loads.items()):
                    if load_.owner is connection:
                        self._drop(token, load_)
            connection.send({"op": "aborted", "id": request_id})
        else:
            connection.error(request_id, "bad_frame", f"unknown op {op[:40]!r}")

    def _batch(self, connection: _Connection, request_id: int, header: dict[str, Any],
               payload: bytes) -> None:
        import numpy as np
        import torch

        loaded = self.active  # one version for the whole batch
        try:
            inputs = wire.from_payload(header.get("shape"), payload)
            if tuple(inputs.shape[1:]) != tuple(loaded.info.input_shape) or not len(inputs):
                raise wire.WireError(f"batch of shape {list(inputs.shape)}, the model takes "
                                     f"(rows, {', '.join(map(str, loaded.info.input_shape))})")
        except wire.WireError as error:
            connection.error(request_id, "bad_frame", str(error))
            return
        start = time.perf_counter()
        try:
            with torch.no_grad():
                outputs = run_on(loaded.model, torch.from_numpy(np.array(inputs)),
                                 loaded.device).numpy()
        except Exception as error:  # e.g. out of memory on a GPU: this batch fails, not the worker
            connection.error(request_id, "failed", describe_failure(error, "the batch"))
            return
        service_s = time.perf_counter() - start
        shape, data = wire.to_payload(outputs)
        connection.send({"op": "result", "id": request_id, "shape": shape,
                         "version": loaded.info.version, "service_s": service_s}, data)

    def _prepare(self, connection: _Connection, request_id: int, path: Any) -> None:
        if not isinstance(path, str) or not path:
            connection.error(request_id, "bad_frame", "prepare needs 'path': a model directory")
            return
        with self._lock:
            running = [load_ for load_ in self._loads.values() if not load_.done]
            if not running:
                token = next(self._tokens)
                self._loads[token] = _Load(connection, time.monotonic())
        if running:
            busy_s = time.monotonic() - running[0].started_s
            connection.error(request_id, "busy", f"still loading an earlier model (for "
                             f"{busy_s:.1f} s); try again when it is done")
            return
        threading.Thread(target=self._load_in_background,
                         args=(connection, request_id, path, token), daemon=True).start()

    def _load_in_background(self, connection: _Connection, request_id: int, path: str,
                            token: int) -> None:
        reply: dict[str, Any]
        loaded: Loaded | None = None
        try:
            if self._load_delay_s:
                time.sleep(self._load_delay_s)
            loaded = load(path, self.active.device)
            reply = {"op": "prepared", "id": request_id, "prepare": token,
                     "version": loaded.info.version, "sha256": loaded.info.sha256,
                     "input_shape": list(loaded.info.input_shape),
                     "output_features": loaded.output_features}
        except Exception as error:  # any failure is answered: the router must not wait
            loaded = None
            reply = {"op": "error", "id": request_id, "code": "load_failed",
                     "message": describe_failure(error, "building or loading the model", path)}
        with self._lock:
            load_ = self._loads[token]
            load_.done, load_.result = True, loaded
            if load_.cancelled or loaded is None:
                del self._loads[token]
        with suppress(OSError):
            connection.send(reply)

    def _commit(self, connection: _Connection, request_id: int, token: int) -> None:
        with self._lock:
            load_ = self._loads.get(token)
            ready = (load_ is not None and load_.owner is connection and load_.done
                     and not load_.cancelled and load_.result is not None)
            if ready:
                del self._loads[token]
        if not ready or load_ is None or load_.result is None:
            connection.error(request_id, "bad_frame", f"no finished load {token} to commit")
            return
        self.active = load_.result
        connection.send({"op": "committed", "id": request_id,
                         "version": self.active.info.version, "switched_at_s": time.time()})

    def _drop(self, token: int, load_: _Load) -> None:
        """Forget a load (call with the lock held); one still running is dropped when done."""
        load_.cancelled = True
        if load_.done:
            del self._loads[token]
