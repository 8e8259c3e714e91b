"""The process group: ranks, backend and the collectives the strategies use.

Initialised from the environment the way torchrun sets it (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); with no such environment it is a group of one whose collectives do nothing, so
the same code path serves one process and N.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from idla.errors import ConfigError

Work = dist.Work


def _int_env(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None


def pick_backend(local_world_size: int) -> str:
    """nccl when every local process has a GPU of its own, gloo otherwise (NCCL refuses two
    ranks on one GPU)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if dist.is_nccl_available() and 0 < local_world_size <= gpus else "gloo"


class Group:
    """This process's view of the job: its rank, the world size and cached sub-groups."""

    def __init__(
        self,
        timeout_s: float = 120.0,
        *,
        store: dist.Store | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """From torchrun's environment, or (elastic re-forms) from `store`, `rank` and
        `world_size`, with `timeout_s` bounding how long a collective waits for a peer."""
        self.world_size = _int_env("WORLD_SIZE", 1) if world_size is None else world_size
        self.rank = _int_env("RANK", 0) if rank is None else rank
        self.local_rank = _int_env("LOCAL_RANK", self.rank)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"wrong world size: RANK={self.rank} does not fit WORLD_SIZE={self.world_size}"
            )
        self.timeout = timedelta(seconds=timeout_s)
        self._owns_init = False
        self.backend = "none"
        if self.world_size > 1:
            if not dist.is_initialized():
                self.backend = pick_backend(_int_env("LOCAL_WORLD_SIZE", self.world_size))
                where: dict[str, Any] = (
                    {"store": store} if store is not None
                    else {"init_method": os.environ.get("IDLA_INIT_METHOD", "env://")})
                dist.init_process_group(
                    self.backend,
                    rank=self.rank,
                    world_size=self.world_size,
                    timeout=timedelta(seconds=timeout_s),
                    **where,
                )
                self._owns_init = True
            else:
                self.backend = str(dist.get_backend())
            if dist.get_world_size() != self.world_size:
                raise ConfigError(
                    f"wrong world size: WORLD_SIZE={self.world_size} but the process group "
                    f"has {dist.get_world_size()} ranks"
                )
        self.device = self._pick_device()
        self._subgroups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}

    def _pick_device(self) -> torch.device:
        if self.backend in ("nccl", "none") and torch.cuda.is_available():
            index = self.local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def subgroup(self, ranks: Sequence[int]) -> dist.ProcessGroup | None:
        """A cached process group over `ranks`; every rank must ask for the same groups in the
        same order (torch.distributed's rule for new_group). None means the default group."""
        key = tuple(sorted(ranks))
        if len(key) == self.world_size:
            return None
        if key not in self._subgroups:
            self._subgroups[key] = dist.new_group(list(key)) if self.world_size > 1 else None
        return self._subgroups[key]

    def all_reduce(
        self, tensor: torch.Tensor, ranks: Sequence[int] | None = None
    ) -> Work | None:
        """Start a sum all-reduce over `ranks` (all by default); None when there is no peer."""
        if self.world_size == 1 or (ranks is not None and len(ranks) < 2):
            return None
        group = self.subgroup(ranks) if ranks is not None else None
        return dist.all_reduce(tensor, group=group, async_op=True)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [tensor.clone()]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return out

    def isend(self, tensor: torch.Tensor, dst: int) -> Work:
        work = dist.isend(tensor, dst)
        assert work is not None  # only None for ranks outside the group, never here
        return work

    def irecv(self, tensor: torch.Tensor, src: int) -> Work:
        work = dist.irecv(tensor, src)
        assert work is not None
        return work

    def wait(self, work: Work) -> None:
        """Wait for `work`; on gloo at most the group timeout, because gloo's own timeouts do not
        cover every wait (a peer cut off mid-collective left survivors blocked for minutes). On
        nccl a timeout would make the CPU wait for the GPU, so its plain stream wait is kept."""
        if self.backend == "nccl":
            work.wait()
        else:
            work.wait(self.timeout)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self._owns_init and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_init = False
