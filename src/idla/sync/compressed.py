"""Compressed synchronous gradient exchange through a stateless codec, with error feedback.

Same contract as `GradientSync` (`idla.sync.exchange.GradientExchange`): every rank's gradient
is already weighted by its share of the global batch (loss × b/B), so the *sum* over ranks is
the global gradient. Here large tensors are compressed before they leave the rank:

- ALLREDUCE codecs (none, fp16, random-k with shared indices) are linear: their payloads are
  summed by one all-reduce and decompressed once.
- ALLGATHER codecs (top-k, scaled sign) are not: every rank's payload is gathered, and each
  rank decompresses and adds them in rank order, so all replicas compute the same sum.

Small tensors travel uncompressed with the statistics (`idla.sync.size_rule`). PowerSGD is
not a stateless codec exchange: it has its own (`idla.sync.powersgd`); `compressed_exchange`
builds whichever a codec needs.

Cost per step (N ranks, ring collectives): the small tensors and statistics as a plain
all-reduce; plus 2(N-1)/N × payload for ALLREDUCE codecs or (N-1) × payload for ALLGATHER
codecs. Error feedback keeps one fp32 residual per compressed tensor (memory = the compressed
part of the model).

The hub/leaf topology is not used with compression: compressed payloads are small enough that
the ring's per-phase stall on a slow member is the cost that remains, and a hub would have to
re-compress what it sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from idla.compress import Codec, ErrorFeedback, PowerSGD, Transport, pack, unpack
from idla.plan.topology import Topology
from idla.runtime.group import Group
from idla.sync.powersgd import PowerSGDExchange
from idla.sync.size_rule import SizeRule, fixed_report


class CodecExchange:
    """The compressed exchange of one step through an ALLREDUCE or ALLGATHER codec."""

    supports_leaves = False

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: Group,
        stats_width: int,
        codec: Codec,
        *,
        error_feedback: ErrorFeedback | None,
        min_compress_numel: int = 1024,
        seed: int = 0,
        steps_done: int = 0,
    ) -> None:
        """`error_feedback`: the residuals, per tensor key (None: off); `seed` and the step
        count seed random-k's shared positions."""
        if codec.transport not in (Transport.ALLREDUCE, Transport.ALLGATHER):
            raise ValueError(f"{codec.name} is not a stateless codec; see compressed_exchange")
        self.group = group
        self.codec = codec
        self.error_feedback = error_feedback
        self.seed = seed
        self.split = SizeRule(params, group, stats_width, codec, min_compress_numel, steps_done)
        self.params = self.split.params
        self.grads = self.split.grads
        self.payload_bytes = self.split.payload_bytes
        self.views = self.split.views

    @property
    def steps_done(self) -> int:
        return self.split.steps_done

    def start_step(self, shares: Sequence[int]) -> None:
        self.split.start_step()

    def continue_step(self, shares: Sequence[int]) -> None:
        """Another micro-batch of the step: the buffer keeps accumulating; nothing to do."""

    def begin_backward(self, final: bool) -> None:
        """Claim the ``.grad`` fields; nothing leaves before `finish` either way."""
        self.views.claim()

    def drop_local_gradient(self) -> None:
        self.split.drop_local_gradient()

    def finish(self, stats_row: torch.Tensor) -> torch.Tensor:
        """Write this rank's statistics, exchange everything, return everybody's statistics;
        afterwards every ``.grad`` holds the (compressed) global gradient."""
        if self.codec.transport is Transport.ALLREDUCE:
            return self.split.finish(stats_row, self._allreduce_codec)
        return self.split.finish(stats_row, self._allgather_codec)

    def after_step(self, step: int, stats: Sequence[Sequence[float]]) -> None:
        """Nothing to learn: the codec is fixed."""

    def set_topology(self, topology: Topology) -> None:
        self.split.set_topology(topology)

    def _seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + self.split.steps_done) * 4099 + index

    def _compress_all(self) -> list[torch.Tensor]:
        """Every compressed tensor's payload, in order; error feedback remembers what each
        payload decompresses to."""
        payloads: list[torch.Tensor] = []
        for index, (key, grad) in enumerate(self.split.large):
            if self.error_feedback is None:
                payloads.extend(self.codec.compress(grad.clone(), seed=self._seed(index)))
                continue
            corrected = self.error_feedback.corrected(key, grad)
            payload = self.codec.compress(corrected, seed=self._seed(index))
            sent = self.codec.decompress(payload, grad.shape, seed=self._seed(index))
            self.error_feedback.update(key, corrected, sent)
            payloads.extend(payload)
        return payloads

    def _allreduce_codec(self) -> None:
        buffer = torch.cat(self._compress_all())  # one dtype per linear codec
        work = self.group.all_reduce(buffer)
        if work is not None:
            self.group.wait(work)
        offset = 0
        for index, (_, grad) in enumerate(self.split.large):
            parts = []
            for _, numel in self.codec.payload_spec(grad.shape):
                parts.append(buffer[offset : offset + numel])
                offset += numel
            grad.copy_(self.codec.decompress(parts, grad.shape, seed=self._seed(index)))

    def _allgather_codec(self) -> None:
        mine = pack(self._compress_all())  # (payload bytes,) uint8
        gathered = self.group.all_gather(mine)
        specs = [self.codec.payload_spec(grad.shape) for _, grad in self.split.large]
        flat_spec = [item for spec in specs for item in spec]
        for _, grad in self.split.large:
            grad.zero_()
        for buffer in gathered:  # rank order: the same additions in the same order everywhere
            parts = unpack(buffer, flat_spec)
            start = 0
            for index, (_, grad) in enumerate(self.split.large):
                count = len(specs[index])
                self.codec.decompress_add_(grad, parts[start : start + count],
                                           seed=self._seed(index))
                start += count

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Error-feedback residuals (``ef.<key>``) and the step counter that seeds random-k."""
        return self.split.state_dict(self.error_feedback)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict`'s output; shapes are checked against this model's tensors. A
        warm Q (``q.<key>``, saved while PowerSGD ran) is checked and dropped: a stateless
        codec has none, and a switch to PowerSGD starts from a fresh Q."""
        self.split.load_state_dict(state, self.error_feedback)

    def report(self) -> dict[str, Any]:
        return fixed_report(self.codec, self.error_feedback, self.payload_bytes)

    def close(self) -> None:
        """Nothing is left in flight after `finish`; the hooks go."""
        self.views.release()


CompressedExchange = CodecExchange | PowerSGDExchange


def compressed_exchange(
    params: Sequence[nn.Parameter],
    group: Group,
    stats_width: int,
    codec: Codec,
    *,
    error_feedback: ErrorFeedback | None,
    min_compress_numel: int = 1024,
    seed: int = 0,
    steps_done: int = 0,
) -> CompressedExchange:
    """The exchange `codec` needs: PowerSGD's own (stateful), or the stateless codecs' one."""
    if isinstance(codec, PowerSGD):
        return PowerSGDExchange(params, group, stats_width, codec, error_feedback=error_feedback,
                                min_compress_numel=min_compress_numel, seed=seed,
                                steps_done=steps_done)
    return CodecExchange(params, group, stats_width, codec, error_feedback=error_feedback,
                         min_compress_numel=min_compress_numel, seed=seed, steps_done=steps_done)
