"""The replica mismatch error names the differing tensors and the likely causes."""

from __future__ import annotations

from torch import nn

from idla.agent.replicas import LIKELY_CAUSES, MAX_NAMED, mismatch_message, named_tensors


def test_the_message_names_ranks_tensors_and_causes() -> None:
    message = mismatch_message(50, "parameters", [1, 3],
                               [("fc.weight", [1]), ("bn.running_mean (buffer)", [1, 3])])

    assert message.startswith("replicas diverged by step 50: parameters on rank(s) 1, 3 differ "
                              "from rank 0's; differing: 'fc.weight' (rank 1), "
                              "'bn.running_mean (buffer)' (rank 1, 3).\nLikely causes:")
    assert all(cause in message for cause in LIKELY_CAUSES)
    assert "agent.backward(loss)" in message


def test_many_differing_tensors_are_counted_and_none_is_fine() -> None:
    tensors = [(f"layer{i}.weight", [1]) for i in range(MAX_NAMED + 3)]

    assert " and 3 more.\n" in mismatch_message(0, "parameters", [1], tensors)
    assert "differing" not in mismatch_message(0, "buffers", [1], [])


def test_named_tensors_list_parameters_then_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))

    names = [name for name, _ in named_tensors(model)]

    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean (buffer)",
                     "1.running_var (buffer)", "1.num_batches_tracked (buffer)"]
