"""Which device each rank computes on, and the one data-plane backend the whole job uses.

Each rank chooses its own device: a GPU of its own when it has one, else the CPU;
``IDLA_DEVICE`` overrides. A rank proposes ``cuda:(LOCAL_RANK mod the GPUs it sees)``
(`choose_device`), and where several ranks of one host propose the same GPU the lowest rank
keeps it and the others compute on the CPU (`settle_shared_gpus`): ``--nproc-per-node 3`` on a
one-GPU box gives one GPU rank and two CPU ranks, and one GPU per Slurm task (each process sees
only its own, as cuda:0) gives every rank its GPU. The backend is a job-wide decision
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
    pinned: bool = False  # chosen by IDLA_DEVICE: kept even on a GPU another rank uses

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> DeviceReport:
        try:
            data = json.loads(text)
            return DeviceReport(host=str(data["host"]), device=str(data["device"]),
                                gpu_id=str(data["gpu_id"]), nccl=bool(data["nccl"]),
                                pinned=bool(data.get("pinned", False)))
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"a peer sent a malformed device report: {error}") from None


def choose_device(
    local_rank: int, gpu_count: int, environ: Mapping[str, str] | None = None
) -> torch.device:
    """The device this rank proposes: `IDLA_DEVICE` when set; else ``cuda:(local_rank mod
    gpu_count)`` when the process sees a GPU; else the CPU. A GPU that several ranks of one
    host propose goes to the lowest of them (`settle_shared_gpus`).

    Raises:
        ConfigError: `IDLA_DEVICE` names no device, or a GPU this host does not have.
    """
    env = os.environ if environ is None else environ
    wanted = env.get(DEVICE_ENV, "").strip()
    if wanted:
        return _parse_device(wanted, local_rank, gpu_count)
    if gpu_count > 0:
        return torch.device("cuda", local_rank % gpu_count)
    return torch.device("cpu")


def is_pinned(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `IDLA_DEVICE` chose this rank's device (then no other rank's claim moves it)."""
    env = os.environ if environ is None else environ
    return bool(env.get(DEVICE_ENV, "").strip())


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


def local_report(device: torch.device, pinned: bool = False) -> DeviceReport:
    """This rank's `DeviceReport` for `device`."""
    host = socket.gethostname()
    gpu_id = ""
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        gpu_id = str(uuid) if uuid is not None else f"{host}:{index}"
    return DeviceReport(host=host, device=str(device), gpu_id=gpu_id,
                        nccl=dist.is_available() and dist.is_nccl_available(), pinned=pinned)


def settle_shared_gpus(reports: Sequence[DeviceReport]) -> list[DeviceReport]:
    """Every rank's device once shared GPUs are settled: of the ranks on one host that
    proposed the same GPU, the lowest keeps it and the others (unless pinned by
    `IDLA_DEVICE`) compute on the CPU. Pure; identical on every rank."""
    taken: set[tuple[str, str]] = set()
    settled = []
    for report in reports:
        gpu = (report.host, report.gpu_id)
        if report.device.startswith("cuda") and gpu in taken and not report.pinned:
            report = DeviceReport(host=report.host, device="cpu", gpu_id="", nccl=report.nccl)
        elif report.device.startswith("cuda"):
            taken.add(gpu)
        settled.append(report)
    return settled


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


class ReportTimeout(ConfigError):
    """A peer did not report its device in time: a user's mistake at a job's start (a rank
    not started), a lost peer when an elastic generation re-forms."""


def agree_on_reports(
    store: dist.Store, rank: int, world_size: int, mine: DeviceReport, timeout_s: float
) -> list[DeviceReport]:
    """Every rank's `DeviceReport`, in rank order, exchanged through `store` (collective:
    every rank calls it once per store). Cost: one set and world_size gets of ~100 bytes.

    Raises:
        ReportTimeout: A peer did not report within `timeout_s`.
    """
    store.set(f"{REPORT_PREFIX}{rank}", mine.to_json())
    keys = [f"{REPORT_PREFIX}{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistStoreError) as error:
        raise ReportTimeout(
            f"rank {rank}: not every rank reported its device within {timeout_s:g} s "
            f"({error}); are all {world_size} ranks started?") from None
    return [DeviceReport.from_json(store.get(key).decode("utf-8")) for key in keys]
