"""The one asynchronous loop, run by the demo job (`idla train --sync async:S`), by
`idla bench sync` and by the tests: a parameter server and the workers that push to it.

Call `train_async` on every rank of the group. The server rank serves (sync/async_ps.py: every
push is one optimizer step with that worker's mean gradient, SSP holds a worker that runs more
than S versions ahead of the slowest); every other rank computes gradients on its own batches.
Cost per push: one receive of n + 2 and one send of n + 4 float32 values (n parameters). The
caller adds what it needs through hooks: the loss (a benchmark dilates the forward), a wrapper
around each worker's gradient callback (tests inject faults), a stop predicate on the server and
a callback on every rank just before the run starts (a barrier, a clock).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from idla.errors import ConfigError
from idla.jobs.loss import LossFn, cross_entropy_loss
from idla.runtime.group import Group
from idla.sync.async_ps import (
    AsyncConfig,
    ComputeGrad,
    OptimizerFactory,
    ParameterServer,
    async_worker,
)


def train_async(
    model: nn.Module,
    group: Group,
    config: AsyncConfig,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    optimizer: float | OptimizerFactory,
    total_steps: int,
    loss_fn: LossFn = cross_entropy_loss,
    wrap_compute: Callable[[ComputeGrad], ComputeGrad] | None = None,
    should_stop: Callable[[int, torch.Tensor], bool] | None = None,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Serve or train until `total_steps` pushes were applied, `should_stop` says so or no live
    worker is left; `model` then holds the final parameters on every rank.

    On the server: `optimizer` (plain SGD's learning rate or a factory) makes each step,
    `should_stop(version, flat)` is asked after every applied push with the server's flat
    parameters (n,); returns the ParameterServer report. On a worker: `batches` feed
    `loss_fn`, `wrap_compute` wraps the gradient callback; returns the worker's pushes and
    seconds waiting and computing. `batches` is not drawn from on the server. The group's
    timeout bounds every blocking receive, so it must exceed `config.dead_after_s` (a held
    worker waits about that long for its parameters).
    """
    timeout_s = group.timeout.total_seconds()
    if timeout_s <= config.dead_after_s:
        raise ConfigError(
            f"group_timeout_s {timeout_s} must exceed async.dead_after_s "
            f"{config.dead_after_s}: a held worker waits that long for its parameters"
        )
    if group.rank == config.server_rank:
        def stop(version: int) -> bool:
            return should_stop is not None and should_stop(version, server.flat.detach())

        server = ParameterServer(model, group, config, optimizer, total_steps,
                                 should_stop=None if should_stop is None else stop)
        if on_start is not None:
            on_start()
        return server.run()

    def compute(worker_model: nn.Module) -> tuple[int, float] | None:
        batch = next(batches, None)
        if batch is None:
            return None
        loss = loss_fn(worker_model, *batch)
        loss.backward()
        return int(batch[1].shape[0]), float(loss.detach())

    if on_start is not None:
        on_start()
    return async_worker(model, compute if wrap_compute is None else wrap_compute(compute),
                        group, config)
