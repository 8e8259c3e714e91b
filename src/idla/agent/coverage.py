"""Which parameters have gradients after a step's exchange, and which parameters train.

A parameter with no ``.grad`` on some rank (``zero_grad(set_to_none=True)`` and unused there)
contributed zeros; one with no ``.grad`` on *any* rank keeps None (DDP's "globally unused"),
which takes one all-reduce of a flag per parameter, only in steps where a rank reports one
(`StepFlag.GRADLESS`).

Freezing (``requires_grad_(False)``) a parameter the exchange covers needs nothing: autograd
gives it no gradient, so it contributes zeros on every rank and keeps whatever ``.grad`` it had
(None after ``zero_grad(set_to_none=True)``), as DDP with ``find_unused_parameters=True`` and
one process do. Unfreezing a parameter the exchange does not cover (frozen when the agent was
built) gives it a gradient outside the flat buffer: that step sums it with one extra all-reduce
(`sum_uncovered`), and the next step rebuilds the exchange over the parameters that train
(`rebuild_exchange`). Either change is first checked with a collective on a digest of every
rank's set of trainable parameters (`agree`); ranks that differ stop with `GradientError`,
since one rank training a parameter the others hold fixed would make the sum wrong.

The check costs nothing in a step where no rank's set changed: each rank compares its flags
with the agreed ones and says so in its statistics row (`StepFlag.TRAINABLE_CHANGED`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from idla.errors import GradientError
from idla.runtime.digest import bytes_digest
from idla.runtime.group import Group
from idla.runtime.stats import StepFlag
from idla.sync.exchange import GradientExchange


def trainable_flags(model: nn.Module) -> tuple[bool, ...]:
    """``requires_grad`` of every parameter, in model order."""
    return tuple(p.requires_grad for p in model.parameters())


def flags_digest(flags: Sequence[bool]) -> int:
    """A blake2b digest of a trainable-flags tuple, as a signed 64-bit integer."""
    return bytes_digest(bytes(1 if f else 0 for f in flags))


class TrainableSet:
    """The trainable parameters all ranks last agreed on, and those the exchange covers."""

    def __init__(self, model: nn.Module, covered: Sequence[nn.Parameter]) -> None:
        self.model = model
        self.agreed = trainable_flags(model)
        self.covered = {id(p) for p in covered}
        self.rebuild_pending = False

    def changed(self) -> bool:
        """Whether this rank's trainable flags differ from the agreed ones (local, cheap)."""
        return trainable_flags(self.model) != self.agreed

    def agree(self, group: Group, step: int) -> None:
        """Collective: every rank's digest of its trainable flags; adopt them if all agree.

        Raises:
            GradientError: On every rank, when some rank's trainable set differs from rank 0's.
        """
        flags = trainable_flags(self.model)
        mine = torch.tensor([flags_digest(flags)], dtype=torch.int64)
        digests = [int(t.item()) for t in group.control_all_gather(mine)]
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise GradientError(
                f"step {step}: rank(s) {', '.join(map(str, differ))} train a different set of "
                "parameters than rank 0 (requires_grad was changed on some ranks only); "
                "freeze or unfreeze the same parameters on every rank"
            )
        self.agreed = flags

    def uncovered(self) -> list[nn.Parameter]:
        """Trainable parameters the exchange does not cover (unfrozen after it was built)."""
        return [p for p in self.model.parameters()
                if p.requires_grad and id(p) not in self.covered]


def settle_step(
    sync: GradientExchange, trainable: TrainableSet, group: Group, seen: StepFlag, step: int,
    drop: bool,
) -> list[torch.Tensor]:
    """After the exchange, on every rank: what the step's flags (`seen`: every rank's, or-ed)
    ask for. Keeps None where no rank has a gradient; agrees on the trainable set and sums the
    gradients of unfrozen parameters (`drop`: this rank's step was non-finite). Returns those
    summed gradients, which live outside the exchange's buffer.

    Raises:
        GradientError: Ranks differ in which parameters train.
    """
    if seen & StepFlag.GRADLESS:
        gradless = torch.tensor(sync.views.gradless(), dtype=torch.float64)
        work = group.control_all_reduce(gradless)
        if work is not None:
            group.wait(work)
        sync.views.settle([int(v) == group.world_size for v in gradless.tolist()])
    if not seen & StepFlag.TRAINABLE_CHANGED:
        return []
    trainable.agree(group, step)
    uncovered = trainable.uncovered()
    if not uncovered:
        return []
    trainable.rebuild_pending = True
    return sum_uncovered(uncovered, group, drop)


def sum_uncovered(params: Sequence[nn.Parameter], group: Group, drop: bool) -> list[torch.Tensor]:
    """Sum over ranks of the gradients of `params` (outside the exchange), in one all-reduce
    with a count of the ranks that had one; a parameter with a gradient on no rank keeps None.
    `drop`: this rank contributes zeros (its step was non-finite). Returns the summed grads.

    Cost: one all-reduce of the parameters' size plus one number each."""
    dtype, device = params[0].dtype, params[0].device
    parts = [torch.zeros(p.numel(), dtype=dtype, device=device)
             if p.grad is None or drop else p.grad.detach().reshape(-1).to(dtype)
             for p in params]
    counts = torch.tensor([0.0 if p.grad is None else 1.0 for p in params],
                          dtype=dtype, device=device)
    flat = torch.cat([*parts, counts])  # (sum of numel + len(params),)
    work = group.all_reduce(flat)
    if work is not None:
        group.wait(work)
    summed, offset = [], 0
    for index, p in enumerate(params):
        view = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if float(flat[-len(params) + index]) > 0:
            p.grad = view
            summed.append(view)
        else:
            p.grad = None
    return summed


def rebuild_exchange(
    old: GradientExchange, model: nn.Module,
    build: Callable[[list[nn.Parameter]], GradientExchange],
) -> GradientExchange:
    """A new exchange over the parameters that train now (every rank, at a step boundary),
    carrying per-tensor state (error-feedback residuals, PowerSGD's Q) over by parameter.

    A covered parameter that no longer trains leaves the buffer; its ``.grad``, if it has one,
    becomes a zero tensor of its own (the zeroed gradient it would hold in one process)."""
    params = [p for p in model.parameters() if p.requires_grad]
    old_keys = {id(p): f"p{i}" for i, p in enumerate(old.params)}
    new_keys = {old_keys[id(p)]: f"p{i}" for i, p in enumerate(params) if id(p) in old_keys}
    state = {}
    for name, tensor in old.state_dict().items():
        kind, dot, key = name.partition(".")
        if not dot:
            state[name] = tensor
        elif key in new_keys:
            state[f"{kind}.{new_keys[key]}"] = tensor
    old.close()
    trainable = {id(p) for p in params}
    for p in old.params:
        if id(p) not in trainable and p.grad is not None:
            p.grad = torch.zeros_like(p)
    new = build(params)
    if state:
        new.load_state_dict(state)
    return new
