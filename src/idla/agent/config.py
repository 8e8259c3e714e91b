"""`AgentConfig`: how the agent plans and checks (every field has a default but the batch)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

from idla.agent.buffers import BufferMode
from idla.agent.replicas import DEFAULT_TOLERANCE, ReplicaCheck
from idla.compress import Codec, parse_codec
from idla.errors import ConfigError
from idla.plan.job_planner import check_min_share
from idla.plan.planner import PlannerConfig


@dataclass(kw_only=True, slots=True)
class AgentConfig:
    """How the agent plans and checks; every field has a default except the global batch."""

    global_batch_size: int = field(metadata={"flag": "--global-batch", "parse": "positive_int",
                                             "metavar": "B"})
    """Samples per optimizer step, summed over all workers."""
    seed: int = field(default=0, metadata={"metavar": "S"})
    """Seeds the data order (one permutation per epoch); the same seed gives the same run."""
    rebalance: bool = True
    """Re-plan shares from measurements; off (False) keeps equal shares, as DDP does."""
    check_every_steps: int = 50
    """Compare a hash of the parameters across ranks every this many steps (0: never)."""
    replica_check: str = field(default="exact", metadata={"metavar": "MODE"})
    """How the replica check compares the ranks: "exact" (bit for bit) or "tolerance" (for mixed
    CPU/GPU fleets, whose optimizer arithmetic rounds differently: tensors may differ by up to
    replica_tolerance); see `idla.agent.replicas`."""
    replica_tolerance: float = field(default=DEFAULT_TOLERANCE, metadata={"metavar": "REL"})
    """With replica_check "tolerance": the largest accepted difference of a tensor's summary
    statistics from rank 0's, relative to the tensor's largest magnitude (unitless)."""
    bucket_cap_bytes: int = 4 * 1024 * 1024
    """Gradient bytes per all-reduce bucket. Smaller buckets start communicating earlier in
    backward, but each collective has a fixed cost: on CPU-starved gloo workers splitting the
    demo CNN's 0.6 MB in two buckets measured 5 % slower than one, so the default keeps small
    models in one bucket. Buckets start during backward only with nan_guard off."""
    nan_guard: bool = True
    """Leave a rank whose loss or gradient is not finite out of the step's weighted sum
    (the others' samples are re-weighted); holds buckets until backward ends to check them."""
    nan_drop_after: int = 3
    """A rank non-finite this many steps in a row gets no more samples (0: never drop)."""
    leaf_ratio: float = 1.8
    """A worker whose communication costs this many times the cheapest one's leaves the ring."""
    max_local_batch: int | None = None
    """This rank's memory cap on its local batch (None: no cap)."""
    initial_shares: list[int] | None = None
    """Local batch per rank before anything is measured (None: equal shares); each 0 or at
    least `min_local_batch`."""
    min_local_batch: int | None = None
    """Fewest samples any plan gives a rank that gets samples at all (ranks get 0 or at least
    this; a batch smaller than it goes whole to one rank). None: 2 when the model holds a
    BatchNorm layer in training mode (it cannot train on 1 sample), else 1."""
    buffers: str = "broadcast"
    """How the replicas' buffers (BatchNorm statistics) agree after each step: "broadcast"
    (the buffers of the lowest rank with the most samples, like DDP's broadcast_buffers),
    "average" (float buffers: the share-weighted mean), or "none" (left per rank, not checked);
    see `idla.agent.buffers`."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """How measurements become a plan: fit memory, noise and hysteresis."""
    compress: str = field(default="none", metadata={"metavar": "CODEC"})
    """Gradient codec: "none" (exact, bucketed, hub/leaf topology), "fp16", "topk:0.01",
    "randk:0.01", "sign", "powersgd:2", or "auto" (chosen from measured link and compute)."""
    error_feedback: bool = True
    """Carry what the codec dropped into the next step (per tensor); turn off only to compare."""
    min_compress_numel: int = 1024
    """Tensors with fewer elements travel uncompressed (with the statistics)."""
    history_steps: int = 10_000
    """Steps `report()["history"]` keeps (shares, loss, compute seconds per rank, topology,
    samples/s); a longer run keeps the last this many, and the report's `history_first_step`
    says where they start. Memory: about (2 × world size + 4) numbers per step."""

    @property
    def codec(self) -> Codec | None:
        """`compress` parsed: the codec, or None for "auto" (the agent chooses one)."""
        return parse_compress(self.compress)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be at least 1, got {self.global_batch_size}")
        if self.check_every_steps < 0:
            raise ConfigError("check_every_steps must be 0 or more")
        checks = [c.value for c in ReplicaCheck]
        if self.replica_check not in checks:
            raise ConfigError(f"replica_check must be one of {', '.join(map(repr, checks))}, "
                              f"got {self.replica_check!r}")
        if not 0.0 < self.replica_tolerance < math.inf:  # also rejects NaN
            raise ConfigError(f"replica_tolerance must be a positive number, got "
                              f"{self.replica_tolerance!r}")
        if self.bucket_cap_bytes < 1:
            raise ConfigError("bucket_cap_bytes must be positive")
        if self.leaf_ratio <= 1.0:
            raise ConfigError("leaf_ratio must be greater than 1")
        if self.max_local_batch is not None and self.max_local_batch < 0:
            raise ConfigError("max_local_batch must be 0 or more")
        parse_compress(self.compress)  # raises ConfigError naming the valid forms
        modes = [m.value for m in BufferMode]
        if self.buffers not in modes:
            raise ConfigError(f"buffers must be one of {', '.join(map(repr, modes))}, "
                              f"got {self.buffers!r}")
        if self.min_local_batch is not None and self.min_local_batch < 1:
            raise ConfigError(f"min_local_batch must be at least 1 or None, got "
                              f"{self.min_local_batch}")
        if self.min_compress_numel < 1:
            raise ConfigError("min_compress_numel must be at least 1")
        if self.history_steps < 1:
            raise ConfigError(f"history_steps must be at least 1, got {self.history_steps}")
        shares = self.initial_shares
        if shares is not None and (
            any(s < 0 for s in shares) or sum(shares) != self.global_batch_size
        ):
            raise ConfigError(
                f"initial_shares {shares} must be non-negative and sum to the global batch "
                f"{self.global_batch_size}"
            )
        if shares is not None and self.min_local_batch is not None:
            check_min_share(shares, min(self.min_local_batch, self.global_batch_size))


def _is_int(value: Any) -> bool:
    """An integer of any kind (numpy's included), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_TYPE_CHECKS = {
    "int": ("an integer", _is_int),
    "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    "bool": ("True or False", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list[int]": ("a list of integers",
                  lambda v: isinstance(v, list | tuple) and all(_is_int(x) for x in v)),
    "PlannerConfig": ("a PlannerConfig", lambda v: isinstance(v, PlannerConfig)),
}


def _check_types(config: AgentConfig) -> None:
    """Every field of the type it declares, so that a float or str global batch stops here
    rather than as a TypeError steps later (a bool is not taken for an integer); other
    integer types (numpy's) become Python integers."""
    for spec in fields(config):
        value = getattr(config, spec.name)
        declared = str(spec.type)
        optional = declared.endswith(" | None")
        if value is None and optional:
            continue
        kind = declared.removesuffix(" | None")
        what, ok = _TYPE_CHECKS[kind]
        if not ok(value):
            none = " or None" if optional else ""
            raise ConfigError(f"{spec.name} must be {what}{none}, got {value!r} "
                              f"({type(value).__name__})")
        if kind == "int" and type(value) is not int:  # numpy's: JSON reports need Python's
            setattr(config, spec.name, int(value))


def parse_compress(spec: str) -> Codec | None:
    """An `AgentConfig.compress` value parsed: the codec, or None for "auto".

    Raises:
        ConfigError: If `spec` is neither "auto" nor a codec, naming the valid forms.
    """
    if spec == "auto":
        return None
    try:
        return parse_codec(spec)
    except ConfigError as error:
        raise ConfigError(f"compress: {error}, or auto") from None
