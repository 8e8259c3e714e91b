"""The router ↔ worker protocol: length-prefixed frames of a JSON header and raw float32 bytes.

A frame is ``>II`` (header length, payload length, both in bytes), the UTF-8 JSON header, then
the payload. Tensors travel as C-contiguous little-endian float32 with their shape in the
header; nothing is ever unpickled, so a peer can at worst send a frame that is refused.

Messages (``op`` in the header; every request carries an ``id`` that its reply repeats):

- worker → router on connect: ``hello`` (version, input_shape, output_features, curve, pid);
- ``batch`` (shape; payload inputs) → ``result`` (shape, version, service_s; payload outputs);
- ``ping`` → ``pong`` (version);
- ``prepare`` (path) → ``prepared`` (prepare: a token, version, sha256, input_shape,
  output_features): the worker loads the model beside the one it serves, one load at a time;
- ``commit`` (prepare: the token) → ``committed`` (version, switched_at_s): the worker
  switches between two batches;
- ``abort`` → ``aborted``: the worker drops this connection's loads, finished or not (a load
  still running is dropped when it ends; a connection that closes aborts too);
- any request → ``error`` (code, message) when it cannot be done; a frame that breaks the
  protocol is answered the same way, with ``id`` null when its own id is not valid.

A connection opens with an HMAC challenge-response (`idla.serve.auth`) before the ``hello``.
"""

from __future__ import annotations

import asyncio
import json
import math
import select
import socket
import struct
import time
from typing import Any

import numpy as np

from idla.errors import IdlaError

PREFIX = struct.Struct(">II")  # header bytes, payload bytes
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30
MAX_ID = (1 << 53) - 1  # ids are JSON numbers: stay exact in a double
FLOAT32 = np.dtype("<f4")


class WireError(IdlaError, ConnectionError):
    """A peer sent a frame that breaks the protocol, or the connection closed mid-frame."""


Frame = tuple[dict[str, Any], bytes]


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(head) > MAX_HEADER_BYTES or len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(f"frame too large: {len(head)} header, {len(payload)} payload bytes")
    return PREFIX.pack(len(head), len(payload)) + head + payload


def _lengths(prefix: bytes) -> tuple[int, int]:
    head_bytes, payload_bytes = PREFIX.unpack(prefix)
    if head_bytes > MAX_HEADER_BYTES or payload_bytes > MAX_PAYLOAD_BYTES:
        raise WireError(f"frame too large: {head_bytes} header, {payload_bytes} payload bytes")
    return head_bytes, payload_bytes


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_header(raw: bytes) -> dict[str, Any]:
    """The JSON object a frame header holds; NaN, Infinity or anything but an object with a
    string ``op`` is a WireError (the stream itself is still in step: the next frame follows)."""
    try:
        header = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise WireError(f"frame header is not valid JSON ({str(error)[:200]})") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise WireError("frame header must be a JSON object with a string 'op'")
    return header


def request_id(header: dict[str, Any]) -> int | None:
    """The header's ``id`` when it is a valid one (an integer in 0..2^53-1), else None."""
    value = header.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
        return value
    return None


def _recv_exactly(sock: socket.socket, size: int, deadline_s: float | None) -> bytes | None:
    """``size`` bytes, all by ``deadline_s`` (time.monotonic; None: no limit); a late peer
    raises TimeoutError. The socket stays blocking (other threads may send on it)."""
    chunks = bytearray()
    while len(chunks) < size:
        if deadline_s is not None:
            ready, _, _ = select.select([sock], [], [], max(deadline_s - time.monotonic(), 0))
            if not ready:
                raise TimeoutError(f"no data from the peer within the time allowed "
                                   f"({len(chunks)} of {size} bytes)")
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            if chunks:
                raise WireError("connection closed in the middle of a frame")
            return None
        chunks += chunk
    return bytes(chunks)


class OversizeFrame(WireError):
    """A frame longer than the limits; ``skippable`` when its bytes were read and dropped."""

    def __init__(self, message: str, skippable: bool) -> None:
        super().__init__(message)
        self.skippable = skippable


def recv_raw(sock: socket.socket, idle_timeout_s: float | None = None,
             frame_timeout_s: float | None = None, max_header_bytes: int = MAX_HEADER_BYTES,
             skip_limit_bytes: int = 0) -> tuple[bytes, bytes] | None:
    """(header bytes, payload) of one frame from a blocking socket; None when the peer closed
    between frames. The frame must start within ``idle_timeout_s`` and be complete within
    ``frame_timeout_s`` of its start (TimeoutError otherwise). A frame over the limits raises
    OversizeFrame; one of at most ``skip_limit_bytes`` is read and dropped first, so the
    stream stays in step (``skippable``)."""
    now_s = time.monotonic()
    prefix = _recv_exactly(sock, PREFIX.size, None if idle_timeout_s is None
                           else now_s + idle_timeout_s)
    if prefix is None:
        return None
    deadline_s = None if frame_timeout_s is None else time.monotonic() + frame_timeout_s
    head_bytes, payload_bytes = PREFIX.unpack(prefix)
    if head_bytes > max_header_bytes or payload_bytes > MAX_PAYLOAD_BYTES:
        total = head_bytes + payload_bytes
        message = (f"frame too large: {head_bytes} header, {payload_bytes} payload bytes (at "
                   f"most {max_header_bytes} and {MAX_PAYLOAD_BYTES})")
        skippable = total <= skip_limit_bytes
        while skippable and total > 0:
            chunk = _recv_exactly(sock, min(total, 1 << 20), deadline_s)
            if chunk is None:
                raise WireError("connection closed in the middle of a frame")
            total -= len(chunk)
        raise OversizeFrame(message, skippable)
    size = head_bytes + payload_bytes
    rest = _recv_exactly(sock, size, deadline_s) if size else b""
    if rest is None:
        raise WireError("connection closed in the middle of a frame")
    return rest[:head_bytes], rest[head_bytes:]


def recv_frame(sock: socket.socket, timeout_s: float | None = None) -> Frame | None:
    """Read one frame from a blocking socket (all of it within ``timeout_s``); None when the
    peer closed between frames."""
    raw = recv_raw(sock, timeout_s, timeout_s)
    if raw is None:
        return None
    return parse_header(raw[0]), raw[1]


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read one frame from an asyncio stream; EOF raises IncompleteReadError."""
    head_bytes, payload_bytes = _lengths(await reader.readexactly(PREFIX.size))
    header = parse_header(await reader.readexactly(head_bytes))
    payload = await reader.readexactly(payload_bytes) if payload_bytes else b""
    return header, payload


def to_payload(array: np.ndarray) -> tuple[list[int], bytes]:
    """(shape, bytes) of ``array`` as little-endian float32."""
    data = np.ascontiguousarray(array, dtype=FLOAT32)
    return list(data.shape), data.tobytes()


def from_payload(shape: Any, payload: bytes) -> np.ndarray:
    """The float32 array a (shape, bytes) pair describes; a size mismatch is a WireError."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise WireError(f"shape {shape!r} must be a list of non-negative integers")
    expected_bytes = math.prod(shape) * FLOAT32.itemsize
    if expected_bytes != len(payload):
        raise WireError(f"shape {shape} needs {expected_bytes} bytes, the payload has "
                        f"{len(payload)}")
    return np.frombuffer(payload, dtype=FLOAT32).reshape(shape)
