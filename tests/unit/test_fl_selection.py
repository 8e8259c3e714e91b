"""Deadline-aware selection: deadline met in expectation, fairness, unbiased reweighting."""

from __future__ import annotations

import numpy as np
import pytest

from idla.plan.selection import (
    ClientProfile,
    capped_probabilities,
    predict_finish_s,
    select_clients,
    systematic_sample,
    work_fraction,
)

_MODEL_BYTES = 400_000
_LINK = 4e6  # bytes/s: 0.2 s to download and upload the model


def _fleet(count: int = 100, slow_every: int = 5) -> list[ClientProfile]:
    """Every `slow_every`-th client trains 10× slower; sample counts vary."""
    return [
        ClientProfile(
            client_id=i,
            num_samples=50 + (i * 37) % 100,
            samples_per_s=50.0 if i % slow_every == 0 else 500.0,
            link_bytes_per_s=_LINK,
        )
        for i in range(count)
    ]


def _deadline(fleet: list[ClientProfile]) -> float:
    """1.5× the slowest fast client's predicted time."""
    fast = [predict_finish_s(p, 1, _MODEL_BYTES) for p in fleet if p.samples_per_s > 100]
    return 1.5 * max(fast)


def test_predict_finish_and_work_fraction_by_hand() -> None:
    profile = ClientProfile(0, num_samples=200, samples_per_s=100.0, link_bytes_per_s=1e6)

    assert predict_finish_s(profile, 3, 500_000) == pytest.approx(6.0 + 1.0)
    assert work_fraction(profile, 3, 500_000, deadline_s=4.0) == pytest.approx(0.5)
    assert work_fraction(profile, 3, 500_000, deadline_s=10.0) == 1.0
    assert work_fraction(profile, 3, 500_000, deadline_s=0.5) == 0.0


def test_uniform_selection_is_seeded_and_without_replacement() -> None:
    fleet = _fleet(30)

    first = select_clients(fleet, 8, None, np.random.default_rng(5))
    again = select_clients(fleet, 8, None, np.random.default_rng(5))

    assert first == again
    assert len(set(first.client_ids)) == 8
    assert set(first.inclusion_probability.values()) == {8 / 30}
    assert len(select_clients(fleet[:3], 8, None, np.random.default_rng(0)).client_ids) == 3


def test_capped_probabilities_sum_to_k_and_stay_at_most_one() -> None:
    sizes = [100.0, 50.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.1]

    probability = capped_probabilities(sizes, 4)

    assert probability.sum() == pytest.approx(4.0)
    assert probability.max() <= 1.0
    assert probability[0] == probability[1] == 1.0
    np.testing.assert_allclose(probability[2] / probability[6], 2.0)


def test_systematic_sampling_hits_the_inclusion_probabilities() -> None:
    rng = np.random.default_rng(3)
    probability = capped_probabilities(rng.uniform(0.05, 1.0, size=12).tolist(), 4)
    draws = 20_000
    hits = np.zeros(12)

    for _ in range(draws):
        chosen = systematic_sample(probability, rng)
        assert len(set(chosen)) == 4
        hits[chosen] += 1

    standard_error = np.sqrt(probability * (1 - probability) / draws)
    assert np.all(np.abs(hits / draws - probability) < 4.5 * standard_error + 1e-12)


def _run_rounds(
    fleet: list[ClientProfile], rounds: int, deadline_s: float | None, seed: int
) -> tuple[list[int], float]:
    """Selected count per client, and the fraction of selections that met the deadline with
    real finish times drawn around the prediction (±10% log-normal noise)."""
    rng = np.random.default_rng(seed)
    noise = np.random.default_rng(seed + 1)
    participation = {p.client_id: 0 for p in fleet}
    deadline = _deadline(fleet)
    on_time = total = 0
    for _ in range(rounds):
        selection = select_clients(
            fleet, 10, deadline_s, rng, participation, model_bytes=_MODEL_BYTES
        )
        for client in selection.client_ids:
            participation[client] += 1
            actual_s = predict_finish_s(fleet[client], 1, _MODEL_BYTES) * noise.lognormal(0, 0.1)
            on_time += actual_s <= deadline
            total += 1
    return [participation[p.client_id] for p in fleet], on_time / total


def test_deadline_is_met_in_expectation_and_every_client_takes_part() -> None:
    fleet = _fleet()
    deadline = _deadline(fleet)

    counts, on_time_fraction = _run_rounds(fleet, 300, deadline, seed=11)
    _, uniform_fraction = _run_rounds(fleet, 300, None, seed=11)

    assert uniform_fraction == pytest.approx(0.8, abs=0.05)  # 20% of the fleet is slow
    assert on_time_fraction >= 0.93
    assert min(counts) >= 1  # every client, slow ones included, was selected
    slow = [c for p, c in zip(fleet, counts, strict=True) if p.samples_per_s < 100]
    fast = [c for p, c in zip(fleet, counts, strict=True) if p.samples_per_s > 100]
    assert 0.05 < np.mean(slow) / np.mean(fast) < 0.5


def test_fairness_boost_raises_the_under_represented() -> None:
    fleet = _fleet(20)
    participation = {p.client_id: (0 if p.client_id == 4 else 10) for p in fleet}
    rng = np.random.default_rng(0)

    boosted = select_clients(fleet, 5, 1e9, rng, participation).inclusion_probability
    flat = select_clients(fleet, 5, 1e9, rng, participation, fairness=0.0).inclusion_probability

    assert boosted[4] == 1.0  # boosted 11× and capped
    assert boosted[3] < 0.25
    assert flat[4] == pytest.approx(flat[3])


def test_horvitz_thompson_reweighting_is_unbiased() -> None:
    """Mean over rounds of Σ_S y_i / π_i / N estimates the population mean of y even though
    slow clients (with different y) are drawn far less often than fast ones."""
    fleet = _fleet(50)
    deadline = _deadline(fleet)
    values = np.array([5.0 if p.samples_per_s < 100 else 1.0 for p in fleet])
    values += np.random.default_rng(4).normal(0.0, 0.5, size=50)
    rng = np.random.default_rng(2024)
    participation = {p.client_id: 0 for p in fleet}
    estimates, naive = [], []

    for _ in range(3000):
        selection = select_clients(fleet, 8, deadline, rng, participation, model_bytes=_MODEL_BYTES)
        ids = selection.client_ids
        pi = np.array([selection.inclusion_probability[i] for i in ids])
        estimates.append(float(np.sum(values[ids] / pi)) / len(fleet))
        naive.append(float(values[ids].mean()))
        for client in ids:
            participation[client] += 1

    truth = float(values.mean())
    standard_error = float(np.std(estimates) / np.sqrt(len(estimates)))
    assert abs(np.mean(estimates) - truth) < 4 * standard_error
    assert abs(np.mean(naive) - truth) > 20 * standard_error  # without reweighting: biased


def test_unreachable_clients_are_drawn_less() -> None:
    fleet = [
        ClientProfile(i, 100, 500.0, _LINK, availability=0.25 if i < 5 else 1.0) for i in range(10)
    ]

    probability = select_clients(fleet, 3, 1e9, np.random.default_rng(0)).inclusion_probability

    assert probability[0] == pytest.approx(probability[9] / 4)


def test_bad_clients_per_round_raises() -> None:
    with pytest.raises(ValueError, match="clients_per_round"):
        select_clients(_fleet(5), 0, None, np.random.default_rng(0))
