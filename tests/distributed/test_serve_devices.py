"""`idla serve --device`: workers on their own devices behind one router, real processes, a real
HTTP server and client; the refusals of a bad ``--device`` (one line, exit 2, no traceback).

The CUDA cases run where a GPU exists and compare with the CPU model within a tolerance.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from idla.cli import main
from idla.serve.model_io import MLP, load_model, save_model
from idla.serve.router import RouterConfig
from idla.serve.server import ServeOptions, ServingThread
from idla.serve.worker import WorkerPool

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FEATURES = 64
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
GPU_TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}  # fp32 kernels sum in another order than the CPU's


def _save(directory: Path, seed: int, version: str) -> Path:
    torch.manual_seed(seed)
    kwargs = {"in_features": FEATURES, "hidden": 128, "layers": 2, "classes": 10}
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


def _metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@contextmanager
def _idla_serve(model: Path, workers: int, device: str) -> Iterator[tuple[str, list[str]]]:
    """`idla serve` in a real process: its URL and the device each worker line names."""
    command = [sys.executable, "-m", "idla.cli", "serve", "--model", str(model), "--workers",
               str(workers), "--device", device, "--port", "0", "--token", TOKEN]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url, devices = "", []
        deadline = time.monotonic() + 120
        while len(devices) < workers and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("idla serve: http://"):
                url = line.split()[2]
            if line.strip().startswith("worker "):
                devices.append(line.split(", ")[1])
        assert url and len(devices) == workers, "the server did not print its workers"
        yield url, devices
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("device", ["cpu,cpu", pytest.param("cuda:0,cpu", marks=CUDA)])
def test_idla_serve_runs_each_worker_on_its_device(models: dict[str, Path], device: str) -> None:
    inputs = [np.random.default_rng(i).random((3, FEATURES), dtype=np.float32)
              for i in range(20)]
    tolerance = GPU_TOLERANCE if "cuda" in device else {"rtol": 1e-5, "atol": 1e-5}

    with _idla_serve(models["v1"], 2, device) as (url, printed), \
            httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        answers = [client.post("/v1/predict", json={"inputs": x.tolist()}) for x in inputs]
        metrics = _metric_samples(client.get("/metrics").text)

    assert printed == device.split(",")
    assert [a.status_code for a in answers] == [200] * len(inputs)
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(answer.json()["outputs"], _reference(models["v1"], x),
                                   **tolerance)
    for worker, name in enumerate(device.split(",")):
        labels = (("device", name), ("worker", str(worker)))
        assert metrics[("idla_worker_device_info", labels)] == 1


@pytest.mark.parametrize(("device", "workers", "message"), [
    ("cpu,cpu", "3", "--device lists 2 devices for 3 workers"),
    ("gpu", "1", "--device 'gpu' is not a device"),
    ("cpu,auto", "2", "--device 'cpu,auto': auto stands alone"),
    pytest.param("cuda:0", "1", "--device cuda:0: CUDA is not available on this machine",
                 marks=NO_CUDA),
])
def test_a_bad_device_is_refused_in_one_line_before_any_worker_starts(
    models: dict[str, Path], device: str, workers: str, message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["serve", "--model", str(models["v1"]), "--workers", workers, "--device",
                 device, "--port", "0"])

    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"idla: error: {message}"), captured.err
    assert "starting" not in captured.out


@NO_CUDA
def test_cuda_without_cuda_exits_2_from_the_real_command(models: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "idla.cli", "serve", "--model", str(models["v1"]), "--device",
         "cuda:0", "--port", "0"], capture_output=True, text=True, timeout=120)

    assert result.returncode == 2
    assert result.stderr == "idla: error: --device cuda:0: CUDA is not available on this machine\n"


@CUDA
def test_a_gpu_and_a_cpu_worker_answer_alike_and_swap_models_on_their_devices(
    models: dict[str, Path],
) -> None:
    inputs = np.random.default_rng(7).random((8, FEATURES), dtype=np.float32)
    options = ServeOptions(token=TOKEN, port=0, router=RouterConfig(max_wait_s=0.002))

    with WorkerPool(models["v1"], 2, devices="cuda:0,cpu") as pool:
        alone = []
        for index in range(2):  # each worker alone
            with ServingThread(pool, options, [index]) as single:
                answer = httpx.post(f"{single.url}/v1/predict", headers=AUTH, timeout=60,
                                    json={"inputs": inputs.tolist()})
                alone.append(np.asarray(answer.json()["outputs"], dtype=np.float32))
        with ServingThread(pool, options) as server, \
                httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
            before = server.call(server.router.stats)
            swap = client.post("/admin/model", json={"path": str(models["v2"])})
            after = [client.post("/v1/predict", json={"inputs": inputs.tolist()}).json()
                     for _ in range(8)]
            devices_after = [w["device"] for w in server.call(server.router.stats)]

    assert [w["device"] for w in before] == devices_after == ["cuda:0", "cpu"]
    assert all(seconds > 0 for w in before for _, seconds in w["curve"])
    np.testing.assert_allclose(alone[0], alone[1], **GPU_TOLERANCE)
    np.testing.assert_allclose(alone[1], _reference(models["v1"], inputs), rtol=1e-5, atol=1e-5)
    assert swap.status_code == 200, swap.text
    assert swap.json()["workers"] == 2
    for answer in after:
        assert answer["model_version"] == "v2"
        np.testing.assert_allclose(answer["outputs"], _reference(models["v2"], inputs),
                                   **GPU_TOLERANCE)
