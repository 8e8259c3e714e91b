"""Build the synchronous gradient exchange an `AgentConfig` asks for, and describe it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from idla.agent.config import AgentConfig
from idla.compress import parse_codec
from idla.runtime.group import Group
from idla.runtime.stats import Stat
from idla.sync.allreduce import GradientSync
from idla.sync.autocodec import CodecPolicy
from idla.sync.compressed import CompressedSync


def make_sync(
    config: AgentConfig, params: Sequence[nn.Parameter], group: Group, stats_width: int
) -> tuple[GradientSync | CompressedSync, CodecPolicy | None]:
    """"none": the exact bucketed all-reduce (with hub/leaf topology); a codec: compressed
    sync; "auto": compressed sync whose codec a `CodecPolicy` chooses and re-checks."""
    if config.compress == "none":
        return GradientSync(params, group, stats_width, config.bucket_cap_bytes,
                            late_column=Stat.LATE_S, early_launch=not config.nan_guard), None
    codec = parse_codec("none" if config.compress == "auto" else config.compress)
    sync = CompressedSync(params, group, stats_width, codec, config.error_feedback,
                          config.min_compress_numel, config.seed)
    policy = CodecPolicy(sync, group) if config.compress == "auto" else None
    return sync, policy


def compression_report(
    sync: GradientSync | CompressedSync, policy: CodecPolicy | None
) -> dict[str, Any]:
    """The codec in use, why, and the gradient bytes this rank contributes per step."""
    if isinstance(sync, GradientSync):
        numel = sum(p.numel() for p in sync.params)
        return {"codec": "none", "error_feedback": False, "payload_bytes_per_step": 4 * numel,
                "reason": "compress='none': exact fp32 all-reduce", "decisions": []}
    reason = f"fixed by configuration (compress='{sync.codec.name}')"
    if policy is not None:
        reason = policy.choice.reason if policy.choice else "probing the link and compute"
    return {
        "codec": sync.codec.name,
        "error_feedback": sync.error_feedback is not None,
        "payload_bytes_per_step": sync.payload_bytes,
        "reason": reason,
        "decisions": policy.decisions if policy is not None else [],
    }
