"""Compressed synchronous gradient exchange through a stateless codec, with error feedback.

Same contract as `GradientSync` (`idla.sync.exchange.GradientExchange`): every rank's gradient
is already weighted by its share of the global batch (loss × b/B), so the *sum* over ranks is
the global gradient. Here large tensors are compressed before they leave the rank:

- ALLREDUCE codecs (none, fp16, random-k with shared indices) are linear: their payloads are
  summed by one all-reduce and decompressed once.
- ALLGATHER codecs (top-k, scaled sign) are not: every rank's payload is gathered, and each
  rank decompresses and adds them in rank order, so all replicas compute the same sum (in
  float32, rounded once to a bf16 or fp16 model's dtype).

Small tensors travel uncompressed with the statistics (`idla.sync.size_rule`). PowerSGD is
not a stateless codec exchange: it has its own (`idla.sync.powersgd`); `compressed_exchange`
builds whichever a codec needs.

Cost per step (N ranks, ring collectives): the small tensors and statistics as a plain
all-reduce; plus 2(N-1)/N × payload for ALLREDUCE codecs or (N-1) × payload for ALLGATHER
codecs. Error feedback keeps one fp32 residual per compressed tensor (memory = the compressed
part of the model, in float32). A bf16 or fp16 model's gradient buffer and plain part are in its
own dtype (`idla.sync.size_rule`); the codecs compute in float32.

The hub/leaf topology is not used with compression: compressed payloads are small enough that
the ring's per-phase stall on a slow member is the cost that remains, and a hub would have to
re-compress what it sums.
"""

from __future__ import annotations

import torch

from idla.compress import Codec, PowerSGD, Transport, pack, unpack
from idla.sync.powersgd import PowerSGDExchange
from idla.sync.size_rule import CompressedSetup, SplitExchange


class CodecExchange(SplitExchange):
    """The compressed exchange of one step through an ALLREDUCE or ALLGATHER codec."""

    def __init__(self, setup: CompressedSetup, codec: Codec, steps_done: int = 0) -> None:
        """`setup.seed` and the step count seed random-k's shared positions."""
        if codec.transport not in (Transport.ALLREDUCE, Transport.ALLGATHER):
            raise ValueError(f"{codec.name} is not a stateless codec; see compressed_exchange")
        super().__init__(setup, codec, steps_done)

    def _exchange_large(self) -> None:
        if self.codec.transport is Transport.ALLREDUCE:
            self._allreduce_codec()
        else:
            self._allgather_codec()

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
        sums = [_float32_sum(grad) for _, grad in self.split.large]
        for buffer in gathered:  # rank order: the same additions in the same order everywhere
            parts = unpack(buffer, flat_spec)
            start = 0
            for index, total in enumerate(sums):
                count = len(specs[index])
                self.codec.decompress_add_(total, parts[start : start + count],
                                           seed=self._seed(index))
                start += count
        for (_, grad), total in zip(self.split.large, sums, strict=True):
            if total is not grad:
                grad.copy_(total)  # one rounding to the parameters' dtype, after the sum


def _float32_sum(grad: torch.Tensor) -> torch.Tensor:
    """A zeroed float32 tensor to sum the ranks' decompressed payloads in: ``grad`` itself
    when it is float32, else a new one (a bf16 sum would round after every rank's term)."""
    if grad.dtype == torch.float32:
        return grad.zero_()
    return torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)


CompressedExchange = CodecExchange | PowerSGDExchange


def compressed_exchange(
    setup: CompressedSetup, codec: Codec, steps_done: int = 0
) -> CompressedExchange:
    """The exchange `codec` needs: PowerSGD's own (stateful), or the stateless codecs' one."""
    if isinstance(codec, PowerSGD):
        return PowerSGDExchange(setup, codec, steps_done)
    return CodecExchange(setup, codec, steps_done)
