"""Build the synchronous gradient exchange an `AgentConfig` asks for."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from idla.agent.config import AgentConfig
from idla.compress import ErrorFeedback
from idla.runtime.group import Group
from idla.runtime.stats import Stat
from idla.sync.allreduce import GradientSync
from idla.sync.autocodec import AutoCodecExchange
from idla.sync.compressed import compressed_exchange
from idla.sync.exchange import GradientExchange
from idla.sync.size_rule import CompressedSetup


def make_sync(
    config: AgentConfig, params: Sequence[nn.Parameter], group: Group, stats_width: int
) -> GradientExchange:
    """"none": the exact bucketed all-reduce (with hub/leaf topology); a codec: its compressed
    exchange (PowerSGD's own for "powersgd"); "auto": an exchange that chooses the codec from
    measurements and re-checks it; with one worker there is nothing to send, so "auto" is
    the exact exchange (a probe with a lossy codec would change a 1-process run)."""
    codec = config.codec
    alone = codec is None and group.world_size == 1
    if alone or (codec is not None and codec.name == "none"):
        reason = ("compress='auto' with one worker: nothing is sent, exact" if alone
                  else "compress='none': exact all-reduce in the parameters' dtype")
        return GradientSync(params, group, stats_width, config.bucket_cap_bytes,
                            late_column=Stat.LATE_S, early_launch=not config.nan_guard,
                            reason=reason)
    setup = CompressedSetup(params, group, stats_width,
                            ErrorFeedback() if config.error_feedback else None,
                            config.min_compress_numel, config.seed)
    if codec is None:
        return AutoCodecExchange(setup)
    return compressed_exchange(setup, codec)
