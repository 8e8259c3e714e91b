"""Worker processes that run many virtual federated clients each, without Ray.

Every worker is a fresh Python interpreter with one torch thread, the training set and its own model
instance. Per round the parent sends each worker one JSON header (round, seed, its jobs) and the
global model as safetensors bytes (``idla.fl.wire``); the worker trains its clients one after the
other and answers each with a JSON header and the client's new weights as safetensors bytes.
Everything crosses the pipe through ``Connection.send_bytes`` / ``recv_bytes``: raw bytes, never
pickle. Jobs are split across workers by longest-processing-time-first on samples × epochs.

Cost per round: the model goes to each worker once and every update comes back once (P floats
each); the workers' compute is what the clients do.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

import numpy as np

from idla.errors import IdlaError
from idla.fl.wire import arrays_from_bytes, arrays_to_bytes

_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Job:
    """One client's work in a round."""

    client_id: int
    local_epochs: int
    proximal_mu: float = 0.0
    work_fraction: float = 1.0
    attack: str = "none"
    """What the client does to its update (``idla.fl.attacks.Attack``; "none": honest)."""


@dataclass(frozen=True)
class JobResult:
    """A client's answer; ``error`` is set (and ``arrays`` empty) when its training failed."""

    client_id: int
    arrays: list[np.ndarray]
    num_samples: int
    compute_s: float
    loss: float
    error: str | None = None


@dataclass(frozen=True)
class PoolSettings:
    """What every worker needs to build its clients."""

    partitions: list[list[int]]
    """Training-set indices of each client (client id = position)."""
    model: str = "mlp"
    batch_size: int = 8
    lr: float = 0.3


class ClientPool:
    """A fixed set of worker processes; use as a context manager or call ``close``."""

    def __init__(self, processes: int, settings: PoolSettings) -> None:
        if processes < 1:
            raise IdlaError(f"--processes must be at least 1, got {processes}")
        self.settings = settings
        self.sizes = [len(p) for p in settings.partitions]
        self._readers: list[Connection] = []
        self._writers: list[Connection] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(processes):
                self._start_worker()
            init = json.dumps(asdict(settings)).encode()
            for writer in self._writers:
                writer.send_bytes(init)
            for reader in self._readers:
                if not reader.poll(_START_TIMEOUT_S):
                    raise IdlaError(
                        f"a client worker did not start within {_START_TIMEOUT_S:.0f} s")
                _recv_json(reader)
        except BaseException:
            self.close()
            raise

    def _start_worker(self) -> None:
        """A fresh interpreter (not a fork, and not multiprocessing's spawn, which re-imports the
        caller's main module) talking over two pipes."""
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}
        code = "import sys; from idla.fl.pool import worker_entry; worker_entry(*sys.argv[1:])"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, env=env,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._procs.append(proc)
        self._readers.append(Connection(from_child_r, writable=False))
        self._writers.append(Connection(to_child_w, readable=False))

    @property
    def processes(self) -> int:
        return len(self._procs)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (politely, then by terminate) and close the pipes."""
        for writer in self._writers:
            with contextlib.suppress(OSError, ValueError):
                writer.send_bytes(json.dumps({"op": "stop"}).encode())
        for proc in self._procs:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=5.0)
        for conn in (*self._readers, *self._writers):
            conn.close()
        self._readers, self._writers, self._procs = [], [], []

    def run_round(
        self,
        round_index: int,
        seed: int,
        global_arrays: Sequence[np.ndarray],
        jobs: Sequence[Job],
    ) -> list[JobResult]:
        """Run every job from ``global_arrays``; results come back in the order of ``jobs``."""
        if not self._procs:
            raise IdlaError("the client pool is closed")
        for job in jobs:
            if not 0 <= job.client_id < len(self.sizes):
                raise IdlaError(f"no partition for client {job.client_id}")
        shares = _split(jobs, self.sizes, len(self._procs))
        model_bytes = arrays_to_bytes(global_arrays)
        pending: dict[Connection, int] = {}
        for reader, writer, share in zip(self._readers, self._writers, shares, strict=True):
            if not share:
                continue
            header = {"op": "round", "round": round_index, "seed": seed,
                      "jobs": [asdict(job) for job in share]}
            writer.send_bytes(json.dumps(header).encode())
            writer.send_bytes(model_bytes)
            pending[reader] = len(share)
        results: dict[int, JobResult] = {}
        while pending:
            for ready in wait(list(pending)):
                conn = cast(Connection, ready)
                while pending.get(conn, 0) > 0:  # drain what is there before waiting again
                    result = _recv_result(conn)
                    results[result.client_id] = result
                    pending[conn] -= 1
                    if pending[conn] == 0:
                        del pending[conn]
                    elif not conn.poll(0):
                        break
        return [results[job.client_id] for job in jobs]


def _split(jobs: Sequence[Job], sizes: Sequence[int], workers: int) -> list[list[Job]]:
    """Longest-processing-time-first: heaviest job to the least-loaded worker (≤ 4/3 of best)."""
    loads = [0.0] * workers
    shares: list[list[Job]] = [[] for _ in range(workers)]
    for job in sorted(jobs, key=lambda j: -sizes[j.client_id] * j.local_epochs * j.work_fraction):
        lightest = min(range(workers), key=loads.__getitem__)
        shares[lightest].append(job)
        loads[lightest] += sizes[job.client_id] * job.local_epochs * job.work_fraction + 1
    return shares


def _recv_json(conn: Connection) -> dict[str, Any]:
    try:
        value = json.loads(conn.recv_bytes().decode())
    except EOFError:
        raise IdlaError("a client worker process exited unexpectedly") from None
    if not isinstance(value, dict):
        raise IdlaError("a client worker sent a malformed message")
    return value


def _recv_result(conn: Connection) -> JobResult:
    header = _recv_json(conn)
    try:
        payload = conn.recv_bytes()
    except EOFError:
        raise IdlaError("a client worker process exited unexpectedly") from None
    error = header.get("error")
    arrays = arrays_from_bytes(payload) if error is None else []
    return JobResult(int(header["client_id"]), arrays, int(header["num_samples"]),
                     float(header["compute_s"]), float(header["loss"]), error)


def worker_entry(read_fd: str, write_fd: str) -> None:
    """Entry point of a worker interpreter: the two pipe ends it inherited."""
    reader = Connection(int(read_fd), writable=False)
    writer = Connection(int(write_fd), readable=False)
    with contextlib.suppress(KeyboardInterrupt):
        _serve(reader, writer)
    # Nothing to flush: skip the interpreter's slow teardown of torch.
    sys.stdout.flush()
    os._exit(0)


def _serve(reader: Connection, writer: Connection) -> None:
    """A worker's loop: build the data and the model once, then train clients on request."""
    import torch

    from idla.demo import load_digits_tensors
    from idla.fl.attacks import parse_attack
    from idla.fl.client import (
        LocalTraining,
        build_model,
        client_seed,
        client_update,
        model_arrays,
    )

    torch.set_num_threads(1)
    try:
        settings = PoolSettings(**json.loads(reader.recv_bytes().decode()))
    except EOFError:
        return
    images, labels, _, _ = load_digits_tensors()
    parts = [torch.as_tensor(p, dtype=torch.int64) for p in settings.partitions]
    model = build_model(settings.model, 0)
    # Warm up: torch's first backward and optimizer step cost ~1 s of one-off set-up, which
    # would otherwise land in the first client's measured compute.
    warm = LocalTraining(local_epochs=1, batch_size=settings.batch_size, lr=settings.lr)
    client_update(model, model_arrays(model), images[:8], labels[:8], warm, 0)
    writer.send_bytes(json.dumps({"ready": True}).encode())
    while True:
        try:
            header = json.loads(reader.recv_bytes().decode())
        except EOFError:
            return
        if header.get("op") != "round":
            return
        global_arrays = arrays_from_bytes(reader.recv_bytes())
        for raw in header["jobs"]:
            job = Job(**raw)
            index = parts[job.client_id]
            training = LocalTraining(
                local_epochs=job.local_epochs, batch_size=settings.batch_size, lr=settings.lr,
                proximal_mu=job.proximal_mu, work_fraction=job.work_fraction,
            )
            seed = client_seed(int(header["seed"]), job.client_id, int(header["round"]))
            reply: dict[str, Any] = {"client_id": job.client_id, "num_samples": int(index.numel()),
                                     "compute_s": 0.0, "loss": 0.0}
            try:
                result = client_update(model, global_arrays, images[index], labels[index],
                                       training, seed, parse_attack(job.attack))
            except (ValueError, RuntimeError) as error:
                reply["error"] = f"{type(error).__name__}: {error}"
                writer.send_bytes(json.dumps(reply).encode())
                writer.send_bytes(b"")
                continue
            reply.update(compute_s=result.compute_s, loss=result.loss)
            writer.send_bytes(json.dumps(reply).encode())
            writer.send_bytes(arrays_to_bytes(result.arrays))
