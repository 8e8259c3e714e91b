"""Codecs, error feedback and the compressed exchanges on bf16, fp16 and fp64 models: gradients
stay in the parameters' dtype, the codec math and the residuals run in float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from idla.compress import (
    Codec,
    ErrorFeedback,
    Fp16,
    PowerSGD,
    RandomK,
    ScaledSign,
    TopK,
    parse_codec,
)
from idla.plan.compression import choose_codec, sent_bytes_per_step
from idla.runtime.group import Group
from idla.runtime.stats import WIDTH
from idla.sync.autocodec import AutoCodecExchange
from idla.sync.compressed import CompressedExchange, compressed_exchange
from idla.sync.size_rule import CompressedSetup

HALF = [torch.bfloat16, torch.float16]
CODECS: list[Codec] = [Fp16(), TopK(0.05), RandomK(0.05), ScaledSign(), PowerSGD(2)]
SPECS = ["fp16", "topk:0.05", "randk:0.05", "sign", "powersgd:2"]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))
    return model.to(dtype)


def _exchange(model: nn.Module, spec: str, error_feedback: bool = True) -> CompressedExchange:
    setup = CompressedSetup(list(model.parameters()), Group(), WIDTH,
                            ErrorFeedback() if error_feedback else None, min_compress_numel=16)
    return compressed_exchange(setup, parse_codec(spec))


def _backward(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 64, generator=generator).to(dtype)
    y = torch.randint(0, 10, (16,), generator=generator)
    nn.functional.cross_entropy(model(x).float(), y).backward()


# --- codecs --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_a_half_precision_input_gives_the_payload_of_its_float32_widening(
    codec: Codec, dtype: torch.dtype
) -> None:
    x = randn(64, 32, 3, 3, seed=3).to(dtype)

    payload = codec.compress(x, seed=5)
    wide = codec.compress(x.float(), seed=5)

    assert [(t.dtype, t.numel()) for t in payload] == codec.payload_spec(x.shape)
    assert codec.wire_bytes(x.shape) == sum(t.numel() * t.element_size() for t in payload)
    assert all(torch.equal(a, b) for a, b in zip(payload, wide, strict=True))
    assert codec.decompress(payload, x.shape, seed=5).dtype == torch.float32


def test_fp16_clamps_a_large_bf16_value_instead_of_overflowing() -> None:
    # 65504 is not a bf16 value: clamping in bf16 would round it to 65536, which is fp16 inf
    x = torch.tensor([1e6, -1e6, 65504.0, 3.0], dtype=torch.bfloat16)

    restored = Fp16().decompress(Fp16().compress(x), x.shape)

    assert torch.equal(restored, torch.tensor([65504.0, -65504.0, 65504.0, 3.0]))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_decompress_add_into_a_half_precision_tensor(dtype: torch.dtype) -> None:
    codec = TopK(0.1)
    x = randn(30, 20)
    out = torch.zeros(30, 20, dtype=dtype)

    codec.decompress_add_(out, codec.compress(x))

    assert out.dtype == dtype
    assert torch.equal(out, codec.decompress(codec.compress(x), x.shape).to(dtype))


@pytest.mark.parametrize("dtype", [*HALF, torch.float64], ids=str)
def test_error_feedback_runs_in_float32_and_loses_nothing(dtype: torch.dtype) -> None:
    feedback, codec = ErrorFeedback(), TopK(0.01)

    for step in range(4):
        x = randn(1001, seed=step).to(dtype)
        old = feedback.residual("w")
        corrected = feedback.corrected("w", x)
        sent = codec.decompress(codec.compress(corrected), x.shape)
        feedback.update("w", corrected, sent)

        residual = feedback.residual("w")
        assert corrected.dtype == torch.float32 and residual is not None
        assert residual.dtype == torch.float32
        expected = x.float() if old is None else x.float() + old
        assert torch.equal(sent + residual, expected)


# --- the exchanges -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*HALF, torch.float64], ids=str)
@pytest.mark.parametrize("spec", SPECS)
def test_gradients_stay_in_the_parameters_dtype(spec: str, dtype: torch.dtype) -> None:
    model = _model(dtype)
    sync = _exchange(model, spec)

    for step in range(3):
        sync.start_step([16])
        _backward(model, seed=step)
        sync.finish(torch.zeros(WIDTH))

        for p in model.parameters():
            assert p.grad is not None and p.grad.dtype == dtype
            storage = p.grad.untyped_storage().data_ptr()
            assert storage == sync.grads.untyped_storage().data_ptr()  # a view of the buffer
            assert bool(torch.isfinite(p.grad).all())
    sync.close()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("spec", ["fp16", "topk:0.05", "sign"])
def test_one_rank_applies_the_float32_codec_once_rounded(spec: str, dtype: torch.dtype) -> None:
    # Prepare: one step without error feedback, so the update is decompress(compress(g))
    model = _model(dtype)
    sync = _exchange(model, spec, error_feedback=False)
    sync.start_step([16])
    _backward(model, seed=7)
    local = [p.grad.detach().float() for p in model.parameters()]

    # Execute
    sync.finish(torch.zeros(WIDTH))

    # Assert: every compressed tensor is its float32 round trip, rounded to the dtype once
    keys = {key for key, _ in sync.split.large}
    assert keys
    for index, (p, g) in enumerate(zip(model.parameters(), local, strict=True)):
        expected = g
        if f"p{index}" in keys:
            seed = sync._seed([k for k, _ in sync.split.large].index(f"p{index}"))
            expected = sync.codec.decompress(sync.codec.compress(g, seed=seed), g.shape,
                                             seed=seed)
        assert torch.equal(p.grad, expected.to(dtype))
    sync.close()


def test_payload_bytes_count_the_plain_part_in_the_parameters_dtype() -> None:
    fp32 = _exchange(_model(torch.float32), "topk:0.05")
    bf16 = _exchange(_model(torch.bfloat16), "topk:0.05")
    codec_bytes = sum(bf16.codec.wire_bytes(g.shape) for _, g in bf16.split.large)

    assert [g.numel() for _, g in bf16.split.large] == [3072, 48, 480]  # under 16: plain
    assert bf16.payload_bytes == codec_bytes + 2 * 10
    assert fp32.payload_bytes == codec_bytes + 4 * 10
    fp32.close()
    bf16.close()


def test_mixed_dtypes_are_refused() -> None:
    model = _model(torch.float32)
    model[2].to(torch.bfloat16)

    with pytest.raises(ValueError, match=r"one floating dtype.*torch.bfloat16, torch.float32"):
        _exchange(model, "fp16")


def test_auto_runs_a_bf16_model() -> None:
    model = _model(torch.bfloat16)
    setup = CompressedSetup(list(model.parameters()), Group(), WIDTH, ErrorFeedback(),
                            min_compress_numel=16)
    sync = AutoCodecExchange(setup, probe_steps=2)

    for step in range(3):
        sync.start_step([16])
        _backward(model, seed=step)
        sync.finish(torch.zeros(WIDTH))
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16
                   for p in model.parameters())
    assert sync.grads.dtype == torch.bfloat16
    sync.close()


def test_the_auto_prediction_counts_uncompressed_bytes_in_the_model_dtype() -> None:
    # Prepare: the demo CNN's shapes on 4 ranks, at a link where fp32 gradients choose fp16
    shapes = [torch.Size(s) for s in [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 1024),
                                      (128,), (10, 128), (10,)]]

    # Execute
    fp32 = choose_codec(shapes, 4, compute_s=0.015, bandwidth_bytes_per_s=2e8)
    bf16 = choose_codec(shapes, 4, compute_s=0.015, bandwidth_bytes_per_s=2e8, element_bytes=2)

    # Assert: for bf16 "fp16" sends what "none" does, so the exact exchange wins the tie
    assert fp32.spec == "fp16"
    assert bf16.spec == "none"
    assert sent_bytes_per_step("none", shapes, 4, 1024, 2) == pytest.approx(
        sent_bytes_per_step("fp16", shapes, 4, 1024, 2))
