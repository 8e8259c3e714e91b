"""The DDP baseline of every benchmark: what a competent PyTorch user runs without idla.

Plain `torch.nn.parallel.DistributedDataParallel` with its documented defaults (25 MB buckets,
gradients all-reduced and averaged during backward), equal shares of the same global batches
idla's Agent sees (one seeded permutation per epoch, cut in rank order), `zero_grad()` and one
optimizer step per global batch. A benchmark adds what it measures through hooks: a PyTorch comm
hook (fp16 compression, PowerSGD), the loss (a benchmark may dilate the forward), a callback
after every step (a throughput meter, a target-accuracy clock) and a stop predicate. On one rank
(no process group) the model trains unwrapped: the standalone reference of one worker alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from idla.jobs.loss import LossFn, cross_entropy_loss
from idla.plan.shares import proportional_shares
from idla.runtime.data import GlobalBatchSampler, local_slice
from idla.runtime.group import Group

CommHook = tuple[Any, Callable[..., Any]]
"""(state, hook) as `DistributedDataParallel.register_comm_hook` takes them."""


class DDPBaseline:
    """`model` wrapped in DDP (a collective: rank 0's parameters are broadcast), ready to train.

    Build it on every rank, then `train`; `close` before the process group goes, since the
    DDP reducer holds it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 train_set: TensorDataset, group: Group, global_batch_size: int, seed: int,
                 comm_hook: CommHook | None = None) -> None:
        self.model, self.optimizer, self.group = model, optimizer, group
        self.module: nn.Module = model
        if group.world_size > 1:
            self.module = DistributedDataParallel(model)
            if comm_hook is not None:
                self.module.register_comm_hook(*comm_hook)
        self.sampler = GlobalBatchSampler(len(train_set), global_batch_size, seed)
        self.images, self.labels = train_set.tensors

    def train(self, should_stop: Callable[[int], bool], loss_fn: LossFn = cross_entropy_loss,
              after_step: Callable[[int, int], None] | None = None) -> int:
        """Step through the epochs' global batches until `should_stop(steps)` (asked after
        every step, on every rank: it must answer the same everywhere). `after_step(steps,
        global batch samples)` runs before it. Returns the steps done."""
        equal = [1.0] * self.group.world_size
        steps, epoch = 0, 0
        while True:
            for batch in self.sampler.epoch(epoch):
                shares = proportional_shares(batch.size, equal)
                mine = batch.indices[local_slice(shares, self.group.rank)]
                self.optimizer.zero_grad()
                loss_fn(self.module, self.images[mine], self.labels[mine]).backward()
                self.optimizer.step()
                steps += 1
                if after_step is not None:
                    after_step(steps, batch.size)
                if should_stop(steps):
                    return steps
            epoch += 1

    def close(self) -> None:
        """Drop the DDP wrapper and its reducer (the model keeps its trained parameters)."""
        self.module = self.model
