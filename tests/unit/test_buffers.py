"""The pure parts of `idla.agent.buffers`: who is the source, the average's weights, the
digests, and an empty forward that leaves no trace."""

from __future__ import annotations

import torch

from idla.agent.buffers import (
    BufferMode,
    BufferSync,
    average_weights,
    replica_tensors,
    source_rank,
)
from idla.agent.replicas import parameter_digest
from idla.runtime.digest import tensor_digest
from idla.runtime.group import Group


def test_the_source_is_the_lowest_rank_with_the_most_samples() -> None:
    assert source_rank([6, 6], [6, 6]) == 0
    assert source_rank([3, 9], [3, 9]) == 1
    assert source_rank([0, 4, 4], [4, 4, 4]) == 1  # rank 0 was dropped as non-finite
    assert source_rank([0, 0], [5, 7]) == 1  # nothing kept: the largest planned share


def test_average_weights_are_the_fraction_of_the_steps_samples() -> None:
    assert average_weights([9, 3], [9, 3]) == [0.75, 0.25]
    assert average_weights([0, 4], [4, 4]) == [0.0, 1.0]
    assert average_weights([0, 0], [2, 6]) == [0.25, 0.75]
    assert average_weights([0, 0], [0, 0]) == [1.0, 0.0]


def test_digests_tell_parameters_from_buffers_and_cover_every_dtype() -> None:
    # Prepare
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    before = {kind: tensor_digest(t) for kind, t in replica_tensors(model).items()}

    # Execute: one buffer element, of the float buffers, changes
    with torch.no_grad():
        model[1].running_var[0] += 0.5
    after = {kind: tensor_digest(t) for kind, t in replica_tensors(model).items()}

    # Assert
    assert set(before) == {"parameters", "buffers"}
    assert before["parameters"] == after["parameters"] == parameter_digest(model)
    assert before["buffers"] != after["buffers"]
    assert set(replica_tensors(model, buffers=False)) == {"parameters"}
    assert tensor_digest([torch.ones(2, dtype=torch.bfloat16)]) != tensor_digest([torch.ones(2)])


def test_an_empty_forward_leaves_the_buffers_as_they_were() -> None:
    # Prepare
    model = torch.nn.BatchNorm1d(3)
    buffers = BufferSync(model, Group(), BufferMode.BROADCAST)
    model(torch.randn(4, 3))
    before = [b.clone() for b in model.buffers()]

    # Execute
    buffers.hold()
    model(torch.zeros(0, 3))
    counted = int(model.num_batches_tracked)
    buffers.restore()

    # Assert: BatchNorm counted the empty batch; the agent undid it
    assert counted == 2
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before, strict=True))
