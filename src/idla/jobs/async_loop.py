"""The demo job trained asynchronously: DigitsCNN on digits through a parameter server.

Run `train_async` in every process of a job (e.g. through `launch_local`): the server rank
serves (sync/async_ps.py) and returns its report with the final test accuracy, every other rank
trains on fixed-size batches drawn from its own seeded permutations of the training set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.errors import ConfigError
from idla.runtime.group import Group
from idla.sync.async_ps import (
    AsyncConfig,
    ComputeGrad,
    ParameterServer,
    async_worker,
    gradient_from_batches,
)


def local_batches(
    dataset: TensorDataset, batch_size: int, seed: int, rank: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) batches of exactly `batch_size` samples for one rank.

    Epoch e visits a permutation seeded by (seed, rank, e), so each rank draws its own order and
    a run is reproducible; the tail of an epoch shorter than a batch is dropped. Cost: one
    permutation per epoch and one gather per batch.
    """
    images, labels = dataset.tensors
    if not 1 <= batch_size <= len(labels):
        raise ConfigError(f"async.batch_size must be in 1..{len(labels)}, got {batch_size}")
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_003 + epoch)
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels) - batch_size + 1, batch_size):
            batch = order[start : start + batch_size]
            yield images[batch], labels[batch]
        epoch += 1


def train_async(
    config: AsyncConfig,
    total_steps: int,
    batch_size: int = 32,
    lr: float = 0.05,
    seed: int = 0,
    group_timeout_s: float = 300.0,
    wrap_compute: Callable[[ComputeGrad], ComputeGrad] | None = None,
    group: Group | None = None,
) -> dict[str, Any]:
    """Train DigitsCNN asynchronously for `total_steps` pushes (each one SGD step of `lr` with a
    worker's mean gradient over `batch_size` samples).

    The server rank returns the ParameterServer report plus `test_accuracy` of the final
    parameters; the other ranks return {}. `wrap_compute` wraps each worker's gradient callback
    (tests use it to inject faults or throttle). With `group` None, a group is made from the
    environment and closed at the end; `group_timeout_s`, its timeout, bounds every blocking
    receive, so it must exceed the longest SSP hold (about the slowest step plus
    `config.dead_after_s`). A `group` passed in stays open, so several runs can share it.
    """
    if group is None and group_timeout_s <= config.dead_after_s:
        raise ConfigError(
            f"group_timeout_s {group_timeout_s} must exceed async.dead_after_s "
            f"{config.dead_after_s}: a held worker waits that long for its parameters"
        )
    torch.set_num_threads(1)
    owned = group is None
    group = Group(timeout_s=group_timeout_s) if group is None else group
    try:
        train, test = load_digits_split()
        torch.manual_seed(seed)
        model = DigitsCNN()
        if group.rank == config.server_rank:
            report = ParameterServer(model, group, config, lr, total_steps).run()
            report["test_accuracy"] = accuracy(model, test, torch.device("cpu"))
            return report
        compute = gradient_from_batches(
            local_batches(train, batch_size, seed, group.rank), F.cross_entropy
        )
        if wrap_compute is not None:
            compute = wrap_compute(compute)
        async_worker(model, compute, group, config)
        return {}
    finally:
        if owned:
            group.close()
