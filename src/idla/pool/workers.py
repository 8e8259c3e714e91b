"""The command line each kind of job runs on its devices.

- train: the user's script with its arguments, one process per device (``RANK``,
  ``WORLD_SIZE`` and the rendezvous come in the environment, as under torchrun);
- serve: one `idla serve` router process with ``--workers n`` for the job's n devices, on a free
  port (printed in the job's log), its bearer token in ``token`` under the run dir (mode 600),
  admitting requests against the spec's p99 target (``--latency-target-ms``);
- infer: one `idla infer` process with ``--workers n``.
A serve or infer job is one process holding all its devices: it is placed rigidly.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from idla.agent.pool_metrics import JOB_ID_ENV, METRICS_DIR_ENV, WORKER_ENV
from idla.pool.model import Device, JobKind
from idla.pool.spec import JobSpec


def processes_per_device(spec: JobSpec) -> bool:
    """True when the job runs one process per device (training); else one for all."""
    return spec.kind is JobKind.TRAIN


def worker_env(spec: JobSpec, job_id: str, run_dir: Path, rendezvous: str, secret: str,
               device: Device, rank: int, world: int, joining: bool) -> dict[str, str]:
    """The environment a worker gets on ``device`` (beside the backend's own): its rank and
    world as under torchrun, the job's rendezvous and secret, and where its metrics go
    (`idla.agent.pool_metrics`, its row naming the device it runs on)."""
    env = {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
        "IDLA_RENDEZVOUS": rendezvous, "IDLA_JOB_SECRET": secret, "IDLA_POOL_JOB": job_id,
        JOB_ID_ENV: job_id, WORKER_ENV: device.device_id, "IDLA_POOL_RUN_DIR": str(run_dir),
        METRICS_DIR_ENV: str(run_dir / "metrics"), "IDLA_POOL_DEVICE": device.device_id,
        "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
        **spec.env,
    }
    if device.kind.partition("@")[0] == "cpu":
        env["IDLA_DEVICE"] = "cpu"
    if joining:
        env["IDLA_JOIN"] = "1"
    return env


def worker_command(spec: JobSpec, python: str, world: int, run_dir: Path) -> list[str]:
    if spec.kind is JobKind.TRAIN:
        assert spec.script is not None
        return [python, spec.script, *spec.args]
    assert spec.model is not None
    if spec.kind is JobKind.SERVE:
        assert spec.p99_ms is not None
        return [python, "-m", "idla.cli", "serve", "--model", spec.model, "--workers", str(world),
                "--port", "0", "--token-file", str(token_file(run_dir)),
                "--latency-target-ms", f"{spec.p99_ms:g}"]
    assert spec.input is not None and spec.output is not None
    return [python, "-m", "idla.cli", "infer", "--model", spec.model, "--input", spec.input,
            "--output", spec.output, "--workers", str(world)]


def token_file(run_dir: Path) -> Path:
    path = run_dir / "token"
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(24) + "\n")
    return path
