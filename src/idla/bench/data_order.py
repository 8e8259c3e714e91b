"""How long the epoch's data order takes on a large data set: the first global batch of an
epoch, its peak extra memory, and an elastic commit (targets: 10^8 samples, < 0.5 s and
< 200 MB; a commit < 50 ms)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from idla.agent.elastic import ElasticState
from idla.bench.machine import machine_info
from idla.runtime.data import GlobalBatchSampler


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux: VmHWM), 0 where unknown."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_data_order(dataset_size: int = 10**8, global_batch_size: int = 512,
                     repeats: int = 20, seed: int = 0) -> dict[str, Any]:
    """Times the first global batch of fresh epochs and `ElasticState.commit`.

    Args:
        dataset_size: Samples in the data set (≥ global_batch_size).
        global_batch_size: Samples per global batch.
        repeats: Epochs (and commits) timed.
        seed: Seed of the order.

    Returns:
        The settings, ``first_batch_ms`` (median and max over `repeats` fresh epochs, each
        timed from the sampler's ``epoch(e)`` to the indices of its batch 0),
        ``peak_extra_memory_mb`` (rise of the peak resident memory meanwhile) and
        ``commit_ms`` (median and max of `repeats` elastic commits), and the machine.
    """
    torch.set_num_threads(1)
    GlobalBatchSampler(10_000, 16, seed).epoch(0)[0]  # warm the code paths on a small set
    peak_before = _peak_rss_bytes()
    sampler = GlobalBatchSampler(dataset_size, global_batch_size, seed)
    first_ms = []
    for epoch in range(repeats):
        start = time.perf_counter()
        sampler.epoch(epoch)[0].indices.sum()
        first_ms.append(1e3 * (time.perf_counter() - start))
    peak_extra = _peak_rss_bytes() - peak_before
    state = ElasticState(agent=SimpleNamespace(sampler=sampler))  # type: ignore[arg-type]
    commit_ms = []
    for _ in range(repeats):
        state.started = state.step + 1
        start = time.perf_counter()
        state.commit()
        commit_ms.append(1e3 * (time.perf_counter() - start))
    return {
        "dataset_size": dataset_size, "global_batch_size": global_batch_size,
        "repeats": repeats,
        "first_batch_ms": {"median": statistics.median(first_ms), "max": max(first_ms)},
        "peak_extra_memory_mb": peak_extra / 2**20,
        "commit_ms": {"median": statistics.median(commit_ms), "max": max(commit_ms)},
        "machine": machine_info(),
    }
