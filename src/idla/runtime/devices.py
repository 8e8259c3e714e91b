"""Which device each rank computes on, and the one data-plane backend the whole job uses.

Each rank chooses its own device (`choose_device`): ``cuda:LOCAL_RANK`` when it has a GPU of
its own, else the CPU; ``IDLA_DEVICE`` overrides. The backend is a job-wide decision
(`data_backend`): NCCL only when every rank computes on a GPU that no other rank uses, gloo
otherwise. Ranks agree on it through the store before any process group exists
(`agree_on_reports`), because ranks that call ``init_process_group`` with different backends
hang. The statistics, flags and probes never depend on it: they travel on a gloo control
plane (`idla.runtime.group`).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from idla.errors import ConfigError

DEVICE_ENV = "IDLA_DEVICE"
"""Overrides a rank's device: ``cpu``, ``cuda`` (= ``cuda:LOCAL_RANK``) or ``cuda:N``."""

REPORT_PREFIX = "idla/device/"
"""Store keys of the device reports, one per rank."""


@dataclass(frozen=True)
class DeviceReport:
    """What a rank tells the others about where it computes."""

    host: str  # the host name: GPUs are shared or not only within one host
    device: str  # "cpu" or "cuda:N"
    gpu_id: str  # the GPU's UUID (or "host:index" where torch does not give one); "" on CPU
    nccl: bool  # whether this rank's torch has NCCL

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> DeviceReport:
        try:
            data = json.loads(text)
            return DeviceReport(host=str(data["host"]), device=str(data["device"]),
                                gpu_id=str(data["gpu_id"]), nccl=bool(data["nccl"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"a peer sent a malformed device report: {error}") from None


def choose_device(
    local_rank: int, gpu_count: int, environ: Mapping[str, str] | None = None
) -> torch.device:
    """This rank's compute device: `IDLA_DEVICE` when set; else ``cuda:local_rank`` when
    this host has that GPU; else ``cuda:0`` when the process sees exactly one GPU because
    ``CUDA_VISIBLE_DEVICES`` names one (a GPU per task, as Slurm gives); else the CPU. So
    ``--nproc-per-node 2`` on a one-GPU box gives one GPU rank and one CPU rank.

    Raises:
        ConfigError: `IDLA_DEVICE` names no device, or a GPU this host does not have.
    """
    env = os.environ if environ is None else environ
    wanted = env.get(DEVICE_ENV, "").strip()
    if wanted:
        return _parse_device(wanted, local_rank, gpu_count)
    if gpu_count > 0 and local_rank < gpu_count:
        return torch.device("cuda", local_rank)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if gpu_count == 1 and len(visible) == 1:
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _parse_device(text: str, local_rank: int, gpu_count: int) -> torch.device:
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda":
        text = f"cuda:{local_rank}"
    kind, _, index_text = text.partition(":")
    if kind != "cuda" or not index_text.isdigit():
        raise ConfigError(f"{DEVICE_ENV}={text!r}: expected cpu, cuda or cuda:N")
    index = int(index_text)
    if index >= gpu_count:
        have = "CUDA is not available" if gpu_count == 0 else f"this host has {gpu_count} GPU(s)"
        raise ConfigError(f"{DEVICE_ENV}={text!r}: {have}")
    return torch.device("cuda", index)


def local_report(device: torch.device) -> DeviceReport:
    """This rank's `DeviceReport` for `device`."""
    host = socket.gethostname()
    gpu_id = ""
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        gpu_id = str(uuid) if uuid is not None else f"{host}:{index}"
    return DeviceReport(host=host, device=str(device), gpu_id=gpu_id,
                        nccl=dist.is_available() and dist.is_nccl_available())


def data_backend(reports: Sequence[DeviceReport]) -> str:
    """The job's data-plane backend: "nccl" when every rank computes on a GPU of its own (no
    two ranks on one GPU, which NCCL refuses) and has NCCL, else "gloo". Pure; every rank
    computes it from the same reports, so all choose the same."""
    gpus = [(r.host, r.gpu_id) for r in reports]
    own_gpus = all(r.device.startswith("cuda") for r in reports) and len(set(gpus)) == len(gpus)
    return "nccl" if reports and own_gpus and all(r.nccl for r in reports) else "gloo"


def describe_fleet(reports: Sequence[DeviceReport]) -> str:
    """One line naming each rank's device, for logs and errors: "0:cuda:0 1:cpu"."""
    return " ".join(f"{rank}:{r.device}" for rank, r in enumerate(reports))


def agree_on_reports(
    store: dist.Store, rank: int, world_size: int, mine: DeviceReport, timeout_s: float
) -> list[DeviceReport]:
    """Every rank's `DeviceReport`, in rank order, exchanged through `store` (collective:
    every rank calls it once per store). Cost: one set and world_size gets of ~100 bytes.

    Raises:
        ConfigError: A peer did not report within `timeout_s`.
    """
    store.set(f"{REPORT_PREFIX}{rank}", mine.to_json())
    keys = [f"{REPORT_PREFIX}{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistStoreError) as error:
        raise ConfigError(
            f"rank {rank}: not every rank reported its device within {timeout_s:g} s "
            f"({error}); are all {world_size} ranks started?") from None
    return [DeviceReport.from_json(store.get(key).decode("utf-8")) for key in keys]
