"""Serving when things go wrong, end to end: real worker processes, a real uvicorn server, real
HTTP clients and raw sockets on loopback.

Rollouts that fail to build or outlast the load timeout, a worker killed with SIGKILL under
load, strangers on the worker port without the secret, and frames that break the protocol.
One pool of three workers serves every test (its hot loads sleep `LOAD_DELAY_S` first, through
the worker's test-only hook, so that a rollout can be made to time out).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from idla.bench.serve_fault_probes import BAD_FRAMES, save_unbuildable_model
from idla.serve import auth, wire
from idla.serve.model_io import MLP, save_model
from idla.serve.model_server import MAX_CONNECTIONS
from idla.serve.router import RolloutError, RouterConfig
from idla.serve.server import ServeOptions, ServingThread
from idla.serve.supervisor import SupervisorConfig
from idla.serve.worker import LOAD_DELAY_ENV, WorkerPool

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FEATURES = 64
LOAD_DELAY_S = 1.5
ROW = [[0.25] * FEATURES]


def _save(directory: Path, seed: int, version: str) -> Path:
    torch.manual_seed(seed)
    kwargs = {"in_features": FEATURES, "hidden": 128, "layers": 2, "classes": 10}
    save_model(directory, MLP(**kwargs), "mlp", kwargs, (FEATURES,), version)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    broken = save_unbuildable_model(root / "broken")
    return {"v1": _save(root / "v1", 1, "v1"), "v2": _save(root / "v2", 2, "v2"),
            "broken": broken}


@pytest.fixture(scope="module")
def pool(models: dict[str, Path]) -> Iterator[WorkerPool]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LOAD_DELAY_ENV, str(LOAD_DELAY_S))
        with WorkerPool(models["v1"], 3) as workers:
            yield workers


def _options(**router: Any) -> ServeOptions:
    return ServeOptions(token=TOKEN, port=0, router=RouterConfig(max_wait_s=0.002, **router))


def _versions(server: ServingThread) -> list[str]:
    """What each worker itself says it serves (a ping on each link)."""
    async def ask() -> list[str]:
        replies = [await w.link.call({"op": "ping"}, timeout_s=5) for w in server.router.workers]
        return [str(header["version"]) for header, _ in replies]
    return server.run(ask(), 10)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_model_that_fails_to_build_is_refused_and_the_old_one_serves(
        pool: WorkerPool, models: dict[str, Path]) -> None:
    with ServingThread(pool, _options()) as server, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        before = _versions(server)
        refused = client.post("/admin/model", json={"path": str(models["broken"])})
        answers = [client.post("/v1/predict", json={"inputs": ROW}) for _ in range(6)]
        after = _versions(server)
    assert refused.status_code == 422, refused.text
    reason = refused.json()["error"]
    assert "negative dimension" in reason and "aborted" in reason
    assert "site-packages" not in reason and ".py" not in reason
    assert after == before and len(set(after)) == 1
    assert {a.status_code for a in answers} == {200}
    assert {a.json()["model_version"] for a in answers} == set(before)


def test_a_rollout_past_the_load_timeout_is_refused_in_time_and_the_old_model_serves(
        pool: WorkerPool, models: dict[str, Path]) -> None:
    load_timeout_s = 0.5
    with ServingThread(pool, _options(load_timeout_s=load_timeout_s)) as server, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        before = _versions(server)
        target = "v2" if before[0] == "v1" else "v1"
        start_s = time.monotonic()
        slow = client.post("/admin/model", json={"path": str(models[target])})
        answered_s = time.monotonic() - start_s
        busy = client.post("/admin/model", json={"path": str(models[target])})
        during = [client.post("/v1/predict", json={"inputs": ROW}) for _ in range(6)]
        time.sleep(LOAD_DELAY_S)  # the aborted loads finish now, and must not be committed
        late = _versions(server)
        healthy = client.get("/healthz").json()
        done = _rollout_when_free(server, models[target])
        switched = _versions(server)
    print(f"rollout past the load timeout answered in {answered_s:.3f} s "
          f"(timeout {load_timeout_s} s)")
    assert slow.status_code == 504, slow.text
    assert "load timeout" in slow.json()["error"]
    assert load_timeout_s <= answered_s < load_timeout_s + 1.0
    assert busy.status_code == 409 and "still loading" in busy.json()["error"]
    assert {a.status_code for a in during} == {200}
    assert {a.json()["model_version"] for a in during} == set(before)
    assert late == before and healthy["workers_up"] == 3  # a slow load is not a dead worker
    assert done["version"] == target and switched == [target] * 3


def _rollout_when_free(server: ServingThread, path: Path) -> dict[str, Any]:
    """Roll ``path`` out with a generous load timeout, retrying while a worker is still busy
    with the load of an aborted rollout (409)."""
    deadline_s = time.monotonic() + 20
    while True:
        try:
            return server.run(server.router.rollout(str(path), load_timeout_s=30), 60)
        except RolloutError as error:
            if error.status != 409 or time.monotonic() > deadline_s:
                raise
        time.sleep(0.2)


async def _steady_load(url: str, victim: int, clients: int = 6) -> dict[str, Any]:
    """Closed-loop load; kill -9 ``victim`` after 40 answers, stop 40 answers after /healthz
    reports every worker up again."""
    codes: list[int] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
        async def loader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                x = rng.random((2, FEATURES), dtype=np.float32)
                answer = await client.post("/v1/predict", json={"inputs": x.tolist()})
                codes.append(answer.status_code)

        loaders = [asyncio.create_task(loader(seed)) for seed in range(clients)]
        while len(codes) < 40:
            await asyncio.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        killed_s = time.monotonic()
        while time.monotonic() - killed_s < 60:
            health = (await client.get("/healthz")).json()
            if health["workers_up"] < 3:
                break
            await asyncio.sleep(0.01)
        while time.monotonic() - killed_s < 60:
            if (await client.get("/healthz")).json()["workers_up"] == 3:
                break
            await asyncio.sleep(0.05)
        recovered_s = time.monotonic() - killed_s
        back = len(codes)
        while len(codes) < back + 40:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*loaders)
        metrics = (await client.get("/metrics")).text
    return {"codes": codes, "recovered_s": recovered_s, "metrics": metrics}


def test_a_worker_killed_under_load_fails_nothing_and_is_restarted(pool: WorkerPool) -> None:
    victim = pool.workers[1].pid
    with ServingThread(pool, _options()) as server:
        version = _versions(server)[0]
        trial = asyncio.run(_steady_load(server.url, victim))
        stats = server.call(server.router.stats)
        versions = _versions(server)
    failed = [code for code in trial["codes"] if code not in (200, 429)]
    print(f"kill -9 under load: {len(trial['codes'])} requests, {len(failed)} failed, "
          f"{trial['codes'].count(429)} answered 429, all {len(stats)} workers back in "
          f"{trial['recovered_s']:.2f} s")
    assert failed == []
    assert trial["codes"].count(200) >= 80
    assert trial["recovered_s"] <= 30
    assert pool.workers[1].pid != victim and stats[1]["pid"] == pool.workers[1].pid
    assert [w["up"] for w in stats] == [True] * 3 and versions == [version] * 3
    samples = _samples(trial["metrics"])
    assert samples[("idla_worker_restarts_total", (("worker", "1"),))] == 1
    assert samples[("idla_worker_restarts_total", (("worker", "0"),))] == 0
    assert samples[("idla_workers_up", ())] == 3


def test_a_hung_worker_is_killed_and_restarted(pool: WorkerPool) -> None:
    victim = pool.workers[2].process
    options = _options(health_interval_s=0.5, health_timeout_s=1.0)
    options.supervisor = SupervisorConfig(restart_after_s=2.0)
    with ServingThread(pool, options) as server, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        os.kill(victim.pid, signal.SIGSTOP)  # alive, but answers nothing
        slot = server.router.workers[2]
        start_s = time.monotonic()
        while time.monotonic() - start_s < 30 and server.call(
                lambda: slot.restarts == 0 or not slot.alive):
            time.sleep(0.1)
        recovered_s = time.monotonic() - start_s
        stats = server.call(server.router.stats)
        answers = [client.post("/v1/predict", json={"inputs": ROW}) for _ in range(6)]
    print(f"a hung (SIGSTOP) worker was replaced in {recovered_s:.2f} s")
    assert victim.poll() == -signal.SIGKILL
    assert stats[2]["up"] and stats[2]["restarts"] == 1 and stats[2]["pid"] != victim.pid
    assert {a.status_code for a in answers} == {200}


def _handshake(address: tuple[str, int], secret: bytes | None) -> socket.socket:
    """A raw connection to a worker, authenticated as the router when ``secret`` is given."""
    sock = socket.create_connection(address, timeout=10)
    challenge = wire.recv_frame(sock)
    assert challenge is not None and challenge[0]["op"] == "challenge"
    if secret is not None:
        nonce = auth.new_nonce()
        sock.sendall(wire.encode({"op": "auth", "nonce": nonce, "mac": auth.proof(
            secret, "router", challenge[0]["nonce"])}))
        hello = wire.recv_frame(sock)
        assert hello is not None and hello[0]["op"] == "hello"
        assert auth.verify(secret, "worker", nonce, hello[0]["mac"])
    return sock


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_stranger_without_the_secret_is_refused_and_the_router_still_works(
        pool: WorkerPool) -> None:
    # Strangers hold every connection worker 0 takes, and one on each other worker, silently.
    holders = [_handshake(pool.addresses[0], None) for _ in range(MAX_CONNECTIONS)]
    holders += [_handshake(address, None) for address in pool.addresses[1:]]
    wrong = _handshake(pool.addresses[0], None)
    wrong.sendall(wire.encode({"op": "auth", "nonce": auth.new_nonce(), "mac": "00" * 32}))
    refusal = wire.recv_frame(wrong)
    rude = _handshake(pool.addresses[0], None)
    rude.sendall(wire.encode({"op": "prepare", "id": 1, "path": "/tmp"}))
    rude_reply = wire.recv_frame(rude)
    with ServingThread(pool, _options()) as server, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        first = client.post("/v1/predict", json={"inputs": ROW})
        server.call(lambda: server.router.workers[0].link.close())  # the router must reconnect
        deadline_s = time.monotonic() + 15
        while time.monotonic() < deadline_s and client.get("/healthz").json()["workers_up"] < 3:
            time.sleep(0.05)
        stats = server.call(server.router.stats)
        again = [client.post("/v1/predict", json={"inputs": ROW}) for _ in range(6)]
    assert refusal is not None and refusal[0]["op"] == "error" and refusal[0]["code"] == "auth"
    assert _closed(wrong)
    assert rude_reply is not None and rude_reply[0]["code"] == "auth" and _closed(rude)
    assert first.status_code == 200 and {a.status_code for a in again} == {200}
    assert stats[0]["up"] and stats[0]["reconnects"] == 1 and stats[0]["restarts"] == 0
    assert _closed(holders[0])  # the oldest stranger made room for a newcomer
    for sock in [*holders, wrong, rude]:
        sock.close()


def _raw_frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(header), len(payload)) + header + payload




def test_malformed_frames_get_an_error_reply_and_the_worker_stays_up(pool: WorkerPool) -> None:
    sock = _handshake(pool.addresses[2], pool.secret)
    replies = []
    for header in BAD_FRAMES:
        sock.sendall(_raw_frame(header))
        replies.append(wire.recv_frame(sock))
    sock.sendall(_raw_frame(b"x" * (10 << 20)))  # a 10 MB header: over the 1 MB limit
    oversize = wire.recv_frame(sock)
    sock.sendall(wire.encode({"op": "ping", "id": 8}))
    pong = wire.recv_frame(sock)
    sock.sendall(b"\xff" * 8)  # no frame at all: lengths of 4 GB
    garbage = wire.recv_frame(sock)
    ended = _closed(sock)
    sock.close()
    with ServingThread(pool, _options()) as server, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        answers = [client.post("/v1/predict", json={"inputs": ROW}) for _ in range(6)]
        up = client.get("/healthz").json()["workers_up"]
    assert all(r is not None and r[0]["op"] == "error" for r in replies), replies
    assert [r[0]["id"] for r in replies if r is not None][:10] == [None] * 10
    assert oversize is not None and "too large" in oversize[0]["message"]
    assert pong is not None and pong[0] == {**pong[0], "op": "pong", "id": 8}
    assert garbage is not None and garbage[0]["op"] == "error" and ended
    assert all(w.process.poll() is None for w in pool.workers)
    assert {a.status_code for a in answers} == {200} and up == 3
