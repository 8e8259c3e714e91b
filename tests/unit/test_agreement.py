"""What must agree job-wide, and how a difference is named (pure parts of the agreement)."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from torch import nn

from idla.agent.agreement import (
    JOB_WIDE_FIELDS,
    MAX_CLAUSES,
    PER_RANK_FIELDS,
    describe_difference,
    job_description,
)
from idla.agent.config import AgentConfig
from idla.plan.planner import PlannerConfig


def _described(config: AgentConfig, model: nn.Module | None = None,
               samples: int = 100) -> dict[str, Any]:
    model = model or nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    return json.loads(json.dumps(job_description(config, model, samples)))


def test_every_config_field_is_either_job_wide_or_per_rank() -> None:
    names = {spec.name for spec in fields(AgentConfig)}

    assert set(JOB_WIDE_FIELDS) | set(PER_RANK_FIELDS) == names
    assert not set(JOB_WIDE_FIELDS) & set(PER_RANK_FIELDS)


def test_equal_descriptions_have_no_difference_and_per_rank_fields_do_not_count() -> None:
    a = _described(AgentConfig(global_batch_size=64, max_local_batch=10, history_steps=5))
    b = _described(AgentConfig(global_batch_size=64))

    assert describe_difference([a, b, a]) is None


def test_a_differing_field_names_the_ranks_and_their_values() -> None:
    a = _described(AgentConfig(global_batch_size=512))
    b = _described(AgentConfig(global_batch_size=256))

    message = describe_difference([a, a, b])

    assert message == ("the ranks disagree on the job: global_batch_size differs: "
                       "rank 0 has 512, rank 2 has 256")


def test_nested_planner_settings_and_the_dataset_length_are_compared() -> None:
    a = _described(AgentConfig(global_batch_size=8))
    b = _described(AgentConfig(global_batch_size=8, planner=PlannerConfig(forget=0.8)), samples=99)

    message = describe_difference([a, b]) or ""

    assert "planner differs" in message
    assert "the dataset's length differs: rank 0 has 100, rank 1 has 99 samples" in message


def test_parameter_differences_are_named_by_index_name_shape_dtype_and_trainability() -> None:
    config = AgentConfig(global_batch_size=8)
    base = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    wider = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))
    double = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).double())
    frozen = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    frozen[1].bias.requires_grad_(False)
    longer = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2))

    described = [_described(config, m) for m in (base, wider, double, frozen, longer)]
    message = describe_difference(described) or ""

    assert "parameter 2 '1.weight' has shape (5, 3) on rank 1, (2, 3) on rank 0" in message
    assert "parameter 2 '1.weight' has dtype torch.float64 on rank 2, torch.float32" in message
    assert ("parameter 3 '1.bias' is frozen (requires_grad=False) on rank 3, trainable on "
            "rank 0") in message
    assert "rank 4 has 6 parameters, rank 0 has 4" in message


def test_config_fields_come_first_and_a_long_list_is_counted() -> None:
    a = _described(AgentConfig(global_batch_size=8), nn.Linear(3, 2))
    b = _described(AgentConfig(global_batch_size=9, seed=1, rebalance=False, nan_guard=False,
                               leaf_ratio=3.0, compress="fp16", bucket_cap_bytes=7),
                   nn.Linear(3, 3))

    message = describe_difference([a, b]) or ""

    assert message.startswith("the ranks disagree on the job: global_batch_size differs")
    assert message.count("differs") == MAX_CLAUSES
    assert message.endswith("; and 2 more")
