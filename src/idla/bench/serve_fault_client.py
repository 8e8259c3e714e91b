"""The load client of `idla bench faults --serving` (`idla.bench.serve_fault_load.SteadyLoad`
starts it as ``python -I serve_fault_client.py``; it imports nothing of idla's).

``--port P --token T --rate R --clients C --features F [--seed S]``: prints
``{"started": true}`` once its client is ready, then sends ``POST /v1/predict`` (one row, binary
float32 body) at Poisson arrival times, whether or not earlier ones were answered, over at most
C keep-alive connections, until a line (or end of file) arrives on its stdin; then it waits for
the requests in flight and prints one JSON line: a record per request with ``t`` (scheduled
send, seconds from the start), ``latency_s`` (from the scheduled send), ``status`` (0: no HTTP
answer at all), ``version`` and ``worker`` (the answer's headers) and ``error``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

CLIENT_TIMEOUT_S = 30.0
MAX_DURATION_S = 600.0  # a load whose parent never says stop ends by itself


async def _one(client: httpx.AsyncClient, raw: bytes, shape: str, scheduled_s: float,
               start_s: float, records: list[dict[str, Any]]) -> None:
    record: dict[str, Any] = {"t": scheduled_s, "status": 0, "version": None, "worker": None}
    try:
        answer = await client.post("/v1/predict", content=raw, headers={
            "Content-Type": "application/octet-stream", "X-Shape": shape})
        record.update(status=answer.status_code, version=answer.headers.get("x-model-version"),
                      worker=answer.headers.get("x-worker"))
    except httpx.HTTPError as error:
        record["error"] = repr(error)
    record["latency_s"] = time.perf_counter() - start_s - scheduled_s
    records.append(record)


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wait_for_stop() -> None:
        sys.stdin.buffer.readline()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_stop, daemon=True).start()
    rng = random.Random(args.seed)
    inputs = np.random.default_rng(args.seed).random((1, args.features), np.float32)
    raw, shape = inputs.astype("<f4").tobytes(), f"1,{args.features}"
    records: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", limits=limits,
                                 timeout=CLIENT_TIMEOUT_S,
                                 headers={"Authorization": f"Bearer {args.token}"}) as client:
        print(json.dumps({"started": True}), flush=True)
        start_s = time.perf_counter()
        scheduled_s = rng.expovariate(args.rate)
        while scheduled_s < MAX_DURATION_S:
            delay_s = start_s + scheduled_s - time.perf_counter()
            if delay_s > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay_s)
            if stop.is_set():
                break
            tasks.append(asyncio.create_task(
                _one(client, raw, shape, scheduled_s, start_s, records)))
            scheduled_s += rng.expovariate(args.rate)
        await asyncio.gather(*tasks)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -I serve_fault_client.py")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--clients", type=int, default=4, help="keep-alive connections")
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = asyncio.run(_run(args))
    json.dump({"records": records}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
