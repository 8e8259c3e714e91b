"""The asynchronous parameter server's message layouts and model ↔ flat vector helpers."""

from __future__ import annotations

import torch
from torch import nn

from idla.sync.async_wire import (
    MAX_VERSION,
    PUSH_HEADER,
    REPLY_HEADER,
    PushFlag,
    PushHeader,
    ReplyFlag,
    flat_grad_into,
    flat_params,
    load_flat,
    make_reply,
    read_push_header,
    read_reply_header,
    write_push_header,
)


def test_push_header_round_trip_keeps_large_versions_exact() -> None:
    push = torch.zeros(PUSH_HEADER + 3)

    write_push_header(push, MAX_VERSION - 1, 32, 12.5, PushFlag.GRADIENT)

    assert read_push_header(push) == PushHeader(MAX_VERSION - 1, 32, 12.5, PushFlag.GRADIENT)
    assert torch.equal(push[PUSH_HEADER:], torch.zeros(3))


def test_reply_carries_a_copy_of_the_parameters() -> None:
    params = torch.arange(4.0)

    reply = make_reply(17, ReplyFlag.STOP, params)
    params += 1  # the server's parameters move on; the reply must not

    assert read_reply_header(reply) == (17, ReplyFlag.STOP)
    assert torch.equal(reply[REPLY_HEADER:], torch.arange(4.0))


def test_flat_helpers_round_trip() -> None:
    torch.manual_seed(0)
    first, last = nn.Linear(3, 2), nn.Linear(2, 1)
    model = nn.Sequential(first, last)
    flat = flat_params(model)
    target = torch.randn_like(flat)
    expected = target.clone()

    load_flat(model, target)
    target += 1  # no aliasing
    model(torch.randn(4, 3)).sum().backward()
    last.bias.grad = None  # a parameter without a gradient sends zeros
    out = torch.full_like(flat, 7.0)
    flat_grad_into(model, out)

    assert flat.numel() == 3 * 2 + 2 + 2 + 1
    assert torch.equal(flat_params(model), expected)
    assert first.weight.grad is not None
    assert torch.equal(out[:6], first.weight.grad.reshape(-1))
    assert float(out[-1]) == 0.0
