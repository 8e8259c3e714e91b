"""`idla pool simulate` and the simulate part of `idla bench pool`: replays, figures, targets.

`run_pool_simulations` returns ``{"simulate": {workload: {policy: figures}}, "calibration": ...,
"targets": ..., "policy_timing": ...}``, so that another part (the live benchmark) can be added
under its own key.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from idla.errors import ConfigError
from idla.pool.model import Device, JobKind, JobView
from idla.pool.perf import OnlineModels
from idla.pool.policy import allocate
from idla.pool.sim.baselines import POLICIES, Idla
from idla.pool.sim.simulator import SimConfig, alone_jct_s, assign_priorities, simulate
from idla.pool.sim.traces import cluster_devices, load_application, load_workload

GAVEL_REFERENCE_H = {"saturn/workload-1": (1.907, 23.71, 28.74),
                     "saturn/workload-2": (1.841, 31.04, 34.90)}
"""Gavel max-min fairness in the artifacts' own simulator: (avg JCT, p99 JCT, makespan) hours."""


@dataclass(kw_only=True, slots=True)
class PoolSimConfig:
    """What `run_pool_simulations` replays."""

    traces_dir: str = "../shared/traces"
    """The folder with workloads/ and models/ (formats in its README)."""
    workloads: tuple[str, ...] = ()
    """Workloads as ``<set>/workload-N``; empty: every workload of every set."""
    policies: tuple[str, ...] = tuple(POLICIES)
    """Policies to compare (fifo, tiresias, gavel, pollux, idla)."""
    jobs_limit: int | None = None
    """Replay only the first N jobs of each workload (quick runs)."""
    alone: bool = True
    """Also replay each p=4 job alone on the cluster under idla (for the 1.2× target)."""
    seed: int = 0
    """Seed of the priority assignment (20% p=4, 30% p=2, 50% p=1)."""

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ConfigError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
        if self.jobs_limit is not None and self.jobs_limit < 1:
            raise ConfigError(f"jobs_limit must be >= 1, got {self.jobs_limit}")


def workload_names(traces_dir: str | Path) -> list[str]:
    root = Path(traces_dir) / "workloads"
    if not root.is_dir():
        raise ConfigError(f"no workloads/ under {traces_dir} (see its README)")
    return sorted(f"{p.parent.name}/{p.stem}" for p in root.glob("*/workload-*.csv"))


def run_pool_simulations(config: PoolSimConfig, on_result: Any = None) -> dict[str, Any]:
    """Replay every chosen workload under every chosen policy (module docstring)."""
    root = Path(config.traces_dir)
    names = list(config.workloads) or workload_names(root)
    devices = cluster_devices()
    apps: dict[str, Any] = {}
    sim_config = SimConfig(seed=config.seed)
    out: dict[str, Any] = {}
    for name in names:
        workload = load_workload(root / "workloads" / f"{name}.csv", config.jobs_limit)
        for row in workload:
            if row.application not in apps:
                apps[row.application] = load_application(root / "models", row.application)
        priorities = assign_priorities([row.name for row in workload], sim_config)
        alone = {}
        if config.alone:
            alone = {row.name: alone_jct_s(row, apps, devices, Idla(), sim_config)
                     for row in workload if priorities[row.name] >= 4}
        figures: dict[str, Any] = {}
        for policy_name in config.policies:
            started = time.perf_counter()
            result = simulate(workload, apps, devices, POLICIES[policy_name](), priorities,
                              sim_config)
            entry: dict[str, Any] = result.summary()
            entry["wall_s"] = time.perf_counter() - started
            if alone:
                ratios = [result.jct_s[j] / alone[j] for j in alone]
                entry["p4_alone_ratio_median"] = float(np.median(ratios))
                entry["p4_alone_ratio_max"] = float(np.max(ratios))
                entry["p4_within_1_2"] = float(np.mean([r <= 1.2 for r in ratios]))
            figures[policy_name] = entry
            if on_result is not None:
                on_result(name, policy_name, entry)
        out[name] = figures
    return {"simulate": out, "targets": targets(out), "calibration": calibration(out),
            "settings": {"traces_dir": str(root), "jobs_limit": config.jobs_limit,
                         "seed": config.seed, "round_s": sim_config.round_s,
                         "cluster": "aws 6x4 T4, dgx-ext 2x8 A100, rtx 3x8 RTX 2080 Ti"}}


def targets(simulated: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per workload: idla's ratios to the best baseline and to FIFO, and whether each target
    (avg JCT ≤ 0.75× best, weighted JCT ≤ 0.6× FIFO, makespan ≤ best, p=4 ≤ 1.2× alone) holds."""
    checks: dict[str, Any] = {}
    for name, figures in simulated.items():
        baselines = {p: f for p, f in figures.items() if p != "idla"}
        if "idla" not in figures or not baselines:
            continue
        idla = figures["idla"]
        best_avg = min(f["avg_jct_s"] for f in baselines.values())
        best_makespan = min(f["makespan_s"] for f in baselines.values())
        entry: dict[str, Any] = {
            "avg_jct_vs_best": idla["avg_jct_s"] / best_avg,
            "makespan_vs_best": idla["makespan_s"] / best_makespan,
        }
        entry["avg_jct_met"] = entry["avg_jct_vs_best"] <= 0.75
        entry["makespan_met"] = entry["makespan_vs_best"] <= 1.0
        if "fifo" in figures:
            entry["weighted_jct_vs_fifo"] = idla["weighted_jct_s"] / figures["fifo"][
                "weighted_jct_s"]
            entry["weighted_jct_met"] = entry["weighted_jct_vs_fifo"] <= 0.6
        if "p4_within_1_2" in idla:
            # The issue asks it of every p=4 job; the fraction and the ratios say how far off.
            entry["p4_within_1_2"] = idla["p4_within_1_2"]
            entry["p4_alone_ratio_median"] = idla["p4_alone_ratio_median"]
            entry["p4_alone_ratio_max"] = idla["p4_alone_ratio_max"]
            entry["p4_alone_met"] = idla["p4_within_1_2"] == 1.0
        checks[name] = entry
    return checks


def calibration(simulated: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Our Gavel-style baseline beside the artifacts' Gavel max-min figures (hours)."""
    lines = {}
    for name, (avg_h, p99_h, makespan_h) in GAVEL_REFERENCE_H.items():
        ours = simulated.get(name, {}).get("gavel")
        if ours is None:
            continue
        lines[name] = {"reference_h": {"avg_jct": avg_h, "p99_jct": p99_h,
                                       "makespan": makespan_h},
                       "ours_h": {"avg_jct": ours["avg_jct_s"] / 3600,
                                  "p99_jct": ours["p99_jct_s"] / 3600,
                                  "makespan": ours["makespan_s"] / 3600}}
    return lines


def time_policy(devices: int = 1000, jobs: int = 200, repeats: int = 5,
                seed: int = 0) -> dict[str, float]:
    """Median seconds of `allocate` for ``devices`` × ``jobs`` on synthetic online models (four
    device kinds, α+β fits): a fresh plan and a re-plan from it."""
    rng = random.Random(seed)
    kinds = {"a": (0.01, 0.001), "b": (0.02, 0.002), "c": (0.01, 0.004), "d": (0.05, 0.0005)}
    pool = [Device(f"n{i // 8}/d{i}", "abcd"[i % 4], f"n{i // 8}", 2**34) for i in range(devices)]
    models = OnlineModels()
    views = []
    for index in range(jobs):
        job_id = f"j{index}"
        models.set_job(job_id, 256, comm_s=0.01 * rng.random())
        for kind, (alpha, beta) in kinds.items():
            slow = rng.uniform(0.5, 2.0)
            models.seed(job_id, kind, [(b, alpha + beta * b * slow) for b in (32, 64, 128)])
        views.append(JobView(job_id=job_id, kind=JobKind.TRAIN, priority=rng.choice([1, 2, 4]),
                             min_workers=1, max_workers=16,
                             remaining_samples=rng.uniform(1e4, 1e6)))
    fresh, replan = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        plan = allocate(views, pool, models, {})
        fresh.append(time.perf_counter() - started)
        views = views[1:] + views[:1]
        started = time.perf_counter()
        allocate(views[:-1], pool, models, plan)
        replan.append(time.perf_counter() - started)
    return {"devices": devices, "jobs": jobs, "fresh_s": float(np.median(fresh)),
            "replan_after_completion_s": float(np.median(replan))}


def print_pool_simulations(result: dict[str, Any], policies: Sequence[str] | None = None) -> None:
    """One table per workload (hours), then the targets and calibration lines."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, figures in result.get("simulate", {}).items():
        table = Table(title=f"{name} (hours; 64 GPUs)")
        for column in ("policy", "avg JCT", "p99 JCT", "makespan", "weighted JCT",
                       "resizes/job", "GPU-h", "p=4 / alone (max)"):
            table.add_column(column)
        for policy, entry in figures.items():
            ratio = entry.get("p4_alone_ratio_max")
            table.add_row(policy, *(f"{entry[k] / 3600:.3f}" for k in (
                "avg_jct_s", "p99_jct_s", "makespan_s", "weighted_jct_s")),
                f"{entry['resizes_per_job']:.2f}", f"{entry['gpu_hours']:.0f}",
                "-" if ratio is None else f"{ratio:.2f}")
        console.print(table)
    for name, entry in result.get("targets", {}).items():
        p4 = (f", p=4 within 1.2x alone {entry['p4_within_1_2']:.0%} (median "
              f"{entry['p4_alone_ratio_median']:.2f}x, max {entry['p4_alone_ratio_max']:.2f}x)"
              if "p4_within_1_2" in entry else "")
        console.print(f"{name}: idla avg JCT {entry['avg_jct_vs_best']:.2f}x best baseline, "
                      f"weighted {entry.get('weighted_jct_vs_fifo', float('nan')):.2f}x FIFO, "
                      f"makespan {entry['makespan_vs_best']:.2f}x best{p4}")
    for name, entry in result.get("calibration", {}).items():
        ref, ours = entry["reference_h"], entry["ours_h"]
        console.print(f"calibration {name}: Gavel max-min avg/p99/makespan h: ours "
                      f"{ours['avg_jct']:.2f}/{ours['p99_jct']:.2f}/{ours['makespan']:.2f}, "
                      f"artifact {ref['avg_jct']:.2f}/{ref['p99_jct']:.2f}/{ref['makespan']:.2f}")
    timing = result.get("policy_timing")
    if timing:
        console.print(f"allocate, {timing['devices']} devices x {timing['jobs']} jobs: "
                      f"{timing['fresh_s'] * 1e3:.1f} ms fresh, "
                      f"{timing['replan_after_completion_s'] * 1e3:.1f} ms re-plan")
