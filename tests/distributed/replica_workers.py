"""Worker functions for the replica-check tests (real processes over gloo)."""

from __future__ import annotations

import torch
from torch import nn

from idla.agent.replicas import check_replicas
from idla.errors import ReplicaMismatchError
from idla.runtime.group import Group


def perturbed_check(mode: str, relative: float, what: str) -> str:
    """The replica check's error message in `mode` ("" when it passes) after rank 1 perturbs
    `what` ("parameters", or the BatchNorm's "running_var" buffer) by up to `relative` of each
    tensor's largest magnitude; every rank starts from the same seeded model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    group = Group()
    targets = list(model.parameters()) if what == "parameters" else [model[1].running_var]
    if group.rank == 1:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for tensor in targets:
                noise = torch.randn(tensor.shape, generator=generator).clamp(-3, 3) / 3
                tensor.add_(relative * tensor.abs().max() * noise)
    try:
        check_replicas(model, group, step=7, buffers=True, mode=mode, tolerance=1e-5)
    except ReplicaMismatchError as error:
        return str(error)
    return ""
