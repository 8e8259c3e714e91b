"""PowerSGD as a synchronous gradient exchange (Vogels et al. 2019): rank r, one power
iteration per step, Q warm-started from the last step, with error feedback.

For each compressed gradient, viewed as an m×n matrix M: P = M Q is all-reduced (one
all-reduce for every tensor's P) and orthonormalized into P̂, then Q = Mᵀ P̂ is all-reduced and
the update is P̂ Qᵀ. Both exchanges are linear, so the result approximates the sum of the
ranks' gradients; the summed Q is the next step's warm start. This rank's own share of the
update is P̂ P̂ᵀ M (a projection), which is what error feedback subtracts, so "sent + residual =
gradient + old residual" holds per rank. The math is the pure functions of
`idla.compress.powersgd`; this exchange holds the state: the warm Q per tensor and the
residuals.

Replicas stay bit-identical across hardware (a CPU rank beside GPUs of different models) with
no extra collective: every rank orthonormalizes the same all-reduced P and reconstructs from
the same all-reduced Q with fixed-order elementwise kernels (`idla.compress.fixed_order`),
which round the same on every IEEE device, where QR and matmul kernels do not.

Tensors PowerSGD cannot shrink ((m+n)·r ≥ m·n, or fewer than 2 dims) and small ones travel
uncompressed with the statistics (`idla.sync.size_rule`).

Cost per step (N ranks, ring collectives): 2(N-1)/N × (m+n)·r·4 bytes per compressed tensor,
in two all-reduces, plus the plain all-reduce of the rest. Memory: one (n, r) Q per compressed
tensor, and with error feedback one fp32 residual of each.

P, Q, P̂ and the residuals are float32 for every parameter dtype; a bf16 or fp16 gradient is
widened when it is read and P̂ Qᵀ is rounded to it once, when written into the gradient view.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from idla.compress import PowerSGD
from idla.runtime.group import Work
from idla.sync.size_rule import CompressedSetup, SplitExchange


class PowerSGDExchange(SplitExchange):
    """The low-rank exchange of one step, and the warm Q it carries to the next."""

    codec: PowerSGD

    def __init__(self, setup: CompressedSetup, codec: PowerSGD, steps_done: int = 0) -> None:
        """`setup.seed` seeds every tensor's initial Q (the same on all ranks)."""
        super().__init__(setup, codec, steps_done)
        self.warm_q: dict[str, torch.Tensor] = {}  # (n, r) per tensor key, same on all ranks

    def _wait(self, work: Work | None) -> None:
        if work is not None:
            self.group.wait(work)

    def _corrected(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        """This rank's gradient plus its residual, as a new float32 tensor (P, Q and the
        residual are float32 whatever the parameters' dtype)."""
        if self.error_feedback is None:
            return grad.to(torch.float32, copy=True)
        return self.error_feedback.corrected(key, grad)

    def _exchange_large(self) -> None:
        codec = self.codec
        matrices, ps = [], []
        for index, (key, grad) in enumerate(self.split.large):
            corrected = self._corrected(key, grad)
            if key not in self.warm_q:
                self.warm_q[key] = codec.initial_q(grad.shape, seed=self.seed * 7919 + index).to(
                    grad.device)
            matrix = corrected.view(codec.matrix_shape(grad.shape))  # (m, n)
            matrices.append((key, corrected, matrix))
            ps.append(codec.p_of(matrix, self.warm_q[key]))  # (m, r)
        p_all = torch.cat([p.reshape(-1) for p in ps])
        self._wait(self.group.all_reduce(p_all))
        p_hats, qs, offset = [], [], 0
        for p in ps:
            p_hat = codec.orthonormalize(p_all[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
            p_hats.append(p_hat)
        for (key, corrected, matrix), p_hat in zip(matrices, p_hats, strict=True):
            q_local = codec.q_of(matrix, p_hat)  # (n, r)
            if self.error_feedback is not None:
                # only this rank reads its residual, so a matmul's rounding is fine here
                sent = (p_hat @ q_local.T).view(corrected.shape)
                self.error_feedback.update(key, corrected, sent)
            qs.append(q_local)
        q_all = torch.cat([q.reshape(-1) for q in qs])
        self._wait(self.group.all_reduce(q_all))
        offset = 0
        for (key, _, _), (_, grad), p_hat, q in zip(matrices, self.split.large, p_hats, qs,
                                                    strict=True):
            q_sum = q_all[offset : offset + q.numel()].view_as(q)
            offset += q.numel()
            self.warm_q[key] = q_sum.clone()
            grad.copy_(codec.reconstruct(p_hat, q_sum, grad.shape))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Error-feedback residuals (``ef.<key>``), the warm Q (``q.<key>``) and the step
        counter. Tensors only, for safetensors."""
        state = self.split.state_dict(self.error_feedback)
        state.update({f"q.{k}": v.detach().cpu().contiguous() for k, v in self.warm_q.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict`'s output; shapes are checked against this model's tensors."""
        self.warm_q = self.split.load_state_dict(state, self.error_feedback)
