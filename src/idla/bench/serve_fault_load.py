"""Steady open-loop load for `idla bench faults --serving`, in its own process, until told to stop.

``python -m idla.bench.serve_fault_load --port P --token T --rate R --clients C --features F``
prints ``{"started": true}`` once its client is ready, then sends ``POST /v1/predict`` (one row,
binary float32 body) at Poisson arrival times, whether or not earlier ones were answered, over at
most C keep-alive connections, until a line (or end of file) arrives on its stdin; then it waits
for the requests in flight and prints one JSON line: a record per request with ``t`` (scheduled
send, seconds from the start), ``latency_s`` (from the scheduled send), ``status`` (0: no HTTP
answer at all), ``version`` and ``worker`` (the answer's headers) and ``error``.

Unlike `idla.bench.loadgen` (a fixed number of seconds) it runs as long as a fault takes, so a
trial's load covers the fault, the recovery and the time after it. The parent side is
`SteadyLoad`; `count_answers` sums a trial's records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from idla.errors import IdlaError
from idla.serve.metrics import percentile

CLIENT_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
MAX_DURATION_S = 600.0  # a load whose parent never says stop ends by itself


class SteadyLoad:
    """``with SteadyLoad(...) as load: ...; records = load.stop()``: the load process runs
    from ``__enter__`` (once it says it started) until `stop`."""

    def __init__(self, port: int, token: str, rate_rps: float, clients: int, features: int,
                 seed: int) -> None:
        self.command = [sys.executable, "-m", "idla.bench.serve_fault_load", "--port", str(port),
                        "--token", token, "--rate", f"{rate_rps:g}", "--clients", str(clients),
                        "--features", str(features), "--seed", str(seed)]
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SteadyLoad:
        process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._process = process
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        if not ready or b"started" not in process.stdout.readline():
            self._kill()
            raise IdlaError("the load generator did not start")
        return self

    def stop(self) -> list[dict[str, Any]]:
        """Stop sending, wait for the answers in flight, and return every request's record."""
        process = self._process
        assert process is not None
        out, _ = process.communicate(b"stop\n", timeout=CLIENT_TIMEOUT_S + 30)
        self._process = None
        if process.returncode != 0:
            raise IdlaError(f"the load generator failed with code {process.returncode}")
        records: list[dict[str, Any]] = json.loads(out)["records"]
        return records

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._kill()


def count_answers(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A trial's requests: ``finished`` (2xx), ``refused`` (429, admission control),
    ``failed`` (any other status, or no answer), ``lost`` (no HTTP answer at all: the failed
    ones a client saw as a broken connection or a timeout), status counts, the model versions
    and workers that answered, and latency percentiles of the finished ones."""
    codes = Counter(int(r["status"]) for r in records)
    finished = [r for r in records if 200 <= r["status"] < 300]
    latencies_ms = [1e3 * r["latency_s"] for r in finished]
    return {
        "sent": len(records), "finished": len(finished), "refused": codes[429],
        "failed": len(records) - len(finished) - codes[429], "lost": codes[0],
        "codes": {str(code): n for code, n in sorted(codes.items())},
        "versions": sorted({str(r["version"]) for r in finished}),
        "workers_answering": sorted({str(r["worker"]) for r in finished}),
        "p50_ms": percentile(latencies_ms, 0.50) if finished else None,
        "p99_ms": percentile(latencies_ms, 0.99) if finished else None,
    }


async def _one(client: Any, raw: bytes, shape: str, scheduled_s: float, start_s: float,
               records: list[dict[str, Any]]) -> None:
    import httpx

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
    import httpx
    import numpy as np

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
    parser = argparse.ArgumentParser(prog="python -m idla.bench.serve_fault_load")
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
