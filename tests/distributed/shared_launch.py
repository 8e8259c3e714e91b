"""Several worker functions in one launch: the processes start once (each start of Python,
torch and a process group costs seconds here) and run the cases one after the other."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from idla.runtime.group import Group
from idla.runtime.launch import launch_local


def run_cases(cases: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """In a worker: every (function, args) in order, under one process group that the
    functions' own groups join (they leave it initialized when they close). Each case starts
    at torch's default dtype, whatever the one before it set."""
    owner = Group()
    dtype = torch.get_default_dtype()
    results = []
    try:
        for fn, args in cases:
            torch.set_default_dtype(dtype)
            results.append(fn(*args))
        return results
    finally:
        owner.close()


def launch_cases(cases: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]],
                 world_size: int, timeout_s: float = 300.0) -> dict[str, list[Any]]:
    """Each case's per-rank results (rank order), from one launch of `world_size` workers;
    a launch still running after `timeout_s` fails."""
    per_rank = launch_local(run_cases, (list(cases.values()),), world_size, timeout_s=timeout_s)
    return {name: [results[i] for results in per_rank] for i, name in enumerate(cases)}
