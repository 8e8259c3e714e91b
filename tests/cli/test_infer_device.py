"""`idla infer --device`: the same outputs on the CPU as without it, clear refusals of a device this
machine lacks, and (where a GPU exists) GPU outputs that match the CPU's within a tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from idla.cli import main
from idla.demo import DigitsCNN
from idla.serve.model_io import save_model
from idla.serve.offline import infer_offline

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
# cuDNN convolutions run in TF32 (10-bit mantissa) by default on Ampere and newer GPUs.
GPU_TOLERANCE = {"rtol": 5e-3, "atol": 5e-3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    save_model(directory, DigitsCNN(hidden=32), "digits_cnn", {"hidden": 32}, (1, 8, 8))
    return directory


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "in.npy"
    np.save(path, np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32))
    return path


def _infer(model_dir: Path, source: Path, target: Path, *options: str) -> np.ndarray:
    code = main(["infer", "--model", str(model_dir), "--input", str(source), "--output",
                 str(target), "--batch-size", "64", *options])
    assert code == 0
    return np.load(target, allow_pickle=False)


def test_device_cpu_gives_the_default_outputs_bit_for_bit(
    model_dir: Path, source: Path, tmp_path: Path,
) -> None:
    default = _infer(model_dir, source, tmp_path / "default.npy")

    on_cpu = _infer(model_dir, source, tmp_path / "cpu.npy", "--workers", "2", "--device",
                    "cpu,cpu", "--json", str(tmp_path / "run.json"))

    assert np.array_equal(on_cpu, default)
    assert json.loads((tmp_path / "run.json").read_text())["devices"] == ["cpu", "cpu"]


@pytest.mark.parametrize(("options", "message"), [
    (["--device", "cpu,cpu"], "--device lists 2 devices for 1 workers"),
    (["--workers", "2", "--device", "npu:0"], "--device 'npu:0' is not a device"),
    pytest.param(["--device", "cuda:0"], "--device cuda:0: CUDA is not available on this machine",
                 marks=NO_CUDA),
    pytest.param(["--workers", "2", "--device", "cpu,cuda"],
                 "--device cuda: CUDA is not available", marks=NO_CUDA),
])
def test_a_bad_device_gives_one_line_and_exit_2(
    model_dir: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    options: list[str], message: str,
) -> None:
    code = main(["infer", "--model", str(model_dir), "--input", str(source), "--output",
                 str(tmp_path / "out.npy"), *options])

    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"idla: error: {message}"), lines
    assert not (tmp_path / "out.npy").exists()


@NO_CUDA
def test_cuda_without_cuda_exits_2_from_the_real_command(
    model_dir: Path, source: Path, tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "idla.cli", "infer", "--model", str(model_dir), "--input",
         str(source), "--output", str(tmp_path / "out.npy"), "--device", "cuda:0"],
        capture_output=True, text=True, timeout=120)

    assert result.returncode == 2
    assert result.stderr == "idla: error: --device cuda:0: CUDA is not available on this machine\n"


@CUDA
@pytest.mark.parametrize(("workers", "device"), [("1", "cuda:0"), ("2", "cuda:0,cpu"),
                                                 ("2", "auto")])
def test_gpu_outputs_match_the_cpu_within_a_tolerance(
    model_dir: Path, source: Path, tmp_path: Path, workers: str, device: str,
) -> None:
    on_cpu = _infer(model_dir, source, tmp_path / "cpu.npy")

    on_gpu = _infer(model_dir, source, tmp_path / "gpu.npy", "--workers", workers, "--device",
                    device, "--json", str(tmp_path / "run.json"))

    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["devices"][0] == "cuda:0" and sum(summary["samples_per_worker"]) == 300
    assert on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape
    np.testing.assert_allclose(on_gpu, on_cpu, **GPU_TOLERANCE)


@CUDA
def test_infer_offline_on_cuda_returns_cpu_arrays_in_input_order(model_dir: Path) -> None:
    inputs = np.random.default_rng(1).random((130, 1, 8, 8), dtype=np.float32)
    reference = infer_offline(model_dir, inputs, batch_size=32)

    result = infer_offline(model_dir, inputs, workers=2, batch_size=32, devices=["cuda:0", "cpu"])

    assert isinstance(result.outputs, np.ndarray)
    np.testing.assert_allclose(result.outputs, reference.outputs, **GPU_TOLERANCE)
    assert sum(result.samples_per_worker) == len(inputs)
