"""The fixed-order kernels PowerSGD uses give the same bits as an independent numpy float32
implementation of the same operation sequence (numpy's elementwise float32 ops are IEEE
correctly rounded too), whatever the thread count or the input's strides; and they are as
good an orthonormalization as QR."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
import torch

from idla.compress import PowerSGD
from idla.compress.fixed_order import orthonormalize, outer_sum, tree_sum

F32 = npt.NDArray[np.float32]
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPES = [(1, 1), (2, 1), (7, 2), (1000, 2), (1024, 4), (1025, 3), (70_001, 2)]
"""(m, r); 70 001 rows make the first tree level ~35 000 elements per column: above the
32 768-element grain at which PyTorch's CPU kernels split work between threads."""


# --- the numpy reference: the same operation sequence, written again --------------------


def np_tree_sum(x: F32) -> F32:
    width = 1 << max(x.shape[0] - 1, 0).bit_length()
    x = np.concatenate([x, np.zeros((width - x.shape[0], *x.shape[1:]), np.float32)])
    while x.shape[0] > 1:
        x = x[: x.shape[0] // 2] + x[x.shape[0] // 2 :]
    return x[0]


def np_orthonormalize(p: F32) -> F32:
    one = np.float32(1.0)
    columns: list[F32] = []
    for k in range(p.shape[1]):
        v = p[:, k].copy()
        for _ in range(2 if columns else 0):
            dots = np_tree_sum(np.stack(columns, axis=1) * v[:, None])
            for j, column in enumerate(columns):
                v = v - dots[j] * column
        top = np.max(np.abs(v))
        v = v / (top if top > 0 else one)
        norm = np.sqrt(np_tree_sum(v * v))
        columns.append(v / (norm if norm > 0 else one))
    return np.stack(columns, axis=1)


def np_outer_sum(p: F32, q: F32) -> F32:
    out = p[:, 0:1] * q[:, 0]
    for k in range(1, p.shape[1]):
        out = out + p[:, k : k + 1] * q[:, k]
    return out


def wide_range(m: int, r: int, seed: int = 0) -> torch.Tensor:
    """A float32 (m, r) matrix whose rows span six orders of magnitude: sums of it round."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.pow(10.0, torch.empty(m, 1).uniform_(-3, 3, generator=generator))
    return torch.randn(m, r, generator=generator) * scale


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _same_bits(a: torch.Tensor, b: npt.NDArray[np.float32]) -> bool:
    mine = a.detach().cpu().contiguous().numpy()
    return mine.dtype == b.dtype and mine.shape == b.shape and mine.tobytes() == b.tobytes()


# --- bit identity --------------------------------------------------------------------------


@pytest.mark.parametrize("threads_n", [1, 2])
@pytest.mark.parametrize(("m", "r"), SHAPES)
def test_orthonormalize_matches_numpy_bit_for_bit(m: int, r: int, threads_n: int,
                                                  threads: None) -> None:
    torch.set_num_threads(threads_n)
    p = wide_range(m, r, seed=m + r)

    assert _same_bits(orthonormalize(p), np_orthonormalize(p.numpy()))


@pytest.mark.parametrize("threads_n", [1, 2])
@pytest.mark.parametrize(("m", "n", "r"), [(3, 5, 1), (64, 288, 2), (300, 400, 4)])
def test_outer_sum_matches_numpy_bit_for_bit(m: int, n: int, r: int, threads_n: int,
                                             threads: None) -> None:
    torch.set_num_threads(threads_n)
    p, q = wide_range(m, r, seed=1), wide_range(n, r, seed=2)

    out = outer_sum(p, q)

    assert _same_bits(out, np_outer_sum(p.numpy(), q.numpy()))
    assert out.is_contiguous()
    assert torch.allclose(out, p @ q.T, rtol=1e-5, atol=1e-6 * float((p @ q.T).abs().max()))


def test_tree_sum_matches_numpy_and_sums_exactly_what_is_exact() -> None:
    x = wide_range(1025, 3)

    assert _same_bits(tree_sum(x), np_tree_sum(x.numpy()))
    assert torch.equal(tree_sum(torch.arange(1001.0)[:, None]), torch.tensor([500500.0]))
    assert torch.equal(tree_sum(torch.tensor([[2.0, 3.0]])), torch.tensor([2.0, 3.0]))


def test_thread_counts_give_the_same_bits(threads: None) -> None:
    p, q = wide_range(70_001, 4, seed=5), wide_range(300, 4, seed=6)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append((orthonormalize(p), outer_sum(p[:400], q)))

    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_non_contiguous_inputs_give_the_same_bits() -> None:
    p = wide_range(1000, 3, seed=8)
    transposed = p.T.contiguous().T  # (1000, 3) with strides (1, 1000)
    strided = torch.zeros(2000, 6)
    strided[::2, ::2] = p
    q = wide_range(50, 3, seed=9)
    q_strided = q.T.contiguous().T

    assert not transposed.is_contiguous() and not strided[::2, ::2].is_contiguous()
    assert torch.equal(orthonormalize(transposed), orthonormalize(p))
    assert torch.equal(orthonormalize(strided[::2, ::2]), orthonormalize(p))
    assert torch.equal(outer_sum(transposed, q_strided), outer_sum(p, q))


@NO_CUDA
def test_cpu_and_cuda_give_the_same_bits() -> None:
    p, q = wide_range(4099, 4, seed=10), wide_range(513, 4, seed=11)

    assert torch.equal(orthonormalize(p.cuda()).cpu(), orthonormalize(p))
    assert torch.equal(outer_sum(p.cuda(), q.cuda()).cpu(), outer_sum(p, q))


# --- quality -------------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "r"), [(7, 2), (1000, 2), (1024, 4), (70_001, 2)])
def test_columns_are_orthonormal_and_span_p(m: int, r: int) -> None:
    p = wide_range(m, r, seed=m)

    p_hat = orthonormalize(p)

    assert torch.allclose(p_hat.T @ p_hat, torch.eye(r), atol=1e-6)
    projected = p_hat @ (p_hat.T @ p)
    assert torch.allclose(projected, p, rtol=0, atol=1e-5 * float(p.abs().max()))


def test_the_approximation_matches_the_qr_version() -> None:
    # Prepare: a gradient-like matrix (a rank-8 signal plus noise) and one PowerSGD iteration
    generator = torch.Generator().manual_seed(12)
    m_matrix = (torch.randn(256, 8, generator=generator) @ torch.randn(8, 576, generator=generator)
                + 0.1 * torch.randn(256, 576, generator=generator))
    codec = PowerSGD(4)
    p = codec.p_of(m_matrix, codec.initial_q(torch.Size([256, 576]), seed=3))

    # Execute
    ours = codec.reconstruct(orthonormalize(p), codec.q_of(m_matrix, orthonormalize(p)),
                             m_matrix.shape)
    qr = torch.linalg.qr(p).Q
    theirs = qr @ (m_matrix.T @ qr).T

    # Assert: the same projection to float32 precision, hence the same error
    scale = float(m_matrix.norm())
    assert float((ours - theirs).norm()) < 1e-5 * scale
    assert float((m_matrix - ours).norm()) == pytest.approx(float((m_matrix - theirs).norm()),
                                                            rel=1e-5)


@pytest.mark.parametrize("power", [80, -80])
def test_the_scale_of_p_changes_no_bit(power: int) -> None:
    # 2**80 squares past float32's range and 2**-80 below its normals: the max-scaling keeps
    # v·v in range, and scaling by a power of two is exact
    p = wide_range(500, 3, seed=13)

    assert torch.equal(orthonormalize(p * 2.0**power), orthonormalize(p))


def test_dependent_and_zero_columns() -> None:
    p = wide_range(300, 1, seed=14)
    dependent = torch.cat([p, 2 * p, torch.zeros(300, 1)], dim=1)

    p_hat = orthonormalize(dependent)

    assert bool(torch.isfinite(p_hat).all())
    assert torch.equal(p_hat[:, 2], torch.zeros(300))
    assert torch.allclose(p_hat[:, 0], p[:, 0] / p[:, 0].norm(), atol=1e-6)
    assert abs(float(p_hat[:, 0] @ p_hat[:, 1])) < 1e-5  # noise, yet orthogonal to column 0
    assert float(p_hat[:, 1].norm()) in (0.0, pytest.approx(1.0, abs=1e-5))
