"""The size rule of the compressed exchanges: what compression cannot pay for travels plain.

Tensors with fewer than `min_compress_numel` elements, and tensors the codec cannot shrink
(`Codec.eligible`: for PowerSGD, matrices where (m+n)·r ≥ m·n), would each cost a codec call
and a collective for little or nothing saved. `SizeRule` lays out one flat buffer for an
exchange, in the parameters' dtype (float16, bfloat16, float32 or float64: PyTorch wants each
``.grad`` in its parameter's dtype, and the plain part is summed in it, as the exact exchange
does): the tensors to compress first, then the others, which travel together in one
all-reduce; the statistics matrix (world_size × width, float64) is summed beside it on the
control plane (`idla.runtime.stats.StatsExchange`). Its `finish` wraps the
exchange's own collectives for the compressed tensors: it starts the all-reduce of the plain
part, runs them, then waits for it. Every rank does the same arithmetic on the same reduced
data, so replicas stay bit-identical.

It also holds what the compressed exchanges checkpoint alike: the step counter (which seeds
random-k's positions) and the error-feedback residuals, ``ef.<key>`` for parameter ``p<i>``.

The codecs and error feedback compute in float32 whatever that dtype (cast up when a
compressed tensor is read, cast back when its sum is written into its view), so a bf16 model
sends the same payloads as its float32 widening would.

Cost per step: one all-reduce of the plain part, the dtype's bytes (2 for bf16/fp16, 4 for
fp32) per element of the small tensors, and the statistics' all-reduce on the control plane.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from idla.compress import Codec, ErrorFeedback, compresses
from idla.plan.topology import Topology
from idla.runtime.group import Group
from idla.runtime.stats import StatsExchange
from idla.sync.grad_views import GradViews

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Parameter dtypes a compressed exchange takes."""


@dataclass(frozen=True, slots=True)
class CompressedSetup:
    """What every compressed exchange of one run is built from; `auto` keeps it to build the
    exchange of each codec it switches to."""

    params: Sequence[nn.Parameter]
    """The model's parameters (the trainable ones are exchanged), in model order."""
    group: Group
    stats_width: int
    """Columns of the statistics matrix."""
    error_feedback: ErrorFeedback | None
    """The residuals per tensor key, one object for the whole run (None: off)."""
    min_compress_numel: int = 1024
    """Tensors with fewer elements travel plain."""
    seed: int = 0
    """Seeds random-k's shared positions and PowerSGD's initial Q (the same on all ranks)."""


class SizeRule:
    """The flat buffer of a compressed exchange, split by the size rule."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: Group,
        stats_width: int,
        codec: Codec,
        min_compress_numel: int,
        steps_done: int = 0,
    ) -> None:
        """`steps_done`: steps already exchanged (a codec switch continues the count)."""
        self.group = group
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        dtype = self.params[0].dtype
        if dtype not in FLOAT_DTYPES or any(p.dtype != dtype for p in self.params):
            dtypes = sorted({str(p.dtype) for p in self.params})
            raise ValueError("compression needs trainable parameters of one floating dtype "
                             f"(float16, bfloat16, float32 or float64), got {', '.join(dtypes)}")
        self.min_compress_numel = min_compress_numel
        self.steps_done = steps_done
        keys = {id(p): f"p{i}" for i, p in enumerate(self.params)}
        self.shapes = {keys[id(p)]: p.shape for p in self.params}
        total = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(total, dtype=dtype, device=self.params[0].device)
        self.grads = self.flat  # (params,) this rank's, then the sum
        self.stats = StatsExchange(group, stats_width)
        large = [p for p in self.params if compresses(codec, p.shape, min_compress_numel)]
        chosen = {id(p) for p in large}
        pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        offset = 0
        for p in [*large, *(p for p in self.params if id(p) not in chosen)]:
            pairs.append((p, self.flat[offset : offset + p.numel()].view_as(p)))
            offset += p.numel()
        self.views = GradViews(pairs)
        """Keeps every ``.grad`` in this buffer whatever the script does to it."""
        self.large = [(keys[id(p)], view) for p, view in pairs[: len(large)]]
        """(key, gradient view) of every tensor to compress, in model order."""
        self._plain_start = sum(p.numel() for p in large)
        self.payload_bytes = sum(codec.wire_bytes(v.shape) for _, v in self.large) + (
            self.flat.element_size() * (self.grads.numel() - self._plain_start)
        )
        """Bytes of gradient this rank contributes per step (codec payloads + small tensors)."""

    def start_step(self) -> None:
        """Zero the buffer and point every ``.grad`` into it (`GradViews.point`)."""
        self.flat.zero_()
        self.stats.reset()
        self.views.point()

    def drop_local_gradient(self) -> None:
        self.grads.zero_()

    def set_topology(self, topology: Topology) -> None:
        if topology.hub_of:
            raise ValueError("compressed sync runs as a ring; leaves are not supported")

    def finish(self, stats_row: torch.Tensor, exchange_large: Callable[[], None]) -> torch.Tensor:
        """Write this rank's statistics, all-reduce the plain part while `exchange_large`
        sums the compressed tensors in place (skipped when there are none), and return
        everybody's statistics."""
        self.stats.start(stats_row)
        plain_work = self.group.all_reduce(self.flat[self._plain_start :])
        if self.large:
            exchange_large()
        if plain_work is not None:
            self.group.wait(plain_work)
        self.steps_done += 1
        return self.stats.finish()

    def state_dict(self, error_feedback: ErrorFeedback | None) -> dict[str, torch.Tensor]:
        """The step counter and every residual (``ef.<key>``), as CPU tensors."""
        state = {"steps_done": torch.tensor([self.steps_done], dtype=torch.int64)}
        if error_feedback is not None:
            state.update({f"ef.{k}": v for k, v in error_feedback.state_dict().items()})
        return state

    def load_state_dict(
        self, state: Mapping[str, torch.Tensor], error_feedback: ErrorFeedback | None
    ) -> dict[str, torch.Tensor]:
        """Restore the step counter and the residuals; return PowerSGD's warm Q per key
        (``q.<key>``, moved to this buffer's device) for the exchange that keeps one.

        Raises:
            ValueError: An entry does not fit this model; nothing is restored.
        """
        residuals, warm_q = {}, {}
        for name, tensor in state.items():
            kind, _, key = name.partition(".")
            if kind == "ef" and self.shapes.get(key) == tensor.shape:
                residuals[key] = tensor
            elif kind == "q" and key in self.shapes and tensor.dim() == 2:
                warm_q[key] = tensor.to(self.flat.device)
            elif name != "steps_done":
                raise ValueError(f"compression state '{name}' does not fit this model "
                                 f"(shape {tuple(tensor.shape)})")
        if error_feedback is not None:
            error_feedback.load_state_dict(residuals)
        if "steps_done" in state:
            self.steps_done = int(state["steps_done"].item())
        return warm_q


class SplitExchange:
    """A compressed exchange around the size rule: everything but the collectives that move
    the compressed tensors, which a subclass adds in `_exchange_large`."""

    supports_leaves = False

    def __init__(self, setup: CompressedSetup, codec: Codec, steps_done: int = 0) -> None:
        """`steps_done`: steps already exchanged (a codec switch continues the count)."""
        self.setup = setup
        self.group = setup.group
        self.codec = codec
        self.error_feedback = setup.error_feedback
        self.seed = setup.seed
        self.split = SizeRule(setup.params, setup.group, setup.stats_width, codec,
                              setup.min_compress_numel, steps_done)
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
        return self.split.finish(stats_row, self._exchange_large)

    def _exchange_large(self) -> None:
        """Sum the compressed tensors (`self.split.large`) over the ranks, in place."""
        raise NotImplementedError

    def after_step(self, step: int, stats: Sequence[Sequence[float]]) -> None:
        """Nothing to learn: the configuration fixed the codec."""

    def set_topology(self, topology: Topology) -> None:
        self.split.set_topology(topology)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Error-feedback residuals (``ef.<key>``) and the step counter that seeds random-k.
        Tensors only, for safetensors."""
        return self.split.state_dict(self.error_feedback)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict`'s output; shapes are checked against this model's tensors. A
        warm Q (``q.<key>``, saved while PowerSGD ran) is checked and dropped: only the
        PowerSGD exchange keeps one, and a switch to PowerSGD starts from a fresh Q."""
        self.split.load_state_dict(state, self.error_feedback)

    def report(self) -> dict[str, Any]:
        return fixed_report(self.codec, self.error_feedback, self.payload_bytes)

    def close(self) -> None:
        """Nothing is left in flight after `finish`; the hooks go."""
        self.views.release()


def fixed_report(
    codec: Codec, error_feedback: ErrorFeedback | None, payload_bytes: int
) -> dict[str, Any]:
    """The compression report of an exchange whose codec the configuration fixed."""
    return {
        "codec": codec.name,
        "error_feedback": error_feedback is not None,
        "payload_bytes_per_step": payload_bytes,
        "reason": f"fixed by configuration (compress='{codec.name}')",
        "decisions": [],
    }
