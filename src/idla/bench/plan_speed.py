"""How long ``allocate_shares`` takes for a large fleet of heterogeneous workers."""

from __future__ import annotations

import time

import numpy as np

from idla.plan.shares import allocate_shares
from idla.profile.perf_model import StepModel

_SAMPLES_PER_WORKER = 32
"""Global batch of the benchmark, per worker."""


def bench_allocate(n_workers: int = 10_000, repeats: int = 20, seed: int = 0) -> dict[str, float]:
    """Times ``allocate_shares`` on random step-time models.

    Models draw β from 0.5–4 ms per sample, α from 0–5 ms and c from 1–20 ms; the global batch
    is 32 samples per worker. One untimed call warms caches first.

    Args:
        n_workers: Number of workers (≥ 1).
        repeats: Timed calls (≥ 1).
        seed: Seed of the random models.

    Returns:
        ``n_workers`` and the ``median_ms``, ``p90_ms`` and ``max_ms`` of one call, in ms.
    """
    rng = np.random.default_rng(seed)
    per_sample_s = rng.uniform(0.5e-3, 4e-3, n_workers)
    fixed_s = rng.uniform(0.0, 5e-3, n_workers)
    comm_s = rng.uniform(1e-3, 20e-3, n_workers)
    models = [
        StepModel(float(a), float(b), float(c))
        for a, b, c in zip(fixed_s, per_sample_s, comm_s, strict=True)
    ]
    global_batch_size = _SAMPLES_PER_WORKER * n_workers
    allocate_shares(global_batch_size, models)
    times_ms = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        allocate_shares(global_batch_size, models)
        times_ms.append((time.perf_counter() - start) * 1e3)
    return {
        "n_workers": float(n_workers),
        "median_ms": float(np.median(times_ms)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "max_ms": float(np.max(times_ms)),
    }
