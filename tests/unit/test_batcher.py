"""Dynamic batching: the service curve, the limits sized from it, and the batching queue."""

from __future__ import annotations

import random

import pytest

from idla.errors import ConfigError
from idla.serve.batcher import BatchPolicy, DynamicBatcher, ServiceCurve, size_batching


def _linear(alpha_s: float, beta_s: float, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
            ) -> ServiceCurve:
    return ServiceCurve.from_points([[b, alpha_s + beta_s * b] for b in sizes])


def test_curve_interpolates_and_extrapolates_linearly() -> None:
    curve = ServiceCurve.from_points([[4, 0.010], [1, 0.004], [2, 0.006]])  # any order
    assert curve.rows == (1, 2, 4)
    assert curve.predict_s(3) == pytest.approx(0.008)
    assert curve.predict_s(8) == pytest.approx(0.018)  # along the last segment (2 ms/row)
    assert curve.predict_s(0) == 0.0


def test_curve_is_made_monotone_and_checked() -> None:
    curve = ServiceCurve.from_points([[1, 0.005], [2, 0.004], [4, 0.009]])
    assert curve.seconds == (0.005, 0.005, 0.009)  # a noisy dip is flattened
    for bad in ([], [[0, 0.1]], [[1, 0.1], [1, 0.2]], [[1, -0.1]], [[1, float("nan")]],
                [["x", 1]]):
        with pytest.raises(ConfigError):
            ServiceCurve.from_points(bad)


def test_fixed_cost_of_a_linear_curve_is_its_intercept() -> None:
    assert _linear(0.002, 0.0005).fixed_s() == pytest.approx(0.002)
    assert _linear(0.0, 0.001).fixed_s() == pytest.approx(0.0, abs=1e-12)


def test_size_batching_takes_the_largest_batch_within_the_budget() -> None:
    curve = _linear(0.002, 0.0005)
    policy = size_batching(curve, batch_budget_s=0.010, max_batch_rows=256, max_wait_cap_s=0.1)
    assert curve.predict_s(policy.max_batch_rows) <= 0.010 < curve.predict_s(
        policy.max_batch_rows + 1)
    assert policy.max_batch_rows == 16
    assert policy.max_wait_s == pytest.approx(0.002)  # waits its fixed cost α
    capped = size_batching(curve, 0.010, max_batch_rows=8, max_wait_cap_s=0.001)
    assert (capped.max_batch_rows, capped.max_wait_s) == (8, 0.001)
    one_request = size_batching(curve, 0.0001, 256, 0.001, min_batch_rows=16)
    assert one_request.max_batch_rows == 16  # a batch always holds one whole request


def test_batcher_waits_for_company_then_runs_what_it_has() -> None:
    batcher: DynamicBatcher[str] = DynamicBatcher(BatchPolicy(max_batch_rows=4, max_wait_s=0.01))
    assert batcher.take(0.0) == ([], None)
    batcher.push("a", 1, now_s=0.0)
    batcher.push("b", 1, now_s=0.004)
    batch, wait_s = batcher.take(0.005)
    assert batch == [] and wait_s == pytest.approx(0.005)
    batch, wait_s = batcher.take(0.010)
    assert [item for item, _ in batch] == ["a", "b"] and wait_s is None
    assert batcher.queued_rows == 0 and batcher.queued_requests == 0


def test_full_batch_goes_at_once_and_requests_are_never_split() -> None:
    batcher: DynamicBatcher[str] = DynamicBatcher(BatchPolicy(max_batch_rows=4, max_wait_s=1.0))
    for name, rows in (("a", 2), ("b", 1), ("c", 2), ("d", 9)):
        batcher.push(name, rows, now_s=0.0)
    first, _ = batcher.take(0.0)
    assert [item for item, _ in first] == ["a", "b"]  # a+b+c would be 5 rows > 4
    second, _ = batcher.take(0.0)
    assert [item for item, _ in second] == ["c"]  # c+d too large: d waits for its own batch
    third, _ = batcher.take(0.0)
    assert [item for item, _ in third] == ["d"]  # a lone oversized request still runs
    batcher.push("e", 1, now_s=0.0)
    assert batcher.drain() == ["e"] and batcher.queued_rows == 0


def test_no_request_waits_past_max_wait_on_an_idle_worker() -> None:
    """Random arrivals; the worker is idle and asks exactly when `take` says to."""
    rng = random.Random(3)
    policy = BatchPolicy(max_batch_rows=8, max_wait_s=0.005)
    batcher: DynamicBatcher[float] = DynamicBatcher(policy)
    arrivals = sorted(rng.uniform(0, 1.0) for _ in range(2000))
    waits_s: list[float] = []
    sizes: list[int] = []
    due_s: float | None = None
    for now_s in [*arrivals, 2.0]:
        while due_s is not None and due_s <= now_s:  # the dispatcher wakes at the deadline
            batch, wait_s = batcher.take(due_s)
            waits_s += [due_s - enqueued_s for _, enqueued_s in batch]
            sizes += [len(batch)] if batch else []
            due_s = None if wait_s is None else due_s + wait_s
        if now_s < 2.0:
            batcher.push(now_s, 1, now_s)
            batch, wait_s = batcher.take(now_s)
            waits_s += [now_s - enqueued_s for _, enqueued_s in batch]
            sizes += [len(batch)] if batch else []
            due_s = None if wait_s is None else now_s + wait_s
    assert len(waits_s) == len(arrivals)
    assert max(waits_s) <= policy.max_wait_s + 1e-12
    assert max(sizes) <= policy.max_batch_rows and max(sizes) > 1  # it did batch


def test_batch_policy_is_validated() -> None:
    with pytest.raises(ConfigError):
        BatchPolicy(max_batch_rows=0, max_wait_s=0.0)
    with pytest.raises(ConfigError):
        BatchPolicy(max_batch_rows=1, max_wait_s=-1.0)
