"""The command line each kind of job runs on its devices.

- train: the user's script with its arguments, one process per device (``RANK``,
  ``WORLD_SIZE`` and the rendezvous come in the environment, as under torchrun);
- serve: one `idla serve` router process with one worker, on a free
  port (printed in the job's log), its bearer token in ``token`` under the run dir (mode 600),
  admitting requests against the spec's p99 target (``--latency-target-ms``);
- infer: one `idla infer` process with ``--workers n``.
An infer job is one process holding all its devices: it is placed rigidly. A serve job's
router runs with one worker on its first device (the job's *anchor*); each further device runs
a standalone serving worker (`serve_worker_command`, the link secret on its stdin from
``link-secret`` under the run dir, mode 600) that the pool adds to the router through
``POST /admin/workers`` and retires the same way before it stops it (`idla.pool.serving`).
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


def resizable(spec: JobSpec) -> bool:
    """Whether the pool may grow and shrink the job while it runs: a training script on
    `run_elastic`, or a serving deployment (through its router's membership)."""
    return spec.kind is JobKind.SERVE or (spec.kind is JobKind.TRAIN and spec.resizable)


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
        return [python, "-m", "idla.cli", "serve", "--model", spec.model, "--workers", "1",
                "--port", "0", "--token-file", str(token_file(run_dir)),
                "--link-secret-file", str(link_secret_file(run_dir)),
                "--latency-target-ms", f"{spec.p99_ms:g}"]
    assert spec.input is not None and spec.output is not None
    return [python, "-m", "idla.cli", "infer", "--model", spec.model, "--input", spec.input,
            "--output", spec.output, "--workers", str(world)]


def serve_worker_command(spec: JobSpec, python: str) -> list[str]:
    """A standalone serving worker for a serve job's router (its link secret on stdin)."""
    assert spec.model is not None
    return [python, "-m", "idla.serve.worker", "--model", spec.model, "--host", "127.0.0.1"]


def token_file(run_dir: Path) -> Path:
    """The job's bearer token for its router (created once, mode 600)."""
    return _private(run_dir / "token", secrets.token_urlsafe(24))


def link_secret_file(run_dir: Path) -> Path:
    """The link secret between the job's router and its workers (created once, mode 600)."""
    return _private(run_dir / "link-secret", secrets.token_hex(32))


def _private(path: Path, value: str) -> Path:
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(value + "\n")
    return path
