"""Bias-corrected moving averages of a worker's measured step times and throughput.

The averages follow hivemind's ``utils/performance_ema.py`` and Adam's bias correction
(Kingma & Ba, 2015): an exponential moving average started at zero is divided by the total
weight it has seen, so the first value is returned as is rather than shrunk towards zero.
Every update costs O(1) time and memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from idla.errors import ConfigError


class EmaMeter:
    """Bias-corrected exponential moving average of a scalar.

    After updates ``x_1 .. x_n`` the value is ``Σ d^(n-k) x_k / Σ d^(n-k)`` with ``d`` the decay,
    which equals the usual EMA ``(1 - d) Σ d^(n-k) x_k`` divided by its bias ``1 - d^n``. It is
    computed as an incremental weighted mean, so the first value comes back bit-exactly and a
    constant input gives that constant back exactly.

    Args:
        decay: Weight kept by the history at each update, in [0, 1]; 0 keeps only the last value
            and 1 gives the plain running mean.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"decay must be in [0, 1], got {decay}")
        self._decay = decay
        self._weight = 0.0  # Σ d^(n-k): total weight of the updates seen, unitless
        self._value = math.nan  # the bias-corrected average, in the unit of the inputs
        self._count = 0  # number of accepted updates

    def update(self, value: float) -> None:
        """Adds one observation; a non-finite value is ignored."""
        if not math.isfinite(value):
            return
        self._weight = self._decay * self._weight + 1.0
        previous = 0.0 if self._count == 0 else self._value
        self._value = previous + (value - previous) / self._weight
        self._count += 1

    @property
    def value(self) -> float:
        """The bias-corrected average; nan before the first update."""
        return self._value

    @property
    def count(self) -> int:
        """Number of accepted updates."""
        return self._count


class RateMeter:
    """Throughput in samples per second as a ratio of two bias-corrected EMAs.

    Averaging samples and seconds separately (rather than averaging per-step rates) weights each
    step by its duration, so one very short step cannot dominate the estimate.

    Args:
        decay: Decay of both moving averages, in [0, 1].
    """

    def __init__(self, decay: float = 0.9) -> None:
        self._samples = EmaMeter(decay)
        self._seconds = EmaMeter(decay)

    def update(self, samples: int, seconds: float) -> None:
        """Adds one step; negative or non-finite inputs are ignored."""
        if samples < 0 or not math.isfinite(seconds) or seconds < 0.0:
            return
        self._samples.update(float(samples))
        self._seconds.update(seconds)

    @property
    def per_s(self) -> float:
        """Samples per second; nan before the first update or while no time has elapsed."""
        seconds = self._seconds.value
        if self._seconds.count == 0 or seconds <= 0.0:
            return math.nan
        return self._samples.value / seconds

    @property
    def count(self) -> int:
        """Number of accepted updates."""
        return self._seconds.count


@dataclass(slots=True)
class StepTimes:
    """One worker's measured split of one training step."""

    compute_s: float
    """Forward and backward time on the local batch, in seconds."""
    comm_s: float
    """Time spent in collectives (gradient all-reduce and similar), in seconds."""
    wait_s: float
    """Idle time waiting for slower workers at the synchronization point, in seconds."""
    samples: int
    """Number of samples in the local batch."""

    @property
    def total_s(self) -> float:
        """Wall time of the whole step, in seconds."""
        return self.compute_s + self.comm_s + self.wait_s


class WorkerMeter:
    """Moving averages of one worker's step-time split and throughput.

    Args:
        decay: Decay of every moving average, in [0, 1].
    """

    def __init__(self, decay: float = 0.9) -> None:
        self._compute_s = EmaMeter(decay)
        self._comm_s = EmaMeter(decay)
        self._wait_s = EmaMeter(decay)
        self._rate = RateMeter(decay)

    def update(self, t: StepTimes) -> None:
        """Adds the measurements of one step."""
        self._compute_s.update(t.compute_s)
        self._comm_s.update(t.comm_s)
        self._wait_s.update(t.wait_s)
        self._rate.update(t.samples, t.total_s)

    def snapshot(self) -> dict[str, float]:
        """Current averages: ``compute_s``, ``comm_s``, ``wait_s`` (seconds per step) and
        ``samples_per_s``; each is nan until it has been measured."""
        return {
            "compute_s": self._compute_s.value,
            "comm_s": self._comm_s.value,
            "wait_s": self._wait_s.value,
            "samples_per_s": self._rate.per_s,
        }
