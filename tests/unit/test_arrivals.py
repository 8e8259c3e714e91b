"""The benchmark's arrival processes: mean rate, burstiness (CV of the gaps) and seeding."""

from __future__ import annotations

import pytest

from idla.bench.arrivals import (
    ArrivalProcess,
    gamma_arrivals_s,
    interarrival_cv,
    mmpp_arrivals_s,
    mmpp_switch_rates_per_s,
    poisson_arrivals_s,
)
from idla.errors import ConfigError


@pytest.mark.parametrize(("name", "cv"), [("poisson", 1.0), ("mmpp", 3.0), ("gamma", 3.0),
                                          ("mmpp", 2.0), ("gamma", 4.0)])
def test_mean_rate_and_cv_match_the_target(name: str, cv: float) -> None:
    rate_per_s, duration_s = 200.0, 600.0
    process = ArrivalProcess(name=name, cv=cv)
    times = process.times_s(rate_per_s, duration_s, seed=3)
    assert times == sorted(times) and times[0] >= 0 and times[-1] < duration_s
    assert len(times) / duration_s == pytest.approx(rate_per_s, rel=0.06)
    assert interarrival_cv(times) == pytest.approx(process.target_cv, rel=0.1)


def test_bursty_processes_are_far_from_poisson_at_the_same_rate() -> None:
    poisson = interarrival_cv(poisson_arrivals_s(100.0, 300.0, 1))
    assert interarrival_cv(mmpp_arrivals_s(100.0, 300.0, 1, cv=3.0)) > 2 * poisson
    assert interarrival_cv(gamma_arrivals_s(100.0, 300.0, 1, cv=3.0)) > 2 * poisson


def test_mmpp_switch_rates_give_the_on_fraction() -> None:
    r_off, r_on = mmpp_switch_rates_per_s(100.0, 3.0, 0.25)
    assert r_on / (r_on + r_off) == pytest.approx(0.25)
    lam = 100.0 / 0.25  # squared CV of the hyperexponential gaps, by formula
    assert 1 + 2 * lam * r_off / (r_off + r_on) ** 2 == pytest.approx(9.0)


def test_seeded_and_described() -> None:
    process = ArrivalProcess(name="mmpp", cv=3.0, on_fraction=0.5)
    assert process.times_s(50.0, 10.0, 7) == process.times_s(50.0, 10.0, 7)
    assert process.times_s(50.0, 10.0, 7) != process.times_s(50.0, 10.0, 8)
    described = process.describe(50.0)
    assert described["rate_on_per_s"] == pytest.approx(100.0)
    assert described["mean_on_s"] == pytest.approx(described["mean_off_s"])


@pytest.mark.parametrize("kwargs", [{"name": "pareto"}, {"name": "gamma", "cv": 1.0},
                                    {"name": "mmpp", "on_fraction": 1.0}])
def test_bad_processes_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ArrivalProcess(**kwargs)  # type: ignore[arg-type]
