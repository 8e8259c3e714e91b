"""The benchmark workloads: shapes, determinism by seed, and a loss that falls in a few steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from idla.demo.synthetic import (
    SmallResNet,
    TinyTransformerLM,
    markov_tokens_split,
    mean_token_loss,
    pattern_images_split,
)
from idla.demo.workloads import WORKLOADS, Split

CPU = torch.device("cpu")


def test_pattern_images_have_the_stated_shapes_and_every_class() -> None:
    train, test = pattern_images_split(train_samples=200, test_samples=50, seed=3)

    images, labels = train.tensors
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (200,) and labels.dtype == torch.int64
    assert test.tensors[0].shape == (50, 3, 32, 32)
    assert set(labels.tolist()) == set(range(10))


def test_markov_tokens_are_next_token_pairs() -> None:
    train, test = markov_tokens_split(train_samples=20, test_samples=5, seq_len=16, vocab=32,
                                      seed=3)

    inputs, targets = train.tensors
    assert inputs.shape == targets.shape == (20, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert int(inputs.max()) < 32 and int(inputs.min()) >= 0
    assert test.tensors[0].shape == (5, 16)


@pytest.mark.parametrize("split", [pattern_images_split, markov_tokens_split])
def test_data_depends_on_the_seed_only(split: Callable[..., Split]) -> None:
    first, again, other = split(seed=1), split(seed=1), split(seed=2)

    for a, b in zip(first[0].tensors + first[1].tensors, again[0].tensors + again[1].tensors,
                    strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0].tensors[0], other[0].tensors[0])


def test_models_give_the_stated_output_shapes() -> None:
    torch.manual_seed(0)
    resnet, lm = SmallResNet(), TinyTransformerLM(vocab=256, max_seq_len=64)

    assert resnet(torch.zeros(5, 3, 32, 32)).shape == (5, 10)
    assert lm(torch.zeros(5, 64, dtype=torch.int64)).shape == (5, 64, 256)
    assert lm(torch.zeros(2, 10, dtype=torch.int64)).shape == (2, 10, 256)


def test_the_language_model_is_causal() -> None:
    torch.manual_seed(0)
    lm = TinyTransformerLM(vocab=32, d_model=32, heads=4, layers=1, max_seq_len=16).eval()
    tokens = torch.randint(32, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (tokens[0, 10] + 1) % 32

    before, after = lm(tokens), lm(changed)

    assert torch.allclose(before[0, :10], after[0, :10], atol=1e-6)
    assert not torch.allclose(before[0, 10:], after[0, 10:], atol=1e-6)


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_model_init_depends_on_the_torch_seed_only(name: str) -> None:
    workload = WORKLOADS[name]
    torch.manual_seed(4)
    first = workload.model().state_dict()
    torch.manual_seed(4)
    again = workload.model().state_dict()

    assert all(torch.equal(first[key], again[key]) for key in first)


@pytest.mark.parametrize(("name", "steps", "batch_size"),
                         [("resnet", 30, 128), ("transformer", 20, 64)])
def test_the_held_out_loss_falls_in_a_few_steps(name: str, steps: int, batch_size: int) -> None:
    torch.set_num_threads(1)
    workload = WORKLOADS[name]
    train, test = workload.split(0)
    torch.manual_seed(0)
    model = workload.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = train.tensors
    held_out = [t[:256] for t in test.tensors]
    with torch.no_grad():
        before = float(workload.loss(model, *held_out))

    for step in range(steps):
        rows = slice(batch_size * step, batch_size * (step + 1))
        optimizer.zero_grad()
        workload.loss(model, inputs[rows], targets[rows]).backward()
        optimizer.step()

    with torch.no_grad():
        after = float(workload.loss(model, *held_out))
    assert after < 0.9 * before


def test_token_loss_starts_near_uniform() -> None:
    torch.manual_seed(0)
    _, test = markov_tokens_split(train_samples=1, test_samples=64, seed=0)

    loss = mean_token_loss(TinyTransformerLM(), test, CPU)

    assert abs(loss - math.log(256)) < 1.0
