"""The pool policy as a pure function: brute force on small pools, constraints, hysteresis."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from idla.errors import ConfigError
from idla.pool.model import Device, JobKind, JobView, check_allocation
from idla.pool.perf import OnlineModels, uneven_step_s
from idla.pool.policy import PolicyConfig, allocate

_GiB = 2**30


def _pool(kinds: str) -> list[Device]:
    return [Device(f"d{i}", kind, f"n{i // 2}", 8 * _GiB) for i, kind in enumerate(kinds)]


def _models(jobs: list[str], speeds: dict[str, dict[str, float]], comm_s: float = 0.0,
            ) -> OnlineModels:
    models = OnlineModels()
    for job in jobs:
        models.set_job(job, 128, comm_s=comm_s)
        for kind, per_sample_s in speeds[job].items():
            models.seed(job, kind, [(b, 0.002 + per_sample_s * b) for b in (16, 32, 64, 128)])
    return models


def _train(job_id: str, priority: float, remaining: float, **kw: object) -> JobView:
    return JobView(job_id=job_id, kind=JobKind.TRAIN, priority=priority, min_workers=1,
                   max_workers=4, remaining_samples=remaining, **kw)  # type: ignore[arg-type]


def _objective(allocation: dict[str, tuple[str, ...]], jobs: list[JobView],
               devices: list[Device], models: OnlineModels, horizon_s: float) -> float:
    by_id = {d.device_id: d for d in devices}
    total = 0.0
    for job in jobs:
        held = [by_id[d] for d in allocation.get(job.job_id, ())]
        assert job.remaining_samples is not None
        total += job.priority * models.rate_per_s(job.job_id, held) * horizon_s / (
            job.remaining_samples)
    return total


def test_uneven_step_all_devices_finish_together() -> None:
    fits = [(2, 0.01, 0.001), (1, 0.05, 0.004)]
    step_s = uneven_step_s(300, fits)
    shares = [n * (step_s - alpha) / beta for n, alpha, beta in fits]
    assert sum(shares) == pytest.approx(300)
    assert all(share > 0 for share in shares)
    # A kind too slow to carry any share is left idle rather than slowing the step.
    assert uneven_step_s(10, [(1, 0.0, 0.001), (1, 5.0, 0.001)]) == pytest.approx(0.01)


def test_online_models_follow_new_observations_after_a_prediction() -> None:
    models = _models(["j"], {"j": {"a": 1e-3}})
    pair = _pool("aa")
    fast_s = models.step_s("j", pair)
    assert fast_s == pytest.approx(0.002 + 1e-3 * 64, rel=1e-6)
    for _ in range(40):  # the kind slows down 4x: the cached prediction must not survive
        models.observe("j", "a", 64, 0.002 + 4e-3 * 64)
    slow_s = models.step_s("j", pair)
    assert slow_s > 3 * fast_s
    models.set_job("j", 256)  # twice the global batch: twice the per-sample compute
    assert models.step_s("j", pair) > 1.9 * slow_s
    assert models.rate_per_s("j", pair) == pytest.approx(256 / models.step_s("j", pair))


def test_greedy_against_brute_force_on_small_pools() -> None:
    # Σ pᵢ·Uᵢ alone: urgent jobs' guarantees (tested below) trade some of it away on purpose.
    config = PolicyConfig(guarantee_priority=math.inf, work_exponent=1.0)
    ratios = []
    for seed in range(12):
        rng = random.Random(seed)
        devices = _pool("aabb")
        names = ["x", "y", "z"]
        speeds = {n: {"a": rng.uniform(1e-4, 1e-3), "b": rng.uniform(1e-4, 1e-3)} for n in names}
        models = _models(names, speeds, comm_s=rng.uniform(0.0, 0.05))
        jobs = [_train(n, rng.choice([1, 2, 4]), rng.uniform(1e4, 1e5)) for n in names]
        greedy = allocate(jobs, devices, models, {}, config)
        check_allocation(greedy, jobs, devices)
        best = 0.0
        for owners in itertools.product([None, *names], repeat=len(devices)):
            candidate: dict[str, tuple[str, ...]] = {}
            for device, owner in zip(devices, owners, strict=True):
                if owner is not None:
                    candidate[owner] = (*candidate.get(owner, ()), device.device_id)
            best = max(best, _objective(candidate, jobs, devices, models, config.horizon_s))
        ratios.append(_objective(greedy, jobs, devices, models, config.horizon_s) / best)
    # The (1 - 1/e) bound of greedy on submodular objectives holds on every instance, and on
    # these pools greedy is optimal or within 5 % on average.
    assert min(ratios) >= 1 - 1 / math.e
    assert sum(ratios) / len(ratios) >= 0.95


def test_memory_min_and_max_workers_are_respected() -> None:
    devices = [Device(f"s{i}", "small", "n0", 2 * _GiB) for i in range(3)] + [
        Device(f"b{i}", "big", "n1", 16 * _GiB) for i in range(2)]
    speeds = {n: {"small": 2e-4, "big": 1e-4} for n in ("big_model", "wide", "capped")}
    models = _models(list(speeds), speeds)
    jobs = [
        _train("big_model", 4, 1e4, memory_bytes_per_worker=8 * _GiB),
        JobView(job_id="wide", kind=JobKind.TRAIN, priority=1, min_workers=4, max_workers=5,
                remaining_samples=1e4),
        JobView(job_id="capped", kind=JobKind.TRAIN, priority=1, min_workers=1, max_workers=1,
                remaining_samples=1e4),
    ]
    allocation = allocate(jobs, devices, models, {})
    check_allocation(allocation, jobs, devices)
    assert set(allocation["big_model"]) <= {"b0", "b1"}
    assert len(allocation.get("capped", ())) == 1
    # Four workers cannot be found once the others hold theirs: queued, not given fewer.
    assert "wide" not in allocation


def test_rigid_running_job_keeps_its_devices() -> None:
    devices = _pool("aaaa")
    speeds = {n: {"a": 1e-4} for n in ("rigid", "urgent")}
    models = _models(list(speeds), speeds)
    rigid = JobView(job_id="rigid", kind=JobKind.TRAIN, priority=1, min_workers=1,
                    max_workers=4, resizable=False, remaining_samples=1e6)
    urgent = _train("urgent", 4, 1e3)
    first = allocate([rigid], devices, models, {})
    assert len(first["rigid"]) == 4
    second = allocate([rigid, urgent], devices, models, first)
    assert second["rigid"] == first["rigid"]
    assert "urgent" not in second
    # A resizable job in its place gives devices to the urgent one.
    elastic = _train("rigid", 1, 1e6)
    third = allocate([elastic, urgent], devices, models, first)
    assert len(third["urgent"]) >= 1


def test_lost_device_keeps_the_rest() -> None:
    devices = _pool("aabb")
    speeds = {"solo": {"a": 1e-4, "b": 2e-4}}
    models = _models(["solo"], speeds)
    jobs = [_train("solo", 1, 1e5)]
    first = allocate(jobs, devices, models, {})
    assert len(first["solo"]) == 4  # mixed kinds in one job
    survivors = [d for d in devices if d.device_id != first["solo"][0]]
    second = allocate(jobs, survivors, models, first)
    assert set(second["solo"]) == set(first["solo"][1:])


def test_no_thrash_under_speed_noise_but_follows_a_real_change() -> None:
    devices = _pool("aaaabbbb")
    names = ["p", "q", "r"]
    rng = random.Random(7)
    base = {n: {"a": rng.uniform(2e-4, 6e-4), "b": rng.uniform(2e-4, 6e-4)} for n in names}
    jobs = [_train(n, p, 5e4) for n, p in zip(names, (1, 2, 4), strict=True)]
    current = allocate(jobs, devices, _models(names, base, comm_s=0.01), {})
    changes = 0
    for _ in range(30):
        noisy = {n: {k: s * rng.uniform(0.97, 1.03) for k, s in v.items()}
                 for n, v in base.items()}
        plan = allocate(jobs, devices, _models(names, noisy, comm_s=0.01), current)
        changes += plan != current
        current = plan
    assert changes == 0
    slow = {n: dict(v) for n, v in base.items()}
    holder = next(j for j in current if any(d in {"d0", "d1", "d2", "d3"} for d in current[j]))
    slow[holder]["a"] *= 20
    assert allocate(jobs, devices, _models(names, slow, comm_s=0.01), current) != current


def test_serving_job_gets_capacity_for_its_offered_load() -> None:
    devices = _pool("aaaa")
    models = _models(["serve", "train"], {"serve": {"a": 1e-3}, "train": {"a": 1e-4}})
    serve = JobView(job_id="serve", kind=JobKind.SERVE, priority=4, min_workers=1,
                    max_workers=4, offered_requests_per_s=700.0)
    allocation = allocate([serve, _train("train", 1, 1e5)], devices, models, {})
    by_id = {d.device_id: d for d in devices}
    capacity = models.rate_per_s("serve", [by_id[d] for d in allocation["serve"]])
    assert capacity >= 700.0
    assert len(allocation["serve"]) < 4  # capacity past the load is worth nothing


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="horizon_s"):
        PolicyConfig(horizon_s=0)
    with pytest.raises(ConfigError, match="work_exponent"):
        PolicyConfig(work_exponent=2.0)
    with pytest.raises(ConfigError, match="guarantee_slowdown"):
        PolicyConfig(guarantee_slowdown=0.5)


def _rate(allocation: dict[str, tuple[str, ...]], job_id: str, devices: list[Device],
          models: OnlineModels) -> float:
    by_id = {d.device_id: d for d in devices}
    return models.rate_per_s(job_id, [by_id[d] for d in allocation.get(job_id, ())])


def _full_pool_and_urgent() -> tuple[list[Device], OnlineModels, list[JobView], JobView]:
    devices = _pool("aaaabbbb")
    names = ["s0", "s1", "s2", "urgent"]
    speeds = {n: {"a": 1e-4, "b": 3e-4} for n in names}
    models = _models(names, speeds, comm_s=0.002)
    # Short p=1 jobs outrank the long p=4 one under Smith's rule (1/2e5 > 4/1e6 per sample).
    short = [_train(n, 1, 2e5) for n in names[:3]]
    urgent = JobView(job_id="urgent", kind=JobKind.TRAIN, priority=4, min_workers=1,
                     max_workers=8, remaining_samples=1e6)
    return devices, models, short, urgent


def test_urgent_job_arriving_into_a_full_pool_gets_its_alone_rate_at_once() -> None:
    devices, models, short, urgent = _full_pool_and_urgent()
    config = PolicyConfig()
    full = allocate(short, devices, models, {}, config)
    assert sum(len(held) for held in full.values()) == len(devices)
    alone = _rate(allocate([urgent], devices, models, {}, config), "urgent", devices, models)
    plan = allocate([*short, urgent], devices, models, full, config)
    check_allocation(plan, [*short, urgent], devices)
    assert _rate(plan, "urgent", devices, models) >= alone / config.guarantee_slowdown
    # Without the guarantee the same arrival gets less than that (Smith's rule alone).
    plain = PolicyConfig(guarantee_priority=math.inf)
    smith = allocate([*short, urgent], devices, models, full, plain)
    assert _rate(smith, "urgent", devices, models) < alone / config.guarantee_slowdown


def test_a_serving_job_takes_the_slowest_kind_that_meets_its_load() -> None:
    devices = _pool("bbaa")  # b: 4x slower than a, listed first; one b carries the load
    models = _models(["serve", "train"], {"serve": {"a": 1e-4, "b": 4e-4},
                                          "train": {"a": 1e-4, "b": 4e-4}})
    serve = JobView(job_id="serve", kind=JobKind.SERVE, priority=1, min_workers=1,
                    max_workers=2, offered_requests_per_s=5.0)
    plan = allocate([serve, _train("train", 1, 1e5)], devices, models, {})
    check_allocation(plan, [serve, _train("train", 1, 1e5)], devices)
    assert [d.kind for d in devices if d.device_id in plan["serve"]] == ["b"]
    assert {"d2", "d3"} <= set(plan["train"])  # the fast ones go to training


def test_an_urgent_arrival_never_takes_a_serving_jobs_devices() -> None:
    devices = _pool("aaaa")
    models = _models(["serve", "sweep", "urgent"], {"serve": {"a": 1e-3}, "sweep": {"a": 1e-4},
                                                    "urgent": {"a": 1e-4}})
    serve = JobView(job_id="serve", kind=JobKind.SERVE, priority=1, min_workers=1,
                    max_workers=1, offered_requests_per_s=50.0)
    sweep = _train("sweep", 1, 1e6)
    urgent = JobView(job_id="urgent", kind=JobKind.TRAIN, priority=4, min_workers=1,
                     max_workers=4, remaining_samples=1e5)
    before = allocate([serve, sweep], devices, models, {})
    plan = allocate([serve, sweep, urgent], devices, models, before)
    check_allocation(plan, [serve, sweep, urgent], devices)
    assert plan["serve"] == before["serve"]  # its latency target is a promise
    assert len(plan["urgent"]) == 3  # every device it may take


def test_guarantee_is_stable_under_speed_noise() -> None:
    devices, models, short, urgent = _full_pool_and_urgent()
    jobs = [*short, urgent]
    current = allocate(jobs, devices, models, allocate(short, devices, models, {}))
    rng = random.Random(3)
    changes = 0
    for _ in range(20):
        noisy = {n: {"a": 1e-4 * rng.uniform(0.97, 1.03), "b": 3e-4 * rng.uniform(0.97, 1.03)}
                 for n in ("s0", "s1", "s2", "urgent")}
        plan = allocate(jobs, devices, _models(list(noisy), noisy, comm_s=0.002), current)
        changes += plan != current
        current = plan
    assert changes == 0


def test_long_urgent_job_is_not_guaranteed_until_its_tail() -> None:
    devices, models, short, urgent = _full_pool_and_urgent()
    full = allocate(short, devices, models, {})
    alone = _rate(allocate([urgent], devices, models, {}), "urgent", devices, models)
    alone_s = 1e6 / alone
    tight = PolicyConfig(guarantee_max_s=alone_s / 2)
    plan = allocate([*short, urgent], devices, models, full, tight)
    assert _rate(plan, "urgent", devices, models) < alone / tight.guarantee_slowdown
    tail = JobView(job_id="urgent", kind=JobKind.TRAIN, priority=4, min_workers=1,
                   max_workers=8, remaining_samples=1e6 / 4)
    plan = allocate([*short, tail], devices, models, full, tight)
    assert _rate(plan, "urgent", devices, models) >= alone / tight.guarantee_slowdown


_DIP_RATES = (0.0, 3.2, 6.0, 10.0, 9.0, 9.5, 9.8, 9.9, 30.0)
"""Samples/s on 0..8 devices: rates measured on real clusters are not concave in the device
count; here 3 devices beat 4 and 5, and 8 beat them all (the shape of deepspeech2 on A100s in
the Sia traces)."""


class _DipModels:
    def rate_per_s(self, job_id: str, devices: list[Device]) -> float:
        return _DIP_RATES[len(devices)]

    def resize_cost_s(self, job_id: str) -> float:
        return 0.0


def test_the_greedy_steps_over_a_dip_in_the_rate_curve_to_the_best_size() -> None:
    devices = [Device(f"d{i}", "a100", "n0", 40 * _GiB) for i in range(8)]
    job = JobView(job_id="asr", kind=JobKind.TRAIN, priority=4, min_workers=1, max_workers=8,
                  remaining_samples=1e5)
    models = _DipModels()

    plan = allocate([job], devices, models, {})  # type: ignore[arg-type]

    assert len(plan["asr"]) == 8  # one device at a time it would stop at 3 (10/s, not 30/s)
    held = {"asr": tuple(d.device_id for d in devices[:3])}
    assert len(allocate([job], devices, models, held)["asr"]) == 8  # and grows past 3
