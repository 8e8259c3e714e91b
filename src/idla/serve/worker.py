"""A serving worker: one process that loads a model directory and runs batches sent over TCP.

Run as ``python -m idla.serve.worker --model DIR [--device cuda:0]`` with the link secret on
stdin (`idla.serve.auth`; `WorkerPool` does this); it prints one JSON line on stdout, either
``{"ready": true, "port": P, "pid": ...}`` or ``{"error": "..."}`` (then exits 2).
The model lives on its device; each batch arrives and leaves on the CPU. It runs one
thread of torch, optionally inside a throttled cgroup (joined after the heavy imports and the
model load, before the batch-size curve is measured, so the curve is the throttled one) and
optionally inside a network namespace (an emulated host). Protocol: `idla.serve.wire`; the
connections and hot swaps: `idla.serve.model_server`.

For tests only: ``IDLA_TEST_ONLY_LOAD_DELAY_S`` (0 to 60 seconds) makes every hot-swap load
sleep that long first, so that a test can watch a rollout time out; it changes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from idla.errors import ConfigError, IdlaError
from idla.serve import auth
from idla.serve.devices import CPU, resolve_devices, run_on
from idla.serve.model_server import ModelServer, describe_failure, load

DEFAULT_MAX_ROWS = 256
CURVE_LIMIT_S = 0.25  # stop measuring larger batches once one takes this long
CURVE_MIN_TIME_S = 0.03  # time each batch size for at least this long (several CFS periods)
SHORT_BATCH_S = 0.05  # sizes faster than this are timed three times, keeping the fastest
READY_TIMEOUT_S = 120.0
LOAD_DELAY_ENV = "IDLA_TEST_ONLY_LOAD_DELAY_S"
MAX_LOAD_DELAY_S = 60.0


def measure_curve(
    model: Any, input_shape: Sequence[int], max_rows: int = DEFAULT_MAX_ROWS,
    limit_s: float = CURVE_LIMIT_S, min_time_s: float = CURVE_MIN_TIME_S, device: str = CPU,
) -> list[list[float]]:
    """``[[rows, seconds], ...]``: sustained wall time of a batch at rows 1, 2, 4, ... on
    ``device`` (where ``model`` lives), as `ModelServer` runs one: inputs moved from the CPU,
    the forward pass, outputs back on the CPU, the device synchronized before the clock is read.

    Each size is timed in windows of at least ``min_time_s`` and two passes (several CFS
    periods, so a throttled worker shows its sustained rate); short sizes get three windows and
    keep the fastest, which drops a window that a neighbour process happened to slow down.
    Sizes stop at ``max_rows`` or after the first that takes ``limit_s``. Cost: about twice
    the time of the largest size measured, plus 3 × ``min_time_s`` per short size.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    sizes = [1]
    while sizes[-1] < max_rows:
        sizes.append(min(sizes[-1] * 2, max_rows))
    curve: list[list[float]] = []
    with torch.no_grad():
        for rows in sizes:
            x = torch.rand((rows, *input_shape), generator=generator)
            run_on(model, x, device)  # warm-up: allocations of this size
            windows_s: list[float] = []
            while len(windows_s) < 3 and (not windows_s or windows_s[-1] < SHORT_BATCH_S):
                reps, start = 0, time.perf_counter()
                while reps < 2 or time.perf_counter() - start < min_time_s:
                    run_on(model, x, device)
                    reps += 1
                windows_s.append((time.perf_counter() - start) / reps)
            curve.append([rows, min(windows_s)])
            if min(windows_s) >= limit_s:
                break
    return curve


def _watch_parent(parent_pid: int) -> None:
    """Exit when the process that started this worker is gone (no orphaned workers)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def _join_cgroup(procs_path: str) -> None:
    try:
        with open(procs_path, "w") as procs:
            procs.write(f"{os.getpid()}\n")
    except OSError as error:
        raise ConfigError(f"cannot join the throttled cgroup {procs_path}: {error}") from None


def _test_load_delay_s() -> float:
    text = os.environ.get(LOAD_DELAY_ENV, "")
    try:
        delay_s = float(text) if text else 0.0
    except ValueError:
        delay_s = -1.0
    if not 0 <= delay_s <= MAX_LOAD_DELAY_S:
        raise ConfigError(f"{LOAD_DELAY_ENV}={text!r} must be 0 to {MAX_LOAD_DELAY_S:g} seconds")
    return delay_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idla.serve.worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cgroup-procs", help="cgroup.procs file of this worker's cgroup")
    parser.add_argument("--netns", help="network namespace (emulated host) to run in")
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS)
    parser.add_argument("--device", default=CPU, help="cpu or cuda:N")
    args = parser.parse_args(argv)
    try:
        secret = auth.read_secret(sys.stdin.buffer)
        load_delay_s = _test_load_delay_s()
    except ConfigError as error:
        print(json.dumps({"error": str(error)}), flush=True)
        return 2
    import torch

    torch.set_num_threads(1)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        if args.netns:
            from idla.emulate.netns import enter_netns

            enter_netns(args.netns)
        loaded = load(args.model, resolve_devices(args.device, 1)[0])
        if args.cgroup_procs:
            _join_cgroup(args.cgroup_procs)
        curve = measure_curve(loaded.model, loaded.info.input_shape, args.max_rows,
                              device=loaded.device)
        listener = socket.create_server((args.host, args.port))
    except Exception as error:  # e.g. a model whose kwargs make torch raise: say why, exit 2
        print(json.dumps({"error": describe_failure(error, "starting the worker", args.model)}),
              flush=True)
        return 2
    print(json.dumps({"ready": True, "port": listener.getsockname()[1], "pid": os.getpid(),
                      "version": loaded.info.version}), flush=True)
    ModelServer(loaded, curve, secret, load_delay_s).serve_forever(listener)
    return 0


@dataclass
class WorkerProcess:
    """A local worker process and the address it serves on."""

    process: subprocess.Popen[bytes]
    host: str
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid


def _wait_ready(process: subprocess.Popen[bytes], deadline_s: float) -> dict[str, Any]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline_s - time.monotonic()))
    line = process.stdout.readline() if ready else b""
    if not line:
        code = process.poll()
        raise IdlaError(f"serving worker (pid {process.pid}) "
                        + ("did not start in time" if code is None else f"exited with {code}"))
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        raise IdlaError(f"serving worker said {line[:200]!r} instead of ready") from None
    if "error" in message:
        raise ConfigError(str(message["error"]))
    return dict(message)


class WorkerPool:
    """Start ``count`` local workers on ``model_dir`` (each in its own throttled cgroup when
    ``speeds`` is given, quota ``base_cores × speed``); stop them all on exit. Worker i runs on
    ``devices[i]`` (a ``--device`` value or one device per worker, checked here).

    With ``netns``, worker i runs in network namespace ``netns[i]`` (an emulated host) and binds
    ``hosts[i]``, that host's address; otherwise every worker binds ``host``. Every worker gets
    `secret` (drawn here, per pool, unless given: a launcher that starts more workers later,
    such as the device pool, shares it) on its stdin; a router needs it to connect
    (`idla.serve.auth`).
    """

    def __init__(
        self, model_dir: str | Path, count: int, speeds: Sequence[float] | None = None,
        base_cores: float = 0.5, host: str = "127.0.0.1", max_rows: int = DEFAULT_MAX_ROWS,
        netns: Sequence[str] | None = None, hosts: Sequence[str] | None = None,
        devices: str | Sequence[str] = CPU, secret: bytes | None = None,
    ) -> None:
        if count < 1:
            raise ConfigError(f"--workers must be at least 1, got {count}")
        if speeds is not None and len(speeds) != count:
            raise ConfigError(f"--emulate-speeds lists {len(speeds)} speeds for {count} workers")
        if netns is not None and len(netns) != count:
            raise ConfigError(f"{len(netns)} network namespaces for {count} workers")
        self.hosts = list(hosts) if hosts is not None else [host] * count
        if len(self.hosts) != count:
            raise ConfigError(f"{len(self.hosts)} bind addresses for {count} workers")
        self.model_dir, self.count, self.speeds = str(model_dir), count, speeds
        self.base_cores, self.max_rows, self.netns = base_cores, max_rows, netns
        self.devices = resolve_devices(devices, count)
        self.secret = secret if secret is not None else auth.new_secret()
        self.workers: list[WorkerProcess] = []
        self._stack = ExitStack()
        self._throttle: Any = None
        self._lock = threading.Lock()  # restarts run on other threads than close
        self._closed = False

    def __enter__(self) -> WorkerPool:
        from idla.emulate.cgroup import CpuThrottle
        from idla.serve.model_io import read_info

        read_info(self.model_dir)  # a missing, damaged or pickle model fails here, clearly
        try:
            self._throttle = (self._stack.enter_context(CpuThrottle(self.speeds,
                                                                    self.base_cores))
                              if self.speeds else None)
            processes = [self._spawn(i, self.model_dir) for i in range(self.count)]
            deadline_s = time.monotonic() + READY_TIMEOUT_S
            for process in processes:
                self._stack.callback(_stop, process)
            for i, process in enumerate(processes):
                ready = _wait_ready(process, deadline_s)
                self.workers.append(WorkerProcess(process, self.hosts[i], int(ready["port"])))
        except BaseException:
            self.close()
            raise
        return self

    def restart(self, index: int, model_dir: str | None = None) -> WorkerProcess:
        """Replace worker ``index`` by a new process on ``model_dir`` (default: `model_dir`),
        with the same device, cgroup, namespace and secret, on a new port; the old process is
        killed if it still runs. Blocks until the new one is ready (at most READY_TIMEOUT_S);
        a worker that cannot start raises IdlaError."""
        with self._lock:
            if self._closed:
                raise IdlaError("the worker pool is closed")
            old = self.workers[index].process
        if old.poll() is None:
            old.kill()
        _stop(old)
        process = self._spawn(index, model_dir or self.model_dir)
        with self._lock:
            closed = self._closed
            if not closed:
                self._stack.callback(_stop, process)
        if closed:
            _stop(process)
            raise IdlaError("the worker pool is closed")
        ready = _wait_ready(process, time.monotonic() + READY_TIMEOUT_S)
        worker = WorkerProcess(process, self.hosts[index], int(ready["port"]))
        self.workers[index] = worker
        return worker

    def _spawn(self, index: int, model_dir: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "idla.serve.worker", "--model", model_dir,
                   "--host", self.hosts[index], "--max-rows", str(self.max_rows),
                   "--device", self.devices[index]]
        if self._throttle is not None:
            command += ["--cgroup-procs", str(self._throttle.paths[index] / "cgroup.procs")]
        if self.netns is not None:
            command += ["--netns", self.netns[index]]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        assert process.stdin is not None
        with suppress(OSError):  # a worker that died at once says so on stdout
            process.stdin.write(self.secret.hex().encode() + b"\n")
            process.stdin.close()
        return process

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(w.host, w.port) for w in self.workers]

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._stack.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
