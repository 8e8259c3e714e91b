"""probe() and the collectives on one process, without an initialized process group."""

import json

import torch.distributed as dist

from idla.profile.probe import WorkerProfile, measure_link_bandwidth, probe, probe_all
from idla.runtime.collectives import all_gather_json


def test_probe_fields_are_sane() -> None:
    profile = probe(rank=3, cpu_sample_s=0.05)

    assert profile.rank == 3
    assert profile.hostname
    assert profile.cpu_count >= 1
    assert 0.0 <= profile.cpu_percent <= 100.0
    assert profile.process_cpu_percent >= 0.0
    assert 0 < profile.mem_available_bytes <= profile.mem_total_bytes
    assert profile.link_bandwidth_bytes_per_s is None
    for gpu in profile.gpus:
        assert gpu.memory_total_bytes > 0
        assert gpu.memory_free_bytes is None or gpu.memory_free_bytes <= gpu.memory_total_bytes


def test_to_dict_is_json_and_round_trips() -> None:
    profile = probe(cpu_sample_s=0.0)

    text = json.dumps(profile.to_dict())

    assert WorkerProfile.from_dict(json.loads(text)) == profile


def test_collectives_without_a_group_are_local() -> None:
    assert not dist.is_initialized()
    payload = {"rank": 0, "nested": {"x": [1, 2.5, "é"]}}

    assert all_gather_json(payload) == [payload]
    assert measure_link_bandwidth() is None


def test_probe_all_without_a_group_returns_this_worker() -> None:
    profiles = probe_all(rank=0)

    assert len(profiles) == 1
    assert profiles[0].rank == 0
    assert profiles[0].link_bandwidth_bytes_per_s is None
