"""The one loop of local SGD and DiLoCo, run by the demo job (`idla train --sync local:H|diloco:H`)
and by `idla bench sync`.

Every rank takes optimizer steps on its own batches; the strategy (sync/local_sgd.py) averages
the parameters (local SGD, Stich 2019) or takes an outer step (DiLoCo, Douillard et al. 2023)
once the rank has done its steps for the round: one all-reduce of the parameters per round, so
the communication per step is 1/H of synchronous training. The caller adds what it needs through
hooks: the loss (a benchmark dilates the forward), a callback after every step (progress) and one
after every round, which may stop the run; it is called on every rank and must decide the same
everywhere (a collective decision), or the ranks' rounds no longer meet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from idla.errors import ConfigError
from idla.jobs.loss import LossFn, cross_entropy_loss
from idla.runtime.group import Group
from idla.sync.local_sgd import DiLoCo, PeriodicAveraging
from idla.sync.modes import SyncMode

RoundStrategy = PeriodicAveraging | DiLoCo


def round_strategy(mode: SyncMode, model: nn.Module, group: Group,
                   period_steps: int) -> RoundStrategy:
    """Local SGD's periodic averaging or DiLoCo, every `period_steps` steps."""
    if mode is SyncMode.LOCAL:
        return PeriodicAveraging(model, group, period_steps)
    if mode is SyncMode.DILOCO:
        return DiLoCo(model, group, period_steps)
    raise ConfigError(f"{mode.value} is not a round-based sync mode (local or diloco)")


@dataclass(slots=True)
class LocalProgress:
    """What the loop has done so far on this rank."""

    steps: int = 0  # optimizer steps
    compute_s: float = 0.0  # seconds drawing batches, in forward, backward and optimizer steps
    sync_s: float = 0.0  # seconds in the strategy's collectives
    round_steps: int = 0  # steps of the current round (in `after_round`: the one just ended)
    round_compute_s: float = 0.0  # compute seconds of the current round

    def round_step_s(self) -> float:
        """Mean compute seconds per step in the current round, before its sync."""
        return self.round_compute_s / max(self.round_steps, 1)


def train_local(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    strategy: RoundStrategy,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int | None = None,
    loss_fn: LossFn = cross_entropy_loss,
    after_step: Callable[[LocalProgress, torch.Tensor], None] | None = None,
    after_round: Callable[[LocalProgress], bool] | None = None,
) -> LocalProgress:
    """Train `model` until `steps` steps or until `after_round` returns True.

    `after_step(progress, loss)` runs after every step (and its sync, if the step ended a
    round); `after_round(progress)` after every sync. With `steps`, every rank must pass the
    same number: a last partial round is closed on every rank. Returns this rank's progress.
    """
    if steps is None and after_round is None:
        raise ConfigError("train_local needs steps or an after_round that stops it")
    progress = LocalProgress()
    synced = True
    while steps is None or progress.steps < steps:
        begin = time.perf_counter()
        inputs, targets = next(batches)
        optimizer.zero_grad()
        loss = loss_fn(model, inputs, targets)
        loss.backward()
        optimizer.step()
        middle = time.perf_counter()
        synced = strategy.after_step(int(inputs.shape[0]))
        progress.steps += 1
        progress.round_steps += 1
        progress.compute_s += middle - begin
        progress.round_compute_s += middle - begin
        progress.sync_s += time.perf_counter() - middle
        if after_step is not None:
            after_step(progress, loss)
        if synced:
            if after_round is not None and after_round(progress):
                return progress
            progress.round_steps, progress.round_compute_s = 0, 0.0
    if not synced:
        begin = time.perf_counter()
        strategy.sync_now()
        progress.sync_s += time.perf_counter() - begin
    return progress
