"""`GradViews`: every covered parameter's ``.grad`` as a view into one flat buffer, kept there
whatever the training script does to ``.grad``.

The semantics follow DDP's reducer with ``gradient_as_bucket_view=True``
(torch/csrc/distributed/c10d/reducer.cpp):

- when the post-accumulate-grad hook finds a ``.grad`` that is not the view (autograd made a
  fresh tensor because the script set ``.grad = None``, e.g. ``zero_grad(set_to_none=True)``),
  the gradient is copied into the view and ``.grad`` is pointed back at it;
- a parameter with no gradient on this rank contributes zeros; one with no gradient on *every*
  rank keeps ``.grad = None`` (`settle`), so optimizers skip it, as they would in one process;
- a new step zeroes the buffer and points every ``.grad`` that is a tensor at its view (what
  ``zero_grad(set_to_none=False)`` does); a ``.grad`` that is None stays None until backward
  gives it a value, so a parameter never used keeps None, as in one process.

Where DDP differs: DDP averages whatever a script assigned to ``.grad`` before backward with
the other ranks' values. idla sums weighted contributions, so a foreign tensor that holds
values would be counted once per rank; `claim` accepts a foreign tensor only when it is all
zeros (``p.grad = torch.zeros_like(p)``) and raises `GradientError` otherwise. Sparse
gradients are refused the same way.

Cost: a Python loop over the parameters before each backward (an identity check per
parameter), one hook call per parameter per backward, and a copy only where ``.grad`` was
replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from idla.errors import GradientError

# The latest GradViews built over a parameter (by id: tensors compare by value) owns its
# ``.grad``: an exchange that was replaced (a codec swap, an agent rebuilt after a lost worker)
# must not pull gradients back into its own buffer from hooks that are still registered.
_OWNER: dict[int, GradViews] = {}


class GradViews:
    """The (parameter, view) pairs of one flat gradient buffer, and the hooks that keep them."""

    def __init__(
        self,
        pairs: Sequence[tuple[nn.Parameter, torch.Tensor]],
        on_ready: Callable[[nn.Parameter], None] | None = None,
    ) -> None:
        """`pairs`: every covered parameter with its view (same shape) into the buffer;
        `on_ready`: called after a parameter's gradient is in its view (bucket launches)."""
        self.pairs = list(pairs)
        self._view_of = {id(p): view for p, view in self.pairs}
        self._index_of = {id(p): i for i, (p, _) in enumerate(self.pairs)}
        self._on_ready = on_ready
        self._handles: list[RemovableHandle] = []
        for p, _ in self.pairs:
            _OWNER[id(p)] = self
            self._handles.append(p.register_post_accumulate_grad_hook(self._ready))

    def point(self) -> None:
        """A new step (the buffer was just zeroed): every ``.grad`` that is a tensor becomes
        its view; None stays None."""
        for p, view in self.pairs:
            if p.grad is not None and p.grad is not view:
                self._check_layout(p, p.grad)
                p.grad = view

    def claim(self) -> None:
        """Before a backward: a ``.grad`` set to None since the step began contributes
        nothing, so its view is zeroed (and ``.grad`` stays None until autograd fills it); a
        foreign all-zero tensor is replaced by the zeroed view.

        Raises:
            GradientError: A ``.grad`` is a foreign tensor with values in it, or sparse.
        """
        for p, view in self.pairs:
            grad = p.grad
            if grad is view:
                continue
            if grad is None:
                view.zero_()
                continue
            self._check_layout(p, grad)
            if grad.data_ptr() == view.data_ptr() and grad.stride() == view.stride():
                p.grad = view  # the same memory under another tensor object
                continue
            if bool(grad.any()):
                raise GradientError(
                    f"parameter {self._index_of[id(p)]} (shape {tuple(p.shape)}): its .grad was "
                    "replaced by a tensor holding values before agent.backward(); idla sums "
                    "every rank's gradient in its own buffer and cannot tell what that tensor "
                    "means. Set .grad to None or zeros instead (optimizer.zero_grad())"
                )
            view.zero_()
            p.grad = view

    def _ready(self, p: torch.Tensor) -> None:
        if _OWNER.get(id(p)) is not self:
            return
        view = self._view_of[id(p)]
        grad = p.grad
        if grad is not view and grad is not None:
            self._check_layout(p, grad)
            view.copy_(grad)
            p.grad = view
        if self._on_ready is not None:
            self._on_ready(p)  # type: ignore[arg-type]

    def _check_layout(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse or grad.shape != p.shape or grad.dtype != p.dtype:
            raise GradientError(
                f"parameter {self._index_of[id(p)]} (shape {tuple(p.shape)}) has a "
                f"{'sparse ' if grad.is_sparse else ''}gradient of shape {tuple(grad.shape)} "
                f"and dtype {grad.dtype}; idla exchanges dense gradients of the parameter's "
                "own shape and dtype"
            )

    def gradless(self) -> list[bool]:
        """Per covered parameter, in order: True where ``.grad`` is None on this rank."""
        return [p.grad is None for p, _ in self.pairs]

    def settle(self, gradless_everywhere: Sequence[bool]) -> None:
        """After the exchange: a parameter that has a gradient on some rank gets its (summed)
        view; one with no gradient on any rank keeps None."""
        for (p, view), none in zip(self.pairs, gradless_everywhere, strict=True):
            if p.grad is None and not none:
                p.grad = view

    def release(self) -> None:
        """Remove the hooks: the buffer no longer owns these gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p, _ in self.pairs:
            if _OWNER.get(id(p)) is self:
                del _OWNER[id(p)]
