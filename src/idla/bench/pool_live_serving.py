"""The serving side of `idla bench pool`'s live part: the served model, its job spec, and the
open-loop load against it.

The serving job is `idla serve` under the pool (one process on its device); the bench finds its
port in the job's log and its token in the job's run dir, waits for ``/healthz``, then runs the
load generator (`idla.bench.loadgen`, its own process, open loop: latency counts from each
request's scheduled time) in back-to-back segments of ``segment_s`` seconds of Poisson
arrivals until it is told to stop. Cost: one short-lived process per segment; at the bench's
load (10 requests/s) a few percent of a core.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idla.bench.arrivals import poisson_arrivals_s
from idla.errors import IdlaError

if TYPE_CHECKING:
    from idla.bench.pool_live_config import PoolLiveConfig

LOADGEN = Path(__file__).with_name("loadgen.py")
SERVE_READY_TIMEOUT_S = 120.0  # the serving job's `idla serve` until /healthz answers
_URL = re.compile(r"idla serve: (http://127\.0\.0\.1:\d+)")


def serve_spec(model_dir: Path, config: PoolLiveConfig) -> dict[str, Any]:
    """The serving job (JSON form of a spec): one device, its p99 target and offered load."""
    return {"name": "serving", "kind": "serve", "priority": 1, "min_workers": 1,
            "max_workers": 1,
            "serve": {"model": str(model_dir), "p99_ms": config.serve_p99_ms,
                      "offered_requests_per_s": config.serve_requests_per_s}}


def save_serve_model(directory: Path, config: PoolLiveConfig) -> None:
    """A small MLP model dir (one row per request costs well under a millisecond)."""
    import torch

    from idla.serve.model_io import MLP, save_model

    kwargs = {"in_features": config.serve_features, "hidden": config.serve_hidden,
              "layers": 2, "classes": 10}
    torch.manual_seed(config.seed)
    save_model(directory, MLP(**kwargs), "mlp", kwargs, (config.serve_features,), "bench-v1")


def serve_endpoint(run_dir: Path, deadline_s: float) -> tuple[int, str]:
    """The serving job's port (from its log) and token, once /healthz answers."""
    while time.monotonic() < deadline_s:
        log = run_dir / "worker-0.log"
        found = _URL.search(log.read_text(errors="replace")) if log.exists() else None
        if found is not None and (run_dir / "token").exists():
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    found.group(1) + "/healthz", timeout=5):
                token = (run_dir / "token").read_text().strip()
                return int(found.group(1).rsplit(":", 1)[1]), token
        time.sleep(0.3)
    raise IdlaError(f"the serving job did not answer within {SERVE_READY_TIMEOUT_S:g} s "
                    f"(see {run_dir / 'worker-0.log'})")


class LoadSegments(threading.Thread):
    """Open-loop Poisson segments against the serving job, back to back until stopped, from
    the moment it answers."""

    def __init__(self, run_dir: Path, config: PoolLiveConfig) -> None:
        super().__init__(name="idla-bench-load", daemon=True)
        self.run_dir, self.config = run_dir, config
        self.segments: list[list[dict[str, Any]]] = []
        self.errors: list[str] = []
        self.ready_s: float | None = None
        """Seconds from the thread's start until the serving job answered."""
        self.port, self.token = 0, ""
        self.stop = threading.Event()

    def run(self) -> None:
        started_s = time.monotonic()
        try:
            self.port, self.token = serve_endpoint(self.run_dir,
                                                   started_s + SERVE_READY_TIMEOUT_S)
        except IdlaError as error:
            self.errors.append(str(error))
            return
        self.ready_s = time.monotonic() - started_s
        index = 0
        while not self.stop.is_set():
            config = self.config
            times_s = poisson_arrivals_s(config.serve_requests_per_s, config.segment_s,
                                         config.seed + index)
            command = [sys.executable, "-I", str(LOADGEN), "--port", str(self.port),
                       "--duration", f"{config.segment_s:g}", "--rows", "1",
                       "--features", str(config.serve_features), "--seed", str(index)]
            with tempfile.TemporaryFile() as stdin:
                stdin.write(json.dumps(times_s).encode())
                stdin.seek(0)
                done = subprocess.run(command, stdin=stdin, capture_output=True,
                                      env=os.environ | {"IDLA_TOKEN": self.token},
                                      timeout=config.segment_s + 120)
            if done.returncode != 0:
                self.errors.append(done.stderr.decode(errors="replace").strip()[-300:])
                return
            self.segments.append(json.loads(done.stdout)["records"])
            index += 1
