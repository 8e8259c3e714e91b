"""Several worker functions in one launch: the processes start once (each start of Python,
torch and a process group costs seconds here) and run the cases one after the other."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from idla.runtime.group import Group
from idla.runtime.launch import launch_local


def run_cases(cases: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """In a worker: every (function, args) in order, under one process group that the
    functions' own groups join (they leave it initialized when they close)."""
    owner = Group()
    try:
        return [fn(*args) for fn, args in cases]
    finally:
        owner.close()


def launch_cases(cases: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]],
                 world_size: int, timeout_s: float = 300.0) -> dict[str, list[Any]]:
    """Each case's per-rank results (rank order), from one launch of `world_size` workers;
    a launch still running after `timeout_s` fails."""
    per_rank = launch_local(run_cases, (list(cases.values()),), world_size, timeout_s=timeout_s)
    return {name: [results[i] for results in per_rank] for i, name in enumerate(cases)}
