"""The user's script in examples/ under plain torchrun with 3 processes, and as one plain
process (torchrun with one process sets WORLD_SIZE=1: the same group of one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_torchrun.py"


def test_example_runs_under_torchrun(tmp_path: Path) -> None:
    processes = 3
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", "0", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "127.0.0.1:0",
        str(EXAMPLE), "--epochs", "4", "--global-batch", "128",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == processes
    assert sum(summary["shares"]) == 128
    assert summary["test_accuracy"] > 0.85


def test_example_runs_as_a_plain_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "4", "--global-batch", "128"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 1
    assert summary["shares"] == [128]
    assert summary["test_accuracy"] > 0.85


def test_mixed_devices_example_runs_under_torchrun(tmp_path: Path) -> None:
    """The mixed-fleet example on this machine's devices (here: three CPU ranks); on a box
    with one GPU the same command makes rank 0 a GPU rank (scripts/gpu_check.sh runs it)."""
    example = EXAMPLE.parent / "train_mixed_devices.py"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
        "--master-addr", "127.0.0.1", "--master-port", "0", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "127.0.0.1:0", str(example), "--epochs", "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["fleet"] == _expected_fleet(3)
    assert sum(summary["shares"]) == 512
    assert summary["test_accuracy"] > 0.8


def _expected_fleet(ranks: int) -> str:
    """What three local ranks choose on this machine (all CPU here; one GPU: rank 0 on it)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = [f"cuda:{r}" if r < gpus else "cpu" for r in range(ranks)]
    backend = "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"
    return f"{backend}: " + " ".join(f"{r}:{d}" for r, d in enumerate(devices))
