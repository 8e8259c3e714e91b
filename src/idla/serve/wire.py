"""The router ↔ worker protocol: length-prefixed frames of a JSON header and raw float32 bytes.

A frame is ``>II`` (header length, payload length, both in bytes), the UTF-8 JSON header, then
the payload. Tensors travel as C-contiguous little-endian float32 with their shape in the
header; nothing is ever unpickled, so a peer can at worst send a frame that is refused.

Messages (``op`` in the header; every request carries an ``id`` that its reply repeats):

- worker → router on connect: ``hello`` (version, input_shape, output_features, curve, pid);
- ``batch`` (shape; payload inputs) → ``result`` (shape, version, service_s; payload outputs);
- ``ping`` → ``pong`` (version);
- ``prepare`` (path) → ``prepared`` (version, sha256, input_shape, output_features): the worker
  loads the model beside the one it serves;
- ``commit`` → ``committed`` (version, switched_at_s): the worker switches between two batches;
- any request → ``error`` (message) when it cannot be done.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import struct
from typing import Any

import numpy as np

from idla.errors import IdlaError

PREFIX = struct.Struct(">II")  # header bytes, payload bytes
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30
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


def _header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireError(f"frame header is not JSON ({error})") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise WireError("frame header must be a JSON object with an 'op'")
    return header


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            if chunks:
                raise WireError("connection closed in the middle of a frame")
            return None
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket) -> Frame | None:
    """Read one frame from a blocking socket; None when the peer closed between frames."""
    prefix = _recv_exactly(sock, PREFIX.size)
    if prefix is None:
        return None
    head_bytes, payload_bytes = _lengths(prefix)
    rest = _recv_exactly(sock, head_bytes + payload_bytes) if head_bytes + payload_bytes else b""
    if rest is None:
        raise WireError("connection closed in the middle of a frame")
    return _header(rest[:head_bytes]), rest[head_bytes:]


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read one frame from an asyncio stream; EOF raises IncompleteReadError."""
    head_bytes, payload_bytes = _lengths(await reader.readexactly(PREFIX.size))
    header = _header(await reader.readexactly(head_bytes))
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
