"""Steady open-loop load for `idla bench faults --serving`, in its own process, until told to
stop: `SteadyLoad` runs `idla.bench.serve_fault_client` (which says what it sends and records)
and `count_answers` sums a trial's records.

Unlike `idla.bench.loadgen` (a fixed number of seconds) the load runs as long as a fault takes,
so a trial's load covers the fault, the recovery and the time after it. The client runs from its
file in isolated mode (``python -I``): it imports neither idla nor torch, so it starts in a
fraction of a second instead of the seconds ``import idla`` takes.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from idla.errors import IdlaError
from idla.serve.metrics import percentile

CLIENT = Path(__file__).with_name("serve_fault_client.py")
STOP_TIMEOUT_S = 60.0  # the client's own request timeout (30 s) and its exit
START_TIMEOUT_S = 60.0


class SteadyLoad:
    """``with SteadyLoad(...) as load: ...; records = load.stop()``: the load process runs
    from ``__enter__`` (once it says it started) until `stop`."""

    def __init__(self, port: int, token: str, rate_rps: float, clients: int, features: int,
                 seed: int) -> None:
        self.command = [sys.executable, "-I", str(CLIENT), "--port", str(port),
                        f"--token={token}", "--rate", f"{rate_rps:g}", "--clients", str(clients),
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
        out, _ = process.communicate(b"stop\n", timeout=STOP_TIMEOUT_S)
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
