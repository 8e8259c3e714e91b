"""Dirichlet non-IID partitions: coverage, label skew against α, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from idla.errors import ConfigError
from idla.fl.data import dirichlet_partition, label_skew


def _labels(num_samples: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=num_samples)


@pytest.mark.parametrize(("num_clients", "alpha"), [(1, 0.5), (7, 0.1), (100, 0.5), (50, 1e3)])
def test_every_index_lands_in_exactly_one_client(num_clients: int, alpha: float) -> None:
    labels = _labels()

    parts = dirichlet_partition(labels, num_clients, alpha, np.random.default_rng(3))

    assert len(parts) == num_clients
    assert all(p.size >= 1 for p in parts)
    merged = np.concatenate(parts)
    assert merged.size == labels.size
    assert np.array_equal(np.sort(merged), np.arange(labels.size))
    assert all(np.array_equal(p, np.sort(p)) and p.dtype == np.int64 for p in parts)


def test_as_many_clients_as_samples_gives_one_sample_each() -> None:
    labels = _labels(num_samples=40)

    parts = dirichlet_partition(labels, 40, 0.05, np.random.default_rng(0))

    assert sorted(p.size for p in parts) == [1] * 40


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = _labels(num_samples=2000)

    skews = {alpha: label_skew(labels, dirichlet_partition(labels, 20, alpha,
                                                           np.random.default_rng(1)))
             for alpha in (0.05, 0.5, 1000.0)}

    assert skews[0.05] > skews[0.5] > skews[1000.0]
    assert skews[0.05] > 0.6  # a client holds one or two labels
    assert skews[1000.0] < 0.1  # close to a stratified split


def test_same_generator_state_gives_the_same_split() -> None:
    labels = _labels()

    first = dirichlet_partition(labels, 10, 0.5, np.random.default_rng(7))
    second = dirichlet_partition(labels, 10, 0.5, np.random.default_rng(7))
    other = dirichlet_partition(labels, 10, 0.5, np.random.default_rng(8))

    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_alpha_must_be_positive_and_finite(alpha: float) -> None:
    with pytest.raises(ConfigError, match="--alpha"):
        dirichlet_partition(_labels(), 10, alpha, np.random.default_rng(0))


def test_more_clients_than_samples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--clients 11"):
        dirichlet_partition(_labels(num_samples=10), 11, 0.5, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="--clients"):
        dirichlet_partition(_labels(), 0, 0.5, np.random.default_rng(0))


def test_label_skew_of_single_label_clients_is_one_minus_one_over_c() -> None:
    labels = np.repeat(np.arange(4), 5)
    parts = [np.flatnonzero(labels == c) for c in range(4)]

    assert label_skew(labels, parts) == pytest.approx(0.75)
    assert label_skew(labels, [np.arange(20)]) == pytest.approx(0.0)
