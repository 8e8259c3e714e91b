"""A serving job in the pool end to end: the agent starts `idla serve` with the spec's latency
target, follows its router through /metrics (with the job's token) and records the p99, the
fraction of time the target held and the failed requests; a cancel stops it."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import torch

from idla.pool.agent import PoolAgent, PoolConfig
from idla.pool.local import LocalBackend, LocalConfig
from idla.pool.spec import parse_spec
from idla.pool.store import Store
from idla.serve.model_io import MLP, save_model

FEATURES = 8


def _predict(url: str, token: str) -> int:
    request = urllib.request.Request(
        f"{url}/v1/predict", data=json.dumps({"inputs": [[0.1] * FEATURES]}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return int(answer.status)


def test_a_serving_job_is_started_with_its_target_and_its_latency_is_recorded(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = {"in_features": FEATURES, "hidden": 32, "layers": 1, "classes": 4}
    save_model(tmp_path / "model", MLP(**kwargs), "mlp", kwargs, (FEATURES,), "v1")
    spec = parse_spec(f'name = "api"\nkind = "serve"\npriority = 2\n[serve]\n'
                      f'model = "{tmp_path / "model"}"\np99_ms = 500\n'
                      f'offered_requests_per_s = 20\n', "api.toml")
    store = Store(tmp_path / "pool.db")
    agent = PoolAgent(store, LocalBackend(LocalConfig(devices=1)),
                      PoolConfig(run_root=tmp_path / "runs"))
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,))
    loop.start()
    try:
        job = agent.submit(spec)
        deadline = time.monotonic() + 60
        while not store.metrics(job).get("url"):
            assert time.monotonic() < deadline, "the router never came up"
            time.sleep(0.2)
        command = " ".join(agent._runs[job].workers["cpu0"].launch.argv)
        token = (tmp_path / "runs" / job / "token").read_text().strip()
        codes = [_predict(store.metrics(job)["url"], token) for _ in range(40)]
        while store.metrics(job).get("requests", 0) < len(codes):
            assert time.monotonic() < deadline + 20, store.metrics(job)
            time.sleep(0.2)
        running = store.metrics(job)
        agent.cancel(job)
        while job in agent._runs:
            assert time.monotonic() < deadline + 40, "the cancel did not stop the router"
            time.sleep(0.2)
    except BaseException:
        for log in sorted((tmp_path / "runs").rglob("*.log")):
            print(f"----- {log.name} -----\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        stop.set()
        loop.join(timeout=30)

    assert "--latency-target-ms 500" in command
    assert codes == [200] * len(codes)
    assert running["requests"] == len(codes) and running["failed"] == 0
    assert running["p99_ms"] is not None and running["p99_ms"] > 0
    assert 0.0 <= running["target_held_fraction"] <= 1.0
    assert running["p99_target_ms"] == 500
    assert store.job(job).state == "cancelled"  # type: ignore[union-attr]
    assert store.metrics(job)["requests"] == len(codes)  # kept after the job ended
    store.close()
