"""A virtual client's local training: deterministic, FedProx pulls toward the global model,
partial work, label flipping."""

from __future__ import annotations

import numpy as np
import torch

from idla.demo import load_digits_tensors
from idla.fl.attacks import Attack
from idla.fl.client import (
    LocalTraining,
    build_model,
    client_seed,
    client_update,
    evaluate_arrays,
    model_arrays,
)


def _data(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _, _ = load_digits_tensors()
    return images[:count], labels[:count]


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True))))


def test_same_seed_same_weights_whatever_the_model_instance() -> None:
    torch.set_num_threads(1)
    images, labels = _data()
    start = model_arrays(build_model("mlp", 0))
    training = LocalTraining(local_epochs=2)

    first = client_update(build_model("mlp", 1), start, images, labels, training, seed=11)
    second = client_update(build_model("mlp", 2), start, images, labels, training, seed=11)
    other = client_update(build_model("mlp", 1), start, images, labels, training, seed=12)

    assert first.num_samples == 64
    assert all(np.array_equal(a, b) for a, b in zip(first.arrays, second.arrays, strict=True))
    assert not np.array_equal(first.arrays[0], other.arrays[0])
    assert first.compute_s > 0


def test_client_seed_is_stable_and_distinct() -> None:
    assert client_seed(0, 3, 1) == client_seed(0, 3, 1)
    seeds = {client_seed(s, c, r) for s in range(2) for c in range(20) for r in range(5)}
    assert len(seeds) == 200


def test_proximal_term_keeps_the_weights_near_the_global_model() -> None:
    torch.set_num_threads(1)
    images, labels = _data()
    model = build_model("mlp", 0)
    start = model_arrays(model)

    plain = client_update(model, start, images, labels, LocalTraining(local_epochs=5), 3)
    prox = client_update(model, start, images, labels,
                         LocalTraining(local_epochs=5, proximal_mu=2.0), 3)

    assert _distance(prox.arrays, start) < 0.7 * _distance(plain.arrays, start)


def test_partial_work_moves_less_than_full_work() -> None:
    torch.set_num_threads(1)
    images, labels = _data()
    model = build_model("mlp", 0)
    start = model_arrays(model)

    full = client_update(model, start, images, labels, LocalTraining(local_epochs=4), 5)
    part = client_update(model, start, images, labels,
                         LocalTraining(local_epochs=4, work_fraction=0.1), 5)

    assert 0 < _distance(part.arrays, start) < 0.5 * _distance(full.arrays, start)


def test_labelflip_client_learns_the_flipped_labels() -> None:
    torch.set_num_threads(1)
    images, labels = _data(200)
    model = build_model("mlp", 0)
    start = model_arrays(model)
    training = LocalTraining(local_epochs=30)

    flipped = client_update(model, start, images, labels, training, 1, Attack.LABELFLIP)

    _, accuracy_true = evaluate_arrays(model, flipped.arrays, images, labels)
    _, accuracy_flipped = evaluate_arrays(model, flipped.arrays, images, 9 - labels)
    assert accuracy_flipped > 0.8
    assert accuracy_true < 0.2
