"""The abuse that `idla bench faults --serving` throws at a running service, on raw sockets:
strangers on a worker's port without the link secret, malformed frames from a peer that has it,
slow (half-open) HTTP clients, and malformed HTTP bodies.

Each probe returns what the service answered, as it answered it: nothing here decides whether
an answer is right (`idla.bench.serve_faults` reports, the tests judge).
"""

from __future__ import annotations

import json
import select
import socket
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idla.serve import auth, wire
from idla.serve.model_server import MAX_CONNECTIONS

Address = tuple[str, int]
SOCKET_TIMEOUT_S = 10.0

# Headers that break the worker protocol, each in a well-formed frame (the bench and
# tests/distributed/test_serve_recovery.py send these).
BAD_FRAMES = (
    b'{"op": "ping", "id": NaN}', b'{"op": "ping", "id": Infinity}', b'{"op": "ping", "id": 1e400}',
    b'{"op": "ping", "id": 12345678901234567890}', b'{"op": "ping", "id": -1}',
    b'{"op": "ping", "id": 1.5}', b'{"op": "ping", "id": true}', b'{"op": "ping", "id": [1]}',
    b'{"op": "ping"}', b'{"op": 5, "id": 1}', b"[1, 2, 3]", b'"ping"', b"\xff\xfe\x00garbage",
    b"[" * 100_000, b'{"op": "launch", "id": 2}', b'{"op": "batch", "id": 3, "shape": "x"}',
    b'{"op": "batch", "id": 4, "shape": [1, 64]}', b'{"op": "prepare", "id": 5, "path": 7}',
    b'{"op": "commit", "id": 6, "prepare": "x"}', b'{"op": "commit", "id": 7, "prepare": 99}',
)
OVERSIZE_HEADER_BYTES = 10 << 20  # over the 1 MB header limit, small enough to be skipped


def save_unbuildable_model(directory: Path) -> Path:
    """A model directory whose files are valid but whose kwargs make torch raise at build (a
    negative layer size): the rollout that must be refused with the old model kept."""
    from idla.demo import DigitsCNN
    from idla.serve.model_io import save_model

    save_model(directory, DigitsCNN(), "digits_cnn", {"hidden": 128, "classes": 10}, (1, 8, 8),
               "broken")
    meta = json.loads((directory / "model.json").read_text())
    meta["kwargs"]["hidden"] = -5
    (directory / "model.json").write_text(json.dumps(meta))
    return directory


def is_closed(sock: socket.socket, wait_s: float = 0.0) -> bool:
    """Whether the peer has closed ``sock``, or does within ``wait_s`` (reading whatever it
    sent)."""
    while True:
        ready, _, _ = select.select([sock], [], [], wait_s)
        if not ready:
            return False
        try:
            if not sock.recv(1 << 16):
                return True
        except OSError:
            return True


def handshake(address: Address, secret: bytes | None) -> socket.socket:
    """A raw connection to a worker, authenticated as the router when ``secret`` is given,
    else left where a stranger stands: challenged, silent."""
    sock = socket.create_connection(address, timeout=SOCKET_TIMEOUT_S)
    challenge = wire.recv_frame(sock, SOCKET_TIMEOUT_S)
    if challenge is None or challenge[0].get("op") != "challenge":
        raise ConnectionError(f"worker {address} sent no challenge")
    if secret is not None:
        nonce = auth.new_nonce()
        sock.sendall(wire.encode({"op": "auth", "nonce": nonce, "mac": auth.proof(
            secret, "router", challenge[0]["nonce"])}))
        hello = wire.recv_frame(sock, SOCKET_TIMEOUT_S)
        if hello is None or not auth.verify(secret, "worker", nonce, hello[0].get("mac")):
            raise ConnectionError(f"worker {address} did not prove the secret")
    return sock


def _refusal(sock: socket.socket) -> str:
    """The error code a worker answered with ("none": it closed without one)."""
    try:
        reply = wire.recv_frame(sock, SOCKET_TIMEOUT_S)
    except (OSError, wire.WireError):
        return "none"
    return "none" if reply is None else str(reply[0].get("code", reply[0].get("op")))


def open_strangers(addresses: Sequence[Address]) -> tuple[list[socket.socket], dict[str, Any]]:
    """Strangers without the secret: `MAX_CONNECTIONS` silent ones on the first worker (every
    connection it takes) and one on each other; then, on the first worker, one with a wrong
    MAC, one that skips the handshake and one that sends HTTP. Returns the silent ones (still
    held) and, for the others, the worker's answer and whether it closed the connection."""
    holders = [handshake(addresses[0], None) for _ in range(MAX_CONNECTIONS)]
    holders += [handshake(address, None) for address in addresses[1:]]
    wrong = handshake(addresses[0], None)
    wrong.sendall(wire.encode({"op": "auth", "nonce": auth.new_nonce(), "mac": "00" * 32}))
    rude = handshake(addresses[0], None)
    rude.sendall(wire.encode({"op": "prepare", "id": 1, "path": "/tmp"}))
    http = handshake(addresses[0], None)
    http.sendall(b"GET / HTTP/1.1\r\nHost: worker\r\n\r\n" + b"\x00" * 4096)
    answers = {"wrong_mac": _refusal(wrong), "no_handshake": _refusal(rude),
               "http_garbage": _refusal(http)}
    closed = {name: is_closed(sock, SOCKET_TIMEOUT_S) for name, sock in
              (("wrong_mac", wrong), ("no_handshake", rude), ("http_garbage", http))}
    for sock in (wrong, rude, http):
        sock.close()
    return holders, {"silent": len(holders), "answers": answers, "closed": closed}


def _raw_frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(header), len(payload)) + header + payload


def bad_frames(address: Address, secret: bytes) -> dict[str, Any]:
    """`BAD_FRAMES`, an oversize header, a ping, then 8 bytes that are no frame at all, on a
    connection authenticated with the secret (a peer that is broken, not a stranger)."""
    sock = handshake(address, secret)
    try:
        replies = []
        for header in (*BAD_FRAMES, b"x" * OVERSIZE_HEADER_BYTES):
            sock.sendall(_raw_frame(header))
            replies.append(wire.recv_frame(sock, SOCKET_TIMEOUT_S))
        sock.sendall(wire.encode({"op": "ping", "id": 8}))
        pong = wire.recv_frame(sock, SOCKET_TIMEOUT_S)
        sock.sendall(b"\xff" * 8)  # lengths of 4 GB
        garbage = wire.recv_frame(sock, SOCKET_TIMEOUT_S)
        closed = is_closed(sock, SOCKET_TIMEOUT_S)
    finally:
        sock.close()
    return {"frames": len(replies),
            "error_replies": sum(1 for r in replies if r is not None and r[0]["op"] == "error"),
            "pong_after": pong is not None and pong[0].get("op") == "pong",
            "garbage_answered": garbage is not None and garbage[0].get("op") == "error",
            "closed_after_garbage": closed}


SLOW_KINDS = ("silent", "partial_headers", "partial_body", "idle_after_answer")


def open_slow_clients(address: Address, count: int, token: str) -> list[tuple[str, socket.socket]]:
    """``count`` HTTP connections, the kinds of `SLOW_KINDS` in turn: one that sends nothing,
    one that stops in the middle of its headers, one that declares a 4 kB body and sends 10
    bytes of it, and (a control for the server's keep-alive timeout) one that completes a
    GET /healthz and then stays idle."""
    host = f"{address[0]}:{address[1]}"
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n")
    sends = {"silent": b"", "partial_headers": head.encode()[:-20],
             "partial_body": (head + "Content-Length: 4096\r\n\r\n").encode() + b'{"inputs":',
             "idle_after_answer": f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()}
    clients = []
    for i in range(count):
        kind = SLOW_KINDS[i % len(SLOW_KINDS)]
        sock = socket.create_connection(address, timeout=SOCKET_TIMEOUT_S)
        sock.sendall(sends[kind])
        if kind == "idle_after_answer":
            _read_answer(sock)
        clients.append((kind, sock))
    return clients


def slow_client_states(clients: Sequence[tuple[str, socket.socket]]) -> dict[str, Any]:
    """Per kind: how many connections the server still holds open, and what it answered on
    each (the status code, "closed" when it closed without a word, "none" while silent)."""
    states: dict[str, Any] = {}
    for kind, sock in clients:
        entry = states.setdefault(kind, {"clients": 0, "open": 0, "answers": Counter()})
        is_open, status = _state(sock)
        entry["clients"] += 1
        entry["open"] += is_open
        entry["answers"][status] += 1
    for entry in states.values():
        entry["answers"] = dict(entry["answers"])
    return states


def _state(sock: socket.socket) -> tuple[bool, str]:
    """(still open, what the server sent): everything readable now, without waiting."""
    data = b""
    while True:
        ready, _, _ = select.select([sock], [], [], 0)
        if not ready:
            break
        try:
            chunk = sock.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            return False, _status(data) or "closed"
        data += chunk
    return True, _status(data) or "none"


def _status(data: bytes) -> str | None:
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode("latin-1") if data.startswith(b"HTTP/") and len(parts) > 1 else None


def _read_answer(sock: socket.socket) -> int:
    """Read one HTTP/1.1 answer (headers and a Content-Length body); its status code."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection before answering")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                   if line.lower().startswith("content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1])


def _json_row(first: str, features: int) -> bytes:
    return ('{"inputs": [[' + ", ".join([first] + ["0.5"] * (features - 1)) + "]]}").encode()


def bad_bodies(address: Address, token: str, features: int) -> list[dict[str, Any]]:
    """POST /v1/predict with bodies that are not a valid request, each on its own connection;
    the status code of each answer (0: the connection broke without one)."""
    deep = 100_000
    bodies = [
        ("deep nesting (100,000 levels)", "application/json",
         b'{"inputs": ' + b"[" * deep + b"]" * deep + b"}"),
        ("10**400 as an integer", "application/json", _json_row("1" + "0" * 400, features)),
        ("1e400 (overflows to inf)", "application/json", _json_row("1e400", features)),
        ("NaN", "application/json", _json_row("NaN", features)),
        ("a 5,000-digit integer", "application/json", _json_row("9" * 5000, features)),
        ("not UTF-8", "application/json", b"\xff\xfe\x00{garbage"),
        ("truncated JSON", "application/json", b'{"inputs": [[0.5, 0.5'),
        ("a string of inputs", "application/json", b'{"inputs": "abc"}'),
        ("ragged rows", "application/json", b'{"inputs": [[1, [2]], [3]]}'),
        ("wrong width", "application/json", b'{"inputs": [[1, 2, 3]]}'),
        ("no rows", "application/json", b'{"inputs": []}'),
        ("2,000 rows", "application/json",
         b'{"inputs": [' + b",".join([_json_row("0.5", features)[12:-2]] * 2000) + b"]}"),
        ("binary, short of X-Shape", "application/octet-stream", b"\x00" * 12),
        ("text/plain", "text/plain", b"hello"),
        ("declares 1 TB", "application/json", None),
    ]
    seen = []
    for name, content_type, body in bodies:
        head = (f"POST /v1/predict HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n")
        if content_type == "application/octet-stream":
            head += f"X-Shape: 1,{features}\r\n"
        length = 10**12 if body is None else len(body)
        raw = f"{head}Content-Length: {length}\r\nConnection: close\r\n\r\n".encode()
        try:
            with socket.create_connection(address, timeout=SOCKET_TIMEOUT_S) as sock:
                sock.sendall(raw + (body or b""))
                status = _read_answer(sock)
        except OSError:
            status = 0
        seen.append({"body": name, "status": status})
    return seen
