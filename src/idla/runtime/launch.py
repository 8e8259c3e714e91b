"""Start N local worker processes the way torchrun would (RANK, WORLD_SIZE, MASTER_*)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from idla.emulate.cgroup import CpuThrottle
from idla.errors import ConfigError, EmulationError, IdlaError

_progress: Any = None  # in a worker started by launch_local: the queue to its launcher


def report_progress(message: dict[str, Any]) -> None:
    """Hand a progress message to the launching process, which draws it (no-op elsewhere).

    Drawing in the launcher keeps the cost of the display off the (possibly throttled) worker.
    """
    if _progress is not None:
        _progress.put(message)


class WorkerFailed(RuntimeError):
    """A worker process raised an unexpected exception (its traceback is in the message)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(
    fn: Callable[..., Any], args: tuple[Any, ...], rank: int, world_size: int, port: int,
    store_path: str, results: Any, progress: Any, netns: str | None, cgroup_procs: str | None,
    env: dict[str, str],
) -> None:
    global _progress
    _progress = progress
    # Local workers meet through a file store and talk over loopback only: torch's TCPStore
    # would listen on every interface, and gloo would pick the host's outward address. In a
    # network namespace of the multi-host rig, the worker talks over that host's eth0.
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        IDLA_INIT_METHOD=f"file://{store_path}", GLOO_SOCKET_IFNAME="lo",
        IDLA_RENDEZVOUS=f"file:{store_path}-rendezvous",
    )
    os.environ.update(env)
    if cgroup_procs is not None or netns is not None:
        # Emulated CPU speeds and hosts are CPU experiments: a GPU rank would void them.
        os.environ.setdefault("IDLA_DEVICE", "cpu")
    try:
        if cgroup_procs is not None:
            _enter_cgroup(cgroup_procs)
        if netns is not None:
            from idla.emulate.netns import enter_netns

            enter_netns(netns)
            os.environ.update(GLOO_SOCKET_IFNAME="eth0", LOCAL_WORLD_SIZE="1")
        results.put(("ok", rank, fn(*args)))
    except IdlaError as error:
        results.put(("user", rank, str(error)))
    except BaseException:
        results.put(("crash", rank, traceback.format_exc()))


def _enter_cgroup(procs_path: str) -> None:
    """Join this worker's throttled cgroup, after the imports: a worker at 1/8 of a core would
    otherwise spend tens of seconds importing scipy (through scikit-learn's digits), and about
    ten importing torch._dynamo (which torch imports at the first optimizer a process builds),
    before its first step, which measures nothing but slows every launch."""
    import torch._dynamo  # noqa: F401

    try:
        import sklearn.datasets
        import sklearn.model_selection  # noqa: F401
    except ImportError:
        pass
    try:
        with open(procs_path, "w") as procs:
            procs.write(f"{os.getpid()}\n")
    except OSError as error:
        raise EmulationError(f"cannot join the throttled cgroup {procs_path}: {error}") from None


def launch_local(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    world_size: int,
    speeds: Sequence[float] | None = None,
    base_cores: float = 0.5,
    timeout_s: float = 3600.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    netns: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    allow_lost: bool = False,
) -> list[Any]:
    """Run fn(*args) in `world_size` processes; return each rank's result, in rank order.

    With `speeds`, each process runs in its own throttled cgroup (real OS throttling; the
    workers are not told their speed). A worker's user error is re-raised as that IdlaError;
    any failure stops the other workers too. Messages a worker sends with `report_progress`
    are passed to `on_progress` here, in the launcher. With `netns`, rank i runs in network
    namespace netns[i] (the multi-host rig) and its collectives use that host's eth0.
    `env` adds environment variables in the workers (e.g. IDLA_RENDEZVOUS, IDLA_FAULTS). With
    `allow_lost` (elastic runs), a worker that dies without a result gets None and the others
    go on; without it, any failure stops every worker.
    """
    if world_size < 1:
        raise ConfigError(f"--workers must be at least 1, got {world_size}")
    if speeds is not None and len(speeds) != world_size:
        raise ConfigError(
            f"--emulate-speeds lists {len(speeds)} speeds for {world_size} workers"
        )
    if netns is not None and len(netns) != world_size:
        raise ConfigError(f"{len(netns)} network namespaces for {world_size} workers")
    context = mp.get_context("spawn")
    results = context.Queue()
    progress = context.Queue() if on_progress is not None else None
    port = free_port()
    with ExitStack() as stack:
        store_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="idla-"))
        store_path = os.path.join(store_dir, "store")
        throttle = stack.enter_context(CpuThrottle(speeds, base_cores)) if speeds else None
        procs = [
            context.Process(
                target=_child,
                args=(fn, args, rank, world_size, port, store_path, results, progress,
                      None if netns is None else netns[rank],
                      None if throttle is None else str(throttle.paths[rank] / "cgroup.procs"),
                      dict(env or {})),
            )
            for rank in range(world_size)
        ]
        try:
            for proc in procs:
                proc.start()  # a throttled worker joins its cgroup itself, once imported
            return _collect(procs, results, timeout_s, progress, on_progress, allow_lost)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                if proc.pid is not None:  # started
                    proc.join(timeout=10)


def _collect(
    procs: list[Any], results: Any, timeout_s: float, progress: Any,
    on_progress: Callable[[dict[str, Any]], None] | None, allow_lost: bool = False,
) -> list[Any]:
    outcome: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcome) < len(procs):
        _drain(progress, on_progress)
        try:
            kind, rank, value = results.get(timeout=0.1)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in outcome and p.exitcode is not None]
            if dead and not allow_lost:
                raise WorkerFailed(
                    f"worker {dead[0]} exited with code {procs[dead[0]].exitcode} "
                    "without a result"
                ) from None
            if dead:
                time.sleep(0.2)  # a result sent just before exit may still be in the pipe
                if results.empty():
                    outcome.update({r: None for r in dead})
            if time.monotonic() > deadline:
                raise WorkerFailed(f"workers did not finish within {timeout_s:.0f} s") from None
            continue
        if allow_lost and kind in ("user", "crash"):
            outcome[rank] = {"lost": str(value)}
            continue
        if kind == "user":
            raise IdlaError(value)
        if kind == "crash":
            raise WorkerFailed(f"worker {rank} failed:\n{value}")
        outcome[rank] = value
    _drain(progress, on_progress)
    return [outcome[r] for r in range(len(procs))]


def _drain(progress: Any, on_progress: Callable[[dict[str, Any]], None] | None) -> None:
    if progress is None or on_progress is None:
        return
    while True:
        try:
            on_progress(progress.get_nowait())
        except queue.Empty:
            return
