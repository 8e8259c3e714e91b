"""Ranks agree on the job before they exchange anything: `agree_on_job`.

A global batch that differs between ranks made the first step hang (each rank waited for
collectives of another size); a parameter of another shape could hang or crash inside gloo's
broadcast. So the agent first compares a digest of what must match job-wide (`JOB_WIDE_FIELDS`
of `AgentConfig`, the dataset's length, every parameter's and buffer's name, shape, dtype and
trainability) in one all-gather of two integers; only when the digests differ does a second
exchange carry each rank's description as JSON bytes (never pickle), so that every rank raises
the same `ConfigError` naming what differs and on which ranks.

Fields that may differ per rank (`PER_RANK_FIELDS`): ``max_local_batch`` (each rank's memory
cap, gathered by the agent) and ``history_steps`` (how much local history this rank's report
keeps).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from idla.agent.config import AgentConfig
from idla.errors import ConfigError
from idla.plan.planner import PlannerConfig
from idla.runtime.digest import bytes_digest
from idla.runtime.group import Group

JOB_WIDE_FIELDS = (
    "global_batch_size",  # sizes every collective of a step
    "seed",  # the data order: another seed means samples seen twice or never
    "rebalance", "nan_drop_after", "leaf_ratio", "initial_shares", "planner",  # the plan each
    # rank computes on its own from the same statistics must be the same plan
    "check_every_steps",  # when the replica check's collective runs
    "replica_check", "replica_tolerance",  # its further collectives, and one verdict for all
    "bucket_cap_bytes", "nan_guard",  # bucket layout and when buckets are sent
    "compress", "error_feedback", "min_compress_numel",  # what travels, in which layout
    "buffers",  # the buffers' collective after every step
    "min_local_batch",  # part of the plan
)
"""`AgentConfig` fields every rank must hold alike."""

PER_RANK_FIELDS = ("max_local_batch", "history_steps")
"""`AgentConfig` fields that may legitimately differ between ranks."""

MAX_DESCRIPTION_BYTES = 64 * 1024 * 1024
"""A peer's description longer than this is not fetched (its length is checked before any
allocation); the error then names only the differing digests."""

MAX_CLAUSES = 6
"""Differences named in one error; more are counted."""


def job_description(config: AgentConfig, model: nn.Module, dataset_samples: int) -> dict[str, Any]:
    """What must be equal on every rank, as plain JSON-ready values."""
    described: dict[str, Any] = {}
    for name in JOB_WIDE_FIELDS:
        value = getattr(config, name)
        described[name] = dataclasses.asdict(value) if isinstance(value, PlannerConfig) else value
    described["dataset_samples"] = dataset_samples
    described["parameters"] = [
        [name, list(p.shape), str(p.dtype), bool(p.requires_grad)]
        for name, p in model.named_parameters()
    ]
    described["buffers"] = [[name, list(b.shape), str(b.dtype), True]
                            for name, b in model.named_buffers()]
    return described


def description_digest(encoded: bytes) -> int:
    """A signed 64-bit digest of a JSON description."""
    return bytes_digest(encoded)


def _ranks_with(values: Sequence[Any]) -> str:
    """'rank 0 has 512, rank 1 has 256' for the ranks whose value differs from rank 0's."""
    parts = [f"rank 0 has {values[0]!r}"]
    parts += [f"rank {r} has {v!r}" for r, v in enumerate(values) if r and v != values[0]]
    return ", ".join(parts)


def _tensor_differences(kind: str, lists: Sequence[Sequence[Sequence[Any]]]) -> list[str]:
    """The first difference of each rank's parameter (or buffer) list from rank 0's."""
    clauses = []
    reference = lists[0]
    for rank, entries in enumerate(lists):
        if rank == 0 or entries == reference:
            continue
        if len(entries) != len(reference):
            clauses.append(f"rank {rank} has {len(entries)} {kind}s, rank 0 has "
                           f"{len(reference)}")
            continue
        index, (mine, theirs) = next(
            (i, pair) for i, pair in enumerate(zip(entries, reference, strict=True))
            if pair[0] != pair[1])
        name, shape, dtype, trainable = mine
        if name != theirs[0]:
            clauses.append(f"{kind} {index} is {name!r} on rank {rank}, {theirs[0]!r} on rank 0")
        elif shape != theirs[1]:
            clauses.append(f"{kind} {index} {name!r} has shape {tuple(shape)} on rank {rank}, "
                           f"{tuple(theirs[1])} on rank 0")
        elif dtype != theirs[2]:
            clauses.append(f"{kind} {index} {name!r} has dtype {dtype} on rank {rank}, "
                           f"{theirs[2]} on rank 0")
        else:
            state = {True: "trainable", False: "frozen (requires_grad=False)"}
            clauses.append(f"{kind} {index} {name!r} is {state[trainable]} on rank {rank}, "
                           f"{state[theirs[3]]} on rank 0")
    return clauses


def describe_difference(descriptions: Sequence[Mapping[str, Any]]) -> str | None:
    """What differs between the ranks' descriptions, compared with rank 0's, or None when they
    are all equal. Identical on every rank given the same descriptions."""
    clauses = []
    for key in sorted(set().union(*descriptions)):
        values = [d.get(key) for d in descriptions]
        if all(v == values[0] for v in values):
            continue
        if key in ("parameters", "buffers"):
            clauses += _tensor_differences(key[:-1], [v or [] for v in values])
        elif key == "dataset_samples":
            clauses.append(f"the dataset's length differs: {_ranks_with(values)} samples")
        else:
            clauses.append(f"{key} differs: {_ranks_with(values)}")
    if not clauses:
        return None
    clauses.sort(key=_clause_order)
    more = len(clauses) - MAX_CLAUSES
    named = "; ".join(clauses[:MAX_CLAUSES]) + (f"; and {more} more" if more > 0 else "")
    return f"the ranks disagree on the job: {named}"


def _clause_order(clause: str) -> tuple[int, str]:
    """Config fields first (in `JOB_WIDE_FIELDS` order), then the data, then the tensors."""
    head = clause.split(" ", 1)[0]
    order = [*JOB_WIDE_FIELDS, "the", "rank", "parameter", "buffer"]
    return (order.index(head) if head in order else len(order), clause)


def agree_on_job(description: Mapping[str, Any], group: Group) -> None:
    """Stop on every rank, with the same message, unless every rank's `description` is equal.

    Collectives: one all-gather of (digest, length) when the ranks agree; when they do not, one
    more all-gather of the JSON descriptions, padded to the longest.

    Raises:
        ConfigError: Naming each differing field, and on which ranks it differs.
    """
    if group.world_size == 1:
        return
    encoded = json.dumps(description, sort_keys=True).encode()
    mine = torch.tensor([description_digest(encoded), len(encoded)], dtype=torch.int64)
    gathered = [t.tolist() for t in group.control_all_gather(mine)]
    if all(g[0] == gathered[0][0] for g in gathered):
        return
    longest = max(length for _, length in gathered)
    if longest > MAX_DESCRIPTION_BYTES:
        raise ConfigError("the ranks disagree on the job (global batch, seed, model or other "
                          f"job-wide settings); digests {[d for d, _ in gathered]}")
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    texts = [t[:length].numpy().tobytes().decode()
             for t, (_, length) in zip(group.control_all_gather(padded), gathered, strict=True)]
    message = describe_difference([json.loads(text) for text in texts])
    raise ConfigError(message or "the ranks disagree on the job, but their descriptions match")
