"""The agent's hold helpers: a serving job's router stays on its device (swapping with the job
the policy gave that device to), and held jobs keep exactly their devices."""

from __future__ import annotations

from idla.pool.model import JobKind, JobView
from idla.pool.run import keep_anchors, respect


def test_a_serving_job_moved_off_its_router_swaps_devices_with_the_job_given_it() -> None:
    target = {"api": ("cpu3",), "big": ("cpu0", "cpu1", "cpu2")}
    current = {"api": ("cpu0",), "old": ("cpu1", "cpu2", "cpu3")}

    swapped, stuck = keep_anchors(target, current, {"api": "cpu0"})

    assert swapped == {"api": ("cpu0",), "big": ("cpu1", "cpu2", "cpu3")} and stuck == set()
    assert keep_anchors({"api": ("cpu0", "cpu1")}, current, {"api": "cpu0"}) == (
        {"api": ("cpu0", "cpu1")}, set())  # on its anchor already: unchanged


def test_a_job_with_no_new_device_to_swap_is_held_and_respect_keeps_held_jobs() -> None:
    current = {"api": ("cpu0", "cpu1"), "b": ("cpu2",)}
    _, stuck = keep_anchors({"api": ("cpu1",), "b": ("cpu0", "cpu2")}, current,
                            {"api": "cpu0"})
    views = {j: JobView(job_id=j, kind=JobKind.TRAIN, priority=1, min_workers=1,
                        max_workers=4) for j in ("api", "b")}

    kept = respect({"api": ("cpu1",), "b": ("cpu0", "cpu2")}, current, stuck, views)

    assert stuck == {"api"}
    assert kept == {"api": ("cpu0", "cpu1"), "b": ("cpu2",)}
