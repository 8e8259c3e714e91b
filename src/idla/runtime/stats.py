"""The per-rank statistics row that rides with the gradients, and what the agent learns from it."""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from idla.runtime.group import Group, Work


class Stat(enum.IntEnum):
    """Columns of the statistics matrix (world_size × WIDTH), one row per rank."""

    COMPUTE_S = 0  # wall seconds from the start of this step to the end of backward
    COMPUTE_CPU_S = 1  # process CPU seconds over the same interval
    PREV_SYNC_S = 2  # wall seconds the previous step spent finishing communication
    PREV_COMM_CPU_S = 3  # process CPU seconds over that same interval
    PREV_OTHER_S = 4  # wall seconds of the previous step after its sync (optimizer, bookkeeping)
    SAMPLES = 5  # local batch of this step
    LOSS_SUM = 6  # local mean loss × local batch
    FLAGS = 7  # this rank's `StepFlag`s, as a small integer
    LATE_S = 8  # written by this rank's hub: how long the hub waited for this leaf's gradient


WIDTH = len(Stat)


class StepFlag(enum.IntFlag):
    """Bits of the `Stat.FLAGS` column. Each row is written by one rank only and the others
    add zeros, so the integer arrives exactly."""

    NONFINITE = 1  # this rank's loss or gradient was not finite (its contribution is dropped)
    GRADLESS = 2  # a parameter the exchange covers has no ``.grad`` on this rank
    TRAINABLE_CHANGED = 4  # this rank's set of trainable parameters is not the agreed one


def flags_of(stats_row: Sequence[float]) -> StepFlag:
    """The `StepFlag`s of one row of a statistics matrix."""
    return StepFlag(int(stats_row[Stat.FLAGS]))


def row(
    compute_s: float,
    compute_cpu_s: float,
    prev_sync_s: float,
    prev_comm_cpu_s: float,
    prev_other_s: float,
    samples: int,
    loss_sum: float,
    nonfinite: bool,
    flags: int = 0,
) -> torch.Tensor:
    """One rank's statistics row (WIDTH,); `nonfinite` adds `StepFlag.NONFINITE` to `flags`."""
    if nonfinite:
        flags |= StepFlag.NONFINITE
    values = [
        compute_s,
        compute_cpu_s,
        prev_sync_s,
        prev_comm_cpu_s,
        prev_other_s,
        float(samples),
        loss_sum,
        float(flags),
        0.0,  # LATE_S: filled in by the hub
    ]
    return torch.tensor(values, dtype=torch.float64)


class StatsExchange:
    """The statistics matrix of one step (world_size × width, float64, on the CPU), summed on
    the control plane: each rank fills its own row, everyone else's stay zero, so the sum
    hands every rank everybody's rows exactly (counts up to 2^53) whatever the model's
    dtype or device. Cost: one all-reduce of world_size × width float64 on the gloo control
    group, concurrent with the gradients' exchange on the data plane."""

    def __init__(self, group: Group, width: int) -> None:
        self.group = group
        self.matrix = torch.zeros(group.world_size, width, dtype=torch.float64)
        self._work: Work | None = None

    def reset(self) -> None:
        """A new step: every row zero."""
        self.matrix.zero_()

    def start(self, mine: torch.Tensor) -> None:
        """Write this rank's row (what a hub noted in its leaves' rows stays) and start the
        sum."""
        self.matrix[self.group.rank].add_(mine.to(torch.float64))
        self._work = self.group.control_all_reduce(self.matrix)

    def finish(self) -> torch.Tensor:
        """Everybody's rows (a copy), once the sum is complete."""
        if self._work is not None:
            self.group.wait(self._work)
            self._work = None
        return self.matrix.clone()
