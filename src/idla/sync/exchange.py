"""`GradientExchange`: what every synchronous gradient exchange offers the agent.

Every rank drives its exchange through the same calls, in the same order:

    exchange.start_step(shares)        # zero the buffer, point every ``.grad`` into it
    exchange.begin_backward(final)     # take back any ``.grad`` the script replaced
    (loss × b/B).backward()            # this rank's gradient, weighted by its share
    exchange.drop_local_gradient()     # optional: contribute nothing (a non-finite gradient)
    stats = exchange.finish(row)       # every ``.grad`` holds the sum; everybody's statistics
    exchange.after_step(step, stats)   # learn from the step (only auto's codec choice does)

and between steps `set_topology`, `state_dict` / `load_state_dict` (what a checkpoint keeps)
and `report`; `close` at the end.

With gradient accumulation (``Agent.no_sync``) a step has several micro-batches: the first
starts with `start_step`, each further one with `continue_step(shares)`, and every backward but
the last is announced with ``begin_backward(final=False)``: gradients add up in the buffer and
nothing is sent until the final backward and `finish`.

The ``.grad`` fields are kept by `views` (`idla.sync.grad_views.GradViews`), with DDP's
semantics for ``zero_grad(set_to_none=True)``, replaced tensors and unused parameters.

The implementations:

- `idla.sync.allreduce.GradientSync`: exact fp32, bucketed, overlapping backward; the only one
  that supports hub/leaf topologies;
- `idla.sync.compressed.CodecExchange`: a stateless codec, with error feedback;
- `idla.sync.powersgd.PowerSGDExchange`: low-rank, warm-started Q, with error feedback;
- `idla.sync.autocodec.AutoCodecExchange`: one of the two above, chosen from measurements.

The compressed ones share the size rule (`idla.sync.size_rule`): small tensors travel
uncompressed with the statistics in one fp32 all-reduce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from idla.plan.topology import Topology
from idla.sync.grad_views import GradViews


@runtime_checkable
class GradientExchange(Protocol):
    """How the replicas of one step agree on the sum of their weighted gradients."""

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters whose gradients are exchanged, in model order."""

    @property
    def grads(self) -> torch.Tensor:
        """This rank's gradient as one flat view (every ``.grad`` points into it); after
        `finish`, the summed gradient."""

    @property
    def views(self) -> GradViews:
        """The parameter/view pairs of the buffer and the hooks that keep ``.grad`` in it."""

    @property
    def supports_leaves(self) -> bool:
        """Whether `set_topology` accepts hub/leaf topologies (else: the ring only)."""

    def start_step(self, shares: Sequence[int]) -> None:
        """Prepare the step in which rank r computes over ``shares[r]`` samples."""

    def continue_step(self, shares: Sequence[int]) -> None:
        """Another micro-batch of the current step, rank r computing over ``shares[r]``
        samples; the buffer keeps what it holds."""

    def begin_backward(self, final: bool) -> None:
        """Before each backward of the step: claim back every ``.grad`` (`GradViews.claim`);
        `final`: the step's last backward (its gradients may start leaving as they fill)."""

    def drop_local_gradient(self) -> None:
        """Contribute nothing this step; before `finish`."""

    def finish(self, stats_row: torch.Tensor) -> torch.Tensor:
        """Exchange the gradients and this rank's statistics row (width,); return every
        rank's statistics (world_size × width)."""

    def after_step(self, step: int, stats: Sequence[Sequence[float]]) -> None:
        """Called by every rank with the same finished step and statistics."""

    def set_topology(self, topology: Topology) -> None:
        """Use `topology` from the next step on (all ranks, between steps)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs to continue exactly; tensors only, for safetensors.
        Empty for an exchange that holds no state."""

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict`'s output (ValueError if it does not fit)."""

    def report(self) -> dict[str, Any]:
        """JSON-ready: codec, error_feedback, payload_bytes_per_step, reason, decisions."""

    def close(self) -> None:
        """Finish whatever is still in flight."""
