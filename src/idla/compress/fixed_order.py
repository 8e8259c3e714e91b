"""Linear algebra in a fixed order of IEEE 754 elementwise operations: the same bits on every
device.

IEEE 754 rounds +, −, ×, ÷ and sqrt correctly, so one sequence of those operations on the same
float32 inputs gives the same bits on any compliant device, whatever it vectorizes, threads or
fuses inside one elementwise kernel. Library reductions, matmuls and QR give no such promise:
their summation order depends on the kernel, the thread count and the device. The functions
here are built only from elementwise kernels (``+``, ``−``, ``×``, ``÷``, ``sqrt``, ``abs``,
``where``) and from ``amax``, which is exact in any order; sums are pairwise trees of a fixed
shape (`tree_sum`). PowerSGD uses them where every rank must reach identical bits from
identical inputs (`idla.compress.powersgd`).

What the promise rests on: every operand stays on the device (a CPU scalar divisor makes
CUDA multiply by its reciprocal instead), no ``alpha`` other than 1 (``a + 1·b`` is exact
even when fused), and the device keeps subnormals (no flush-to-zero, PyTorch's default on CPU
and CUDA; ``torch.set_flush_denormal(True)`` would break it), as IEEE requires.
"""

from __future__ import annotations

import torch


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over dim 0 in a fixed pairwise order.  (m, ...) -> (...).

    Rows are padded with zeros to the next power of two (x + 0 = x), then the lower half is
    added to the upper half elementwise until one row is left: element i of level l is always
    the sum of the same two elements of level l−1, on any device. Error: at most
    ⌈log2 m⌉ roundings per element, against m − 1 for a sequential sum (Higham 1993, "The
    accuracy of floating point summation"). Cost: ⌈log2 m⌉ elementwise additions, m − 1
    adds in all, and one padded copy when m is not a power of two.
    """
    m = x.shape[0]
    width = 1 << max(m - 1, 0).bit_length()
    if width != m:
        x = torch.cat([x, x.new_zeros((width - m, *x.shape[1:]))])
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        x = x[:half] + x[half:]
    return x[0]


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """P with orthonormal columns spanning the same space, by classical Gram–Schmidt with one
    reorthogonalization (CGS2; Giraud, Langou, Rozložník & van den Eshof 2005, "Rounding error
    analysis of the classical Gram–Schmidt orthogonalization process": orthogonal to working
    precision, like Householder QR, where plain Gram–Schmidt is not).  (m, r) -> (m, r).

    Column k has its projections on columns 0..k−1 removed twice (dot products by
    `tree_sum`, then one multiply and one subtract per earlier column, in column order), is
    scaled by its largest magnitude (exact in any order; keeps v·v from overflowing or
    underflowing) and divided by its norm. A column that is all zeros stays zeros (QR would
    give some unit vector; either way it adds nothing to P̂ Qᵀ). The result has the same bits
    on every IEEE device and thread count for the same bits of ``p``, in ``p``'s dtype.

    Cost: 3r − 2 `tree_sum` calls (the dot products of each pass batched into one) of
    ⌈log2 m⌉ additions each, plus a multiply and a subtract per earlier column per pass and
    ~8 kernels per column: about r²·log2(m) elementwise kernels in all (64 for r = 2 at
    m = 1024, ~170 for r = 4), where QR is one LAPACK/cuSOLVER call. The flops are the same
    O(m·r²); on a GPU the cost is kernel launches (~5 µs each), not arithmetic.
    """
    columns: list[torch.Tensor] = []  # (m,) each, orthonormal
    for k in range(p.shape[1]):
        v = p[:, k]
        if columns:
            basis = torch.stack(columns, dim=1)  # (m, k)
            for _ in range(2):
                dots = tree_sum(basis * v[:, None])  # (k,)
                for j, column in enumerate(columns):
                    v = v - dots[j : j + 1] * column
        top = torch.amax(v.abs(), dim=0, keepdim=True)  # (1,)
        v = v / torch.where(top > 0, top, torch.ones_like(top))  # |v| ≤ 1, max 1 or all zero
        norm = torch.sqrt(tree_sum(v * v)).reshape(1)  # (1,): ≥ 1 unless v is zero
        columns.append(v / torch.where(norm > 0, norm, torch.ones_like(norm)))
    if not columns:
        return p.clone()
    return torch.stack(columns, dim=1)


def outer_sum(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P Qᵀ as r rank-one terms added in column order, each a separate elementwise multiply
    and add (no matmul, no fused multiply-add).  (m, r), (n, r) -> (m, n), contiguous.

    Cost: 2r − 1 elementwise passes over m·n elements and one (m, n) temporary, against one
    matmul of the same m·n·r multiply-adds; memory-bound, it is what bit identity costs.
    """
    p_rows, q_rows = p.T.contiguous(), q.T.contiguous()  # (r, m), (r, n): unit-stride rows
    out = p_rows[0][:, None] * q_rows[0]
    for k in range(1, p.shape[1]):
        out.add_(p_rows[k][:, None] * q_rows[k])
    return out
