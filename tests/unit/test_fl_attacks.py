"""Attacks of malicious federated clients, against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from idla.errors import ConfigError
from idla.fl.attacks import (
    Attack,
    attack_update,
    flip_labels,
    gaussian,
    parse_attack,
    scale,
    signflip,
)


def _model(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    global_arrays = [rng.normal(size=(40, 30)).astype(np.float32),
                     rng.normal(size=30).astype(np.float32)]
    new_arrays = [a + rng.normal(scale=0.1, size=a.shape).astype(np.float32)
                  for a in global_arrays]
    return global_arrays, new_arrays


def test_signflip_reverses_the_update() -> None:
    global_arrays, new_arrays = _model()

    attacked = signflip(global_arrays, new_arrays)

    for g, n, a in zip(global_arrays, new_arrays, attacked, strict=True):
        assert a.dtype == np.float32 and a.shape == g.shape
        np.testing.assert_allclose(a - g, -(n - g), atol=1e-5)


def test_scale_boosts_and_reverses_the_update() -> None:
    global_arrays, new_arrays = _model()

    attacked = scale(global_arrays, new_arrays)
    doubled = scale(global_arrays, new_arrays, factor=2.0)

    for g, n, a, d in zip(global_arrays, new_arrays, attacked, doubled, strict=True):
        np.testing.assert_allclose(a - g, -10.0 * (n - g), atol=1e-4)
        np.testing.assert_allclose(d - g, 2.0 * (n - g), atol=1e-5)


def test_gaussian_is_noise_scaled_to_the_update_without_its_signal() -> None:
    global_arrays, new_arrays = _model()
    delta = np.concatenate([(n - g).ravel() for g, n in zip(global_arrays, new_arrays,
                                                            strict=True)])

    attacked = gaussian(global_arrays, new_arrays, np.random.default_rng(1), relative_scale=3.0)
    noise = np.concatenate([(a - g).ravel() for g, a in zip(global_arrays, attacked,
                                                            strict=True)])

    rms = float(np.sqrt(np.mean(delta.astype(np.float64) ** 2)))
    assert float(np.std(noise)) == pytest.approx(3.0 * rms, rel=0.1)
    assert abs(float(np.mean(noise))) < 0.3 * rms
    assert abs(float(np.corrcoef(noise, delta)[0, 1])) < 0.1


def test_gaussian_depends_on_the_generator() -> None:
    global_arrays, new_arrays = _model()

    a = gaussian(global_arrays, new_arrays, np.random.default_rng(5))
    b = gaussian(global_arrays, new_arrays, np.random.default_rng(5))
    c = gaussian(global_arrays, new_arrays, np.random.default_rng(6))

    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_flip_labels_maps_y_to_nine_minus_y() -> None:
    labels = np.arange(10)

    flipped = flip_labels(labels)

    assert flipped.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert np.array_equal(flip_labels(flipped), labels)
    with pytest.raises(ValueError, match="labels must be in"):
        flip_labels(np.array([0, 10]))


def test_attack_update_dispatches_and_leaves_honest_weights_alone() -> None:
    global_arrays, new_arrays = _model()
    rng = np.random.default_rng(0)

    for attack in (Attack.NONE, Attack.LABELFLIP):
        unchanged = attack_update(attack, global_arrays, new_arrays, rng)
        assert all(np.array_equal(u, n) for u, n in zip(unchanged, new_arrays, strict=True))
    flipped = attack_update(Attack.SIGNFLIP, global_arrays, new_arrays, rng)
    np.testing.assert_allclose(flipped[1] - global_arrays[1], global_arrays[1] - new_arrays[1],
                               atol=1e-5)


def test_attacks_refuse_mismatched_models() -> None:
    global_arrays, new_arrays = _model()

    with pytest.raises(ValueError, match="shape"):
        signflip(global_arrays, [new_arrays[0].T, new_arrays[1]])
    with pytest.raises(ValueError, match="arrays for a model of 2"):
        scale(global_arrays, new_arrays[:1])


@pytest.mark.parametrize("text", ["signflip", "GAUSSIAN", " scale ", "labelflip", "none"])
def test_parse_attack_accepts_the_names(text: str) -> None:
    assert parse_attack(text).value == text.strip().lower()


def test_parse_attack_names_the_choices_on_error() -> None:
    with pytest.raises(ConfigError, match=r"--attack: unknown attack 'flip'.*signflip"):
        parse_attack("flip")
