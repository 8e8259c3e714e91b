"""The control plane beside the data plane, over real gloo processes (one 2-rank launch):
control collectives run on a gloo group of their own, and a GPU rank's staging through host
buffers (run here on CPU tensors with IDLA_STAGE_HOST=1) changes no bit of the model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from idla.runtime.stats import Stat
from tests.distributed import plane_workers
from tests.distributed.shared_launch import launch_cases

_results: dict[str, list[Any]] = {}


def _run() -> dict[str, list[Any]]:
    if not _results:
        _results.update(launch_cases({
            "planes": (plane_workers.planes, ()),
            "beside": (plane_workers.control_beside_pending_data, ()),
            "plain": (plane_workers.train, (False, False)),
            "staged": (plane_workers.train, (True, False)),
            "plain_leaf": (plane_workers.train, (False, True)),
            "staged_leaf": (plane_workers.train, (True, True)),
            "bfloat16": (plane_workers.half_precision_weighting, ("bfloat16",)),
            "float16": (plane_workers.half_precision_weighting, ("float16",)),
        }, world_size=2))
    return _results


def test_control_collectives_run_on_a_gloo_group_of_their_own() -> None:
    for seen in _run()["planes"]:
        assert seen["control_backend"] == "gloo"
        assert not seen["control_is_default"]
        assert seen["control_size"] == 2
        assert seen["backend"] == "gloo"
        assert seen["fleet"] == "gloo: 0:cpu 1:cpu"


def test_a_control_collective_does_not_wait_behind_a_pending_data_one() -> None:
    assert _run()["beside"] == [[0, 1], [0, 1]]


@pytest.mark.parametrize("topology", ["ring", "leaf"])
def test_staging_through_host_buffers_changes_no_bit(topology: str) -> None:
    suffix = "_leaf" if topology == "leaf" else ""
    plain, staged = _run()[f"plain{suffix}"], _run()[f"staged{suffix}"]
    assert plain[0][0] == plain[1][0]  # replicas identical
    assert [values for values, _ in staged] == [values for values, _ in plain]
    assert all(ops == 0 for _, ops in plain) and all(ops > 0 for _, ops in staged)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_weight_samples_exactly(dtype: str) -> None:
    """Statistics are float64 whatever the model's dtype: in bf16, 341 would round to 340 and
    the agent would rescale every gradient by 512/511. Here the counts and loss sums arrive
    exactly, and the exchanged gradient is the sum of the two ranks' own weighted gradients
    (bit for bit in the model's dtype: nothing rescaled it)."""
    ranks = _run()[dtype]
    for seen in ranks:
        assert seen["stats_dtype"] == "torch.float64"
        assert [row[Stat.SAMPLES] for row in seen["table"]] == [341.0, 171.0]
        for rank, (samples, other) in enumerate([(341, ranks[0]), (171, ranks[1])]):
            assert seen["table"][rank][Stat.LOSS_SUM] == other["loss"] * samples
    half = getattr(torch, dtype)
    for got, g0, g1 in zip(ranks[0]["exchanged"], ranks[0]["mine"], ranks[1]["mine"],
                           strict=True):
        expected = torch.tensor(g0).to(half) + torch.tensor(g1).to(half)
        assert torch.equal(torch.tensor(got).to(half), expected)
    assert ranks[0]["exchanged"] == ranks[1]["exchanged"]
