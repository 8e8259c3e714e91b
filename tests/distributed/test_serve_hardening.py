"""Hostile clients against a real server: malformed bodies, stalled connections, connection
floods, rollout paths outside the model root, and the token's ways into `idla serve`.

One worker process and one uvicorn server on 127.0.0.1:0 serve every probe; after each, a normal
predict must still be answered.
"""

from __future__ import annotations

import os
import pickle
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from idla.serve.http import HttpLimits
from idla.serve.model_io import MLP, save_model
from idla.serve.model_path import NO_MODEL
from idla.serve.server import ServeOptions, ServingThread
from idla.serve.worker import WorkerPool

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FEATURES = 64
HEAD_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 250
ROW = b"[" + b", ".join([b"0.5"] * FEATURES) + b"]"


def _save(directory: Path, seed: int, version: str) -> Path:
    torch.manual_seed(seed)
    kwargs = {"in_features": FEATURES, "hidden": 32, "layers": 1, "classes": 10}
    save_model(directory, MLP(**kwargs), "mlp", kwargs, (FEATURES,), version)
    return directory


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hardening")
    models = base / "models"
    _save(models / "v1", 1, "v1")
    _save(models / "v2", 2, "v2")
    _save(base / "outside", 3, "outside")
    os.symlink(base / "outside", models / "escape")
    (models / "evil").mkdir()
    (models / "evil" / "model.pt").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    return models


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[ServingThread]:
    options = ServeOptions(token=TOKEN, port=0, model_root=root, head_timeout_s=HEAD_TIMEOUT_S,
                           max_connections=MAX_CONNECTIONS,
                           limits=HttpLimits(body_timeout_s=HEAD_TIMEOUT_S))
    with WorkerPool(root / "v1", 1) as pool, ServingThread(pool, options) as serving:
        yield serving


def _still_serving(url: str) -> None:
    answer = httpx.post(f"{url}/v1/predict", headers=AUTH, timeout=30,
                        content=b'{"inputs": [' + ROW + b"]}")
    assert answer.status_code == 200, answer.text


def _counts(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.labels.get("endpoint", s.labels.get("reason", "")), s.labels.get("code", "")):
            s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in ("idla_requests_total", "idla_http_connections_closed_total")}


PROBES = [  # (endpoint, body, status, words of the reason)
    ("predict", b'{"inputs": ' + b"[" * 50 + b"]" * 50 + b"}", 400, "deeper than"),
    ("predict", b"[" * 200_000, 400, "brackets"),
    ("predict", b'{"inputs": [' + b"[]," * 400_000 + b"[]]}", 400, "brackets"),
    ("predict", b'{"inputs": [[%s]]}' % str(10**400).encode(), 400, "float32's range"),
    ("predict", b'{"inputs": [[' + b"9" * 5000 + b"]]}", 400, "float32's range"),
    ("predict", b'{"inputs": [[NaN]]}', 400, "NaN"),
    ("predict", b'{"inputs": [[Infinity]]}', 400, "Infinity"),
    ("predict", b'{"inputs": [[1, 2]', 400, "not valid JSON"),
    ("predict", b'{"inputs": [[true]]}', 422, "found true"),
    ("predict", b'{"inputs": [["x"]]}', 422, 'found "x"'),
    ("predict", b'{"inputs": [[1, 2], [3]]}', 422, "unequal length"),
    ("predict", b'{"inputs": [[1, 2]]}', 422, "shape [1, 2]"),
    ("admin_model", b'{"path": ' + b"9" * 5000 + b"}", 422, "path"),
    ("admin_model", b'{"path": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "deeper than"),
    ("admin_model", b'{"path": NaN}', 400, "NaN"),
]


def test_malformed_bodies_are_counted_4xx_answers(server: ServingThread) -> None:
    before = _counts(server.url)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        for endpoint, body, status, reason in PROBES:
            path = "/v1/predict" if endpoint == "predict" else "/admin/model"
            answer = client.post(path, content=body,
                                 headers={"Content-Type": "application/json"})
            assert answer.status_code == status, (body[:40], answer.text)
            assert reason in answer.json()["error"], (body[:40], answer.text)
            _still_serving(server.url)
    after = _counts(server.url)
    for endpoint in ("predict", "admin_model"):
        for status in (400, 422):
            want = sum(1 for e, _, s, _ in PROBES if (e, s) == (endpoint, status))
            got = after.get((endpoint, str(status)), 0) - before.get((endpoint, str(status)), 0)
            assert got == want, (endpoint, status)
    assert not any(code.startswith("5") for _, code in after)


def _open(count: int, port: int, first_bytes: bytes) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        if first_bytes:
            sock.sendall(first_bytes)
        sockets.append(sock)
    return sockets


def _closed_after_s(sockets: list[socket.socket], start_s: float, limit_s: float,
                    drip: list[socket.socket]) -> tuple[dict[socket.socket, float], bytes]:
    """When each socket read EOF (seconds after ``start_s``); ``drip`` sockets get a byte
    every 0.25 s meanwhile (slow loris). Also the bytes the first one read."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    closed: dict[socket.socket, float] = {}
    first = b""
    next_drip_s = time.monotonic() + 0.25
    while len(closed) < len(sockets) and time.monotonic() - start_s < limit_s:
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(4096)
            first = first or data
            if not data:
                closed[sock] = time.monotonic() - start_s
                selector.unregister(sock)
        if time.monotonic() >= next_drip_s:
            next_drip_s += 0.25
            for sock in drip:
                if sock not in closed:
                    sock.send(b"x")
    selector.close()
    return closed, first


def test_stalled_and_slow_loris_connections_are_closed_at_the_head_timeout(
        server: ServingThread) -> None:
    port = server.running.port
    start_s = time.monotonic()
    stalled = _open(200, port, b"GET /healthz HTTP/1.1\r\nHost: x")
    drip = _open(20, port, b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    try:
        served_s = time.monotonic()
        _still_serving(server.url)  # a normal client meanwhile
        assert time.monotonic() - served_s < HEAD_TIMEOUT_S
        closed, first = _closed_after_s(stalled + drip, start_s, 4 * HEAD_TIMEOUT_S, drip)
    finally:
        for sock in stalled + drip:
            sock.close()
    assert len(closed) == 220, f"{220 - len(closed)} connections still open"
    assert min(closed.values()) >= HEAD_TIMEOUT_S - 0.1
    assert max(closed.values()) <= HEAD_TIMEOUT_S + 2.0, max(closed.values())
    assert first.startswith(b"HTTP/1.1 408")
    _still_serving(server.url)
    assert _counts(server.url)[("head_timeout", "")] >= 220
    print(f"half-open connections closed {min(closed.values()):.2f}..{max(closed.values()):.2f}"
          f" s after opening (head timeout {HEAD_TIMEOUT_S} s)")


def test_a_stalled_body_is_a_408(server: ServingThread) -> None:
    sock = socket.create_connection(("127.0.0.1", server.running.port))
    try:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                     TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
        sock.settimeout(4 * HEAD_TIMEOUT_S)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        sock.close()
    _still_serving(server.url)


def test_connections_past_the_cap_evict_the_oldest_silent_ones(server: ServingThread) -> None:
    sockets = _open(MAX_CONNECTIONS + 20, server.running.port, b"")
    try:
        served_s = time.monotonic()
        _still_serving(server.url)  # a client that sends its request at once gets in
        assert time.monotonic() - served_s < HEAD_TIMEOUT_S
        selector = selectors.DefaultSelector()
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        evicted: dict[int, bytes] = {}
        deadline_s = time.monotonic() + HEAD_TIMEOUT_S / 4  # before any head timeout
        while time.monotonic() < deadline_s:
            for key, _ in selector.select(timeout=0.05):
                assert isinstance(key.fileobj, socket.socket)
                evicted[sockets.index(key.fileobj)] = key.fileobj.recv(4096)
                selector.unregister(key.fileobj)
        selector.close()
    finally:
        for sock in sockets:
            sock.close()
    assert len(evicted) >= 21  # the 20 past the cap and one for the normal client
    assert all(data.startswith(b"HTTP/1.1 408") for data in evicted.values()), evicted
    assert max(evicted) < len(sockets) - 20  # the oldest went, not the newest
    time.sleep(0.2)  # the server sees the closes
    _still_serving(server.url)
    assert _counts(server.url)[("evicted", "")] >= 21


def test_rollouts_stay_inside_the_model_root_and_name_no_paths(server: ServingThread,
                                                              root: Path) -> None:
    outside = root.parent / "outside"
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        answers = {path: client.post("/admin/model", json={"path": path}) for path in [
            "../outside", str(outside), "escape", "missing", "/no/such/dir", "v1/../../outside"]}
        for path, answer in answers.items():
            assert (answer.status_code, answer.json()) == (422, {"error": NO_MODEL}), path
        pickled = client.post("/admin/model", json={"path": "evil/model.pt"})
        assert pickled.status_code == 422 and "pickle" in pickled.json()["error"]
        assert str(root) not in pickled.text and "evil/model.pt" in pickled.text
        swapped = client.post("/admin/model", json={"path": "v2"})
        assert swapped.status_code == 200 and swapped.json()["version"] == "v2"
        back = client.post("/admin/model", json={"path": str(root / "v1")})
        assert back.status_code == 200 and back.json()["version"] == "v1"
    _still_serving(server.url)


def _idla_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "idla.cli", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=60,
                          env=None if env is None else os.environ | env)


def test_the_token_flag_warns_and_a_bad_root_is_a_one_line_error(tmp_path: Path,
                                                                  root: Path) -> None:
    """(Bad token files, one line each, are in tests/unit/test_serve_token.py.)"""
    absent = tmp_path / "absent"
    flagged = _idla_serve("--model", str(root / "v1"), "--token", "t", "--model-root",
                          str(absent))
    assert flagged.returncode == 2 and "Traceback" not in flagged.stderr
    warning, error = flagged.stderr.strip().splitlines()
    assert "--token is visible to every user" in warning
    assert error == f"idla: error: --model-root {absent}: not a directory"


def test_idla_serve_takes_its_token_from_a_file_not_the_command_line(tmp_path: Path,
                                                                     root: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    token_file.chmod(0o600)
    command = [sys.executable, "-m", "idla.cli", "serve", "--model", str(root / "v1"),
               "--workers", "1", "--port", "0", "--token-file", str(token_file),
               "--model-root", str(root)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout is not None
        url = ""
        deadline_s = time.monotonic() + 60
        while not url and time.monotonic() < deadline_s:
            line = process.stdout.readline()
            if line.startswith("idla serve: http://"):
                url = line.split()[2]
        assert url, "the server did not print its address"
        assert "file-token" not in Path(f"/proc/{process.pid}/cmdline").read_text()
        denied = httpx.post(f"{url}/admin/model", json={"path": "v2"}, headers=AUTH)
        assert denied.status_code == 403
        swap = httpx.post(f"{url}/admin/model", json={"path": "../v1"}, timeout=60,
                          headers={"Authorization": "Bearer file-token"})
        assert (swap.status_code, swap.json()) == (422, {"error": NO_MODEL})
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0 and "warning" not in stderr
