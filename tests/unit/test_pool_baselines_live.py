"""The live baselines (FIFO, static partition) as pure functions on hand-made pools."""

from __future__ import annotations

import pytest

from idla.pool.baselines_live import fifo, live_policy, partition, static_partition
from idla.pool.model import Device, JobKind, JobView, check_allocation
from idla.pool.perf import OnlineModels

SPEEDS = {"cpu0": 1.0, "cpu1": 1.0, "cpu2": 0.5, "cpu3": 0.25}
DEVICES = [Device(device_id=d, kind="cpu", node="n", memory_bytes=1 << 30) for d in SPEEDS]
MODELS = OnlineModels()  # the rigid baselines never ask it


def _job(job_id: str, arrival_s: float, priority: float = 1.0, max_workers: int = 3,
         min_workers: int = 1) -> JobView:
    return JobView(job_id=job_id, kind=JobKind.TRAIN, priority=priority,
                   min_workers=min_workers, max_workers=max_workers, arrival_s=arrival_s)


def test_fifo_gives_the_first_job_its_maximum_on_the_fastest_devices_and_never_resizes() -> None:
    jobs = [_job("b", 1.0, priority=4), _job("a", 0.0, priority=1)]
    first = fifo(jobs, DEVICES, MODELS, {})
    check_allocation(first, jobs, DEVICES)
    assert first["a"] == ("cpu0", "cpu1", "cpu2")  # arrived first, priority ignored
    assert first["b"] == ("cpu3",)
    again = fifo([*jobs, _job("c", 2.0, priority=9)], DEVICES, MODELS, first)
    assert again == first  # the newcomer waits; nobody is resized


def test_fifo_blocks_behind_a_job_that_cannot_start() -> None:
    jobs = [_job("a", 0.0, max_workers=3), _job("b", 1.0, min_workers=2),
            _job("c", 2.0, max_workers=1)]
    allocation = fifo(jobs, DEVICES, MODELS, {})
    assert set(allocation) == {"a"}  # b needs 2 of the 1 left, and c waits behind it


def test_fifo_drops_a_lost_device_and_keeps_the_rest() -> None:
    jobs = [_job("a", 0.0)]
    allocation = fifo(jobs, DEVICES[1:], MODELS, {"a": ("cpu0", "cpu1")})
    assert allocation == {"a": ("cpu1",)}  # not grown onto the free ones either


@pytest.mark.parametrize("parts, sizes", [(1, [4]), (2, [2, 2]), (3, [2, 1, 1]), (4, [1] * 4),
                                          (9, [1] * 4)])
def test_partition_is_contiguous_and_equal_within_one(parts: int, sizes: list[int]) -> None:
    groups = partition(list(reversed(DEVICES)), parts)
    assert [len(g) for g in groups] == sizes
    assert [d.device_id for g in groups for d in g] == sorted(SPEEDS)


def test_static_gives_each_job_one_group_in_arrival_order_and_keeps_it() -> None:
    policy = static_partition(2)
    jobs = [_job("a", 0.0), _job("b", 1.0, max_workers=1), _job("c", 2.0)]
    first = policy(jobs, DEVICES, MODELS, {})
    check_allocation(first, jobs, DEVICES)
    assert first == {"a": ("cpu0", "cpu1"), "b": ("cpu2",)}  # b leaves cpu3 of its group idle
    later = policy([jobs[1], jobs[2]], DEVICES, MODELS, {"b": first["b"]})
    assert later == {"b": ("cpu2",), "c": ("cpu0", "cpu1")}  # a ended: c takes its group


def test_live_policy_names() -> None:
    assert live_policy("idla") is None
    assert live_policy("fifo") is fifo
    assert live_policy("static")([_job("a", 0.0)], DEVICES, MODELS, {}) == {"a": ("cpu0",)}
    with pytest.raises(ValueError, match="unknown policy"):
        live_policy("lottery")
