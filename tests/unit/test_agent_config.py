"""AgentConfig refuses values of the wrong type where it is built, naming the field; one
worker under compress="auto" runs the exact exchange."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idla import Agent, AgentConfig, ConfigError


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("global_batch_size", 512.0, "global_batch_size must be an integer"),
        ("global_batch_size", "512", "global_batch_size must be an integer"),
        ("global_batch_size", True, "global_batch_size must be an integer"),
        ("seed", 0.5, "seed must be an integer"),
        ("rebalance", 1, "rebalance must be True or False"),
        ("leaf_ratio", "2", "leaf_ratio must be a number"),
        ("max_local_batch", 8.0, "max_local_batch must be an integer or None"),
        ("initial_shares", [4.0, 4.0], "initial_shares must be a list of integers or None"),
        ("compress", None, "compress must be a string"),
        ("planner", {}, "planner must be a PlannerConfig"),
        ("min_local_batch", 2.0, "min_local_batch must be an integer or None"),
        ("buffers", True, "buffers must be a string"),
    ],
)
def test_a_wrong_type_is_a_config_error_naming_the_field(
    field: str, value: Any, expected: str
) -> None:
    kwargs: dict[str, Any] = {"global_batch_size": 8, field: value}

    with pytest.raises(ConfigError, match=expected):
        AgentConfig(**kwargs)


def test_right_types_pass_numpy_integers_too_and_an_integer_is_a_number() -> None:
    config = AgentConfig(global_batch_size=np.int64(8), leaf_ratio=2, initial_shares=[8],
                         max_local_batch=None)

    assert config.global_batch_size == 8
    assert type(config.global_batch_size) is int
    assert config.leaf_ratio == 2


def _train(compress: str) -> tuple[list[torch.Tensor], dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 4))
    data = (torch.randn(96, 64), torch.randint(0, 4, (96,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = Agent(model, optimizer, data,
                  config=AgentConfig(global_batch_size=16, compress=compress))
    for x, y in agent.batches(0):
        agent.backward(F.cross_entropy(model(x), y))
        optimizer.step()
    agent.close()
    return [p.detach().clone() for p in model.parameters()], agent.report()["compression"]


def test_one_worker_under_auto_trains_exactly_as_without_compression() -> None:
    exact, _ = _train("none")

    auto, report = _train("auto")

    assert all(torch.equal(a, b) for a, b in zip(exact, auto, strict=True))
    assert report["codec"] == "none"
    assert "one worker" in report["reason"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"buffers": "sync"}, "buffers must be one of 'broadcast', 'average', 'none'"),
        ({"replica_check": "close"}, "replica_check must be one of 'exact', 'tolerance'"),
        ({"replica_tolerance": 0.0}, "replica_tolerance must be a positive number, got 0.0"),
        ({"replica_tolerance": float("nan")}, "replica_tolerance must be a positive number"),
        ({"replica_tolerance": "1e-5"}, "replica_tolerance must be a number"),
        ({"min_local_batch": 0}, "min_local_batch must be at least 1 or None"),
        ({"min_local_batch": 2, "initial_shares": [11, 1]},
         r"initial_shares \[11, 1\] gives rank 1 1 sample\(s\), fewer than min_local_batch 2"),
    ],
)
def test_buffer_and_minimum_share_mistakes_name_the_field(
    kwargs: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        AgentConfig(global_batch_size=12, **kwargs)


def _bn_model(train: bool) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    return model.train(train)


@pytest.mark.parametrize(
    ("model", "configured", "expected"),
    [
        (_bn_model(train=True), None, 2),
        (_bn_model(train=False), None, 1),
        (torch.nn.Linear(4, 3), None, 1),
        (_bn_model(train=True), 4, 4),
    ],
)
def test_the_minimum_share_defaults_to_two_with_batchnorm_in_training(
    model: torch.nn.Module, configured: int | None, expected: int
) -> None:
    data = (torch.randn(24, 4), torch.randint(0, 3, (24,)))

    agent = Agent(model, None, data,
                  config=AgentConfig(global_batch_size=12, min_local_batch=configured))

    assert agent.min_local_batch == expected
    agent.close()
