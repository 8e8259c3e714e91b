"""The pure parts of elastic training: fault specs, failure classification, state skeletons."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from idla.elastic.faults import Fault, parse_faults
from idla.elastic.membership import ElasticConfig, is_peer_failure
from idla.elastic.rendezvous import Membership, open_store
from idla.elastic.state_transfer import join_state, split_state
from idla.errors import ConfigError, ReplicaMismatchError


def test_fault_specs_parse() -> None:
    faults = parse_faults("kill:2@30, nan:1@20+5,slow:3@10x10")

    assert faults == [
        Fault("kill", 2, 30), Fault("nan", 1, 20, steps=5), Fault("slow", 3, 10, factor=10.0)
    ]
    assert parse_faults("") == []


@pytest.mark.parametrize("text", ["kill", "kill:x@3", "explode:1@2", "nan:1@2+0", "slow:1@2x0.5"])
def test_bad_fault_specs_name_the_item(text: str) -> None:
    with pytest.raises(ConfigError, match="IDLA_FAULTS"):
        parse_faults(text)


def test_peer_failures_are_told_from_bugs() -> None:
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    timeout = RuntimeError("Operation timed out!")
    usage = RuntimeError("call agent.backward(loss) once for every batch")

    assert is_peer_failure(gloo) and is_peer_failure(timeout)
    assert not is_peer_failure(usage)
    assert not is_peer_failure(ReplicaMismatchError("hash differs"))
    assert not is_peer_failure(ValueError("connection"))


def test_optimizer_state_survives_the_json_skeleton() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()

    tensors: list[torch.Tensor] = []
    skeleton = split_state(state, tensors)
    rebuilt = join_state(skeleton, [t.clone() for t in tensors])

    assert set(rebuilt["state"]) == set(state["state"])  # integer keys come back as integers
    for key, per_param in state["state"].items():
        for name, value in per_param.items():
            assert torch.equal(rebuilt["state"][key][name], value)
    assert rebuilt["param_groups"][0]["lr"] == 0.1
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    fresh.load_state_dict(rebuilt)  # accepted by the optimizer as is


def test_membership_ranks_follow_the_member_list() -> None:
    membership = Membership(generation=2, members=(0, 1, 3), member=3)

    assert membership.rank == 2 and membership.world_size == 3


def test_elastic_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="collective_timeout_s"):
        ElasticConfig(collective_timeout_s=0)
    with pytest.raises(ConfigError, match="heartbeat_s"):
        ElasticConfig(heartbeat_s=5, dead_after_s=3)


@pytest.mark.parametrize("spec", ["", "udp:1.2.3.4:5", "tcp:host", "file:"])
def test_bad_store_specs_are_clear(spec: str) -> None:
    with pytest.raises(ConfigError, match="IDLA_RENDEZVOUS"):
        open_store(spec, 1.0)


@given(st.text(max_size=40))
def test_any_fault_spec_parses_or_gives_a_clear_error(text: str) -> None:
    try:
        faults = parse_faults(text)
    except ConfigError as error:
        assert "IDLA_FAULTS" in str(error)
    else:
        assert all(f.kind in {"kill", "nan", "slow"} and f.step >= 0 for f in faults)
