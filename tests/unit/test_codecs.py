"""Gradient codecs, byte packing and error feedback, checked against their definitions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from idla.compress import (
    Codec,
    ErrorFeedback,
    Fp16,
    NoCompression,
    PowerSGD,
    RandomK,
    ScaledSign,
    TopK,
    Transport,
    pack,
    parse_codec,
    unpack,
)
from idla.errors import ConfigError

SHAPES = [torch.Size([1]), torch.Size([7]), torch.Size([1001]), torch.Size([64, 32, 3, 3])]
ELEMENTWISE: list[Codec] = [NoCompression(), Fp16(), TopK(0.01), RandomK(0.05), ScaledSign()]
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]


def randn(*shape: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device)


def low_rank(m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    return randn(m, rank, seed=seed) @ randn(n, rank, seed=seed + 1).T


# --- wire format ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ELEMENTWISE, ids=lambda c: c.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_payload_matches_spec_and_wire_bytes(codec: Codec, shape: torch.Size) -> None:
    x = randn(*shape, seed=3)

    payload = codec.compress(x, seed=5)

    assert [(t.dtype, t.numel()) for t in payload] == codec.payload_spec(shape)
    assert all(t.dim() == 1 and t.is_contiguous() for t in payload)
    assert codec.wire_bytes(shape) == sum(t.numel() * t.element_size() for t in payload)


@pytest.mark.parametrize("shape", [torch.Size([64, 32, 3, 3]), torch.Size([40, 17])])
def test_powersgd_payload_matches_spec_and_wire_bytes(shape: torch.Size) -> None:
    codec = PowerSGD(2)

    payload = codec.compress(randn(*shape))

    assert [(t.dtype, t.numel()) for t in payload] == codec.payload_spec(shape)
    assert codec.wire_bytes(shape) == sum(t.numel() * t.element_size() for t in payload)


def test_sizes_and_transports() -> None:
    assert TopK().transport is Transport.ALLGATHER and RandomK().transport is Transport.ALLREDUCE
    assert TopK(0.01).payload_spec(torch.Size([1001])) == [(torch.float16, 11), (torch.int32, 11)]
    assert TopK(0.5).payload_spec(torch.Size([1])) == [(torch.float16, 1), (torch.int32, 1)]
    assert RandomK(0.05).wire_bytes(torch.Size([1001])) == 51 * 4
    assert ScaledSign().wire_bytes(torch.Size([7])) == 4 + 1
    assert ScaledSign().wire_bytes(torch.Size([64, 32, 3, 3])) == 4 + 64 * 32 * 9 // 8


@pytest.mark.parametrize(("m", "n", "rank"), [(64, 288, 2), (512, 512, 4), (10, 1000, 1)])
def test_powersgd_compression_ratio(m: int, n: int, rank: int) -> None:
    codec = PowerSGD(rank)
    shape = torch.Size([m, n])

    ratio = (shape.numel() * 4) / codec.wire_bytes(shape)

    assert codec.wire_bytes(shape) == (m + n) * rank * 4
    assert ratio == (m * n) / ((m + n) * rank)


def test_powersgd_eligibility() -> None:
    codec = PowerSGD(2)

    assert codec.eligible(torch.Size([64, 32, 3, 3]))
    assert codec.matrix_shape(torch.Size([64, 32, 3, 3])) == (64, 288)
    assert not codec.eligible(torch.Size([1000]))
    assert not codec.eligible(torch.Size([4, 4]))  # (4 + 4)·2 = 16 is not below 16
    assert not codec.eligible(torch.Size([2, 1000]))


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_none_is_exact(device: str) -> None:
    x = randn(5, 7, device=device)

    restored = NoCompression().decompress(NoCompression().compress(x), x.shape)

    assert restored.dtype == torch.float32 and restored.device == x.device
    assert torch.equal(restored, x)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_within_precision_and_clamped(device: str) -> None:
    x = randn(1001, device=device)
    x[:4] = torch.tensor([1e6, -1e6, math.inf, -math.inf])

    restored = Fp16().decompress(Fp16().compress(x), x.shape)

    assert torch.equal(restored[:4].cpu(), torch.tensor([65504.0, -65504.0, 65504.0, -65504.0]))
    assert torch.allclose(restored[4:], x[4:], rtol=2**-11, atol=2**-24)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_keeps_exactly_the_largest(device: str) -> None:
    x = randn(1001, seed=1, device=device)
    codec = TopK(0.01)

    payload = codec.compress(x)
    restored = codec.decompress(payload, x.shape)

    largest = torch.argsort(x.abs(), descending=True)[:11]
    assert set(payload[1].tolist()) == set(largest.tolist())
    assert torch.equal(restored[largest], x[largest].half().float())  # values travel as fp16
    assert torch.count_nonzero(restored) == 11
    assert all(torch.equal(a, b) for a, b in zip(payload, codec.compress(x), strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_sign_is_scale_times_sign(device: str) -> None:
    x = randn(64, 32, 3, 3, seed=2, device=device)
    x.view(-1)[0] = 0.0

    restored = ScaledSign().decompress(ScaledSign().compress(x), x.shape)

    expected = x.abs().mean() * torch.where(x >= 0, 1.0, -1.0)
    assert torch.allclose(restored, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1001])
def test_sign_bits_survive_odd_sizes(numel: int) -> None:
    x = randn(numel, seed=numel)

    restored = ScaledSign().decompress(ScaledSign().compress(x), x.shape)

    assert torch.equal(restored > 0, x >= 0)


@pytest.mark.parametrize("device", DEVICES)
def test_randk_indices_follow_the_seed(device: str) -> None:
    codec = RandomK(0.05)
    x = torch.arange(1, 1002, dtype=torch.float32, device=device)

    same = [codec.compress(x, seed=7)[0] for _ in range(2)]
    other = codec.compress(x, seed=8)[0]
    restored = codec.decompress([same[0]], x.shape, seed=7)

    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], other)
    assert torch.equal(restored[restored != 0], x[restored != 0])
    assert torch.count_nonzero(restored) == 51
    assert torch.equal(same[0].cpu(), codec.compress(x.cpu(), seed=7)[0])  # CPU and CUDA agree


def test_randk_payloads_sum_like_their_inputs() -> None:
    codec = RandomK(0.1)
    xs = [randn(300, seed=s) for s in range(3)]

    summed = torch.stack([codec.compress(x, seed=4)[0] for x in xs]).sum(dim=0)
    restored = codec.decompress([summed], torch.Size([300]), seed=4)

    mask = codec.decompress(codec.compress(torch.ones(300), seed=4), torch.Size([300]), seed=4)
    assert torch.allclose(restored, sum(xs) * mask)


@pytest.mark.parametrize("device", DEVICES)
def test_powersgd_reconstructs_a_rank_r_matrix(device: str) -> None:
    codec = PowerSGD(2)
    x = low_rank(64, 288, 2).view(64, 32, 3, 3).to(device)

    restored = codec.decompress(codec.compress(x, seed=3), x.shape)

    assert torch.allclose(restored, x, rtol=0, atol=1e-5 * x.abs().max().item())


def test_powersgd_helpers_compose_like_compress() -> None:
    codec = PowerSGD(3)
    shape = torch.Size([50, 40])
    m_matrix = low_rank(50, 40, 3, seed=9)

    p_hat = codec.orthonormalize(codec.p_of(m_matrix, codec.initial_q(shape, seed=1)))
    q = codec.q_of(m_matrix, p_hat)

    assert torch.allclose(p_hat.T @ p_hat, torch.eye(3), atol=1e-5)
    assert torch.allclose(codec.reconstruct(p_hat, q, shape), m_matrix, atol=1e-4)
    assert torch.equal(codec.initial_q(shape, seed=1), codec.initial_q(shape, seed=1))
    assert not torch.equal(codec.initial_q(shape, seed=1), codec.initial_q(shape, seed=2))


@pytest.mark.parametrize("codec", ELEMENTWISE, ids=lambda c: c.name)
def test_decompress_add_matches_decompress(codec: Codec) -> None:
    shape = torch.Size([64, 32, 3, 3])
    payloads = [codec.compress(randn(*shape, seed=s), seed=11) for s in range(3)]
    out = torch.ones(shape)

    for payload in payloads:
        codec.decompress_add_(out, payload, seed=11)

    expected = 1 + torch.stack([codec.decompress(p, shape, seed=11) for p in payloads]).sum(0)
    assert torch.allclose(out, expected, atol=1e-6)


def test_decompress_add_into_a_non_contiguous_view() -> None:
    codec = TopK(0.1)
    base = torch.zeros(20, 30)
    out = base.T  # (30, 20), not contiguous
    x = randn(30, 20)

    codec.decompress_add_(out, codec.compress(x))

    assert torch.equal(out, codec.decompress(codec.compress(x), x.shape))


def test_decompress_rejects_a_payload_of_the_wrong_shape() -> None:
    payload = TopK(0.01).compress(randn(1001))

    with pytest.raises(ValueError, match="does not fit"):
        TopK(0.01).decompress(payload, torch.Size([2000]))


# --- packing -------------------------------------------------------------------------------


def test_pack_unpack_round_trip_with_mixed_dtypes() -> None:
    tensors = [
        torch.tensor([1.5, -2.25, 3.0]),
        torch.tensor([7, -1, 2**31 - 1, 0, 5], dtype=torch.int32),
        torch.tensor([255, 0, 1], dtype=torch.uint8),
        torch.tensor([0.5, -1.0, 65504.0], dtype=torch.float16),
        torch.tensor([3.25]),
        torch.empty(0, dtype=torch.int32),
    ]
    spec = [(t.dtype, t.numel()) for t in tensors]

    buf = pack(tensors)
    restored = unpack(buf, spec)

    assert buf.dtype == torch.uint8 and buf.numel() == 12 + 20 + 3 + 6 + 4
    assert all(
        torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(restored, tensors, strict=True)
    )
    buf.zero_()
    assert torch.equal(restored[0], tensors[0])  # unpacked tensors do not alias the buffer


def test_pack_carries_whole_payloads() -> None:
    codecs: list[Codec] = [TopK(0.01), ScaledSign(), Fp16()]
    xs = [randn(1001, seed=1), randn(7, seed=2), randn(13, seed=3)]
    payloads = [c.compress(x) for c, x in zip(codecs, xs, strict=True)]
    spec = [s for c, x in zip(codecs, xs, strict=True) for s in c.payload_spec(x.shape)]

    restored = unpack(pack([t for p in payloads for t in p]), spec)

    assert sum(c.wire_bytes(x.shape) for c, x in zip(codecs, xs, strict=True)) == sum(
        t.numel() * t.element_size() for t in restored
    )
    assert torch.equal(
        codecs[0].decompress(restored[:2], xs[0].shape),
        codecs[0].decompress(payloads[0], xs[0].shape),
    )


def test_unpack_rejects_a_buffer_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="8 bytes"):
        unpack(torch.zeros(7, dtype=torch.uint8), [(torch.float32, 2)])


# --- error feedback ------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [*ELEMENTWISE, PowerSGD(2)], ids=lambda c: c.name)
def test_error_feedback_loses_nothing(codec: Codec) -> None:
    feedback = ErrorFeedback()
    exact = isinstance(codec, (TopK, RandomK, NoCompression))

    for step in range(4):
        x = randn(64, 32, 3, 3, seed=step)
        old = feedback.residual("w")
        expected = x if old is None else x + old
        corrected = feedback.corrected("w", x)
        sent = codec.decompress(codec.compress(corrected, seed=step), x.shape, seed=step)
        feedback.update("w", corrected, sent)

        residual = feedback.residual("w")
        assert residual is not None
        total = sent + residual
        if exact:
            assert torch.equal(total, expected)
        else:
            assert torch.allclose(total, expected, atol=1e-5)


def test_error_feedback_starts_from_a_copy() -> None:
    feedback = ErrorFeedback()
    x = torch.ones(3)

    corrected = feedback.corrected("w", x)
    corrected.add_(1)

    assert torch.equal(x, torch.ones(3))
    assert feedback.residual("w") is None


def test_error_feedback_state_round_trips_through_safetensors(tmp_path: Path) -> None:
    feedback = ErrorFeedback()
    for key in ("layer.0.weight", "layer.0.bias"):
        x = randn(4, 5, seed=len(key))
        feedback.update(key, x, TopK(0.2).decompress(TopK(0.2).compress(x), x.shape))
    path = tmp_path / "residuals.safetensors"

    save_file(feedback.state_dict(), str(path))
    restored = ErrorFeedback()
    restored.load_state_dict(load_file(str(path)))

    assert restored.state_dict().keys() == feedback.state_dict().keys()
    for key, value in feedback.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    restored.reset()
    assert restored.residual("layer.0.bias") is None


@pytest.mark.parametrize(
    "value",
    [torch.tensor([1.0, math.nan]), torch.tensor([math.inf]), torch.tensor([1, 2])],
    ids=["nan", "inf", "int"],
)
def test_error_feedback_rejects_bad_state(value: torch.Tensor) -> None:
    feedback = ErrorFeedback()
    feedback.update("kept", torch.ones(2), torch.zeros(2))

    with pytest.raises(ConfigError, match="'w'"):
        feedback.load_state_dict({"w": value})
    assert torch.equal(feedback.state_dict()["kept"], torch.ones(2))


def test_error_feedback_rejects_a_shape_change() -> None:
    feedback = ErrorFeedback()
    feedback.update("w", torch.ones(4), torch.zeros(4))

    with pytest.raises(ValueError, match="shape"):
        feedback.corrected("w", torch.ones(5))


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", NoCompression()),
        ("fp16", Fp16()),
        ("sign", ScaledSign()),
        ("topk:0.01", TopK(0.01)),
        ("topk", TopK(0.01)),
        ("topk:1", TopK(1.0)),
        ("randk:0.05", RandomK(0.05)),
        ("randk", RandomK(0.01)),
        ("powersgd:2", PowerSGD(2)),
        ("powersgd", PowerSGD(2)),
        (" PowerSGD:4 ", PowerSGD(4)),
    ],
)
def test_parse_codec_accepts(spec: str, expected: Codec) -> None:
    codec = parse_codec(spec)

    assert codec == expected
    assert parse_codec(codec.name) == codec


@pytest.mark.parametrize(
    "spec",
    [
        "auto",
        "gzip",
        "",
        "topk:0",
        "topk:1.5",
        "topk:-0.1",
        "topk:abc",
        "topk:",
        "topk:nan",
        "randk:inf",
        "powersgd:0",
        "powersgd:-1",
        "powersgd:2.5",
        "powersgd:two",
        "fp16:0.5",
    ],
)
def test_parse_codec_rejects(spec: str) -> None:
    with pytest.raises(ConfigError, match="valid forms"):
        parse_codec(spec)
