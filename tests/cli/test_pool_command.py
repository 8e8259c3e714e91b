"""`idla pool start` as a real process, driven over real HTTP and by `idla submit|status|cancel`.

Bad calls get a 4xx with one line and leave the database as it was; the status page needs the
token and renders in a headless browser (skipped, saying why, when none is installed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idla.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _idla(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "idla.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, env=ENV, timeout=60)


def _idla_here(capsys: pytest.CaptureFixture[str], home: Path, *args: str
               ) -> subprocess.CompletedProcess[str]:
    """`idla ARGS --home HOME` through the CLI's `main` in this process (a fresh interpreter
    costs seconds of imports; `_idla` runs the real command where the process matters)."""
    capsys.readouterr()  # what was printed before is not this command's
    code = main([*args, "--home", str(home)])
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, printed.out, printed.err)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    home = tmp_path_factory.mktemp("pool")
    process = subprocess.Popen(
        [sys.executable, "-m", "idla.cli", "pool", "start", "--home", str(home), "--port", "0",
         "--devices", "2"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (home / "agent.json").exists():
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "the agent did not start"
        time.sleep(0.1)
    time.sleep(0.2)  # written atomically; give the API thread a moment
    try:
        yield home, json.loads((home / "agent.json").read_text())
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert not (home / "agent.json").exists()


def _http(state: dict[str, Any], method: str, path: str, body: bytes | None = None,
          token: str | None = "state", content_type: str = "application/toml"
          ) -> tuple[int, Any]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {state['token'] if token == 'state' else token}"
    request = urllib.request.Request(state["url"] + path, data=body, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            kind = response.headers.get("Content-Type", "")
            return response.status, json.loads(raw) if "json" in kind else raw.decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _spec(tmp_path: Path, priority: str = "2", sleep_s: int = 60) -> Path:
    script = tmp_path / "wait.py"
    script.write_text(f"import time\ntime.sleep({sleep_s})\n")
    spec = tmp_path / "job.toml"
    spec.write_text(f'name = "waiter"\nkind = "train"\npriority = {priority}\n'
                    f'[train]\nscript = "wait.py"\nresizable = false\n')
    return spec


def test_submit_status_cancel_through_the_cli(agent: tuple[Path, dict[str, Any]],
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    home, state = agent
    submitted = _idla(home, "submit", str(_spec(tmp_path)))  # the real command, once
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    deadline = time.monotonic() + 20
    while (row := _http(state, "GET", f"/jobs/{job_id}")[1])["state"] != "running":
        assert time.monotonic() < deadline, row
        time.sleep(0.2)
    assert len(row["devices"]) == 1
    table = _idla_here(capsys, home, "pool", "status")
    assert job_id in table.stdout and "waiter" in table.stdout and "running" in table.stdout

    cancelled = _idla_here(capsys, home, "cancel", job_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    again = _idla_here(capsys, home, "cancel", job_id)
    assert again.returncode == 2 and "409" in again.stderr and "\n" not in again.stderr.strip()
    bad = _idla_here(capsys, home, "submit", str(_spec(tmp_path, priority='"high"')))
    assert bad.returncode == 2
    assert bad.stderr.strip() == ('idla: error: job.toml: priority: must be a number >= 0, '
                                  'got "high"')


def test_the_api_refuses_bad_calls_and_changes_nothing(agent: tuple[Path, dict[str, Any]]
                                                       ) -> None:
    _, state = agent
    _, before = _http(state, "GET", "/jobs")

    assert _http(state, "GET", "/jobs", token=None)[0] == 401
    assert _http(state, "GET", "/jobs", token="wrong")[0] == 403
    assert _http(state, "POST", "/jobs", b'name = "x"', token=None)[0] == 401
    status, answer = _http(state, "POST", "/jobs", b'name = "x"\nkind = "train"\npriority = 1\n'
                           b'[train]\nscript = "relative.py"\n')
    assert status == 400 and "train.script: 'relative.py' is relative" in answer["error"]
    assert _http(state, "POST", "/jobs", b"[1, 2]", content_type="application/json")[0] == 400
    assert _http(state, "POST", "/jobs", b"\xff\xfe", content_type="application/json")[0] == 400
    assert _http(state, "POST", "/jobs", b"x" * 70_000)[0] == 413
    assert _http(state, "POST", "/jobs", b"x", content_type="image/png")[0] == 415
    assert _http(state, "GET", "/jobs/job-999")[0] == 404
    assert _http(state, "DELETE", "/jobs/job-999")[0] == 404
    assert _http(state, "PUT", "/jobs")[0] == 405

    assert _http(state, "POST", "/devices/cpu9/drain")[0] == 404
    assert _http(state, "POST", "/devices/cpu1/drain", b"lost", token=None)[0] == 401
    assert _http(state, "POST", "/devices/cpu1/drain", b"lost",
                 content_type="application/json")[0] == 400
    assert _http(state, "POST", "/devices/cpu1/drain", b'{"lost": 1}',
                 content_type="application/json")[0] == 400
    assert _http(state, "POST", "/devices/cpu1/explode")[0] == 405

    assert _http(state, "GET", "/jobs")[1] == before
    status, devices = _http(state, "GET", "/devices")
    assert status == 200 and [d["id"] for d in devices["devices"]] == ["cpu0", "cpu1"]
    assert {d["state"] for d in devices["devices"]} == {"up"}
    status, health = _http(state, "GET", "/agent")
    assert status == 200 and health["tick_errors"] == 0


def test_a_device_is_drained_lost_and_restored_through_the_api_and_the_cli(
        agent: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    home, state = agent

    drained = _idla_here(capsys, home, "pool", "drain", "cpu1")
    lost = _http(state, "POST", "/devices/cpu0/drain", b'{"lost": true}',
                 content_type="application/json")
    listed = {d["id"]: d["state"] for d in _http(state, "GET", "/devices")[1]["devices"]}
    restored = _idla_here(capsys, home, "pool", "restore", "cpu1")
    back = _http(state, "POST", "/devices/cpu0/restore")
    unknown = _http(state, "POST", "/devices/gpu7/restore")

    assert drained.returncode == 0 and drained.stdout.strip() == "cpu1: drained"
    assert lost == (200, {"id": "cpu0", "state": "lost"})
    assert listed == {"cpu0": "lost", "cpu1": "drained"}
    assert restored.returncode == 0 and restored.stdout.strip() == "cpu1: up"
    assert back == (200, {"id": "cpu0", "state": "up"})
    assert unknown == (404, {"error": "no device 'gpu7'"})


def test_the_status_page_needs_the_token_and_renders(agent: tuple[Path, dict[str, Any]],
                                                     tmp_path: Path) -> None:
    _, state = agent
    assert _http(state, "GET", "/", token=None)[0] == 401
    with urllib.request.urlopen(f"{state['url']}/?token={state['token']}", timeout=10) as page:
        text = page.read().decode()
    assert "<svg" in text and "cpu0" in text and "waiter" in text

    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(n)), None)
    if browser is None:
        pytest.skip("no headless browser (Debian: apt-get install chromium) for the screenshot")
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=900,700",
                    f"{state['url']}/?token={state['token']}"],
                   capture_output=True, timeout=60, check=False)
    assert shot.exists() and shot.stat().st_size > 5_000  # a page, not a blank error


def test_ray_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    unreachable = _idla(tmp_path, "pool", "start", "--ray", "127.0.0.1:1")
    mixed = _idla(tmp_path, "pool", "start", "--ray", "auto", "--emulate-speeds", "1,0.5")
    for result, says in ((unreachable, "cannot reach the Ray cluster at 127.0.0.1:1"),
                         (mixed, "--ray takes its devices from the cluster's nodes")):
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "agent.json").exists()
