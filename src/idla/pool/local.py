"""The local backend: every worker a subprocess on this machine, each device a CPU slot.

A device is one worker slot (``cpu0``, ``cpu1``, ...) of kind ``cpu``. With emulated speeds
(``idla pool start --emulate-speeds 1,1,0.5,0.25``) each device owns a cgroup whose CPU quota
is ``base_cores × speed`` (`idla.emulate.cgroup.CpuThrottle`), and a worker placed on the
device is moved into it as it starts, so its children are throttled too, and its kind carries the
speed (``cpu@0.25``), so that the pool's per-kind performance models tell fast slots from
slow ones. Without a writable
cgroup v1 cpu controller that option fails with one line; without it, slots run at full speed.

Each worker runs in its own session (process group), so a stop reaches the processes it
started as well: SIGTERM for a graceful stop (a `run_elastic` worker leaves at its next step
boundary), SIGKILL otherwise or when it has not exited within ``kill_after_s``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import psutil

from idla.emulate.cgroup import CpuThrottle
from idla.errors import ConfigError
from idla.pool.backend import WorkerHandle, WorkerLaunch
from idla.pool.model import Device


@dataclass(kw_only=True, slots=True)
class LocalConfig:
    """How many local slots there are and how fast each one runs."""

    devices: int | None = None
    """Worker slots; None: one per speed when speeds are given, else 2."""
    speeds: Sequence[float] | None = None
    """Relative CPU speed per slot (cgroup quota); None: no throttling."""
    base_cores: float = 0.5
    """CPUs a slot of speed 1.0 gets under throttling."""
    kill_after_s: float = 10.0
    """A gracefully stopped worker still running after this long is killed."""

    def __post_init__(self) -> None:
        if self.devices is not None and self.devices < 1:
            raise ConfigError(f"--devices must be at least 1, got {self.devices}")
        if (self.speeds is not None and self.devices is not None
                and len(self.speeds) != self.devices):
            raise ConfigError(f"--emulate-speeds lists {len(self.speeds)} speeds for "
                              f"{self.devices} devices")

    @property
    def count(self) -> int:
        if self.speeds is not None:
            return len(self.speeds)
        return 2 if self.devices is None else self.devices


class LocalWorker:
    """A started worker process."""

    def __init__(self, launch: WorkerLaunch, process: subprocess.Popen[bytes]) -> None:
        self.launch = launch
        self.process = process
        self.stop_requested_s: float | None = None

    def poll(self) -> int | None:
        return self.process.poll()

    @property
    def pid(self) -> int:
        return self.process.pid


class LocalBackend:
    """Subprocesses on this machine; one optional throttled cgroup per device."""

    def __init__(self, config: LocalConfig | None = None) -> None:
        self.config = config or LocalConfig()
        memory_bytes = int(psutil.virtual_memory().total // self.config.count)
        node = socket.gethostname()
        speeds = self.config.speeds
        self._devices = [Device(device_id=f"cpu{i}",
                                kind="cpu" if speeds is None else f"cpu@{speeds[i]:g}",
                                node=node, memory_bytes=memory_bytes)
                         for i in range(self.config.count)]
        self._index = {d.device_id: i for i, d in enumerate(self._devices)}
        self._throttle = (CpuThrottle(self.config.speeds, self.config.base_cores).__enter__()
                          if self.config.speeds is not None else None)
        self._workers: list[LocalWorker] = []
        self._lock = threading.Lock()

    def devices(self) -> Sequence[Device]:
        return list(self._devices)

    def speeds(self) -> dict[str, float]:
        """The emulated relative speed of each device (1.0 each without throttling)."""
        speeds = self.config.speeds or [1.0] * len(self._devices)
        return {d.device_id: float(s) for d, s in zip(self._devices, speeds, strict=True)}

    def start(self, launch: WorkerLaunch) -> LocalWorker:
        index = self._index.get(launch.device.device_id)
        if index is None:
            raise ConfigError(f"no local device {launch.device.device_id!r}")
        log: IO[bytes] | int = subprocess.DEVNULL
        if launch.log_path is not None:
            log = open(launch.log_path, "ab")  # noqa: SIM115  # the child holds it open
        stdin: IO[bytes] | int = subprocess.DEVNULL
        try:
            if launch.stdin_path is not None:
                stdin = open(launch.stdin_path, "rb")  # noqa: SIM115  # closed below
            process = subprocess.Popen(
                list(launch.argv), cwd=launch.cwd, env={**os.environ, **launch.env},
                stdin=stdin, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            for file in (log, stdin):
                if not isinstance(file, int):
                    file.close()
        worker = LocalWorker(launch, process)
        if self._throttle is not None:
            self._throttle.attach(index, process.pid)
        with self._lock:
            self._workers.append(worker)
        return worker

    def stop(self, handle: WorkerHandle, graceful: bool = True) -> None:
        """SIGTERM (graceful) or SIGKILL to the worker's whole process group; returns at once."""
        if not isinstance(handle, LocalWorker):
            raise TypeError(f"not a local worker: {handle!r}")
        if handle.poll() is not None:
            return
        if handle.stop_requested_s is None:
            handle.stop_requested_s = time.monotonic()
        _signal_group(handle.pid, signal.SIGTERM if graceful else signal.SIGKILL)

    def reap(self) -> None:
        """Kill gracefully stopped workers that outlived ``kill_after_s``; forget exited ones."""
        now = time.monotonic()
        with self._lock:
            for worker in self._workers:
                if (worker.poll() is None and worker.stop_requested_s is not None
                        and now - worker.stop_requested_s > self.config.kill_after_s):
                    _signal_group(worker.pid, signal.SIGKILL)
            self._workers = [w for w in self._workers if w.poll() is None]

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            if worker.poll() is None:
                _signal_group(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + min(self.config.kill_after_s, 5.0)
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(worker.pid, signal.SIGKILL)
                worker.process.wait(timeout=5)
        if self._throttle is not None:
            self._throttle.close()
            self._throttle = None


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
