"""Compressed synchronous gradient sync for uneven shares, with optional error feedback.

Same contract as `GradientSync` (the agent drives either): every rank's gradient is already
weighted by its share of the global batch (loss × b/B), so the *sum* over ranks is the global
gradient. Here large tensors are compressed before they leave the rank:

- ALLREDUCE codecs (none, fp16, random-k with shared indices) are linear: their payloads are
  summed by one all-reduce and decompressed once.
- ALLGATHER codecs (top-k, scaled sign) are not: every rank's payload is gathered, and each
  rank decompresses and adds them in rank order, so all replicas compute the same sum.
- PowerSGD (Vogels et al. 2019, rank r, one power iteration, warm-started Q): P = M Q is
  all-reduced and orthonormalized into P̂, then Q = Mᵀ P̂ is all-reduced and the update is P̂ Qᵀ.
  This rank's own share of that update is P̂ P̂ᵀ M (a projection), which is what error
  feedback subtracts, so "sent + residual = gradient + old residual" holds per rank.

Small tensors (fewer than `min_compress_numel` elements, and for PowerSGD tensors it cannot
shrink) travel uncompressed, together with the statistics matrix, in one fp32 all-reduce.
Every rank does the same arithmetic on the same reduced data, so replicas stay bit-identical.

Cost per step (N ranks, ring collectives): the small tensors and statistics as a plain
all-reduce; plus 2(N-1)/N × payload for ALLREDUCE and LOWRANK codecs or (N-1) × payload for
ALLGATHER codecs. Error feedback keeps one fp32 residual per compressed tensor (memory = the
compressed part of the model).

The hub/leaf topology is not used with compression: compressed payloads are small enough that
the ring's per-phase stall on a slow member is the cost that remains, and a hub would have to
re-compress what it sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from idla.compress import Codec, ErrorFeedback, PowerSGD, Transport, pack, unpack
from idla.plan.topology import Topology
from idla.runtime.group import Group, Work


def _eligible(codec: Codec, shape: torch.Size, min_numel: int) -> bool:
    if shape.numel() < min_numel or codec.name == "none":
        return False
    if isinstance(codec, PowerSGD):
        return codec.eligible(shape)
    return True


class CompressedSync:
    """The flat gradient buffer and the compressed exchange of one step."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: Group,
        stats_width: int,
        codec: Codec,
        error_feedback: bool = True,
        min_compress_numel: int = 1024,
        seed: int = 0,
    ) -> None:
        self.group = group
        self.seed = seed
        self.error_feedback = ErrorFeedback() if error_feedback else None
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("compression needs float32 parameters")
        self.min_compress_numel = min_compress_numel
        self._keys = {id(p): f"p{i}" for i, p in enumerate(self.params)}
        self._stats_numel = group.world_size * stats_width
        total = sum(p.numel() for p in self.params) + self._stats_numel
        self.flat = torch.zeros(total, dtype=torch.float32, device=self.params[0].device)
        self.grads = self.flat[: total - self._stats_numel]
        self.stats = self.flat[total - self._stats_numel :].view(group.world_size, stats_width)
        self.topology = Topology.ring(group.world_size)
        self.steps_done = 0
        self.warm_q: dict[str, torch.Tensor] = {}  # PowerSGD's Q per tensor (same on all ranks)
        self.set_codec(codec)

    def set_codec(self, codec: Codec) -> None:
        """Use `codec` from the next step on (all ranks, between steps). Residuals of tensors
        that stay compressed carry over; PowerSGD restarts from fresh Q."""
        self.codec = codec
        self.warm_q = {}
        squeezed = [p for p in self.params if _eligible(codec, p.shape, self.min_compress_numel)]
        chosen = {id(p) for p in squeezed}
        dense = [p for p in self.params if id(p) not in chosen]
        self._views: list[tuple[nn.Parameter, torch.Tensor]] = []
        offset = 0
        for p in [*squeezed, *dense]:
            self._views.append((p, self.flat[offset : offset + p.numel()].view_as(p)))
            offset += p.numel()
        self._squeezed = [(self._keys[id(p)], view) for p, view in self._views[: len(squeezed)]]
        self._dense_start = sum(p.numel() for p in squeezed)
        self.payload_bytes = sum(codec.wire_bytes(v.shape) for _, v in self._squeezed) + 4 * (
            self.grads.numel() - self._dense_start
        )
        """Bytes of gradient this rank contributes per step (codec payloads + small tensors)."""

    @property
    def is_leaf(self) -> bool:
        return False

    @property
    def compressed_numel(self) -> int:
        return self._dense_start

    def set_topology(self, topology: Topology) -> None:
        if topology.hub_of:
            raise ValueError("compressed sync runs as a ring; leaves are not supported")

    def start_step(self, shares: Sequence[int]) -> None:
        """Zero the buffer and point every ``.grad`` into it."""
        self.flat.zero_()
        for p, view in self._views:
            p.grad = view

    def drop_local_gradient(self) -> None:
        self.grads.zero_()

    def _seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + self.steps_done) * 4099 + index

    def _corrected(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        if self.error_feedback is None:
            return grad.clone()
        return self.error_feedback.corrected(key, grad)

    def _remember(self, key: str, corrected: torch.Tensor, sent: torch.Tensor) -> None:
        if self.error_feedback is not None:
            self.error_feedback.update(key, corrected, sent)

    def finish(self, stats_row: torch.Tensor) -> torch.Tensor:
        """Write this rank's statistics, exchange everything, return everybody's statistics;
        afterwards every ``.grad`` holds the (compressed) global gradient."""
        self.stats[self.group.rank].copy_(stats_row)
        tail_work = self.group.all_reduce(self.flat[self._dense_start :])
        if self._squeezed:
            transport = self.codec.transport
            if transport is Transport.ALLREDUCE:
                self._allreduce_codec()
            elif transport is Transport.ALLGATHER:
                self._allgather_codec()
            else:
                self._powersgd()
        if tail_work is not None:
            self.group.wait(tail_work)
        self.steps_done += 1
        return self.stats.clone()

    def _wait(self, work: Work | None) -> None:
        if work is not None:
            self.group.wait(work)

    def _compress_all(self) -> list[torch.Tensor]:
        """Every compressed tensor's payload, in order; error feedback remembers what each
        payload decompresses to."""
        payloads: list[torch.Tensor] = []
        for index, (key, grad) in enumerate(self._squeezed):
            corrected = self._corrected(key, grad)
            payload = self.codec.compress(corrected, seed=self._seed(index))
            if self.error_feedback is not None:
                sent = self.codec.decompress(payload, grad.shape, seed=self._seed(index))
                self._remember(key, corrected, sent)
            payloads.extend(payload)
        return payloads

    def _allreduce_codec(self) -> None:
        buffer = torch.cat(self._compress_all())  # one dtype per linear codec
        self._wait(self.group.all_reduce(buffer))
        offset = 0
        for index, (_, grad) in enumerate(self._squeezed):
            parts = []
            for _, numel in self.codec.payload_spec(grad.shape):
                parts.append(buffer[offset : offset + numel])
                offset += numel
            grad.copy_(self.codec.decompress(parts, grad.shape, seed=self._seed(index)))

    def _allgather_codec(self) -> None:
        mine = pack(self._compress_all())  # (payload bytes,) uint8
        gathered = self.group.all_gather(mine)
        specs = [self.codec.payload_spec(grad.shape) for _, grad in self._squeezed]
        flat_spec = [item for spec in specs for item in spec]
        for _, grad in self._squeezed:
            grad.zero_()
        for buffer in gathered:  # rank order: the same additions in the same order everywhere
            parts = unpack(buffer, flat_spec)
            start = 0
            for index, (_, grad) in enumerate(self._squeezed):
                count = len(specs[index])
                self.codec.decompress_add_(grad, parts[start : start + count],
                                           seed=self._seed(index))
                start += count

    def _powersgd(self) -> None:
        codec = self.codec
        assert isinstance(codec, PowerSGD)
        matrices, ps = [], []
        for index, (key, grad) in enumerate(self._squeezed):
            corrected = self._corrected(key, grad)
            if key not in self.warm_q:
                self.warm_q[key] = codec.initial_q(grad.shape, seed=self.seed * 7919 + index).to(
                    grad.device)
            matrix = corrected.view(codec.matrix_shape(grad.shape))  # (m, n)
            matrices.append((key, corrected, matrix))
            ps.append(codec.p_of(matrix, self.warm_q[key]))  # (m, r)
        p_all = torch.cat([p.reshape(-1) for p in ps])
        self._wait(self.group.all_reduce(p_all))
        p_hats, qs, offset = [], [], 0
        for p in ps:
            p_hat = codec.orthonormalize(p_all[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
            p_hats.append(p_hat)
        for (key, corrected, matrix), p_hat in zip(matrices, p_hats, strict=True):
            q_local = codec.q_of(matrix, p_hat)  # (n, r)
            if self.error_feedback is not None:
                self._remember(key, corrected, codec.reconstruct(p_hat, q_local, corrected.shape))
            qs.append(q_local)
        q_all = torch.cat([q.reshape(-1) for q in qs])
        self._wait(self.group.all_reduce(q_all))
        offset = 0
        for (key, _, _), (_, grad), p_hat, q in zip(matrices, self._squeezed, p_hats, qs,
                                                    strict=True):
            q_sum = q_all[offset : offset + q.numel()].view_as(q)
            offset += q.numel()
            self.warm_q[key] = q_sum.clone()
            grad.copy_(codec.reconstruct(p_hat, q_sum, grad.shape))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs to continue exactly: error-feedback residuals (``ef.<key>``),
        PowerSGD's warm Q (``q.<key>``) and the step counter that seeds random-k. Tensors only,
        for safetensors."""
        state = {"steps_done": torch.tensor([self.steps_done], dtype=torch.int64)}
        if self.error_feedback is not None:
            state.update({f"ef.{k}": v for k, v in self.error_feedback.state_dict().items()})
        state.update({f"q.{k}": v.detach().cpu().contiguous() for k, v in self.warm_q.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict`'s output; shapes are checked against this model's tensors."""
        shapes = {self._keys[id(p)]: p.shape for p in self.params}
        residuals, warm_q = {}, {}
        for name, tensor in state.items():
            kind, _, key = name.partition(".")
            if kind == "ef" and shapes.get(key) == tensor.shape:
                residuals[key] = tensor
            elif kind == "q" and key in shapes and tensor.dim() == 2:
                warm_q[key] = tensor.to(self.flat.device)
            elif name != "steps_done":
                raise ValueError(f"compression state '{name}' does not fit this model "
                                 f"(shape {tuple(tensor.shape)})")
        if self.error_feedback is not None:
            self.error_feedback.load_state_dict(residuals)
        self.warm_q = warm_q
        if "steps_done" in state:
            self.steps_done = int(state["steps_done"].item())

    def close(self) -> None:
        """Nothing is left in flight after `finish`."""
