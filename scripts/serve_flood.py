"""Latency of small requests while another client floods `idla serve` with big JSON bodies.

One client process posts a valid JSON predict body of about 16 MB again and again; another sends
``GET /healthz`` one after the other. Prints the healthz latency percentiles (ms) and how many big
bodies were answered. Real worker processes, a real uvicorn server, real client processes on
loopback::

    PYTHONPATH=src python scripts/serve_flood.py [--seconds 15] [--features 784]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TOKEN = "flood-token"
MAX_BODY_BYTES = 16 << 20


def big_body(features: int, max_rows: int = 1024) -> bytes:
    """The largest JSON body of whole rows (full-precision floats) within 16 MiB."""
    import numpy as np

    values = np.random.default_rng(0).random((max_rows, features)).tolist()
    rows = [json.dumps(row) for row in values]
    keep = min(max_rows, (MAX_BODY_BYTES - 64) // (len(rows[0]) + 1))
    return ('{"inputs": [' + ",".join(rows[:keep]) + "]}").encode()


def flood(url: str, features: int, seconds: float) -> dict[str, object]:
    body = big_body(features)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    codes: list[int] = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        end_s = time.perf_counter() + seconds
        while time.perf_counter() < end_s:
            codes.append(client.post("/v1/predict", content=body).status_code)
    return {"body_bytes": len(body), "answered": len(codes), "codes": sorted(set(codes))}


def probe(url: str, seconds: float) -> dict[str, object]:
    latencies_ms: list[float] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        end_s = time.perf_counter() + seconds
        while time.perf_counter() < end_s:
            start_s = time.perf_counter()
            client.get("/healthz").raise_for_status()
            latencies_ms.append(1e3 * (time.perf_counter() - start_s))
            time.sleep(0.005)
    ordered = sorted(latencies_ms)
    return {"requests": len(ordered), "max_ms": round(ordered[-1], 1)} | {
        f"p{q}_ms": round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 1)
        for q in (50, 90, 99)}


def serve_and_measure(seconds: float, features: int) -> None:
    import torch

    from idla.serve.model_io import MLP, save_model
    from idla.serve.router import RouterConfig
    from idla.serve.server import ServeOptions, ServingThread
    from idla.serve.worker import WorkerPool

    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        kwargs = {"in_features": features, "hidden": 64, "layers": 1, "classes": 10}
        save_model(Path(root), MLP(**kwargs), "mlp", kwargs, (features,), "v1")
        options = ServeOptions(token=TOKEN, port=0, router=RouterConfig(max_batch_rows=1024))
        with WorkerPool(root, 1, max_rows=1024) as pool, \
                ServingThread(pool, options) as server:
            me = [sys.executable, __file__, "--url", server.url, "--seconds", str(seconds),
                  "--features", str(features), "--client"]
            idle = json.loads(subprocess.run([*me, "probe"], capture_output=True, text=True,
                                             check=True, timeout=600).stdout)
            flooder = subprocess.Popen([*me, "flood"], stdout=subprocess.PIPE, text=True)
            time.sleep(2.0)  # the flooder builds its body and starts sending
            loaded = json.loads(subprocess.run([*me, "probe"], capture_output=True, text=True,
                                               check=True, timeout=600).stdout)
            out, _ = flooder.communicate(timeout=600)
    print(json.dumps({"healthz_idle": idle, "healthz_under_flood": loaded,
                      "flood": json.loads(out)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--url")
    parser.add_argument("--client", choices=["flood", "probe"])
    args = parser.parse_args()
    if args.client == "flood":
        print(json.dumps(flood(args.url, args.features, args.seconds + 4.0)))
    elif args.client == "probe":
        print(json.dumps(probe(args.url, args.seconds)))
    else:
        serve_and_measure(args.seconds, args.features)


if __name__ == "__main__":
    main()
