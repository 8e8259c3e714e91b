"""Local SGD and DiLoCo over real gloo processes, checked against references."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

from idla.errors import ConfigError
from idla.runtime.group import Group
from idla.sync.local_sgd import DiLoCo, PeriodicAveraging
from tests.distributed import local_sgd_workers as workers
from tests.distributed.shared_launch import launch_cases

PERIOD_ONE_SHARES = {"uneven": [40, 20, 4], "idle-rank": [48, 16, 0]}
"""Uneven shares of a 64-sample global batch; the second has an idle rank."""


@functools.cache
def _period_one() -> dict[str, list[Any]]:
    """3 steps, each rank on its own mean loss, averaged every step; one launch for both."""
    return launch_cases({name: (workers.period_one_vs_global_batch, (shares, 3))
                         for name, shares in PERIOD_ONE_SHARES.items()}, 3)


INNER_STEPS, BATCH_SIZES = [4, 2], [2, 6]
"""Heterogeneous DiLoCo: rank 0 does 4 inner steps of 2 samples, rank 1 2 steps of 6."""


@functools.cache
def _two_ranks() -> dict[str, list[Any]]:
    """Every two-process case, in one launch (each start of a process group costs seconds)."""
    return launch_cases({
        "torch-averager": (workers.against_torch_averager, ([32, 32], 3, 7)),
        "diloco-vs-periodic": (workers.diloco_vs_periodic, ([40, 24], 3, 2)),
        "heterogeneous-diloco": (workers.heterogeneous_diloco, (INNER_STEPS, BATCH_SIZES, 2)),
        "bytes-plain": (workers.count_bytes, (False, 2, 5)),
        "bytes-batchnorm": (workers.count_bytes, (True, 2, 5)),
    }, 2)


@pytest.mark.parametrize("shares", list(PERIOD_ONE_SHARES))
def test_period_one_with_sample_weights_is_one_global_batch_step(shares: str) -> None:
    # Execute
    results = _period_one()[shares]

    # Assert
    assert len({r["hash"] for r in results}) == 1
    assert [r["syncs"] for r in results] == [3, 3, 3]
    assert results[0]["max_abs_diff"] < 1e-6


def test_equal_shares_match_pytorch_periodic_model_averager() -> None:
    results = _two_ranks()["torch-averager"]

    assert len({r["hash"] for r in results}) == 1
    assert results[0]["syncs"] == 3  # after steps 1, 4 and 7, as PyTorch's averager
    assert results[0]["diff_vs_torch"] <= 1e-6
    assert results[0]["diff_vs_lone"] > 1e-4  # averaging did change the parameters


def test_diloco_with_outer_lr_1_and_no_momentum_is_periodic_averaging() -> None:
    results = _two_ranks()["diloco-vs-periodic"]

    for result in results:
        assert result["syncs"] == [2, 2, 2]
        assert result["diff_lr1"] <= 1e-6
        assert result["diff_default"] > 1e-4  # the outer Nesterov step does something
    for copy_index in range(3):
        assert len({r["hashes"][copy_index] for r in results}) == 1


def _hand_diloco(
    inner_steps: list[int], batch_sizes: list[int], rounds: int, sample_weights: bool
) -> list[torch.Tensor]:
    """θ_global = [w1, w2, b] after each round, by hand in float64: inner SGD on the MSE of
    y = w·x + b (gradient 2/n Σ r·[x, 1]), Δ averaged, outer Nesterov SGD (lr 0.7, m 0.9)."""
    model = workers.tiny_model()
    theta = torch.cat([model.weight.reshape(-1), model.bias]).detach().double()  # (3,)
    momentum: torch.Tensor | None = None
    steps_done = [0] * len(inner_steps)
    thetas = []
    for _ in range(rounds):
        deltas, weights = [], []
        for rank, (steps, size) in enumerate(zip(inner_steps, batch_sizes, strict=True)):
            local = theta.clone()
            for _ in range(steps):
                x, y = (t.double() for t in workers.tiny_batch(rank, steps_done[rank], size))
                residual = x @ local[:2] + local[2] - y.reshape(-1)  # (size,)
                grad = 2.0 / size * torch.cat([x.T @ residual, residual.sum().reshape(1)])
                local -= workers.TINY_LR * grad
                steps_done[rank] += 1
            deltas.append(theta - local)
            weights.append(float(steps * size) if sample_weights else 1.0)
        delta = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
        assert isinstance(delta, torch.Tensor)
        momentum = delta if momentum is None else 0.9 * momentum + delta
        theta = theta - 0.7 * (delta + 0.9 * momentum)
        thetas.append(theta)
    return thetas


def test_diloco_heterogeneous_inner_steps_weights_by_samples() -> None:
    # Prepare
    expected = _hand_diloco(INNER_STEPS, BATCH_SIZES, 2, sample_weights=True)
    unweighted = _hand_diloco(INNER_STEPS, BATCH_SIZES, 2, sample_weights=False)

    # Execute
    results = _two_ranks()["heterogeneous-diloco"]

    # Assert
    assert [r["local_steps"] for r in results] == [8, 4]
    for round_index in range(2):
        snapshots = [r["snapshots"][round_index] for r in results]
        assert len({s["hash"] for s in snapshots}) == 1
        got = torch.tensor(snapshots[0]["weight"] + snapshots[0]["bias"], dtype=torch.float64)
        assert torch.allclose(got, expected[round_index], rtol=0, atol=1e-5)
        assert (got - unweighted[round_index]).abs().max() > 1e-3  # the weights matter


@pytest.mark.parametrize(
    ("batchnorm", "payload_bytes"),
    [
        (False, 8 * 4 + 4),  # Linear(3, 2): 8 float32 parameters, then the float32 weight
        (True, (34 + 8) * 4 + 4),  # 34 parameters and BatchNorm's 8 running statistics
    ],
)
def test_bytes_sent_counts_one_payload_per_sync(batchnorm: bool, payload_bytes: int) -> None:
    # Execute: period 2 for 5 steps (syncs after steps 2 and 4), then sync_now
    results = _two_ranks()["bytes-batchnorm" if batchnorm else "bytes-plain"]

    # Assert
    for result in results:
        assert result["syncs"] == [3, 3]
        assert result["bytes_sent"] == [3 * payload_bytes, 3 * payload_bytes]
    assert results[0]["hashes"] == results[1]["hashes"]  # buffers are averaged too


def test_a_group_of_one_keeps_parameters_bit_identical() -> None:
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    strategy = PeriodicAveraging(model, Group(), period_steps=1)

    assert strategy.after_step(5)

    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert (strategy.syncs, strategy.bytes_sent) == (1, 0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"inner_steps": 0}, "inner_steps"),
        ({"inner_steps": 2, "outer_lr": 0.0}, "outer_lr"),
        ({"inner_steps": 2, "outer_lr": -0.1}, "outer_lr"),
        ({"inner_steps": 2, "outer_momentum": 1.0}, "outer_momentum"),
        ({"inner_steps": 2, "outer_momentum": -0.1}, "outer_momentum"),
    ],
)
def test_diloco_rejects_bad_settings(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DiLoCo(nn.Linear(2, 1), Group(), **kwargs)


def test_bad_step_counts_are_rejected() -> None:
    model, group = nn.Linear(2, 1), Group()
    with pytest.raises(ConfigError, match="period_steps"):
        PeriodicAveraging(model, group, period_steps=0)
    strategy = DiLoCo(model, group, inner_steps=2)
    with pytest.raises(ConfigError, match="inner_steps"):
        strategy.set_inner_steps(0)
    with pytest.raises(ConfigError, match="samples"):
        strategy.after_step(-1)
