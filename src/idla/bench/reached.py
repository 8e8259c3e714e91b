"""Times to a target that a run may never reach (None): medians and ratios over them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def seconds(value: float | None) -> float:
    """A time to target, with "not reached" as infinitely slow."""
    return math.inf if value is None else float(value)


def median_reached(values: Iterable[float | None]) -> float | None:
    """Median with a run that never reached the target counted as infinitely slow; None when
    the median itself is such a run."""
    middle = statistics.median(seconds(v) for v in values)
    return None if math.isinf(middle) else middle
