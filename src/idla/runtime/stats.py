"""The per-rank statistics row that rides with the gradients, and what the agent learns from it."""

from __future__ import annotations

import enum

import torch


class Stat(enum.IntEnum):
    """Columns of the statistics matrix (world_size × WIDTH), one row per rank."""

    COMPUTE_S = 0  # wall seconds from the start of this step to the end of backward
    COMPUTE_CPU_S = 1  # process CPU seconds over the same interval
    PREV_SYNC_S = 2  # wall seconds the previous step spent finishing communication
    PREV_COMM_CPU_S = 3  # process CPU seconds over that same interval
    PREV_OTHER_S = 4  # wall seconds of the previous step after its sync (optimizer, bookkeeping)
    SAMPLES = 5  # local batch of this step
    LOSS_SUM = 6  # local mean loss × local batch
    NONFINITE = 7  # 1 if this rank's loss was not finite
    LATE_S = 8  # written by this rank's hub: how long the hub waited for this leaf's gradient


WIDTH = len(Stat)


def row(
    compute_s: float,
    compute_cpu_s: float,
    prev_sync_s: float,
    prev_comm_cpu_s: float,
    prev_other_s: float,
    samples: int,
    loss_sum: float,
    nonfinite: bool,
) -> torch.Tensor:
    values = [
        compute_s,
        compute_cpu_s,
        prev_sync_s,
        prev_comm_cpu_s,
        prev_other_s,
        float(samples),
        loss_sum,
        1.0 if nonfinite else 0.0,
        0.0,  # LATE_S: filled in by the hub
    ]
    return torch.tensor(values, dtype=torch.float32)
