"""The replica mismatch error names the mode, the differing tensors and the likely causes; the
tolerance mode's per-tensor summaries see differences at about their size."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from idla.agent import replicas
from idla.agent.replicas import (
    LIKELY_CAUSES,
    MAX_NAMED,
    SUMMARY_WIDTH,
    mismatch_message,
    named_tensors,
    relative_difference,
    replica_report,
    tensor_summary,
)


def test_the_message_names_ranks_tensors_and_causes() -> None:
    message = mismatch_message(50, "parameters", [1, 3],
                               [("fc.weight", [1]), ("bn.running_mean (buffer)", [1, 3])])

    assert message.startswith("replicas diverged by step 50: parameters on rank(s) 1, 3 differ "
                              "from rank 0's (replica check 'exact': bit for bit); differing: "
                              "'fc.weight' (rank 1), 'bn.running_mean (buffer)' (rank 1, 3)."
                              "\nLikely causes:")
    assert all(cause in message for cause in LIKELY_CAUSES)
    assert "agent.backward(loss)" in message
    assert "replica_check='tolerance'" in message


def test_the_tolerance_message_names_the_mode_and_each_difference() -> None:
    message = mismatch_message(8, "parameters", [1], [("fc.weight", [1])], tolerance=1e-5,
                               gaps=[3.21e-3])

    assert message.startswith("replicas diverged by step 8: parameters on rank(s) 1 differ from "
                              "rank 0's (replica check 'tolerance': relative difference above "
                              "1e-05); differing: 'fc.weight' (rank 1; relative difference "
                              "0.0032).\n")


def test_many_differing_tensors_are_counted_and_none_is_fine() -> None:
    tensors = [(f"layer{i}.weight", [1]) for i in range(MAX_NAMED + 3)]

    assert " and 3 more.\n" in mismatch_message(0, "parameters", [1], tensors)
    assert "differing" not in mismatch_message(0, "buffers", [1], [])


def test_named_tensors_list_parameters_then_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))

    names = [name for name, _ in named_tensors(model)]

    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean (buffer)",
                     "1.running_var (buffer)", "1.num_batches_tracked (buffer)"]


def _perturbed(x: torch.Tensor, relative: float, pattern: torch.Tensor) -> torch.Tensor:
    return x + relative * float(x.abs().max()) * pattern


@pytest.mark.parametrize("numel", [1, 10, 100_000])
@pytest.mark.parametrize("relative", [1e-7, 1e-2])
def test_summaries_see_a_spread_difference_at_about_its_size(numel: int,
                                                             relative: float) -> None:
    # Prepare: a float32 tensor and a copy perturbed by up to `relative` of its largest entry
    generator = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=generator)
    noise = torch.randn(numel, generator=generator).clamp(-3, 3) / 3  # |noise| ≤ 1
    other = _perturbed(x, relative, noise)
    d = (other.double() - x.double()) / float(x.abs().max())
    spread, largest = float(d.square().mean().sqrt()), float(d.abs().max())

    # Execute
    gap = relative_difference(tensor_summary(other).tolist(), tensor_summary(x).tolist())

    # Assert: seen at about its root mean square, not amplified beyond a few times its size
    assert 0.1 * spread <= gap <= 10 * largest
    assert (gap <= 1e-5) == (relative == 1e-7)  # the default tolerance tells them apart


def test_a_difference_that_cancels_in_the_sum_is_still_seen() -> None:
    # +δ and −δ on alternate elements: the plain sum and max |t| hardly move
    x = torch.full((10_000,), 0.5)
    alternating = torch.tensor([1.0, -1.0]).repeat(5_000)

    gap = relative_difference(tensor_summary(_perturbed(x, 1e-2, alternating)).tolist(),
                              tensor_summary(x).tolist())

    assert gap > 1e-3


def test_summaries_of_identical_tensors_agree_and_odd_tensors_work() -> None:
    x = torch.randn(3, 5)
    ints = torch.tensor([7], dtype=torch.int64)  # num_batches_tracked
    half = x.to(torch.bfloat16)

    assert relative_difference(tensor_summary(x).tolist(), tensor_summary(x.T.contiguous().T)
                               .tolist()) == 0.0
    assert tensor_summary(ints).tolist() == [7.0, 7.0, 7.0, tensor_summary(ints).tolist()[3]]
    assert tensor_summary(half).dtype == torch.float64
    assert tensor_summary(torch.zeros(0)).tolist() == [0.0] * SUMMARY_WIDTH


def test_nan_and_infinity() -> None:
    x = torch.randn(10)
    with_nan = x.clone()
    with_nan[3] = math.nan
    with_inf = x.clone()
    with_inf[3] = math.inf

    nan_summary = tensor_summary(with_nan).tolist()
    inf_summary = tensor_summary(with_inf).tolist()

    assert relative_difference(nan_summary, tensor_summary(x).tolist()) == math.inf
    assert relative_difference(nan_summary, nan_summary) == math.inf  # NaN never matches
    assert relative_difference(inf_summary, inf_summary) == 0.0


def test_the_report_says_the_mode() -> None:
    assert replica_report("exact", 1e-5) == {"mode": "exact", "compares": "bit for bit"}
    tolerant = replica_report("tolerance", 1e-4)
    assert tolerant["mode"] == "tolerance" and tolerant["tolerance"] == 1e-4


def test_chunks_give_the_summary_of_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(10_007, generator=torch.Generator().manual_seed(3))
    whole = tensor_summary(x)

    monkeypatch.setattr(replicas, "SUMMARY_CHUNK", 1000)

    assert torch.allclose(tensor_summary(x), whole, rtol=1e-14, atol=0)
