"""The rigid comparison policies: FIFO keeps running jobs where they are and blocks behind the
head of the queue; the static partition caps every job at its share."""

from __future__ import annotations

from collections.abc import Sequence

from idla.pool.model import Device, JobKind, JobView
from idla.pool.rigid import fifo, static_partition

DEVICES = [Device(f"cpu{i}", "cpu@1" if i < 2 else "cpu@0.5", "h", 1 << 30) for i in range(4)]


class _BySpeed:
    def rate_per_s(self, job_id: str, devices: Sequence[Device]) -> float:
        return sum(float(d.kind.partition("@")[2]) for d in devices)

    def resize_cost_s(self, job_id: str) -> float:
        return 0.0


def _job(job_id: str, arrival_s: float, min_workers: int = 1, max_workers: int = 4,
         priority: float = 1.0) -> JobView:
    return JobView(job_id=job_id, kind=JobKind.TRAIN, priority=priority,
                   min_workers=min_workers, max_workers=max_workers, arrival_s=arrival_s)


def test_fifo_keeps_running_jobs_and_gives_the_oldest_the_fastest_free_devices() -> None:
    jobs = [_job("late", 5.0, priority=4.0), _job("early", 1.0, max_workers=1),
            _job("running", 0.0, max_workers=4)]

    allocation = fifo(jobs, DEVICES, _BySpeed(), {"running": ("cpu2", "cpu3")})

    assert allocation == {"running": ("cpu2", "cpu3"), "early": ("cpu0",), "late": ("cpu1",)}


def test_a_head_that_cannot_start_blocks_the_queue_and_the_partition_caps_each_job() -> None:
    blocked = fifo([_job("running", 0.0), _job("big", 1.0, min_workers=3), _job("small", 2.0)],
                   DEVICES, _BySpeed(), {"running": ("cpu0", "cpu1")})
    parts = static_partition(2)([_job("a", 1.0), _job("b", 2.0), _job("c", 3.0)], DEVICES,
                                _BySpeed(), {})

    assert blocked == {"running": ("cpu0", "cpu1")}  # "big" needs 3 of the 2 free: all wait
    assert parts == {"a": ("cpu0", "cpu1"), "b": ("cpu2", "cpu3")}
