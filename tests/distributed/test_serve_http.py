"""The serving stack end to end: real worker processes, a real uvicorn server, a real HTTP client.

Every server binds port 0 and reads its port back; workers come from `WorkerPool`.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from idla.errors import ConfigError
from idla.serve.model_io import MLP, load_model, save_model
from idla.serve.router import RouterConfig
from idla.serve.server import ServeOptions, ServingThread
from idla.serve.worker import WorkerPool

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FEATURES = 64


def _save(directory: Path, seed: int, version: str, hidden: int = 128) -> Path:
    torch.manual_seed(seed)
    kwargs = {"in_features": FEATURES, "hidden": hidden, "layers": 2, "classes": 10}
    save_model(directory, MLP(**kwargs), "mlp", kwargs, (FEATURES,), version)
    return directory


def _reference(directory: Path, inputs: np.ndarray) -> np.ndarray:
    model, _ = load_model(directory)
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"v1": _save(root / "v1", 1, "v1"), "v2": _save(root / "v2", 2, "v2")}


@pytest.fixture(scope="module")
def pool(models: dict[str, Path]) -> Iterator[WorkerPool]:
    with WorkerPool(models["v1"], 2) as workers:
        yield workers


@pytest.fixture
def serving(pool: WorkerPool) -> Iterator[ServingThread]:
    options = ServeOptions(token=TOKEN, port=0, router=RouterConfig(max_wait_s=0.002))
    with ServingThread(pool, options) as server:
        yield server


def test_predictions_equal_the_models_own_outputs(serving: ServingThread,
                                                  models: dict[str, Path]) -> None:
    inputs = np.random.default_rng(0).random((5, FEATURES), dtype=np.float32)
    expected = _reference(models["v1"], inputs)
    with httpx.Client(base_url=serving.url, headers=AUTH) as client:
        answer = client.post("/v1/predict", json={"inputs": inputs.tolist()})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == answer.headers["x-model-version"] == "v1"
        np.testing.assert_allclose(answer.json()["outputs"], expected, rtol=1e-5, atol=1e-5)
        binary = client.post("/v1/predict", content=inputs.tobytes(), headers={
            "Content-Type": "application/octet-stream", "X-Shape": f"5,{FEATURES}",
            "Accept": "application/octet-stream"})
        assert binary.status_code == 200, binary.text
        assert binary.headers["x-shape"] == "5,10"
        outputs = np.frombuffer(binary.content, dtype="<f4").reshape(5, 10)
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
        assert client.get("/healthz").json() == {"status": "ok", "workers_up": 2, "workers": 2}
        metrics = client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples[("idla_requests_total", (("code", "200"), ("endpoint", "predict")))] == 2
    assert samples[("idla_model_version_info", (("version", "v1"), ("worker", "1")))] == 1
    assert samples[("idla_request_latency_seconds_count", ())] == 2
    assert samples[("idla_router_overhead_seconds_bucket", (("le", "+Inf"),))] == 2
    assert ("idla_queue_requests", (("worker", "0"),)) in samples


def test_auth_refuses_a_missing_or_wrong_token(serving: ServingThread) -> None:
    body = {"inputs": [[0.0] * FEATURES]}
    with httpx.Client(base_url=serving.url) as client:
        assert client.post("/v1/predict", json=body).status_code == 401
        wrong = client.post("/v1/predict", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        assert client.post("/admin/model", json={"path": "/tmp"}).status_code == 401
        assert client.post("/v1/predict", json=body, headers=AUTH).status_code == 200


@pytest.mark.parametrize(("kwargs", "status", "reason"), [
    ({"content": b"{not json"}, 400, "not valid JSON"),
    ({"json": {"rows": []}}, 422, "inputs"),
    ({"json": {"inputs": [[1.0, 2.0]]}}, 422, "shape [1, 2]"),
    ({"json": {"inputs": [[1.0] * FEATURES, [1.0]]}}, 422, "rectangular"),
    ({"json": {"inputs": [[1.0] * FEATURES] * 1025}}, 413, "at most 1024"),
    ({"content": b"\0" * 17, "headers": {"Content-Type": "application/octet-stream",
                                         "X-Shape": f"1,{FEATURES}"}}, 400, "X-Shape"),
    ({"content": b"x" * (17 << 20)}, 413, "bytes"),
    ({"content": b"a,b", "headers": {"Content-Type": "text/csv"}}, 415, "content type"),
])
def test_bad_requests_get_a_4xx_with_a_reason(serving: ServingThread, kwargs: dict[str, object],
                                              status: int, reason: str) -> None:
    with httpx.Client(base_url=serving.url, headers=AUTH) as client:
        answer = client.post("/v1/predict", **kwargs)  # type: ignore[arg-type]
        assert answer.status_code == status
        assert reason in answer.json()["error"]
        still = client.post("/v1/predict", json={"inputs": [[0.5] * FEATURES]})
        assert still.status_code == 200


def test_batching_never_exceeds_max_wait_by_more_than_a_margin(pool: WorkerPool) -> None:
    max_wait_s, margin_s = 0.050, 0.025
    options = ServeOptions(token=TOKEN, port=0, router=RouterConfig(max_wait_s=max_wait_s))
    with ServingThread(pool, options, [0]) as server, \
            httpx.Client(base_url=server.url, headers=AUTH) as client:
        alone = [client.post("/v1/predict", json={"inputs": [[0.1] * FEATURES]}).json()
                 for _ in range(4)]
        for answer in alone:  # a lone request waits for company, but only max_wait
            assert answer["batch_rows"] == 1
            assert max_wait_s - 0.002 <= answer["queue_ms"] / 1e3 <= max_wait_s + margin_s

        def send(out: list[dict[str, float]]) -> None:
            out.append(client.post("/v1/predict", json={"inputs": [[0.2] * FEATURES]}).json())

        together: list[dict[str, float]] = []
        threads = [threading.Thread(target=send, args=(together,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(together) == 6
    assert max(a["batch_rows"] for a in together) > 1  # concurrent requests share a batch
    assert max(a["queue_ms"] for a in together) / 1e3 <= max_wait_s + margin_s


def test_a_pickle_model_is_refused(tmp_path: Path, serving: ServingThread) -> None:
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ConfigError, match="pickle"), WorkerPool(evil, 1):
        pass
    cli = subprocess.run([sys.executable, "-m", "idla.cli", "serve", "--model", str(evil),
                          "--port", "0"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "pickle" in cli.stderr and "Traceback" not in cli.stderr
    with httpx.Client(base_url=serving.url, headers=AUTH) as client:
        refused = client.post("/admin/model", json={"path": str(evil)})
        assert refused.status_code == 422 and "pickle" in refused.json()["error"]
        answer = client.post("/v1/predict", json={"inputs": [[0.0] * FEATURES]})
        assert answer.headers["x-model-version"] == "v1"


async def _load(url: str, inputs: list[np.ndarray], concurrency: int,
                on_answer: Callable[[], None]) -> list[httpx.Response]:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
        async def one(x: np.ndarray) -> httpx.Response:
            async with semaphore:
                answer = await client.post("/v1/predict", json={"inputs": x.tolist()})
            on_answer()
            return answer
        return list(await asyncio.gather(*(one(x) for x in inputs)))


def test_failover_answers_every_request_exactly_once(tmp_path: Path) -> None:
    model = _save(tmp_path / "big", 3, "big", hidden=512)
    inputs = [np.random.default_rng(i).random((4, FEATURES), dtype=np.float32)
              for i in range(300)]
    answered = 0
    with WorkerPool(model, 3) as workers:
        victim = workers.workers[1].pid
        options = ServeOptions(token=TOKEN, port=0, router=RouterConfig(max_wait_s=0.002))
        with ServingThread(workers, options) as server:
            def count() -> None:
                nonlocal answered
                answered += 1
                if answered == 60:
                    os.kill(victim, signal.SIGKILL)

            answers = asyncio.run(_load(server.url, inputs, 48, count))
            served = server.call(lambda: [w["served_requests"] for w in server.router.stats()])
            failovers = server.call(lambda: server.router.failovers)
    assert [a.status_code for a in answers] == [200] * len(inputs)
    assert sum(served) == len(inputs)  # each request was answered by exactly one worker
    assert failovers == 1
    expected = _reference(model, np.concatenate(inputs)).reshape(len(inputs), 4, 10)
    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(answer.json()["outputs"], want, rtol=1e-5, atol=1e-5)


async def _swap_under_load(url: str, path: Path, workers: int = 8
                           ) -> tuple[httpx.Response, list[tuple[np.ndarray, httpx.Response]]]:
    """Closed-loop load from ``workers`` clients; the rollout starts after 50 answers and the
    load stops 50 answers after it ended."""
    answers: list[tuple[np.ndarray, httpx.Response]] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
        async def loader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                x = rng.random((2, FEATURES), dtype=np.float32)
                answers.append((x, await client.post("/v1/predict", json={"inputs": x.tolist()})))

        loaders = [asyncio.create_task(loader(seed)) for seed in range(workers)]
        while len(answers) < 50:
            await asyncio.sleep(0.005)
        swap = await client.post("/admin/model", json={"path": str(path)})
        done = len(answers)
        while len(answers) < done + 50:
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.gather(*loaders)
    return swap, answers


def test_hot_swap_under_load_fails_nothing(serving: ServingThread,
                                           models: dict[str, Path]) -> None:
    swap, answers = asyncio.run(_swap_under_load(serving.url, models["v2"]))
    assert swap.status_code == 200, swap.text
    report = swap.json()
    assert report["version"] == "v2" and report["previous_versions"] == ["v1"]
    assert report["workers"] == 2 and 0 <= report["skew_s"] < 1.0
    assert [a.status_code for _, a in answers] == [200] * len(answers)
    versions = [a.json()["model_version"] for _, a in answers]
    assert versions[0] == "v1" and versions[-1] == "v2"
    assert set(versions) == {"v1", "v2"}
    for x, answer in answers:  # each answer is entirely the one version it names
        want = _reference(models[answer.json()["model_version"]], x)
        np.testing.assert_allclose(answer.json()["outputs"], want, rtol=1e-5, atol=1e-5)
    back = httpx.post(f"{serving.url}/admin/model", headers=AUTH,
                      json={"path": str(models["v1"])}, timeout=60)
    assert back.status_code == 200 and back.json()["version"] == "v1"


def test_idla_serve_command_serves_until_terminated(models: dict[str, Path]) -> None:
    command = [sys.executable, "-m", "idla.cli", "serve", "--model", str(models["v1"]),
               "--workers", "1", "--port", "0", "--token", TOKEN]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url, pids = "", []
        deadline = time.monotonic() + 60
        while not pids and time.monotonic() < deadline:
            line = process.stdout.readline()
            if line.startswith("idla serve: http://"):
                url = line.split()[2]
            if line.strip().startswith("worker 0: pid"):
                pids.append(int(line.split()[3].rstrip(",")))
        assert url and pids, "the server did not print its address and workers"
        answer = httpx.post(f"{url}/v1/predict", headers=AUTH,
                            json={"inputs": [[0.3] * FEATURES]})
        assert answer.status_code == 200 and answer.json()["model_version"] == "v1"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0  # stopped cleanly, workers with it
        with pytest.raises(ProcessLookupError):
            os.kill(pids[0], 0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
