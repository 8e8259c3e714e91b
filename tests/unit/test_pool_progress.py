"""JobProgress: a job's metrics files feed the models per device kind, say when the job is formed,
and measure what a resize cost; SpeedPrior rates an unmeasured job by emulated speeds and an
unmeasured serving job by its offered load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from idla.agent.pool_metrics import write_metrics
from idla.pool.model import Device, JobKind, JobView
from idla.pool.perf import OnlineModels
from idla.pool.policy import allocate
from idla.pool.progress import JobProgress, SpeedPrior, kind_speed

FAST, SLOW = Device("cpu0", "cpu@1", "h", 0), Device("cpu1", "cpu@0.25", "h", 0)


def _row(directory: Path, member: int, device: Device, *, time_s: float, world: int,
         step: int, samples: float, rate: float = 100.0, local_batch: int = 64,
         compute_s: float = 0.5, status: str = "running") -> None:
    row: dict[str, Any] = {"member": member, "worker": device.device_id, "world_size": world,
                           "job_step": step, "samples_done": samples, "time": time_s,
                           "status": status, "local_batch": local_batch, "global_batch": 128,
                           "compute_s": compute_s, "comm_s": 0.0, "job_samples_per_s": rate}
    write_metrics(directory / f"member-{member}.json", row)


def test_kind_speed_reads_the_emulated_speed_and_defaults_to_one() -> None:
    assert kind_speed("cpu@0.25") == 0.25
    assert kind_speed("cpu") == kind_speed("a100") == kind_speed("cpu@fast") == 1.0
    assert kind_speed("cpu@-1") == kind_speed("cpu@nan") == 1.0


def test_rows_feed_the_models_and_seed_the_kinds_not_run_on(tmp_path: Path) -> None:
    models = OnlineModels()
    progress = JobProgress("j", tmp_path, started_wall_s=100.0, pool_kinds=["cpu@1", "cpu@0.25"])
    _row(tmp_path, 0, FAST, time_s=90.0, world=1, step=5, samples=999)  # an earlier attempt
    assert progress.update({"cpu0": FAST}, models) is None
    assert progress.samples_done == 0 and not progress.formed

    _row(tmp_path, 0, FAST, time_s=101.0, world=1, step=3, samples=384, compute_s=0.5,
         local_batch=128)

    progress.update({"cpu0": FAST}, models)
    assert progress.formed and progress.step == 3 and progress.samples_done == 384
    fast = models.rate_per_s("j", [FAST])
    assert fast == pytest.approx(128 / 0.5)
    assert models.rate_per_s("j", [SLOW]) == pytest.approx(fast * 0.25)  # seeded by its speed


def test_formed_needs_every_worker_stepping_at_the_new_world_and_a_resize_is_measured(
        tmp_path: Path) -> None:
    models = OnlineModels()
    progress = JobProgress("j", tmp_path, started_wall_s=0.0)
    _row(tmp_path, 0, FAST, time_s=10.0, world=1, step=20, samples=1000, rate=100.0)
    progress.update({"cpu0": FAST}, models)
    assert progress.formed

    progress.changed(now_wall_s=10.5)  # grown onto cpu1
    _row(tmp_path, 0, FAST, time_s=11.0, world=1, step=21, samples=1100, rate=100.0)
    _row(tmp_path, 1, SLOW, time_s=12.0, world=2, step=21, samples=1100, rate=0.0,
         status="joining")
    assert progress.update({"cpu0": FAST, "cpu1": SLOW}, models) is None
    assert not progress.formed  # the old world's row and a newcomer not yet stepping
    _row(tmp_path, 0, FAST, time_s=15.0, world=2, step=23, samples=1300, rate=125.0)
    assert progress.update({"cpu0": FAST, "cpu1": SLOW}, models) is None
    assert not progress.formed  # cpu1 has not stepped at world 2 yet
    _row(tmp_path, 1, SLOW, time_s=15.2, world=2, step=23, samples=1300, rate=125.0)

    lost_s = progress.update({"cpu0": FAST, "cpu1": SLOW}, models)

    assert progress.formed
    # From the last row before the change (t=10, 1000 samples) to the new world's newest
    # (t=15.2, 1300): 5.2 s in which 300 samples at the faster rate (125/s) took 2.4 s.
    assert lost_s == pytest.approx(5.2 - 300 / 125)
    assert models.resize_cost_s("j") == pytest.approx(lost_s)


def test_a_worker_that_left_does_not_count_and_an_unmeasured_job_goes_by_speed(
        tmp_path: Path) -> None:
    models = OnlineModels()
    progress = JobProgress("j", tmp_path, started_wall_s=0.0)
    _row(tmp_path, 0, FAST, time_s=5.0, world=2, step=4, samples=512, status="left")
    assert progress.update({"cpu0": FAST}, models) is None and not progress.formed
    prior = SpeedPrior(models, prior_rate_per_s=2.0)

    assert prior.rate_per_s("j", [FAST, SLOW]) == pytest.approx(2.0 * 1.25)
    assert prior.rate_per_s("j", []) == 0.0


def _one_measured_job(directory: Path) -> OnlineModels:
    """Models that have seen job "old" do 128 samples in 0.5 s on a speed-1 device."""
    models = OnlineModels()
    progress = JobProgress("old", directory, started_wall_s=0.0, pool_kinds=["cpu@1", "cpu@0.25"])
    _row(directory, 0, FAST, time_s=1.0, world=1, step=3, samples=384, compute_s=0.5,
         local_batch=128)
    progress.update({"cpu0": FAST}, models)
    return models


def test_an_unmeasured_job_is_rated_like_the_measured_ones_per_unit_of_speed(
        tmp_path: Path) -> None:
    models = _one_measured_job(tmp_path)
    prior = SpeedPrior(models)
    assert prior.rate_per_s("new", [FAST]) == 1.0  # nothing measured: the configured prior

    prior.refresh([_train("old"), _train("new")], ["cpu@1", "cpu@0.25"])

    assert prior.rate_per_s("new", [FAST]) == pytest.approx(128 / 0.5)
    assert prior.rate_per_s("new", [SLOW]) == pytest.approx(128 / 0.5 * 0.25)


def _train(job_id: str) -> JobView:
    return JobView(job_id=job_id, kind=JobKind.TRAIN, priority=1, min_workers=1, max_workers=2)


def test_an_unmeasured_serving_job_starts_on_the_slowest_kind_then_goes_by_its_capacity(
        tmp_path: Path) -> None:
    models = _one_measured_job(tmp_path)
    serve = JobView(job_id="web", kind=JobKind.SERVE, priority=1, min_workers=1, max_workers=2,
                    offered_requests_per_s=10.0)
    prior = SpeedPrior(models)
    prior.refresh([_train("old"), serve], ["cpu@1", "cpu@0.25"])
    # Not the training jobs' samples/s: its offered load on its one device, whatever the kind.
    assert prior.rate_per_s("web", [FAST]) == prior.rate_per_s("web", [SLOW]) == 10.0
    assert allocate([serve], [FAST, SLOW], prior, {}) == {"web": ("cpu1",)}

    prior.set_capacity("web", "cpu@0.25", 6.0)  # measured: the slow device carries 6 of 10

    assert prior.rate_per_s("web", [SLOW]) == 6.0
    assert allocate([serve], [FAST, SLOW], prior, {"web": ("cpu1",)}) == {"web": ("cpu0", "cpu1")}
