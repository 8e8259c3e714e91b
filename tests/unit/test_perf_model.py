"""StepTimeFit: recovers the model, falls back sensibly, follows speed changes."""

from __future__ import annotations

import math

import pytest

from idla.errors import ConfigError
from idla.profile.perf_model import StepModel, StepTimeFit


def test_predict_step_s_pays_compute_only_with_samples() -> None:
    # Prepare
    model = StepModel(compute_fixed_s=0.01, compute_per_sample_s=0.002, comm_s=0.05)

    # Execute / Assert
    assert model.predict_step_s(0) == 0.05
    assert model.predict_step_s(10) == pytest.approx(0.05 + 0.01 + 0.02)


def test_recovers_alpha_beta_from_noiseless_data() -> None:
    # Prepare
    fit = StepTimeFit()
    for local_batch in [16, 32, 64, 48, 24, 96]:
        fit.observe(local_batch, 0.004 + 0.0015 * local_batch, comm_s=0.02)

    # Execute
    model = fit.model()

    # Assert
    assert model is not None
    assert model.compute_fixed_s == pytest.approx(0.004, rel=1e-9)
    assert model.compute_per_sample_s == pytest.approx(0.0015, rel=1e-9)
    assert model.comm_s == pytest.approx(0.02, rel=1e-12)
    assert fit.count == 6


def test_one_batch_size_gives_proportional_model() -> None:
    # Prepare
    fit = StepTimeFit()
    for compute_s in [0.10, 0.11, 0.09]:
        fit.observe(50, compute_s)

    # Execute
    model = fit.model()

    # Assert
    assert model is not None
    assert model.compute_fixed_s == 0.0
    assert model.compute_per_sample_s * 50 == pytest.approx(0.10, rel=0.05)
    assert model.comm_s == 0.0


def test_fixed_term_is_clamped_to_half_the_mean() -> None:
    # Prepare: nearly flat in the batch size, so the fitted α would explain almost everything
    fit = StepTimeFit(forget=1.0)
    for local_batch in [10, 20, 30]:
        fit.observe(local_batch, 1.0 + 0.001 * local_batch)

    # Execute
    model = fit.model()

    # Assert: still predicts the mean point exactly, with α at half of it
    assert model is not None
    assert model.compute_fixed_s == pytest.approx(0.5 * 1.02)
    assert model.predict_step_s(20) == pytest.approx(1.02)


def test_adapts_to_a_slowdown_within_a_few_observations() -> None:
    # Prepare
    fit = StepTimeFit()
    for _ in range(20):
        fit.observe(100, 0.1)

    # Execute
    fit.observe(100, 0.2)
    after_one = fit.model()
    fit.observe(100, 0.2)
    after_two = fit.model()

    # Assert: one slow step alone is held back; two in a row re-learn the new speed
    assert after_one is not None and after_two is not None
    assert after_one.predict_step_s(100) == pytest.approx(0.1)
    assert after_two.predict_step_s(100) == pytest.approx(0.2)


def test_a_lone_outlier_is_dropped() -> None:
    # Prepare
    fit = StepTimeFit()
    for _ in range(10):
        fit.observe(100, 0.1)

    # Execute
    fit.observe(100, 0.5)
    fit.observe(100, 0.1)
    model = fit.model()

    # Assert
    assert model is not None
    assert model.predict_step_s(100) == pytest.approx(0.1)


def test_small_drift_is_followed_by_forgetting() -> None:
    # Prepare
    fit = StepTimeFit()
    for _ in range(10):
        fit.observe(100, 0.1)

    # Execute: 20 % slower, below the change threshold
    for _ in range(15):
        fit.observe(100, 0.12)
    model = fit.model()

    # Assert
    assert model is not None
    assert model.predict_step_s(100) == pytest.approx(0.12, rel=0.01)


def test_ignores_nan_negative_and_empty_batches() -> None:
    # Prepare
    fit = StepTimeFit()
    fit.observe(10, 0.05, comm_s=0.01)

    # Execute
    fit.observe(10, math.nan, comm_s=math.inf)
    fit.observe(10, -1.0, comm_s=-1.0)
    fit.observe(0, 0.05, comm_s=0.03)
    model = fit.model()

    # Assert: only the comm of the empty batch counted
    assert model is not None
    assert fit.count == 1
    assert model.compute_per_sample_s == pytest.approx(0.005)
    assert 0.01 < model.comm_s < 0.03


def test_no_model_before_first_observation() -> None:
    # Prepare
    fit = StepTimeFit()

    # Execute
    fit.observe(0, 0.0, comm_s=0.01)

    # Assert
    assert fit.model() is None
    assert fit.count == 0


def test_identical_inputs_give_identical_models() -> None:
    # Prepare
    fits = [StepTimeFit(), StepTimeFit()]
    data = [(64, 0.071), (80, 0.088), (72, 0.079), (64, 0.150), (64, 0.149), (50, 0.12)]

    # Execute
    for fit in fits:
        for local_batch, compute_s in data:
            fit.observe(local_batch, compute_s, comm_s=0.01)

    # Assert
    assert fits[0].model() == fits[1].model()


def test_invalid_forget_raises() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="forget"):
        StepTimeFit(forget=0.0)


def test_relative_error_tracks_the_timing_noise() -> None:
    import random

    rng = random.Random(0)
    quiet = StepTimeFit(forget=0.9, change_ratio=0.6)
    noisy = StepTimeFit(forget=0.9, change_ratio=0.6)
    for _ in range(60):
        quiet.observe(100, 0.010 * (1 + rng.uniform(-0.01, 0.01)))
        noisy.observe(100, 0.010 * (1 + rng.uniform(-0.3, 0.3)))

    assert quiet.relative_error < 0.02
    assert 0.08 < noisy.relative_error < 0.3
    assert noisy.standard_error() < noisy.relative_error


def test_a_burst_shorter_than_change_steps_is_dropped() -> None:
    # Prepare
    fit = StepTimeFit(change_steps=4)
    for _ in range(20):
        fit.observe(100, 0.1)

    # Execute: three slow steps (a passing burst), then back to speed; then four slow steps
    for _ in range(3):
        fit.observe(100, 0.25)
    fit.observe(100, 0.1)
    after_burst = fit.model()
    for _ in range(4):
        fit.observe(100, 0.25)
    after_change = fit.model()

    # Assert
    assert after_burst is not None and after_change is not None
    assert after_burst.predict_step_s(100) == pytest.approx(0.1)
    assert after_change.predict_step_s(100) == pytest.approx(0.25)


def test_change_steps_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="change_steps"):
        StepTimeFit(change_steps=0)
