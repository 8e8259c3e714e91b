"""What each worker is: CPU, memory, GPUs and the bandwidth of its link, measured on the spot.

The probe reads only what the operating system and devices report and what a timed transfer
shows. It deliberately ignores cgroup quotas and any emulation setting: the planner has to
discover how fast each worker is by measuring, as it would on real heterogeneous machines.
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch
import torch.distributed as dist

from idla.runtime.collectives import all_gather_json


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU visible to a worker."""

    index: int  # CUDA device index as this process sees it (after CUDA_VISIBLE_DEVICES)
    name: str  # device name reported by the driver, e.g. "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int  # device memory in bytes
    memory_free_bytes: int | None  # free device memory in bytes; None when it cannot be read
    utilization_percent: float | None  # busy % over NVML's last sample, 0-100; None without NVML

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuInfo:
        free = data.get("memory_free_bytes")
        util = data.get("utilization_percent")
        return cls(
            index=int(data["index"]),
            name=str(data["name"]),
            memory_total_bytes=int(data["memory_total_bytes"]),
            memory_free_bytes=None if free is None else int(free),
            utilization_percent=None if util is None else float(util),
        )


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    """Facts about one worker, gathered at start-up and shared with every rank."""

    rank: int  # global rank of the worker in the process group
    hostname: str  # host the worker runs on
    cpu_count: int  # logical CPUs the host reports (not a cgroup quota)
    cpu_percent: float  # host-wide CPU utilization over the sample window, 0-100
    process_cpu_percent: float  # this process's CPU use over the window; 100 = one full core
    mem_total_bytes: int  # physical memory of the host in bytes
    mem_available_bytes: int  # memory that can be given to processes without swapping, bytes
    gpus: tuple[GpuInfo, ...]  # GPUs visible to this process, by CUDA index
    link_bandwidth_bytes_per_s: float | None  # measured ring send rate; None when world size is 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (``from_dict`` inverts it)."""
        data = dataclasses.asdict(self)
        data["gpus"] = [dataclasses.asdict(gpu) for gpu in self.gpus]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerProfile:
        """Rebuild a profile from ``to_dict`` output (e.g. received from a peer as JSON)."""
        bandwidth = data.get("link_bandwidth_bytes_per_s")
        return cls(
            rank=int(data["rank"]),
            hostname=str(data["hostname"]),
            cpu_count=int(data["cpu_count"]),
            cpu_percent=float(data["cpu_percent"]),
            process_cpu_percent=float(data["process_cpu_percent"]),
            mem_total_bytes=int(data["mem_total_bytes"]),
            mem_available_bytes=int(data["mem_available_bytes"]),
            gpus=tuple(GpuInfo.from_dict(gpu) for gpu in data.get("gpus", [])),
            link_bandwidth_bytes_per_s=None if bandwidth is None else float(bandwidth),
        )


def _nvml_readings() -> dict[str, tuple[int, float]]:
    """Free memory (bytes) and utilization (%) per GPU UUID from NVML; empty if unavailable."""
    try:
        import pynvml
    except ImportError:
        return {}
    readings: dict[str, tuple[int, float]] = {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            free_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
            util_percent = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            readings[uuid] = (free_bytes, util_percent)
    except pynvml.NVMLError:
        pass
    finally:
        pynvml.nvmlShutdown()
    return readings


def _torch_uuid(props: Any) -> str | None:
    """The device UUID in NVML's form ("GPU-xxxxxxxx-..."), or None on builds without it."""
    raw = getattr(props, "uuid", None)
    if raw is None:
        return None
    text = str(raw)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def _probe_gpus() -> tuple[GpuInfo, ...]:
    if not torch.cuda.is_available():
        return ()
    nvml = _nvml_readings()
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        # CUDA and NVML may number devices differently (CUDA_VISIBLE_DEVICES), so match by UUID.
        uuid = _torch_uuid(props)
        reading = nvml.get(uuid) if uuid is not None else None
        if reading is not None:
            free_bytes: int | None = reading[0]
            util_percent: float | None = reading[1]
        else:
            util_percent = None
            try:
                free_bytes = int(torch.cuda.mem_get_info(index)[0])
            except RuntimeError:
                free_bytes = None
        gpus.append(
            GpuInfo(
                index=index,
                name=str(props.name),
                memory_total_bytes=int(props.total_memory),
                memory_free_bytes=free_bytes,
                utilization_percent=util_percent,
            )
        )
    return tuple(gpus)


def probe(rank: int = 0, cpu_sample_s: float = 0.1) -> WorkerProfile:
    """Read this worker's local facts; ``link_bandwidth_bytes_per_s`` is left None.

    Blocks for ``cpu_sample_s`` seconds to sample CPU utilization (host and this process).
    """
    process = psutil.Process()
    # The first cpu_percent call only starts the window; the second reads it.
    psutil.cpu_percent(interval=None)
    process.cpu_percent(interval=None)
    time.sleep(max(cpu_sample_s, 0.0))
    cpu_percent = float(psutil.cpu_percent(interval=None))
    process_cpu_percent = float(process.cpu_percent(interval=None))
    memory = psutil.virtual_memory()
    return WorkerProfile(
        rank=rank,
        hostname=socket.gethostname(),
        cpu_count=psutil.cpu_count(logical=True) or 1,
        cpu_percent=cpu_percent,
        process_cpu_percent=process_cpu_percent,
        mem_total_bytes=int(memory.total),
        mem_available_bytes=int(memory.available),
        gpus=_probe_gpus(),
        link_bandwidth_bytes_per_s=None,
    )


def _ring_exchange_s(send: torch.Tensor, recv: torch.Tensor, rank: int, world_size: int,
                     group: Any) -> float:
    """Seconds for one simultaneous send to the next rank and receive from the previous one."""
    dist.barrier(group=group)
    start_s = time.perf_counter()
    requests = [
        dist.isend(send, dst=(rank + 1) % world_size, group=group),
        dist.irecv(recv, src=(rank - 1) % world_size, group=group),
    ]
    for request in requests:
        if request is not None:  # None only for ranks outside the default group
            request.wait()
    return time.perf_counter() - start_s


def measure_link_bandwidth(
    nbytes: int = 2**21, repeats: int = 3, group: Any = None
) -> float | None:
    """This rank's send rate in bytes/s over a ring exchange of host buffers; None without
    peers. `group`: the torch process group to measure on: a gloo one (the control plane,
    `idla.runtime.group.Group.control`; None: the default group, which must then be gloo).

    Every rank sends ``nbytes`` to ``(rank+1) % W`` while receiving as much from
    ``(rank-1) % W``; the result is ``nbytes`` over the median of ``repeats`` timed exchanges,
    after one untimed warm-up. Collective: every rank must call it with the same arguments.
    Cost: ``(repeats + 1) * nbytes`` bytes sent per rank, plus one barrier per exchange.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size(group)
    if world_size < 2:
        return None
    if nbytes < 1 or repeats < 1:
        raise ValueError(f"measure_link_bandwidth: nbytes={nbytes}, repeats={repeats}; need ≥ 1")
    rank = dist.get_rank()
    send = torch.ones(nbytes, dtype=torch.uint8)  # (nbytes,)
    recv = torch.empty(nbytes, dtype=torch.uint8)  # (nbytes,)
    _ring_exchange_s(send, recv, rank, world_size, group)
    times_s = [_ring_exchange_s(send, recv, rank, world_size, group) for _ in range(repeats)]
    return nbytes / max(statistics.median(times_s), 1e-9)


def probe_all(rank: int, group: Any = None) -> list[WorkerProfile]:
    """Probe locally, measure the link, and share the profiles; the list is indexed by rank.

    Collective when a process group is initialized; with none it returns this worker alone.
    `group`: a gloo process group of all ranks (the control plane; None: the default group).
    """
    bandwidth = measure_link_bandwidth(group=group)
    local = dataclasses.replace(probe(rank), link_bandwidth_bytes_per_s=bandwidth)
    profiles = [WorkerProfile.from_dict(data)
                for data in all_gather_json(local.to_dict(), group=group)]
    for position, profile in enumerate(profiles):
        if profile.rank != position:
            raise ValueError(
                f"probe_all: the profile at position {position} says rank {profile.rank}; "
                "pass each worker's own torch.distributed rank"
            )
    return profiles
