"""allocate_shares against a brute-force enumerator, and its guarantees."""

from __future__ import annotations

import itertools
import random
import statistics
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idla.errors import PlanError
from idla.plan.shares import allocate_shares, predicted_step_s, proportional_shares
from idla.profile.perf_model import StepModel


def brute_force_step_s(global_batch: int, models: list[StepModel], caps: list[int]) -> float:
    """Smallest predicted slowest step over every split of the batch, by enumeration."""
    table = np.array([[m.predict_step_s(b) for b in range(global_batch + 1)] for m in models])
    ranges = [range(min(cap, global_batch) + 1) for cap in caps[:-1]]
    best = float("inf")
    for head in itertools.product(*ranges):
        last = global_batch - sum(head)
        if 0 <= last <= caps[-1]:
            shares = [*head, last]
            best = min(best, max(table[i, b] for i, b in enumerate(shares)))
    return best


def random_case(rng: random.Random) -> tuple[int, list[StepModel], list[int]]:
    n_workers = rng.randint(2, 4)
    global_batch = rng.randint(1, 30)
    grid = rng.random() < 0.5  # small integer grids make ties between workers likely
    models = []
    for _ in range(n_workers):
        if grid:
            model = StepModel(rng.randint(0, 3) * 1.0, rng.randint(1, 4) * 0.5, rng.randint(0, 4))
        else:
            model = StepModel(rng.uniform(0, 5), rng.uniform(0.1, 3), rng.uniform(0, 10))
        models.append(model)
    caps = [rng.randint(0, global_batch + 2) for _ in range(n_workers)]
    while sum(caps) < global_batch:
        caps[rng.randrange(n_workers)] += 1
    return global_batch, models, caps


def test_matches_brute_force_on_small_cases() -> None:
    # Prepare
    rng = random.Random(1234)
    cases = [random_case(rng) for _ in range(300)]

    for global_batch, models, caps in cases:
        # Execute
        shares = allocate_shares(global_batch, models, caps)
        best_s = brute_force_step_s(global_batch, models, caps)

        # Assert
        assert sum(shares) == global_batch
        assert all(0 <= b <= cap for b, cap in zip(shares, caps, strict=True))
        assert predicted_step_s(shares, models) == pytest.approx(best_s, rel=1e-12, abs=0.0)


def test_sums_exactly_and_respects_caps() -> None:
    # Prepare
    rng = np.random.default_rng(7)
    models = [StepModel(float(a), float(b), float(c)) for a, b, c in rng.uniform(0.1, 2, (50, 3))]
    caps = [int(c) for c in rng.integers(0, 60, 50)]

    # Execute
    shares = allocate_shares(1000, models, caps)

    # Assert
    assert sum(shares) == 1000
    assert all(0 <= b <= cap for b, cap in zip(shares, caps, strict=True))
    assert all(isinstance(b, int) for b in shares)


def test_equal_models_get_equal_shares() -> None:
    # Prepare
    models = [StepModel(0.01, 0.002, 0.05)] * 7

    # Execute
    shares = allocate_shares(100, models)

    # Assert
    assert sum(shares) == 100
    assert max(shares) - min(shares) <= 1


def test_large_comm_gets_less() -> None:
    # Prepare
    models = [StepModel(0.0, 1e-3, 0.0), StepModel(0.0, 1e-3, 0.05)]

    # Execute
    shares = allocate_shares(200, models)

    # Assert
    assert shares[1] < shares[0]
    assert shares == [125, 75]


def test_hopeless_worker_gets_zero() -> None:
    # Prepare
    fast = StepModel(0.0, 1e-3, 0.0)
    hopeless = StepModel(10.0, 1e-3, 0.0)

    # Execute
    shares = allocate_shares(64, [fast, hopeless, fast])

    # Assert
    assert shares == [32, 0, 32]


@pytest.mark.parametrize(
    ("global_batch", "models", "caps", "match"),
    [
        (0, [StepModel(0.0, 1.0)], None, "global_batch"),
        (4, [], None, "models is empty"),
        (4, [StepModel(0.0, 1.0)] * 2, [4], "caps has 1 entries"),
        (4, [StepModel(0.0, 1.0)] * 2, [5, -1], r"caps\[1\]"),
        (9, [StepModel(0.0, 1.0)] * 2, [4, 4], "memory caps hold at most 8 samples"),
        (4, [StepModel(0.0, 0.0)], None, r"models\[0\].compute_per_sample_s"),
        (4, [StepModel(0.0, 1.0), StepModel(float("nan"), 1.0)], None, r"models\[1\]"),
        (4, [StepModel(0.0, 1.0, float("inf"))], None, r"models\[0\].comm_s"),
        (4, [StepModel(-1.0, 1.0)], None, r"models\[0\].compute_fixed_s"),
    ],
)
def test_invalid_inputs_raise_plan_error(
    global_batch: int, models: list[StepModel], caps: list[int] | None, match: str
) -> None:
    # Execute / Assert
    with pytest.raises(PlanError, match=match):
        allocate_shares(global_batch, models, caps)


def test_deterministic() -> None:
    # Prepare
    rng = np.random.default_rng(3)
    params = rng.uniform(1e-4, 1e-2, (500, 3))
    models = [StepModel(float(a), float(b), float(c)) for a, b, c in params]
    copies = [StepModel(m.compute_fixed_s, m.compute_per_sample_s, m.comm_s) for m in models]

    # Execute
    first = allocate_shares(20_000, models)
    second = allocate_shares(20_000, copies)

    # Assert
    assert first == second


def test_stable_under_one_percent_noise() -> None:
    # Prepare
    rng = np.random.default_rng(11)
    global_batch = 1000
    params = rng.uniform([0.0, 0.5e-3, 1e-3], [5e-3, 4e-3, 20e-3], (8, 3))
    models = [StepModel(float(a), float(b), float(c)) for a, b, c in params]
    base = allocate_shares(global_batch, models)

    for _ in range(50):
        noise = rng.uniform(0.99, 1.01, (8, 3))
        noisy = [StepModel(*(float(x) for x in row)) for row in params * noise]

        # Execute
        shares = allocate_shares(global_batch, noisy)

        # Assert
        assert max(abs(a - b) for a, b in zip(shares, base, strict=True)) <= 0.02 * global_batch


def test_ten_thousand_workers_plan_fast() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    params = rng.uniform([0.0, 0.5e-3, 1e-3], [5e-3, 4e-3, 20e-3], (10_000, 3))
    models = [StepModel(float(a), float(b), float(c)) for a, b, c in params]
    allocate_shares(320_000, models)

    # Execute
    times_s = []
    for _ in range(5):
        start = time.perf_counter()
        shares = allocate_shares(320_000, models)
        times_s.append(time.perf_counter() - start)

    # Assert: generous bound for a loaded 2-core machine; the real number is in bench/plan_speed
    assert sum(shares) == 320_000
    assert statistics.median(times_s) < 0.050


def test_proportional_shares_largest_remainder() -> None:
    # Execute
    shares = proportional_shares(10, [1.0, 1.0, 1.0])
    skewed = proportional_shares(7, [3.0, 1.0, 0.0])

    # Assert
    assert shares == [4, 3, 3]
    assert skewed == [5, 2, 0]
    assert sum(proportional_shares(1001, [0.1 * i for i in range(1, 30)])) == 1001


def test_proportional_shares_rejects_bad_weights() -> None:
    # Execute / Assert
    with pytest.raises(PlanError, match=r"weights\[1\]"):
        proportional_shares(4, [1.0, -1.0])
    with pytest.raises(PlanError, match="all zero"):
        proportional_shares(4, [0.0, 0.0])


def brute_force_min_step_s(global_batch: int, models: list[StepModel], caps: list[int],
                           min_share: int) -> float:
    """Smallest predicted slowest step over every split whose shares are each 0 or at least
    min(min_share, global_batch), by enumeration (inf when none fits the caps)."""
    least = min(min_share, global_batch)
    best = float("inf")
    for head in itertools.product(*[range(min(cap, global_batch) + 1) for cap in caps[:-1]]):
        shares = [*head, global_batch - sum(head)]
        if 0 <= shares[-1] <= caps[-1] and all(b == 0 or b >= least for b in shares):
            best = min(best, predicted_step_s(shares, models))
    return best


def test_a_minimum_share_matches_brute_force_on_small_cases() -> None:
    # Prepare
    rng = random.Random(99)
    cases = [(*random_case(rng), rng.randint(2, 6)) for _ in range(400)]
    planned = 0

    for global_batch, models, caps, min_share in cases:
        best_s = brute_force_min_step_s(global_batch, models, caps, min_share)
        if best_s == float("inf"):
            # Execute / Assert: no valid split fits the caps
            with pytest.raises(PlanError, match="in shares of at least"):
                allocate_shares(global_batch, models, caps, min_share)
            continue
        # Execute
        shares = allocate_shares(global_batch, models, caps, min_share)

        # Assert
        planned += 1
        assert sum(shares) == global_batch
        assert all(0 <= b <= cap for b, cap in zip(shares, caps, strict=True))
        assert all(b == 0 or b >= min(min_share, global_batch) for b in shares)
        assert predicted_step_s(shares, models) == pytest.approx(best_s, rel=1e-12, abs=0.0)
    assert planned > 300


@settings(max_examples=300, deadline=None)
@given(
    global_batch=st.integers(1, 24),
    min_share=st.integers(1, 6),
    workers=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(0, 3)),
                     min_size=1, max_size=4),
)
def test_minimum_share_property(global_batch: int, min_share: int,
                                workers: list[tuple[int, int, int]]) -> None:
    """Every share is 0 or at least the minimum, they sum to the batch, and no valid split
    is predicted faster."""
    # Prepare: small integer grids make ties between workers likely
    models = [StepModel(fixed * 0.5, per_sample * 0.25, comm * 1.0)
              for fixed, per_sample, comm in workers]

    # Execute
    shares = allocate_shares(global_batch, models, None, min_share)

    # Assert
    assert sum(shares) == global_batch
    assert all(b == 0 or b >= min(min_share, global_batch) for b in shares)
    best_s = brute_force_min_step_s(global_batch, models, [global_batch] * len(models), min_share)
    assert predicted_step_s(shares, models) == pytest.approx(best_s, rel=1e-12, abs=0.0)


def test_a_minimum_share_changes_nothing_that_already_respects_it() -> None:
    models = [StepModel(0.1, 0.01), StepModel(0.0, 0.03, 0.2), StepModel(0.5, 0.002)]

    for batch in (17, 64, 301):
        plain = allocate_shares(batch, models)
        if all(b == 0 or b >= 2 for b in plain):
            assert allocate_shares(batch, models, min_share=2) == plain
    assert proportional_shares(12, [6.0, 6.0], min_share=2) == [6, 6]


def test_fewer_workers_get_samples_when_the_batch_is_short() -> None:
    equal = [StepModel(0.0, 1.0)] * 4

    assert allocate_shares(6, equal, min_share=2) == [2, 2, 2, 0]
    assert allocate_shares(3, equal, min_share=2) == [3, 0, 0, 0]
    assert allocate_shares(1, equal, min_share=2) == [1, 0, 0, 0]  # smaller than the minimum
    assert allocate_shares(5, [StepModel(0.0, 2.0), StepModel(0.0, 1.0)], min_share=2) == [2, 3]


def test_proportional_shares_with_a_minimum_drop_a_worker_rather_than_give_it_one() -> None:
    assert proportional_shares(12, [10.0, 1.0]) == [11, 1]
    assert proportional_shares(12, [10.0, 1.0], min_share=2) == [12, 0]
    assert proportional_shares(3, [9.0, 3.0], min_share=2) == [3, 0]
    assert proportional_shares(5, [1.0, 1.0, 1.0], min_share=2) == [3, 2, 0]
    assert proportional_shares(7, [1.0, 0.0, 1.0], min_share=2) == [4, 0, 3]


def test_an_invalid_minimum_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="min_share must be >= 1"):
        allocate_shares(8, [StepModel(0.0, 1.0)], min_share=0)
