"""Every synchronous exchange is a `GradientExchange`; the size rule splits and wraps alike."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from idla.compress import ErrorFeedback, compresses, parse_codec
from idla.plan.topology import Topology
from idla.runtime.group import Group
from idla.runtime.stats import WIDTH, Stat, row
from idla.sync.allreduce import GradientSync
from idla.sync.autocodec import AutoCodecExchange
from idla.sync.compressed import CodecExchange, compressed_exchange
from idla.sync.exchange import GradientExchange
from idla.sync.powersgd import PowerSGDExchange
from idla.sync.size_rule import CompressedSetup, SizeRule

REPORT_KEYS = ["codec", "error_feedback", "payload_bytes_per_step", "reason", "decisions"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))


def _setup(model: nn.Module) -> CompressedSetup:
    return CompressedSetup(list(model.parameters()), Group(), WIDTH, ErrorFeedback(),
                           min_compress_numel=16)


def _exact(model: nn.Module) -> GradientExchange:
    return GradientSync(list(model.parameters()), Group(), WIDTH)


def _codec(spec: str) -> Callable[[nn.Module], GradientExchange]:
    def build(model: nn.Module) -> GradientExchange:
        return compressed_exchange(_setup(model), parse_codec(spec))
    return build


def _auto(model: nn.Module) -> GradientExchange:
    return AutoCodecExchange(_setup(model))


BUILDERS = {"exact": _exact, "fp16": _codec("fp16"), "topk": _codec("topk:0.05"),
            "powersgd": _codec("powersgd:2"), "auto": _auto}


def _row(compute_s: float = 0.5, samples: int = 8) -> torch.Tensor:
    return row(compute_s=compute_s, compute_cpu_s=compute_s, prev_sync_s=0.0,
               prev_comm_cpu_s=0.0, prev_other_s=0.0, samples=samples, loss_sum=0.0,
               nonfinite=False)


def _step(exchange: GradientExchange, model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 64, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    exchange.start_step([8])
    nn.functional.cross_entropy(model(x), y).backward()
    stats = exchange.finish(_row())
    exchange.after_step(step, stats.double().tolist())
    return stats


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_every_exchange_satisfies_the_protocol(kind: str) -> None:
    # Prepare
    model = _model()
    exchange = BUILDERS[kind](model)

    # Execute: a few steps, as the agent drives them (auto chooses at step 3)
    for step in range(4):
        stats = _step(exchange, model, step)

    # Assert
    assert isinstance(exchange, GradientExchange)
    assert exchange.params == list(model.parameters())
    assert exchange.grads.numel() == sum(p.numel() for p in model.parameters())
    assert stats.shape == (1, WIDTH) and stats[0, Stat.SAMPLES] == 8
    assert exchange.supports_leaves == (kind == "exact")
    report = exchange.report()
    assert list(report) == REPORT_KEYS
    state = exchange.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert bool(state) == (kind != "exact")
    exchange.load_state_dict(state)
    exchange.close()


def test_auto_on_one_worker_swaps_to_the_exact_codec() -> None:
    model = _model()
    exchange = _auto(model)
    assert isinstance(exchange, AutoCodecExchange)
    assert exchange.codec.name == "sign"  # the leanest candidate while probing

    for step in range(3):
        _step(exchange, model, step)

    assert exchange.codec.name == "none"
    assert [d["codec"] for d in exchange.report()["decisions"]] == ["none"]
    assert exchange.state_dict()["steps_done"].item() == 3  # the count survives the swap


def test_compressed_exchanges_refuse_leaves() -> None:
    model = _model()
    exchange = _codec("topk:0.05")(model)

    with pytest.raises(ValueError, match="leaves are not supported"):
        exchange.set_topology(Topology(2, (0,), {1: 0}))


def test_factory_builds_powersgd_its_own_exchange() -> None:
    model = _model()

    assert isinstance(_codec("powersgd:2")(model), PowerSGDExchange)
    assert isinstance(_codec("sign")(model), CodecExchange)


def _params(*shapes: tuple[int, ...]) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(shape)) for shape in shapes]


@pytest.mark.parametrize(
    ("spec", "large"),
    [
        ("topk:0.01", ["p0", "p2"]),  # (48, 64) and (4, 4); the (48,) bias is under 16
        ("powersgd:2", ["p0"]),  # (4, 4) is not shrunk at rank 2: (4+4)·2 ≥ 16
        ("none", []),
    ],
)
def test_size_rule_splits_by_size_and_by_what_the_codec_shrinks(
    spec: str, large: list[str]
) -> None:
    # Prepare
    params = _params((48, 64), (8,), (4, 4))
    codec = parse_codec(spec)

    # Execute
    split = SizeRule(params, Group(), WIDTH, codec, min_compress_numel=16)

    # Assert
    assert [key for key, _ in split.large] == large
    plain = sum(p.numel() for p in params) - sum(v.numel() for _, v in split.large)
    assert split.payload_bytes == sum(codec.wire_bytes(v.shape) for _, v in split.large) \
        + 4 * plain
    assert [compresses(codec, p.shape, 16) for p in params] == [
        f"p{i}" in large for i in range(len(params))]


def test_size_rule_wraps_the_compressed_exchange_around_the_plain_all_reduce() -> None:
    # Prepare: gradients of ones; the "compressed exchange" doubles what it is given
    params = _params((48, 64), (8,))
    split = SizeRule(params, Group(), WIDTH, parse_codec("fp16"), min_compress_numel=16)
    for p in params:
        p.grad = torch.zeros_like(p)  # start_step points a .grad that is a tensor at its view
    split.start_step()
    for p in params:
        assert p.grad is not None
        p.grad.fill_(1.0)
    calls = []

    def exchange_large() -> None:
        calls.append(len(split.large))
        for _, grad in split.large:
            grad.mul_(2.0)

    # Execute
    stats = split.finish(_row(samples=3), exchange_large)

    # Assert: only the large tensor went through the exchange; the statistics came back
    assert calls == [1]
    assert params[0].grad is not None and params[1].grad is not None
    assert torch.equal(params[0].grad, torch.full((48, 64), 2.0))
    assert torch.equal(params[1].grad, torch.ones(8))
    assert stats[0, Stat.SAMPLES] == 3
    assert split.steps_done == 1


def test_size_rule_skips_the_exchange_when_nothing_is_large() -> None:
    split = SizeRule(_params((8,)), Group(), WIDTH, parse_codec("sign"), min_compress_numel=16)
    split.start_step()

    split.finish(_row(), lambda: pytest.fail("nothing to compress"))

    assert split.large == [] and split.steps_done == 1
