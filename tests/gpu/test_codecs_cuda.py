"""Codecs and digests on CUDA tensors against the CPU, where the code claims the same bits:
ranks on different devices must agree on what they sent, where a value went, and whether two
replicas are the same."""

from __future__ import annotations

import pytest
import torch

from idla.compress import Codec, Fp16, PowerSGD, RandomK, ScaledSign, TopK
from idla.compress.fixed_order import orthonormalize, outer_sum
from idla.runtime.digest import tensor_digest, tensor_digests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUMEL = (1 << 20) + 37  # not a multiple of 8 (sign's packing) nor of a warp


def _distinct_magnitudes(numel: int, seed: int = 0) -> torch.Tensor:
    """Values whose magnitudes are all different, so top-k has one answer on every device."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = (torch.randperm(numel, generator=generator).double() + 0.5) / numel
    signs = torch.randint(0, 2, (numel,), generator=generator).double().mul(2).sub(1)
    return (magnitudes * signs).float()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers on the CPU: equal bits compare equal, NaN included."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits, except that a NaN matches any NaN: devices write NaN's payload bits
    differently (CUDA a canonical NaN), and no one reads them."""
    a, b = a.detach().cpu(), b.detach().cpu()
    nan = a.isnan()
    return (a.dtype == b.dtype and torch.equal(nan, b.isnan())
            and _same_bits(a[~nan], b[~nan]))


def test_fp16_payload_and_sum_are_the_cpus_bits() -> None:
    # Prepare: ordinary values, values beyond fp16's range, infinities and a NaN
    x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(1)) * 1e3
    x[:4] = torch.tensor([1e6, -1e6, float("inf"), float("nan")])
    codec = Fp16()

    # Execute
    cpu, gpu = codec.compress(x), codec.compress(x.cuda())
    sums = []
    for device in ("cpu", "cuda"):
        total = torch.zeros(NUMEL, device=device)
        for payload in (cpu, gpu):
            codec.decompress_add_(total, [t.to(device) for t in payload])
        sums.append(total)

    # Assert
    assert gpu[0].device.type == "cuda"
    assert _same_values(cpu[0], gpu[0])
    assert _same_values(sums[0], sums[1])


def test_randomk_draws_the_same_positions_and_values_on_both_devices() -> None:
    # Prepare
    x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(2))
    codec = RandomK(0.01)

    # Execute
    positions = codec.indices(NUMEL, seed=7), codec.indices(NUMEL, seed=7, device="cuda")
    payloads = codec.compress(x, seed=7), codec.compress(x.cuda(), seed=7)
    decompressed = [codec.decompress([p.to(d) for p in payloads[0]], x.shape, seed=7)
                    for d in ("cpu", "cuda")]

    # Assert
    assert positions[1].device.type == "cuda" and torch.equal(positions[0], positions[1].cpu())
    assert _same_bits(payloads[0][0], payloads[1][0])
    assert _same_bits(decompressed[0], decompressed[1])


def test_topk_keeps_the_same_entries_on_both_devices() -> None:
    """Top-k promises one answer per input, not one order: the payload's entries may come in
    another order on the GPU, but the same positions with the same values must be kept."""
    # Prepare
    x = _distinct_magnitudes(NUMEL)
    codec = TopK(0.01)

    # Execute
    values_cpu, positions_cpu = codec.compress(x)
    values_gpu, positions_gpu = codec.compress(x.cuda())
    order_cpu, order_gpu = positions_cpu.argsort(), positions_gpu.cpu().argsort()
    decompressed = (codec.decompress([values_cpu, positions_cpu], x.shape),
                    codec.decompress([values_gpu, positions_gpu], x.shape))

    # Assert
    assert torch.equal(positions_cpu[order_cpu], positions_gpu.cpu()[order_gpu])
    assert _same_bits(values_cpu[order_cpu], values_gpu.cpu()[order_gpu])
    assert _same_bits(decompressed[0], decompressed[1])


def test_sign_packs_the_same_bits_on_both_devices() -> None:
    """The signs are exact; the scale is a mean, summed in another order on the GPU."""
    # Prepare
    x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(3))
    x[:5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0])
    codec = ScaledSign()

    # Execute
    (scale_cpu, bits_cpu), (scale_gpu, bits_gpu) = codec.compress(x), codec.compress(x.cuda())

    # Assert
    assert _same_bits(bits_cpu, bits_gpu)
    assert float(scale_gpu) == pytest.approx(float(scale_cpu), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codec", [Fp16(), RandomK(0.01), TopK(0.01), ScaledSign()],
                         ids=lambda c: c.name)
def test_half_precision_gradients_give_their_float32_widenings_payload_on_cuda(
        dtype: torch.dtype, codec: Codec) -> None:
    # Prepare
    x = _distinct_magnitudes(NUMEL).mul(4.0).to(dtype).cuda()

    # Execute
    half, widened = codec.compress(x, seed=5), codec.compress(x.float(), seed=5)
    on_cpu = codec.compress(x.cpu(), seed=5)

    # Assert: the same payload as the float32 widening, and (where exact) as on the CPU
    assert all(_same_bits(a, b) for a, b in zip(half, widened, strict=True))
    if not isinstance(codec, ScaledSign | TopK):  # a mean; an order
        assert all(_same_bits(a, b) for a, b in zip(half, on_cpu, strict=True))


@pytest.mark.parametrize("shape", [(4096, 2), (1000, 4), (37, 3), (1 << 16, 1), (513, 2)])
def test_powersgd_steps_after_the_all_reduce_are_the_cpus_bits(shape: tuple[int, int]) -> None:
    """Every rank orthonormalizes the same all-reduced P and rebuilds P̂ Qᵀ from the same Q:
    fixed-order elementwise math, so a GPU rank and a CPU rank must get the same bits (TF32
    or not: no matmul is involved)."""
    # Prepare: magnitudes over many decades; in the last shape a zero column
    generator = torch.Generator().manual_seed(5)
    p = torch.randn(*shape, generator=generator) * torch.logspace(-20, 20, shape[0])[:, None]
    if shape == (513, 2):
        p[:, 1] = 0.0
    q = torch.randn(512, shape[1], generator=generator)
    codec = PowerSGD(shape[1])
    size = torch.Size([shape[0], 512])

    # Execute
    on_cpu, on_gpu = orthonormalize(p), orthonormalize(p.cuda())
    rebuilt = outer_sum(on_cpu, q), outer_sum(on_cpu.cuda(), q.cuda())
    payload = [on_cpu.reshape(-1), q.reshape(-1)]
    decompressed = (codec.decompress(payload, size),
                    codec.decompress([t.cuda() for t in payload], size))

    # Assert
    assert on_gpu.device.type == "cuda" and _same_bits(on_cpu, on_gpu)
    assert _same_bits(rebuilt[0], rebuilt[1])
    assert _same_bits(decompressed[0], decompressed[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.int64, torch.uint8, torch.bool])
def test_digests_agree_between_cpu_and_gpu(dtype: torch.dtype) -> None:
    """A CPU rank and a GPU rank holding the same bytes must agree, or the replica check would
    stop every correct mixed job; one changed element must still show."""
    # Prepare
    generator = torch.Generator().manual_seed(6)
    tensors = [(torch.randn(n, generator=generator) * 100).to(dtype) for n in (1, 7, NUMEL)]
    changed = [t.clone() for t in tensors]
    changed[2][12345] = 0 if bool(tensors[2][12345] != 0) else 1

    # Execute
    cpu = tensor_digests(tensors), tensor_digest(tensors)
    gpu = tensor_digests([t.cuda() for t in tensors]), tensor_digest([t.cuda() for t in tensors])

    # Assert
    assert cpu == gpu
    assert tensor_digest([t.cuda() for t in changed]) != gpu[1]
