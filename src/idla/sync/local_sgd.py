"""Local SGD and DiLoCo: train for a few steps alone, then meet once.

Two synchronization strategies that a training loop calls after every optimizer step. Both
end a round with one sample-weighted average over the ranks, `weighted_average_` (one flat
buffer, one all-reduce); they differ in what they average and what they do with it:

- `PeriodicAveraging` (Stich 2019, "Local SGD converges fast and communicates little";
  Lin et al. 2020, "Don't use large mini-batches, use local SGD") replaces every replica by
  the weighted average of the replicas.
- `DiLoCo` (Douillard et al. 2023, "DiLoCo: distributed low-communication training of
  language models") averages the pseudo-gradient Δ = θ_global − θ_local and feeds it to an
  outer Nesterov SGD on θ_global, from which every replica then continues.

Weights. Rank r's weight w_r is the number of samples it processed since the last sync, so a
rank that did more work counts more and a rank with w_r = 0 contributes nothing (it still
receives the result). With period 1, plain SGD and each rank's mean loss, this is exactly one
synchronous step on the concatenated global batch.

Rounds. A sync is a collective: every rank must enter it once per round, and the strategies
never talk to each other about when. Each rank syncs when it has done its own number of
steps since the last sync; ranks may do different numbers of steps per round (`DiLoCo`'s
`set_inner_steps`) as long as each keeps stepping until it reaches its count. A loop must
therefore run for a number of rounds (`while strategy.syncs < rounds`), not a number of
steps, and a final `sync_now` must be called on every rank or on none.

Replicas must start identical (same seed, or a broadcast as the agent does); the strategies
keep them identical after every sync, because every rank does the same arithmetic on the same
reduced buffer. Trainable parameters and floating-point buffers (e.g. BatchNorm running
statistics) are averaged; frozen parameters never change and integer buffers (BatchNorm's
`num_batches_tracked`) stay local.

Cost per round: one all-reduce of (trainable parameters + floating buffers + 1) numbers in
float32 (float64 if a tensor is float64); ring all-reduce moves 2(N−1)/N of that per rank,
against one such all-reduce per step for synchronous data parallelism.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from idla.errors import ConfigError
from idla.runtime.group import Group


@dataclass(frozen=True, slots=True)
class Averaged:
    """What one call of `weighted_average_` did."""

    total_samples: float  # Σ_r w_r over the group; 0 means the tensors were left unchanged
    payload_bytes: int  # bytes this rank put into the all-reduce (payload, not ring traffic)


def _accumulation_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float32, or wider if some tensor is wider: half-precision models average in float32."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


@torch.no_grad()
def weighted_average_(tensors: Sequence[torch.Tensor], samples: float, group: Group) -> Averaged:
    """Replace each tensor, in place, by Σ_r w_r t_r / Σ_r w_r over the group's ranks.

    `samples` is this rank's weight w_r. The tensors and w_r travel in one flat buffer
    [w·t..., w] (float32, or float64 if a tensor is float64) through one sum all-reduce, then
    the sums are divided by Σ w: one rounding per multiply, sum and divide. Sample counts are
    exact in float32 up to 2**24 per round. When Σ w = 0 nothing is divided and the tensors
    stay as they are; the caller decides what that means. A group of one is its own average:
    no arithmetic is done, so the tensors stay bit-identical.

    Cost: one all-reduce of (Σ numel + 1) elements; one temporary buffer of that size.
    """
    if group.world_size == 1 or not tensors:
        return Averaged(total_samples=float(samples), payload_bytes=0)
    total_numel = sum(t.numel() for t in tensors)
    flat = torch.empty(  # (Σ numel + 1,): weighted tensors, then the weight
        total_numel + 1, dtype=_accumulation_dtype(tensors), device=tensors[0].device
    )
    offset = 0
    for tensor in tensors:
        view = flat[offset : offset + tensor.numel()]
        view.copy_(tensor.reshape(-1))
        view.mul_(samples)
        offset += tensor.numel()
    flat[-1] = samples
    work = group.all_reduce(flat)
    if work is not None:
        group.wait(work)
    payload_bytes = flat.numel() * flat.element_size()
    total_samples = float(flat[-1])
    if total_samples == 0.0:
        return Averaged(total_samples=0.0, payload_bytes=payload_bytes)
    # A one-element tensor, not a Python scalar: a scalar divisor becomes a multiplication by
    # its reciprocal, one more rounding.
    flat[:-1].div_(flat[-1:])
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
    return Averaged(total_samples=total_samples, payload_bytes=payload_bytes)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _floating_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


def _check_steps(field: str, steps: int) -> int:
    if steps < 1:
        raise ConfigError(f"{field} must be at least 1, got {steps}")
    return steps


class _RoundSync(ABC):
    """Counts steps and samples since the last sync and syncs when a round is over."""

    def __init__(self, model: nn.Module, group: Group, steps_per_round: int) -> None:
        self.model = model
        self.group = group
        self._steps_per_round = steps_per_round
        self._steps_since_sync = 0
        self._samples_since_sync = 0
        self.bytes_sent = 0  # bytes this rank put into all-reduces so far (payload only)
        self.syncs = 0  # rounds ended so far; the same number on every rank

    def after_step(self, samples: int) -> bool:
        """Record one optimizer step over `samples` samples; sync (a collective) when this
        rank has done its steps for the round. Returns True when it synced."""
        if samples < 0:
            raise ConfigError(f"samples must be non-negative, got {samples}")
        self._samples_since_sync += samples
        self._steps_since_sync += 1
        if self._steps_since_sync < self._steps_per_round:
            return False
        self.sync_now()
        return True

    def sync_now(self) -> None:
        """End the round now (e.g. at the end of training). Collective: every rank calls it."""
        self.bytes_sent += self._sync(float(self._samples_since_sync))
        self.syncs += 1
        self._steps_since_sync = 0
        self._samples_since_sync = 0

    @abstractmethod
    def _sync(self, samples: float) -> int:
        """Do the round's collective with this rank's weight; return the payload bytes."""


class PeriodicAveraging(_RoundSync):
    """Local SGD (Stich 2019; Lin et al. 2020, "Don't use large mini-batches, use local SGD"):
    H local steps, then a sample-weighted average of the parameters.

    After every `period_steps` steps of this rank, all ranks set θ = Σ_r w_r θ_r / Σ_r w_r,
    w_r being the samples rank r processed since the last sync; floating buffers are averaged
    the same way. If no rank processed a sample, every rank counts once (a plain mean), so the
    replicas still end identical. Optimizer state (momentum, Adam moments) stays local.

    Cost: one all-reduce of the trainable parameters and floating buffers (+1 number) per
    `period_steps` steps, and a temporary flat copy of them during the sync.
    """

    def __init__(self, model: nn.Module, group: Group, period_steps: int) -> None:
        super().__init__(model, group, _check_steps("period_steps", period_steps))
        self._tensors = [*_trainable(model), *_floating_buffers(model)]

    @property
    def period_steps(self) -> int:
        return self._steps_per_round

    def _sync(self, samples: float) -> int:
        averaged = weighted_average_(self._tensors, samples, self.group)
        if averaged.total_samples > 0.0:
            return averaged.payload_bytes
        return (
            averaged.payload_bytes + weighted_average_(self._tensors, 1.0, self.group).payload_bytes
        )


class DiLoCo(_RoundSync):
    """DiLoCo (Douillard et al. 2023): H inner steps with the user's optimizer, then one outer
    Nesterov-SGD step on θ_global with the sample-weighted pseudo-gradient.

    At the end of a round every rank computes Δ_r = θ_global − θ_r, the ranks all-reduce
    Δ = Σ_r w_r Δ_r / Σ_r w_r (w_r: samples since the last sync), and θ_global takes one step
    of torch.optim.SGD(lr=outer_lr, momentum=outer_momentum, nesterov) with gradient Δ; every
    replica then continues from θ_global. Floating buffers are averaged directly, in the same
    all-reduce. The user's inner optimizer is never touched: its state stays per worker, as in
    the paper. With outer_lr = 1 and outer_momentum = 0 this is `PeriodicAveraging`:
    θ_global − (θ_global − avg θ_r) = avg θ_r (equal up to rounding, about one ulp of θ).
    If no rank processed a sample in a round there is no outer step; every replica returns to
    θ_global. The pseudo-gradient, not θ, is what travels, so a codec could later shrink it.

    Heterogeneous workers: `set_inner_steps` gives this rank its own number of inner steps per
    round (a faster worker does more in the same wall time). The round is still one collective
    per rank; see the module docstring for how a loop must count rounds.

    Cost: one all-reduce of the trainable parameters and floating buffers (+1 number) per round;
    memory for three float32 copies of the trainable parameters (θ_global, Δ and the outer
    momentum) and the temporary flat buffer.
    """

    def __init__(
        self,
        model: nn.Module,
        group: Group,
        inner_steps: int,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
    ) -> None:
        if not outer_lr > 0.0:
            raise ConfigError(f"outer_lr must be positive, got {outer_lr}")
        if not 0.0 <= outer_momentum < 1.0:
            raise ConfigError(f"outer_momentum must be in [0, 1), got {outer_momentum}")
        super().__init__(model, group, _check_steps("inner_steps", inner_steps))
        self._params = _trainable(model)
        self._buffers = _floating_buffers(model)
        self._global = [  # θ_global, one per trainable parameter
            p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)
            for p in self._params
        ]
        self._deltas = [torch.zeros_like(g) for g in self._global]  # Δ, the outer gradient
        for global_param, delta in zip(self._global, self._deltas, strict=True):
            global_param.grad = delta
        self._outer = torch.optim.SGD(
            self._global,
            lr=outer_lr,
            momentum=outer_momentum,
            nesterov=nesterov and outer_momentum > 0.0,  # torch refuses Nesterov without momentum
        )

    @property
    def inner_steps(self) -> int:
        return self._steps_per_round

    def set_inner_steps(self, steps: int) -> None:
        """This rank's inner steps per round from now on (the current round included: if this
        rank already did that many, it syncs at its next step)."""
        self._steps_per_round = _check_steps("inner_steps", steps)

    @torch.no_grad()
    def _sync(self, samples: float) -> int:
        for global_param, param, delta in zip(
            self._global, self._params, self._deltas, strict=True
        ):
            torch.sub(global_param, param, out=delta)
        averaged = weighted_average_([*self._deltas, *self._buffers], samples, self.group)
        if averaged.total_samples > 0.0:
            self._outer.step()
        for global_param, param in zip(self._global, self._params, strict=True):
            param.copy_(global_param)
        return averaged.payload_bytes
