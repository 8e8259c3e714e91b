"""`GradViews` keeps every ``.grad`` in the flat buffer, with DDP's semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from idla.errors import GradientError
from idla.sync.grad_views import GradViews


def _views(*shapes: tuple[int, ...]) -> tuple[list[nn.Parameter], torch.Tensor, GradViews]:
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    flat = torch.zeros(sum(p.numel() for p in params))
    pairs, offset = [], 0
    for p in params:
        pairs.append((p, flat[offset : offset + p.numel()].view_as(p)))
        offset += p.numel()
    return params, flat, GradViews(pairs)


def test_a_fresh_gradient_after_set_to_none_lands_in_the_view() -> None:
    # Prepare
    params, flat, views = _views((3, 2), (2,))
    views.point()
    for p in params:
        p.grad = None

    # Execute
    views.claim()
    sum((p * p).sum() for p in params).backward()

    # Assert: .grad is the view again and holds the gradient
    assert all(p.grad is view for p, view in views.pairs)
    assert torch.equal(flat, torch.cat([2 * p.detach().reshape(-1) for p in params]))


def test_a_parameter_never_used_keeps_none_and_settles_by_every_rank() -> None:
    params, _, views = _views((2,), (2,))
    views.point()
    (params[0] * 3).sum().backward()

    assert views.gradless() == [False, True]
    views.settle([False, True])  # no rank has a gradient for the second
    assert params[1].grad is None
    views.settle([False, False])  # another rank has one: the summed view
    assert params[1].grad is views.pairs[1][1]


def test_a_foreign_zero_tensor_is_taken_back_and_one_with_values_refused() -> None:
    params, _, views = _views((2,))
    params[0].grad = torch.zeros(2)
    views.claim()
    assert params[0].grad is views.pairs[0][1]

    params[0].grad = torch.ones(2)
    with pytest.raises(GradientError, match="replaced by a tensor holding values"):
        views.claim()


def test_a_released_buffer_no_longer_takes_gradients() -> None:
    params, flat, views = _views((2,))
    views.release()

    (params[0] * 2).sum().backward()

    assert params[0].grad is not views.pairs[0][1]
    assert torch.equal(flat, torch.zeros(2))
