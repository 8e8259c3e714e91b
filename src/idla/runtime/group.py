"""The process group: ranks, each rank's device, a data plane and a control plane.

Initialised from the environment the way torchrun sets it (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); with no such environment it is a group of one whose collectives do nothing, so
the same code path serves one process and N.

- **Device**: each rank's own choice (`idla.runtime.devices.choose_device`), independent of
  the backend: a GPU rank computes on its GPU even when the job runs over gloo.
- **Data plane** (gradients, parameters, buffers; `all_reduce`, `all_gather`, `isend`,
  `irecv`, `broadcast`): NCCL when every rank has a GPU of its own, gloo otherwise, agreed by
  all ranks through the store before the group exists. A CUDA tensor on a gloo data plane (a
  GPU rank in a mixed fleet) is staged through a pinned host buffer (`idla.runtime.staging`).
- **Control plane** (statistics, flags, digests, JSON, probes; the ``control_*`` methods and
  `control`): always a CPU gloo group of all ranks, so no control tensor meets NCCL and a
  control collective never waits behind gradients.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from idla.errors import ConfigError
from idla.runtime.devices import (
    DeviceReport,
    agree_on_reports,
    choose_device,
    data_backend,
    describe_fleet,
    is_pinned,
    local_report,
    settle_shared_gpus,
)
from idla.runtime.netif import ensure_gloo_interface
from idla.runtime.staging import STAGE_ENV, HostStaging, Work

__all__ = ["Group", "Work"]


_PLANES: dict[int, tuple[Any, dist.ProcessGroup, list[DeviceReport]]] = {}
"""The control plane and fleet of each live default process group, by its id (the group is
held, so the id stays its own): every `Group` over the same process group shares them."""


def _int_env(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None


def _script_backend(backend: str, fleet: Sequence[DeviceReport]) -> str:
    """What a process group the script initialised itself ("nccl", "gloo", or per device,
    "cpu:gloo,cuda:nccl") is for the data plane: NCCL only when every rank is on a GPU."""
    if "nccl" in backend and all(r.device.startswith("cuda") for r in fleet):
        return "nccl"
    return "gloo" if "gloo" in backend else backend


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class Group:
    """This process's view of the job: its rank and device, the data and control planes."""

    def __init__(
        self,
        timeout_s: float = 120.0,
        *,
        store: dist.Store | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """From torchrun's environment, or (elastic re-forms) from `store`, `rank` and
        `world_size`, with `timeout_s` bounding how long a collective waits for a peer.
        `device`: this rank's compute device (default: `choose_device`)."""
        self.world_size = _int_env("WORLD_SIZE", 1) if world_size is None else world_size
        self.rank = _int_env("RANK", 0) if rank is None else rank
        self.local_rank = _int_env("LOCAL_RANK", self.rank)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"wrong world size: RANK={self.rank} does not fit WORLD_SIZE={self.world_size}"
            )
        self.timeout = timedelta(seconds=timeout_s)
        self.device = (choose_device(self.local_rank, _gpu_count()) if device is None
                       else torch.device(device))
        self._owns_init = False
        self.backend = "none"
        self.control: dist.ProcessGroup | None = None
        self.fleet: list[DeviceReport] = [
            local_report(self.device, pinned=device is not None or is_pinned())]
        if self.world_size > 1:
            self._init_planes(store, timeout_s)
            self.device = torch.device(self.fleet[self.rank].device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._staging = HostStaging(enabled=self._stages() or os.environ.get(STAGE_ENV) == "1")
        self._subgroups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}

    def _init_planes(self, store: dist.Store | None, timeout_s: float) -> None:
        if not dist.is_initialized():
            ensure_gloo_interface(os.environ)  # GLOO_SOCKET_IFNAME: the route to MASTER_ADDR
            if store is None:
                url = os.environ.get("IDLA_INIT_METHOD", "env://")
                store, _, _ = next(dist.rendezvous(
                    url, rank=self.rank, world_size=self.world_size, timeout=self.timeout))
            self.fleet = settle_shared_gpus(agree_on_reports(
                store, self.rank, self.world_size, self.fleet[0], timeout_s))
            self.backend = data_backend(self.fleet)
            dist.init_process_group(self.backend, store=store, rank=self.rank,
                                    world_size=self.world_size, timeout=self.timeout)
            self._owns_init = True
        if dist.get_world_size() != self.world_size:
            raise ConfigError(
                f"wrong world size: WORLD_SIZE={self.world_size} but the process group "
                f"has {dist.get_world_size()} ranks"
            )
        world = dist.group.WORLD
        if id(world) in _PLANES:  # a Group that joins a live one shares its control plane
            _, self.control, self.fleet = _PLANES[id(world)]
        else:
            self.control = dist.new_group(backend="gloo", timeout=self.timeout)
            if not self._owns_init:
                from idla.runtime.collectives import all_gather_json

                rows = all_gather_json({"report": self.fleet[0].to_json()}, group=self.control)
                self.fleet = settle_shared_gpus(
                    [DeviceReport.from_json(str(r["report"])) for r in rows])
            _PLANES[id(world)] = (world, self.control, self.fleet)
        if not self._owns_init:
            self.backend = _script_backend(str(dist.get_backend()), self.fleet)
        mine = self.fleet[self.rank].device
        if self.backend == "nccl" and not mine.startswith("cuda"):
            raise ConfigError(
                f"rank {self.rank} computes on {mine} but the process group runs NCCL, "
                "which needs a GPU on every rank; initialise it with gloo (or let idla do it)")

    def _stages(self) -> bool:
        """Whether data-plane tensors on this rank's device cross a host buffer: a GPU rank
        on a gloo data plane."""
        return self.world_size > 1 and self.backend != "nccl" and self.device.type == "cuda"

    @property
    def staged_ops(self) -> int:
        """Data-plane operations that went through a host copy so far."""
        return self._staging.staged_ops

    def describe_fleet(self) -> str:
        """Every rank's device and the data-plane backend, e.g. "gloo: 0:cuda:0 1:cpu"."""
        return f"{self.backend}: {describe_fleet(self.fleet)}"

    def subgroup(self, ranks: Sequence[int]) -> dist.ProcessGroup | None:
        """A cached data-plane group over `ranks`; every rank must ask for the same groups in
        the same order (torch.distributed's rule for new_group). None: the default group."""
        key = tuple(sorted(ranks))
        if len(key) == self.world_size:
            return None
        if key not in self._subgroups:
            self._subgroups[key] = dist.new_group(list(key)) if self.world_size > 1 else None
        return self._subgroups[key]

    # The data plane: tensors on `device`.

    def all_reduce(
        self, tensor: torch.Tensor, ranks: Sequence[int] | None = None
    ) -> Work | None:
        """Start a sum all-reduce over `ranks` (all by default); None when there is no peer."""
        if self.world_size == 1 or (ranks is not None and len(ranks) < 2):
            return None
        group = self.subgroup(ranks) if ranks is not None else None
        return self._staging.run(
            tensor, lambda t: dist.all_reduce(t, group=group, async_op=True), back=True)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [tensor.clone()]
        host = self._staging.to_host(tensor)
        out = [torch.empty_like(host) for _ in range(self.world_size)]
        dist.all_gather(out, host)
        return [t.to(tensor.device) for t in out] if host is not tensor else out

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """Rank `src`'s `tensor` into every rank's `tensor`, in place."""
        if self.world_size == 1:
            return
        work = self._staging.run(
            tensor, lambda t: dist.broadcast(t, src=src, async_op=True), back=self.rank != src)
        self.wait(work)

    def isend(self, tensor: torch.Tensor, dst: int) -> Work:
        return self._staging.run(tensor, lambda t: dist.isend(t, dst), back=False)

    def irecv(self, tensor: torch.Tensor, src: int) -> Work:
        return self._staging.run(tensor, lambda t: dist.irecv(t, src), back=True, copy_in=False)

    def wait(self, work: Work) -> None:
        """Wait for `work`; on gloo at most the group timeout, because gloo's own timeouts do not
        cover every wait (a peer cut off mid-collective left survivors blocked for minutes). On
        nccl a timeout would make the CPU wait for the GPU, so its plain stream wait is kept:
        the host does not learn when it completes (`idla.profile.clock` measures that)."""
        if self.backend == "nccl":
            work.wait()
        else:
            work.wait(self.timeout)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.control)

    # The control plane: CPU tensors, gloo, all ranks.

    def control_all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (a CPU tensor, same shape everywhere), in rank order."""
        _require_cpu(tensor)
        if self.world_size == 1:
            return [tensor.clone()]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.control)
        return out

    def control_all_reduce(self, tensor: torch.Tensor) -> Work | None:
        """Start a sum all-reduce of a CPU tensor over all ranks; None without peers."""
        _require_cpu(tensor)
        if self.world_size == 1:
            return None
        return dist.all_reduce(tensor, group=self.control, async_op=True)

    def control_broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """Rank `src`'s CPU `tensor` into every rank's, in place."""
        _require_cpu(tensor)
        if self.world_size > 1:
            dist.broadcast(tensor, src=src, group=self.control)

    def control_isend(self, tensor: torch.Tensor, dst: int) -> Work:
        _require_cpu(tensor)
        work = dist.isend(tensor, dst, group=self.control)
        assert work is not None  # only None for ranks outside the group, never here
        return work

    def control_irecv(self, tensor: torch.Tensor, src: int) -> Work:
        _require_cpu(tensor)
        work = dist.irecv(tensor, src, group=self.control)
        assert work is not None
        return work

    def close(self, together: bool = False) -> None:
        """Release the process group (when this Group created it). `together`: first wait
        for every rank on the control plane, so none tears down its connections while a peer
        is still finishing a collective with it (only where every rank is known to be alive
        and closing, as at the end of `Agent.close`)."""
        if self._owns_init and dist.is_initialized():
            if together and self.control is not None:
                dist.barrier(group=self.control)
            _PLANES.pop(id(dist.group.WORLD), None)
            dist.destroy_process_group()
            self._owns_init = False


def _require_cpu(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cpu":
        raise ValueError(f"a control-plane tensor must be on the CPU, got one on {tensor.device}")

