"""Resume a run of the `Agent` exactly from a checkpoint (`runtime/checkpoint.py`).

`save_agent` and `restore_agent` add what a multi-rank job needs on top of the files: every
rank's own state (compression residuals differ per rank, as does the torch RNG), gathered before
rank 0 writes and handed back to each rank on load. A run resumes at the global batch it was
saved before (`Agent.batches(epoch, start_batch)`), with the same world size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from idla.errors import ConfigError
from idla.runtime.checkpoint import Checkpoint, restore_rng, save_checkpoint
from idla.runtime.collectives import all_gather_json
from idla.runtime.digest import bytes_digest

if TYPE_CHECKING:
    from idla.agent.agent import Agent


def _gather_per_rank(agent: Agent, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every rank's `tensors` as ``rank<r>.<key>`` (collective; same keys and shapes on all
    ranks, which is checked first). Cost: world_size copies of `tensors` on every rank."""
    keys = sorted(tensors)
    layout = ";".join(f"{k}:{tuple(tensors[k].shape)}:{tensors[k].dtype}" for k in keys)
    digest = bytes_digest(layout.encode())
    if len({int(t.item()) for t in agent.group.control_all_gather(
            torch.tensor([digest], dtype=torch.int64))}) != 1:
        raise ConfigError("cannot checkpoint: ranks hold differently shaped per-rank state")
    out: dict[str, Tensor] = {}
    for key in keys:
        parts = agent.group.control_all_gather(tensors[key].cpu().contiguous())
        out.update({f"rank{r}.{key}": part for r, part in enumerate(parts)})
    return out


def save_agent(
    directory: str | Path, agent: Agent, *, epoch: int, batch_in_epoch: int = 0
) -> Path:
    """Checkpoint a run before global batch `batch_in_epoch` of `epoch` (0: at its start).

    Collective: every rank calls it. Each rank's compression state and torch RNG state are
    gathered (they differ per rank: residuals hold what that rank's codec dropped); rank 0
    writes; the others wait for its outcome and return the directory it wrote (a re-save of a
    step has a fresh name). Cost: one all-gather of the per-rank state.

    Raises:
        ConfigError: On every rank, with rank 0's reason, if rank 0 could not write the
            checkpoint, or if the step is open (micro-batches under ``no_sync`` not exchanged).
    """
    if agent.accumulating:
        raise ConfigError("cannot checkpoint in the middle of a step: micro-batches under "
                          "agent.no_sync() have not been exchanged yet")
    per_rank: dict[str, Tensor] = {"rng.torch": torch.get_rng_state(),
                                   "rng.cuda": cuda_rng_state(agent.group.device)}
    per_rank.update({f"sync.{k}": v for k, v in agent.sync.state_dict().items()})
    gathered = _gather_per_rank(agent, per_rank)
    outcome = {"path": "", "failure": ""}
    if agent.rank == 0:
        try:
            outcome["path"] = str(save_checkpoint(
                directory, model=agent.model, optimizer=agent.optimizer, step=agent.step,
                epoch=epoch, batch_in_epoch=batch_in_epoch, shares=list(agent.shares),
                extra_tensors=gathered))
        except (ConfigError, OSError) as error:
            outcome["failure"] = str(error) or type(error).__name__
    written = all_gather_json(outcome, group=agent.group.control)[0]  # doubles as the barrier
    if written["failure"] or not written["path"]:
        raise ConfigError(written["failure"] or "rank 0 could not write the checkpoint")
    return Path(written["path"])


def restore_agent(agent: Agent, checkpoint: Checkpoint) -> tuple[int, int]:
    """Load a `save_agent` checkpoint into a freshly built agent; return where to continue:
    (epoch, first global batch), for `agent.batches(epoch, start_batch)`.

    Every rank calls it with a checkpoint it loaded itself. Restores the model, the optimizer,
    ``agent.step``, ``agent.shares``, this rank's compression state and RNG states.

    Raises:
        ConfigError: The checkpoint does not fit this model or job.
    """
    where = f"checkpoint {checkpoint.path}"
    check_shares(checkpoint.shares, agent.world_size, agent.config.global_batch_size, where)
    prefix = f"rank{agent.rank}."
    own = {k[len(prefix):]: v for k, v in checkpoint.extra_tensors.items()
           if k.startswith(prefix)}
    sync_state = {k[len("sync."):]: v for k, v in own.items() if k.startswith("sync.")}
    if sync_state and not agent.sync.state_dict():  # an exchange that holds no state
        raise ConfigError(f"{where} holds compression state but this agent compresses nothing")
    try:
        agent.model.load_state_dict(checkpoint.model_state)
        if agent.optimizer is not None:
            agent.optimizer.load_state_dict(checkpoint.optimizer_state)
        if sync_state:
            agent.sync.load_state_dict(sync_state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(f"{where} does not fit this job: {first_line or type(error).__name__}"
                          ) from None
    agent.step = checkpoint.step
    agent.shares = list(checkpoint.shares)
    restore_rng(checkpoint)
    if "rng.torch" in own:
        torch.set_rng_state(own["rng.torch"])
    if "rng.cuda" in own:
        set_cuda_rng_state(own["rng.cuda"], agent.group.device)
    return checkpoint.epoch, checkpoint.batch_in_epoch


def check_shares(shares: list[int], world_size: int, global_batch_size: int, where: str) -> None:
    """A checkpoint's shares fit this job: one integer ≥ 0 per rank, summing to the global batch.

    Raises:
        ConfigError: One line starting with `where` saying which condition fails.
    """
    if len(shares) != world_size:
        raise ConfigError(f"{where} was taken with {len(shares)} ranks, this job has "
                          f"{world_size}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shares):
        raise ConfigError(f"{where} holds shares {shares}; each must be an integer ≥ 0")
    if sum(shares) != global_batch_size:
        raise ConfigError(f"{where} holds shares {shares} summing to {sum(shares)}, this job's "
                          f"global batch is {global_batch_size}")


CUDA_RNG_BYTES = 64
"""Room for one rank's CUDA generator state in a checkpoint: its length, then its bytes (the
Philox state is 16), zeros on a CPU rank, so every rank's per-rank state has one shape."""


def cuda_rng_state(device: torch.device) -> Tensor:
    """This rank's CUDA generator state as (CUDA_RNG_BYTES,) uint8: [length, state..., 0...];
    all zeros on a CPU rank."""
    out = torch.zeros(CUDA_RNG_BYTES, dtype=torch.uint8)
    if device.type == "cuda":
        state = torch.cuda.get_rng_state(device)
        if state.numel() >= CUDA_RNG_BYTES:
            raise ConfigError(f"the CUDA generator state has {state.numel()} bytes; "
                              f"checkpoints hold {CUDA_RNG_BYTES - 1}")
        out[0] = state.numel()
        out[1:1 + state.numel()] = state
    return out


def set_cuda_rng_state(saved: Tensor, device: torch.device) -> None:
    """Restore what `cuda_rng_state` saved, on a CUDA rank; a CPU rank (or a state saved on
    one) has nothing to restore."""
    length = int(saved[0])
    if device.type == "cuda" and length > 0:
        torch.cuda.set_rng_state(saved[1:1 + length].clone(), device)
