"""Load generator for `idla bench serve`, run in its own process from its file in isolated mode
(``python -I``: it imports neither idla nor torch, so it starts in a fraction of a second).

``IDLA_TOKEN=T python -I loadgen.py --port P --duration S --rows N --features F < times.json``
sends POST /v1/predict requests (binary float32 bodies) at the arrival times read from stdin (a
JSON list of seconds, drawn by the bench from `idla.bench.arrivals`), whether or not earlier
ones were answered (open loop), over a pool of keep-alive HTTP/1.1 connections, and prints one
JSON object: one record per request. Latency counts from the request's scheduled time, so a late
send (this process starved of CPU) is charged to the latency rather than hidden (no coordinated
omission; Tene, "How NOT to measure latency", 2015).

``--clients N`` instead runs N closed-loop clients, each sending its next request as soon as
its last is answered (after a 429, after `REFUSED_BACKOFF_S`), for ``--duration`` seconds: the
throughput a user measures through the router, with the router's CPU in the loop.

The client is a minimal HTTP/1.1 writer/reader on asyncio streams: at a few hundred requests/s
a general client (httpx) would cost as much CPU as the router it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

CLIENT_TIMEOUT_S = 30.0
REFUSED_BACKOFF_S = 0.005  # a closed-loop client refused (429) tries again this much later


class StaleConnection(ConnectionError):
    """The connection broke before any byte of an answer: the server closed an idle keep-alive
    connection (uvicorn does after 5 s), so the request never reached it and is sent again on
    a fresh connection, as HTTP clients do for pooled connections."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            self.writer.write(raw)
            status_line = await self.reader.readline()
        except ConnectionError as error:
            raise StaleConnection(repr(error)) from None
        if not status_line:
            raise StaleConnection("the server closed the connection before answering")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


class LoadGenerator:
    """Sends one request per arrival time; keeps one record per request."""

    def __init__(self, host: str, port: int, token: str, body: bytes, shape: Sequence[int]) -> None:
        self.host, self.port = host, port
        head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
                f"Accept: application/octet-stream\r\nX-Shape: {','.join(map(str, shape))}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        self._raw = head.encode() + body
        self._idle: list[_Connection] = []
        self.records: list[dict[str, Any]] = []

    async def _one(self, scheduled_s: float, start_s: float) -> int:
        connection = self._idle.pop() if self._idle else None
        record: dict[str, Any] = {"t": scheduled_s, "status": 0}
        try:
            if connection is not None:
                try:
                    status, headers, _ = await asyncio.wait_for(
                        connection.request(self._raw), CLIENT_TIMEOUT_S)
                except StaleConnection:
                    connection.close()
                    connection = None
                    record["reconnected"] = True
            if connection is None:
                connection = _Connection(*await asyncio.open_connection(self.host, self.port))
                status, headers, _ = await asyncio.wait_for(connection.request(self._raw),
                                                            CLIENT_TIMEOUT_S)
            self._idle.append(connection)
            record.update(status=status, version=headers.get("x-model-version"),
                          worker=headers.get("x-worker"),
                          queue_ms=float(headers.get("x-queue-ms", "nan")),
                          service_ms=float(headers.get("x-service-ms", "nan")))
            if "retry-after" in headers:
                record["retry_after"] = headers["retry-after"]
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                IndexError) as error:
            record["error"] = repr(error)
            if connection is not None:
                connection.close()
        record["latency_s"] = time.perf_counter() - start_s - scheduled_s
        self.records.append(record)
        return int(record["status"])

    async def run(self, arrivals_s: Sequence[float]) -> list[dict[str, Any]]:
        start_s = time.perf_counter()
        tasks = []
        for scheduled_s in arrivals_s:
            delay_s = start_s + scheduled_s - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(self._one(scheduled_s, start_s)))
        await asyncio.gather(*tasks)
        for connection in self._idle:
            connection.close()
        return self.records

    async def run_closed(self, clients: int, duration_s: float) -> list[dict[str, Any]]:
        """``clients`` closed-loop clients for ``duration_s`` seconds (each record's ``t``: its
        send time)."""
        start_s = time.perf_counter()

        async def client() -> None:
            while (sent_s := time.perf_counter() - start_s) < duration_s:
                if await self._one(sent_s, start_s) == 429:
                    await asyncio.sleep(REFUSED_BACKOFF_S)

        await asyncio.gather(*(client() for _ in range(clients)))
        for connection in self._idle:
            connection.close()
        return self.records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -I loadgen.py")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default=os.environ.get("IDLA_TOKEN"),
                        help="bearer token (default: $IDLA_TOKEN, which ps does not show)")
    parser.add_argument("--clients", type=int,
                        help="closed-loop clients (default: open loop at the times on stdin)")
    parser.add_argument("--duration", type=float, required=True,
                        help="seconds of arrivals (times on stdin at or past it are dropped)")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give the bearer token in IDLA_TOKEN (or --token)")
    if args.clients is not None and args.clients < 1:
        parser.error("--clients must be at least 1")
    inputs = np.random.default_rng(args.seed).random((args.rows, args.features), np.float32)
    generator = LoadGenerator(args.host, args.port, args.token, inputs.astype("<f4").tobytes(),
                              inputs.shape)
    if args.clients is None:
        times_s = sorted(float(t) for t in json.load(sys.stdin))
        job = generator.run([t for t in times_s if 0 <= t < args.duration])
    else:
        job = generator.run_closed(args.clients, args.duration)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        records = loop.run_until_complete(job)
    finally:
        loop.close()
    json.dump({"records": records, "duration_s": args.duration}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
