"""Deadline admission end to end: real workers, a real uvicorn server, a real HTTP client.

A burst far beyond what the workers can answer within the latency target gets some answers and
some 429s with Retry-After; /metrics counts those as refusals and none as failures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from idla.serve.model_io import MLP, save_model
from idla.serve.router import RouterConfig
from idla.serve.server import ServeOptions, ServingThread
from idla.serve.worker import WorkerPool

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FEATURES = 64
TARGET_S = 0.2


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    kwargs = {"in_features": FEATURES, "hidden": 2048, "layers": 2, "classes": 10}  # costly rows
    save_model(directory, MLP(**kwargs), "mlp", kwargs, (FEATURES,), "v1")
    with WorkerPool(directory, 2, max_rows=64) as workers:
        yield workers


async def _burst(url: str, requests: int, rows: int) -> list[httpx.Response]:
    body = np.random.default_rng(0).random((rows, FEATURES), dtype=np.float32).tobytes()
    headers = {**AUTH, "Content-Type": "application/octet-stream",
               "X-Shape": f"{rows},{FEATURES}", "Accept": "application/octet-stream"}
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60,
                                 limits=limits) as client:
        return list(await asyncio.gather(*(client.post("/v1/predict", content=body)
                                           for _ in range(requests))))


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_overload_is_refused_with_retry_after_and_counted_apart(pool: WorkerPool) -> None:
    config = RouterConfig(latency_target_s=TARGET_S, max_wait_s=0.002, max_batch_rows=64)
    with ServingThread(pool, ServeOptions(token=TOKEN, port=0, router=config)) as server:
        stats = server.call(server.router.stats)
        rows_per_s = sum(w["capacity_requests_per_s"] for w in stats)  # 1-row requests
        requests = 100
        rows = min(1024, max(8, int(8 * rows_per_s * TARGET_S / requests)))  # ~8x the target
        answers = asyncio.run(_burst(server.url, requests, rows))
        codes = [a.status_code for a in answers]
        refused = [a for a in answers if a.status_code == 429]
        assert set(codes) <= {200, 429} and codes.count(200) > 0 and refused
        for answer in refused:
            assert int(answer.headers["retry-after"]) >= 1
            assert "latency target" in answer.json()["error"]
        later = httpx.post(f"{server.url}/v1/predict", headers=AUTH,
                           json={"inputs": [[0.5] * FEATURES]}, timeout=30)
        assert later.status_code == 200  # the backlog drained; new requests are admitted
        samples = _samples(httpx.get(f"{server.url}/metrics").text)
        router_refused = server.call(lambda: dict(server.router.refused))
    assert samples[("idla_refused_requests_total", (("reason", "deadline"),))] == len(refused)
    assert samples[("idla_refused_requests_total", (("reason", "queue_full"),))] == 0
    assert router_refused == {"deadline": len(refused), "queue_full": 0}
    assert samples[("idla_failed_requests_total", ())] == 0
    for worker in ("0", "1"):
        assert samples[("idla_worker_lateness_seconds", (("worker", worker),))] >= 0
        assert samples[("idla_worker_retired", (("worker", worker),))] == 0
    assert samples[("idla_requests_total", (("code", "429"), ("endpoint", "predict")))] == len(
        refused)


def test_without_a_target_the_same_burst_is_queued_not_refused(pool: WorkerPool) -> None:
    config = RouterConfig(max_wait_s=0.002, max_batch_rows=64, max_queue_requests=1000)
    with ServingThread(pool, ServeOptions(token=TOKEN, port=0, router=config)) as server:
        answers = asyncio.run(_burst(server.url, 60, 16))
    assert [a.status_code for a in answers] == [200] * 60
