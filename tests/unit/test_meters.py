"""Bias-corrected moving averages and the per-worker meter."""

from __future__ import annotations

import math

import pytest

from idla.profile.meters import EmaMeter, RateMeter, StepTimes, WorkerMeter


def test_ema_returns_first_value_exactly() -> None:
    # Prepare
    meter = EmaMeter(decay=0.9)

    # Execute
    meter.update(0.1234567)

    # Assert
    assert meter.value == 0.1234567
    assert meter.count == 1


def test_ema_is_nan_before_any_update() -> None:
    # Execute / Assert
    assert math.isnan(EmaMeter().value)
    assert EmaMeter().count == 0


def test_ema_bias_correction_matches_definition() -> None:
    # Prepare
    meter = EmaMeter(decay=0.5)

    # Execute
    for x in [1.0, 2.0, 4.0]:
        meter.update(x)

    # Assert: (0.25·1 + 0.5·2 + 1·4) / (0.25 + 0.5 + 1)
    assert meter.value == pytest.approx(5.25 / 1.75)


def test_ema_ignores_non_finite() -> None:
    # Prepare
    meter = EmaMeter()
    meter.update(2.0)

    # Execute
    meter.update(math.nan)
    meter.update(math.inf)

    # Assert
    assert meter.value == 2.0
    assert meter.count == 1


def test_rate_is_ratio_of_averages() -> None:
    # Prepare
    meter = RateMeter(decay=0.5)

    # Execute
    meter.update(100, 1.0)
    first = meter.per_s
    meter.update(300, 1.0)

    # Assert: (0.5·100 + 300) / (0.5·1 + 1)
    assert first == 100.0
    assert meter.per_s == pytest.approx(350.0 / 1.5)


def test_rate_is_nan_without_time() -> None:
    # Prepare
    meter = RateMeter()

    # Execute
    before = meter.per_s
    meter.update(10, 0.0)

    # Assert
    assert math.isnan(before)
    assert math.isnan(meter.per_s)


def test_worker_meter_snapshot() -> None:
    # Prepare
    meter = WorkerMeter()
    times = StepTimes(compute_s=0.3, comm_s=0.1, wait_s=0.1, samples=50)

    # Execute
    meter.update(times)
    snapshot = meter.snapshot()

    # Assert
    assert times.total_s == pytest.approx(0.5)
    assert snapshot == pytest.approx(
        {"compute_s": 0.3, "comm_s": 0.1, "wait_s": 0.1, "samples_per_s": 100.0}
    )
