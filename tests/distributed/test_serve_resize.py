"""A serving job gains and loses workers at runtime (POST /admin/workers) under load, with no
failed request: real worker processes, a real uvicorn server, real HTTP clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import torch

from idla.serve.model_io import MLP, save_model
from idla.serve.router import RouterConfig
from idla.serve.server import ServeOptions, ServingThread
from idla.serve.worker import WorkerPool

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FEATURES = 64
STEP_ANSWERS = 60  # answers between the admin calls


async def _resize_under_load(url: str, add: str, clients: int = 8
                             ) -> tuple[list[httpx.Response], list[tuple[str, httpx.Response]]]:
    """Closed-loop load; after STEP_ANSWERS answers add a worker, after as many more retire
    worker 0, and stop STEP_ANSWERS answers later. Returns the answers (in order of arrival)
    and the admin calls with the number of answers seen when each returned."""
    answers: list[httpx.Response] = []
    admin: list[tuple[str, httpx.Response]] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
        async def loader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                x = rng.random((2, FEATURES), dtype=np.float32)
                answers.append(await client.post("/v1/predict", json={"inputs": x.tolist()}))

        async def after(count: int) -> None:
            while len(answers) < count:
                await asyncio.sleep(0.005)

        loaders = [asyncio.create_task(loader(seed)) for seed in range(clients)]
        await after(STEP_ANSWERS)
        admin.append((str(len(answers)), await client.post("/admin/workers", json={"add": add})))
        await after(len(answers) + STEP_ANSWERS)
        admin.append((str(len(answers)), await client.post("/admin/workers",
                                                          json={"retire": 0})))
        await after(len(answers) + STEP_ANSWERS)
        stop.set()
        await asyncio.gather(*loaders)
    return answers, admin


def test_add_and_retire_under_load_fail_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = {"in_features": FEATURES, "hidden": 256, "layers": 2, "classes": 10}
    save_model(tmp_path, MLP(**kwargs), "mlp", kwargs, (FEATURES,), "v1")
    with WorkerPool(tmp_path, 3) as pool:
        options = ServeOptions(token=TOKEN, port=0, router=RouterConfig(max_wait_s=0.002))
        with ServingThread(pool, options, [0, 1]) as server:
            host, port = pool.addresses[2]
            answers, admin = asyncio.run(_resize_under_load(server.url, f"{host}:{port}"))
            stats = server.call(server.router.stats)
            refused = httpx.post(f"{server.url}/admin/workers", headers=AUTH,
                                 json={"retire": 0}, timeout=30)
            bad = httpx.post(f"{server.url}/admin/workers", headers=AUTH,
                             json={"add": "nowhere"}, timeout=30)
            anonymous = httpx.post(f"{server.url}/admin/workers", json={"retire": 1}, timeout=30)
            healthy = httpx.post(f"{server.url}/v1/predict", headers=AUTH,
                                 json={"inputs": [[0.1] * FEATURES]}, timeout=30)
    (_, added), (retired_at, retired) = admin
    assert added.status_code == 200, added.text
    assert added.json()["worker"] == 2 and added.json()["up"]
    assert retired.status_code == 200, retired.text
    assert [a.status_code for a in answers] == [200] * len(answers)  # 0 failed
    workers = [a.headers["x-worker"] for a in answers]
    assert "2" in workers  # the added worker served
    later = workers[int(retired_at) + 2 * 8:]  # past the requests in flight at retirement
    assert later and "0" not in later
    assert [(w["worker"], w["up"], w["retired"]) for w in stats] == [
        (0, False, True), (1, True, False), (2, True, False)]
    assert sum(w["served_requests"] for w in stats) == len(answers)  # each answered once
    assert refused.status_code == 404  # already retired
    assert bad.status_code == 422 and anonymous.status_code == 401
    assert healthy.status_code == 200
