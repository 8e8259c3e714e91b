"""Deadlines and a cap for HTTP connections: uvicorn's h11 protocol with a request-head timeout.

uvicorn closes a connection that stays silent ``timeout_keep_alive`` seconds after a response,
but any byte restarts that wait and nothing bounds the first request: a client that sends half a
request line and stalls (or sends one byte every few seconds, "slow loris") holds its
connection, and its memory, forever. `guarded_protocol` gives each request head — request line and
headers, at most h11's 16 KiB — a deadline that partial data does not extend, counted from the
connection's start or the previous response's end; past it the server answers 408 and closes.
A request whose head arrived is bounded by the app instead (``HttpLimits.body_timeout_s``); a
client still sending a body the app already answered (413, 408) gets the same deadline to finish.

The same class keeps at most ``max_connections`` open. A connection past the cap closes the
oldest one that is waiting for a request head (408, "evicted"), so a flood of silent connections
evicts itself while a client that sends its request at once is served; only when every
connection is inside a request is the newcomer refused (503, closed; a client that already sent
bytes may see a reset instead). uvicorn's own ``limit_concurrency`` answers 503 only once a
request has arrived, and evicts nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _closing_answer(status: str, reason: str, extra: str = "") -> bytes:
    body = json.dumps({"error": reason}).encode()
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"{extra}content-length: {len(body)}\r\n\r\n")
    return head.encode() + body


_TIMEOUT = _closing_answer("408 Request Timeout", "request head not received in time")
_FULL = _closing_answer("503 Service Unavailable", "too many open connections",
                        "retry-after: 1\r\n")


def guarded_protocol(head_timeout_s: float, max_connections: int,
                     on_close: Callable[[str], None]) -> type[asyncio.Protocol]:
    """An uvicorn protocol class (``uvicorn.Config(http=...)``) that closes a connection whose
    request head takes over ``head_timeout_s`` and keeps at most ``max_connections`` open;
    ``on_close(reason)`` hears of each connection it closes ("head_timeout", "unread_body",
    "evicted", "over_limit")."""
    if head_timeout_s <= 0 or max_connections < 1:
        raise ValueError(f"head_timeout_s {head_timeout_s} must be > 0 and max_connections "
                         f"{max_connections} at least 1")
    waiting: dict[Any, None] = {}  # connections with a deadline armed, oldest first

    class GuardedH11Protocol(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                oldest = next(iter(waiting), None)
                if oldest is None:  # every connection is inside a request
                    on_close("over_limit")
                    transport.write(_FULL)
                    transport.close()
                    return
                oldest._give_up("evicted")
            self._arm()

        def data_received(self, data: bytes) -> None:
            waiting_for_head = self.conn.their_state is h11.IDLE
            super().data_received(data)
            if waiting_for_head and self.conn.their_state is not h11.IDLE:  # h11 made a Request
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._idle() and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _idle(self) -> bool:
            """Waiting for a request head, or for the rest of a body the app already answered
            (413, 408) — not inside a request (a pipelined one may have started)."""
            their, ours = self.conn.their_state, self.conn.our_state
            return their is h11.IDLE or (their is h11.SEND_BODY and ours is h11.DONE)

        def _arm(self) -> None:
            self._disarm()
            self._head_deadline = self.loop.call_later(head_timeout_s, self._head_timed_out)
            waiting[self] = None

        def _disarm(self) -> None:
            waiting.pop(self, None)
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_timed_out(self) -> None:
            self._give_up("head_timeout" if self.conn.their_state is h11.IDLE else "unread_body")

        def _give_up(self, reason: str) -> None:
            self._disarm()
            if self.transport.is_closing() or not self._idle():
                return
            on_close(reason)
            if self.conn.their_state is h11.IDLE:
                self.transport.write(_TIMEOUT)
            self.transport.close()

    return GuardedH11Protocol
