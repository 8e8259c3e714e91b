"""Open-loop load generator for `idla bench serve`, run in its own process.

``IDLA_TOKEN=T python -m idla.bench.loadgen --port P --rate R --duration S --rows N --features F``
sends POST /v1/predict requests (binary float32 bodies) at Poisson arrival times, whether or not
earlier ones were answered (open loop), over a pool of keep-alive HTTP/1.1 connections, and
prints one JSON object: one record per request. Latency counts from the request's scheduled
time, so a late send (this process starved of CPU) is charged to the latency rather than hidden
(no coordinated omission; Tene, "How NOT to measure latency", 2015).

The client is a minimal HTTP/1.1 writer/reader on asyncio streams: at a few hundred requests/s
a general client (httpx) would cost as much CPU as the router it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

CLIENT_TIMEOUT_S = 30.0


def poisson_arrivals_s(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process of rate ``rate_per_s``."""
    rng = random.Random(seed)
    times: list[float] = []
    t = rng.expovariate(rate_per_s)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


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

    async def _one(self, scheduled_s: float, start_s: float) -> None:
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
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                IndexError) as error:
            record["error"] = repr(error)
            if connection is not None:
                connection.close()
        record["latency_s"] = time.perf_counter() - start_s - scheduled_s
        self.records.append(record)

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idla.bench.loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default=os.environ.get("IDLA_TOKEN"),
                        help="bearer token (default: $IDLA_TOKEN, which ps does not show)")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give the bearer token in IDLA_TOKEN (or --token)")
    inputs = np.random.default_rng(args.seed).random((args.rows, args.features), np.float32)
    generator = LoadGenerator(args.host, args.port, args.token, inputs.astype("<f4").tobytes(),
                              inputs.shape)
    arrivals_s = poisson_arrivals_s(args.rate, args.duration, args.seed)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        records = loop.run_until_complete(generator.run(arrivals_s))
    finally:
        loop.close()
    json.dump({"records": records, "duration_s": args.duration, "rate": args.rate},
              sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
