"""A serving job in the pool end to end: the agent starts `idla serve` with the spec's latency
target on one device and adds a standalone worker on the other through the router's
membership; under a steady stream of requests a drained device's worker is retired before it
stops, and a restored device's worker is added back, with 0 failed requests. The agent
records the router's p99, the fraction of time the target held and the failed requests."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _wait(what: Callable[[], bool], timeout_s: float, why: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


def test_a_serving_job_grows_and_shrinks_through_its_router_and_fails_no_request(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = {"in_features": FEATURES, "hidden": 32, "layers": 1, "classes": 4}
    save_model(tmp_path / "model", MLP(**kwargs), "mlp", kwargs, (FEATURES,), "v1")
    spec = parse_spec(f'name = "api"\nkind = "serve"\npriority = 2\nmax_workers = 2\n'
                      f'[serve]\nmodel = "{tmp_path / "model"}"\np99_ms = 500\n'
                      f'offered_requests_per_s = 1e9\n', "api.toml")  # more than 1 can carry
    store = Store(tmp_path / "pool.db")
    agent = PoolAgent(store, LocalBackend(LocalConfig(devices=2)),
                      PoolConfig(run_root=tmp_path / "runs", resize_hold_s=0.5))
    stop, done = threading.Event(), threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,))
    loop.start()
    codes: list[int] = []
    try:
        job = agent.submit(spec)
        _wait(lambda: store.metrics(job).get("workers_up") == 2, 60, "did not serve with 2")
        info = agent.run_info(job)
        assert info is not None and info["devices"] == ["cpu0", "cpu1"] and info["formed"]
        command = " ".join(agent._runs[job].workers["cpu0"].launch.argv)
        url = store.metrics(job)["url"]
        token = (tmp_path / "runs" / job / "token").read_text().strip()

        def load() -> None:
            while not done.is_set():
                codes.append(_predict(url, token))
                time.sleep(0.01)

        client = threading.Thread(target=load)
        client.start()
        _wait(lambda: len(codes) >= 20, 20, "no answers")
        retiring = agent._runs[job].workers["cpu1"]
        agent.drain("cpu1")  # its worker is retired from the router, then stopped
        _wait(lambda: retiring.poll() is not None, 20, "the drained worker did not stop")
        served_with_one = len(codes)
        agent.restore("cpu1")  # a new worker starts there and is added
        _wait(lambda: len(agent.allocation().get(job, ())) == 2
              and agent._runs[job].progress.formed, 40, "did not grow back")
        _wait(lambda: len(codes) >= served_with_one + 20, 20, "no answers after the growth")
        done.set()
        client.join(timeout=40)
        _wait(lambda: store.metrics(job).get("requests", 0) >= len(codes), 20,
              "the agent did not count every request")
        running = store.metrics(job)
        events = [e["kind"] for e in store.events(job)]
        agent.cancel(job)
        _wait(lambda: job not in agent._runs, 20, "the cancel did not stop the router")
    except BaseException:
        print("events:", store.events())
        for log in sorted((tmp_path / "runs").rglob("*.log")):
            print(f"----- {log.name} -----\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        done.set()
        stop.set()
        loop.join(timeout=30)

    assert "--latency-target-ms 500" in command and "--workers 1" in command
    assert codes and set(codes) == {200}  # 0 failed, 0 refused across the shrink and growth
    assert running["requests"] == len(codes) and running["failed"] == 0
    assert running["p99_ms"] is not None and running["p99_ms"] > 0
    assert 0.0 <= running["target_held_fraction"] <= 1.0 and running["p99_target_ms"] == 500
    assert events.count("serve_worker_joined") == 2 and "serve_worker_retired" in events
    assert store.job(job).state == "cancelled"  # type: ignore[union-attr]
    assert store.metrics(job)["requests"] >= len(codes)  # kept after the job ended
    store.close()
