"""Workers on a Ray cluster (`idla pool start --ray ADDRESS`): devices are the nodes' resources,
each worker is a Ray actor pinned to its device's node that runs the worker's argv as a child
process, with its environment.

The actor only holds the process: a job's workers still meet through torch.distributed (their
IDLA_RENDEZVOUS store, gloo or NCCL), exactly as under torchrun, so the same script runs under
the local backend, under torchrun and here. Only this module imports Ray; the local default
never does.

Devices: every alive node gives one ``"cpu"`` device per `RayConfig.cpus_per_worker` CPUs it
has (minus those its GPUs' workers take) and one device per GPU, whose kind is the node's
``accelerator_type`` resource in lower case (``"a100"``), or ``"gpu"`` without one. Ray chooses
which physical GPU of the node an actor gets (it sets CUDA_VISIBLE_DEVICES), so the GPUs of one
node are interchangeable slots. The worker process is a child of its actor: `stop` and `close`
end it; an actor whose own process dies alone (its node still up) leaves the child running, and
its peers go on without the actor answering. Cost: `devices` is one ``ray.nodes()`` call;
`start` one actor creation and one remote call (milliseconds on a warm cluster); `poll` one
remote call.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from idla.errors import ConfigError, IdlaError
from idla.pool.backend import WorkerLaunch
from idla.pool.model import Device

ACCELERATOR_PREFIX = "accelerator_type:"
LOST_EXIT_CODE = -signal.SIGKILL
"""What `RayWorker.poll` says when the actor (or its node) is gone: the process was lost."""


@dataclass(kw_only=True, slots=True)
class RayConfig:
    """How the pool uses a Ray cluster."""

    address: str | None = None
    """The cluster (``ray://HOST:10001``, ``HOST:6379``, ``"auto"``, ``"local"`` for a new one
    on this machine); None: the Ray this process already initialised, else what ``ray.init()``
    finds (RAY_ADDRESS, the last ``ray start`` here) or a new local one."""
    cpus_per_worker: int = 1
    """Ray CPUs each CPU worker holds (and its torch threads): a node with C CPUs gives
    C // cpus_per_worker CPU devices."""
    cpus_per_gpu_worker: int = 1
    """Ray CPUs each GPU worker holds beside its GPU."""
    call_timeout_s: float = 30.0
    """How long a remote call to a worker's actor may take before the worker counts as lost."""

    def __post_init__(self) -> None:
        if self.cpus_per_worker < 1:
            raise ConfigError("ray.cpus_per_worker must be at least 1")
        if self.cpus_per_gpu_worker < 0:
            raise ConfigError("ray.cpus_per_gpu_worker must be 0 or more")
        if self.call_timeout_s <= 0:
            raise ConfigError("ray.call_timeout_s must be positive")


def node_devices(node: dict[str, Any], config: RayConfig) -> list[Device]:
    """The devices one entry of ``ray.nodes()`` gives (none for a dead node)."""
    if not node.get("Alive", False):
        return []
    resources: dict[str, float] = node.get("Resources", {})
    node_id = str(node["NodeID"])
    label = f"ray:{node.get('NodeManagerAddress', '?')}/{node_id[:8]}"
    gpus = int(resources.get("GPU", 0))
    kinds = [key[len(ACCELERATOR_PREFIX):].lower() for key in resources
             if key.startswith(ACCELERATOR_PREFIX)]
    cpus = max(0, int(resources.get("CPU", 0)) - gpus * config.cpus_per_gpu_worker)
    cpu_slots = cpus // config.cpus_per_worker
    memory_bytes = int(resources.get("memory", 0)) // max(1, cpu_slots + gpus)
    return [
        *(Device(f"{label}/gpu{i}", kinds[0] if kinds else "gpu", node_id, memory_bytes)
          for i in range(gpus)),
        *(Device(f"{label}/cpu{i}", "cpu", node_id, memory_bytes) for i in range(cpu_slots)),
    ]


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast when `address` names a HOST:PORT (or ray://HOST:PORT) nobody answers on:
    ``ray.init`` would retry for minutes.

    Raises:
        IdlaError: Nothing accepts a TCP connection there within `timeout_s`.
    """
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise IdlaError(f"cannot reach the Ray cluster at {address}: "
                        f"{error.strerror or type(error).__name__}") from None


class _WorkerProcess:
    """Inside the actor: one child process running the worker's argv."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: list[str], env: dict[str, str], cwd: str | None,
              log_path: str | None) -> tuple[int, str]:
        """Start the child; its pid, and the id of the node this actor runs on."""
        full_env = {**os.environ, **env}
        if log_path is None:
            self._proc = subprocess.Popen(argv, env=full_env, cwd=cwd,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            with open(log_path, "ab") as log:
                self._proc = subprocess.Popen(argv, env=full_env, cwd=cwd, stdout=log,
                                              stderr=subprocess.STDOUT)
        return self._proc.pid, str(ray.get_runtime_context().get_node_id())

    def poll(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def signal(self, signum: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)


_RemoteWorker = ray.remote(_WorkerProcess)


@dataclass(eq=False)
class RayWorker:
    """A started worker: its actor, and its exit code once known."""

    launch: WorkerLaunch
    actor: Any
    pid: int
    """The worker process's id on its node."""
    node_id: str
    """The Ray node it runs on (its device's)."""
    timeout_s: float
    _exit_code: int | None = field(default=None, repr=False)

    def poll(self) -> int | None:
        """Its exit code, or None while it runs (or its actor did not answer within
        `timeout_s`: busy is not lost); `LOST_EXIT_CODE` once the actor is gone (its node was
        lost, or it was killed). The actor, and the Ray resources it holds, is released once
        the process has ended."""
        if self._exit_code is not None:
            return self._exit_code
        try:
            code = ray.get(self.actor.poll.remote(), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            return None
        except ray.exceptions.RayActorError:
            code = LOST_EXIT_CODE
        if code is not None:
            self._exit_code = int(code)
            ray.kill(self.actor)
        return self._exit_code

    def send(self, signum: int) -> None:
        """Send `signum` to the worker process (nothing once it has ended).

        Raises:
            IdlaError: Its actor did not answer within `timeout_s`.
        """
        if self._exit_code is not None:
            return
        try:
            ray.get(self.actor.signal.remote(signum), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise IdlaError(f"job {self.launch.job_id} member {self.launch.member}: its Ray "
                            f"actor did not answer within {self.timeout_s:.0f} s") from None
        except ray.exceptions.RayActorError:
            self._exit_code = LOST_EXIT_CODE


class RayBackend:
    """`idla.pool.backend.Backend` on a Ray cluster's nodes."""

    def __init__(self, config: RayConfig | None = None) -> None:
        self.config = config or RayConfig()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            check_reachable(self.config.address)
            try:
                ray.init(address=self.config.address, include_dashboard=False,
                         log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise IdlaError(f"cannot reach the Ray cluster at {self.config.address!r}: "
                                f"{str(error).splitlines()[0] if str(error) else error}"
                                ) from None
        self._workers: list[RayWorker] = []

    def devices(self) -> Sequence[Device]:
        return [d for node in ray.nodes() for d in node_devices(node, self.config)]

    def start(self, launch: WorkerLaunch) -> RayWorker:
        """Start `launch` in an actor on its device's node, holding that device's resources.

        Raises:
            IdlaError: The device is not one of this cluster's, or the actor did not start.
        """
        device = launch.device
        if device.device_id not in {d.device_id for d in self.devices()}:
            raise IdlaError(f"device {device.device_id} is not on this Ray cluster (any more)")
        on_gpu = device.kind != "cpu"
        cpus = self.config.cpus_per_gpu_worker if on_gpu else self.config.cpus_per_worker
        # Ray shows a GPU actor only its GPU (CUDA_VISIBLE_DEVICES), and a CPU actor none.
        env = {"OMP_NUM_THREADS": str(max(1, cpus)),
               "IDLA_DEVICE": "cuda:0" if on_gpu else "cpu", **launch.env}
        actor: Any = _RemoteWorker.options(
            num_cpus=cpus, num_gpus=1 if on_gpu else 0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(device.node, soft=False),
        ).remote()
        try:
            pid, node_id = ray.get(actor.start.remote(list(launch.argv), env, launch.cwd,
                                             launch.log_path), timeout=self.config.call_timeout_s)
        except (ray.exceptions.RayError, OSError) as error:
            ray.kill(actor)
            raise IdlaError(f"job {launch.job_id} member {launch.member}: the worker did not "
                            f"start on {device.device_id}: {type(error).__name__}") from None
        worker = RayWorker(launch, actor, int(pid), str(node_id), self.config.call_timeout_s)
        self._workers.append(worker)
        return worker

    def stop(self, handle: Any, graceful: bool = True) -> None:
        """graceful: SIGTERM (the worker leaves at its next step boundary); else SIGKILL."""
        if not isinstance(handle, RayWorker):
            raise TypeError(f"not a Ray worker: {handle!r}")
        handle.send(signal.SIGTERM if graceful else signal.SIGKILL)

    def close(self) -> None:
        """Kill every worker still running, release the actors; shut down a Ray it started."""
        for worker in self._workers:
            if worker.poll() is None:
                with contextlib.suppress(IdlaError):
                    worker.send(signal.SIGKILL)
            ray.kill(worker.actor)
        self._workers.clear()
        if self._owns_ray:
            ray.shutdown()
