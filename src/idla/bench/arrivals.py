"""Arrival processes for `idla bench serve`: Poisson and two bursty ones with the same mean rate.

Every process is a pure function of (mean rate, duration, seed, shape) returning sorted arrival
times, so a trial is reproduced by its seed. Burstiness is stated as the coefficient of
variation (CV: standard deviation over mean) of the inter-arrival times; Poisson's is 1.

- ``poisson``: exponential gaps (CV 1).
- ``mmpp``: an interrupted Poisson process, the on/off special case of the two-state
  Markov-modulated Poisson process (Fischer and Meier-Hellstern, "The Markov-modulated Poisson
  process (MMPP) cookbook", 1993): Poisson at rate λ while on, silent while off, with
  exponential on and off periods of rates r_off (on → off) and r_on (off → on). Its gaps are
  i.i.d. two-phase hyperexponential with squared CV 1 + 2·λ·r_off / (r_off + r_on)², so for a
  mean rate m, an on fraction p = r_on / (r_off + r_on) and a target CV c the switching rate is
  s = r_off + r_on = 2·m·(1 − p) / (p·(c² − 1)).
- ``gamma``: a renewal process with gamma gaps of shape 1/c² (CV c): most gaps are tiny, a few
  are long, so requests come in clumps.

Cost: O(arrivals) each.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from idla.errors import ConfigError

ARRIVALS = ("poisson", "mmpp", "gamma")


@dataclass(frozen=True, kw_only=True, slots=True)
class ArrivalProcess:
    """A named arrival process and its burstiness."""

    name: str
    """One of ARRIVALS."""
    cv: float = 3.0
    """Target coefficient of variation of the inter-arrival times (ignored by poisson: 1)."""
    on_fraction: float = 0.5
    """mmpp: the fraction of time the source is on (its rate while on is the mean over this)."""

    def __post_init__(self) -> None:
        if self.name not in ARRIVALS:
            raise ConfigError(f"arrival process {self.name!r} is not one of {', '.join(ARRIVALS)}")
        if self.name != "poisson" and not 1 < self.cv < 100:
            raise ConfigError(f"arrival cv {self.cv} must be in (1, 100) for {self.name}")
        if not 0 < self.on_fraction < 1:
            raise ConfigError(f"on_fraction {self.on_fraction} must be in (0, 1)")

    @property
    def target_cv(self) -> float:
        return 1.0 if self.name == "poisson" else self.cv

    def times_s(self, rate_per_s: float, duration_s: float, seed: int) -> list[float]:
        """Arrival times in [0, duration_s) at mean rate ``rate_per_s``."""
        if not rate_per_s > 0 or not duration_s > 0:
            raise ConfigError(f"rate {rate_per_s}/s and duration {duration_s} s must be positive")
        if self.name == "poisson":
            return poisson_arrivals_s(rate_per_s, duration_s, seed)
        if self.name == "mmpp":
            return mmpp_arrivals_s(rate_per_s, duration_s, seed, self.cv, self.on_fraction)
        return gamma_arrivals_s(rate_per_s, duration_s, seed, self.cv)

    def describe(self, rate_per_s: float) -> dict[str, float | str]:
        """The process's parameters at ``rate_per_s`` (for the benchmark's JSON)."""
        out: dict[str, float | str] = {"name": self.name, "target_cv": self.target_cv}
        if self.name == "mmpp":
            r_off, r_on = mmpp_switch_rates_per_s(rate_per_s, self.cv, self.on_fraction)
            out.update(on_fraction=self.on_fraction, rate_on_per_s=rate_per_s / self.on_fraction,
                       mean_on_s=1 / r_off, mean_off_s=1 / r_on)
        elif self.name == "gamma":
            out.update(shape=1 / self.cv**2)
        return out


def poisson_arrivals_s(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process of rate ``rate_per_s``."""
    rng = random.Random(seed)
    times: list[float] = []
    t = rng.expovariate(rate_per_s)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


def mmpp_switch_rates_per_s(rate_per_s: float, cv: float, on_fraction: float
                            ) -> tuple[float, float]:
    """(r_off, r_on): the on → off and off → on rates of the on/off process of mean rate
    ``rate_per_s``, on ``on_fraction`` of the time, whose gaps have CV ``cv``."""
    switch_per_s = 2 * rate_per_s * (1 - on_fraction) / (on_fraction * (cv**2 - 1))
    return (1 - on_fraction) * switch_per_s, on_fraction * switch_per_s


def mmpp_arrivals_s(rate_per_s: float, duration_s: float, seed: int, cv: float = 3.0,
                    on_fraction: float = 0.5) -> list[float]:
    """Arrival times in [0, duration_s) of the on/off MMPP-2 of mean rate ``rate_per_s`` whose
    gaps have CV ``cv`` (module docstring); it starts in its stationary state."""
    rng = random.Random(seed)
    r_off, r_on = mmpp_switch_rates_per_s(rate_per_s, cv, on_fraction)
    rate_on = rate_per_s / on_fraction
    on = rng.random() < on_fraction
    t, times = 0.0, []
    while t < duration_s:
        if on:
            period_end = t + rng.expovariate(r_off)
            t += rng.expovariate(rate_on)
            while t < min(period_end, duration_s):
                times.append(t)
                t += rng.expovariate(rate_on)
            t = period_end  # memoryless: the gap cut by the switch restarts after the off time
        else:
            t += rng.expovariate(r_on)
        on = not on
    return times


def gamma_arrivals_s(rate_per_s: float, duration_s: float, seed: int, cv: float = 3.0
                     ) -> list[float]:
    """Arrival times in [0, duration_s) of a renewal process with gamma gaps of mean
    1/``rate_per_s`` and CV ``cv`` (shape 1/cv²)."""
    rng = random.Random(seed)
    shape = 1 / cv**2
    scale_s = 1 / (rate_per_s * shape)
    times: list[float] = []
    t = rng.gammavariate(shape, scale_s)
    while t < duration_s:
        times.append(t)
        t += rng.gammavariate(shape, scale_s)
    return times


def interarrival_cv(times_s: Sequence[float]) -> float:
    """Coefficient of variation of the gaps between consecutive times (nan for < 3 times)."""
    gaps = [b - a for a, b in itertools.pairwise(times_s)]
    if len(gaps) < 2:
        return math.nan
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)
    return math.sqrt(var) / mean if mean > 0 else math.nan
