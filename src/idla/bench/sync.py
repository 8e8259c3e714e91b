"""`idla bench sync`: synchronous, local-SGD, DiLoCo and asynchronous training side by side.

Same model (demo CNN), data (digits), Adam lr, seed and wall-clock budget for every run, under
the same cgroup throttling (`--speeds`), with and without jitter. Jitter: every worker's speed is
multiplied by m ~ U[0.5, 1.5], redrawn every few steps; the cgroups give 1.5× the nominal speed
and after each forward the worker sleeps (1.5/m − 1) × 3 × its forward time (forward + backward ≈
3 forwards), so the effective speed is nominal × m (compute-time dilation on top of real
throttling). Each run records the wall seconds until test accuracy first reaches the target
(evaluation excluded), the accuracy at the end of the budget, gradient/parameter bytes each
worker sent, and (async) the staleness of every applied update.
"""

from __future__ import annotations

from typing import Any

from idla.bench import sync_workers
from idla.bench.reached import median_reached, seconds
from idla.bench.sync_setup import RUNS, Jitter, SyncBenchConfig
from idla.runtime.launch import launch_local


def _launch(config: SyncBenchConfig, name: str, jitter: bool, seed: int) -> dict[str, Any]:
    speeds = [s * Jitter.HEADROOM for s in config.speeds]
    world = len(speeds)
    if name in ("ddp", "allreduce"):
        worker = sync_workers.ddp if name == "ddp" else sync_workers.allreduce
        return launch_local(worker, (config, jitter, seed), world, speeds, config.base_cores)[0]
    if name in ("local", "diloco"):
        args = (config, name, jitter, seed)
        return launch_local(sync_workers.local, args, world, speeds, config.base_cores)[0]
    lam = config.delay_compensation if name == "async_dc" else 0.0
    return launch_local(sync_workers.asynchronous, (config, lam, jitter, seed), world + 1,
                        [Jitter.HEADROOM, *speeds], config.base_cores)[0]


def run_sync_bench(config: SyncBenchConfig, on_run: Any = None) -> dict[str, Any]:
    """Every mode in both scenarios, `repeats` times (interleaved); medians."""
    import statistics

    from idla.bench.machine import machine_info

    result: dict[str, Any] = {"settings": _settings(config), "machine": machine_info(),
                              "scenarios": {}}
    for scenario, jitter in (("steady", False), ("jitter", True)):
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in RUNS}
        for repeat in range(config.repeats):
            for name, _ in RUNS:
                row = _launch(config, name, jitter, config.seed + repeat)
                rows[name].append(row)
                if on_run is not None:
                    on_run(scenario, name, repeat, row)
        runs = {}
        for name, results in rows.items():
            runs[name] = {
                "time_to_target_s": median_reached(r["time_to_target_s"] for r in results),
                "final_accuracy": statistics.median(r["final_accuracy"] for r in results),
                "bytes_sent_per_worker": statistics.median(
                    r["bytes_sent_per_worker"] for r in results),
                "steps": statistics.median(r["steps"] for r in results),
                "staleness": results[0].get("staleness"),
                "repeats": results,
            }
        result["scenarios"][scenario] = {"runs": runs}
    result["runs"] = result["scenarios"]["jitter"]["runs"]
    result["summary"] = _summary(result["scenarios"])
    return result


def _settings(config: SyncBenchConfig) -> dict[str, Any]:
    from idla.report import settings_dict

    return settings_dict(config)


def _summary(scenarios: dict[str, Any]) -> dict[str, Any]:
    def ttt(runs: dict[str, Any], name: str) -> float:
        return seconds(runs[name]["time_to_target_s"])

    jitter = scenarios["jitter"]["runs"]
    steady = scenarios["steady"]["runs"]
    best = min(("async", "async_dc", "local", "diloco"), key=lambda n: ttt(jitter, n))
    sync_acc = jitter["allreduce"]["final_accuracy"]
    gap = sync_acc - jitter["async"]["final_accuracy"]
    closed = (jitter["async_dc"]["final_accuracy"] - jitter["async"]["final_accuracy"])
    def per_step(name: str) -> float:
        return float(steady[name]["bytes_sent_per_worker"]) / max(steady[name]["steps"], 1)

    steady_bytes, diloco_bytes = per_step("allreduce"), per_step("diloco")
    return {
        "jitter_best_relaxed": best,
        "jitter_best_vs_sync_time": ttt(jitter, best) / ttt(jitter, "allreduce"),
        "dc_gap_closed_fraction": closed / gap if gap > 0 else None,
        "diloco_bytes_reduction_per_step": steady_bytes / diloco_bytes if diloco_bytes else None,
        "diloco_accuracy_loss_pp": 100 * (steady["allreduce"]["final_accuracy"]
                                          - steady["diloco"]["final_accuracy"]),
    }


def print_sync_bench(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    settings = result["settings"]
    for scenario, data in result["scenarios"].items():
        table = Table(title=f"idla bench sync — {scenario} (speeds {settings['speeds']}, target "
                      f"{100 * settings['target_accuracy']:.0f}%, budget {settings['budget_s']} s, "
                      f"medians of {settings['repeats']})")
        for column in ("run", "time to target", "final acc", "steps", "MB sent/worker",
                       "staleness max/mean"):
            table.add_column(column, justify="right")
        for name, run in data["runs"].items():
            ttt = run["time_to_target_s"]
            stale = run["staleness"]
            table.add_row(
                name, "not reached" if ttt is None else f"{ttt:.1f} s",
                f"{100 * run['final_accuracy']:.2f}%", f"{run['steps']:.0f}",
                f"{run['bytes_sent_per_worker'] / 1e6:.1f}",
                "" if not stale else f"{stale['max']} / {stale['mean']:.1f}")
        console.print(table)
    console.print(result["summary"])
    machine = result["machine"]
    console.print(f"H={settings['period_steps']}, S={settings['staleness_bound']}, λ="
                  f"{settings['delay_compensation']}; {machine['cpu_model']}, "
                  f"{machine['cpu_count']} cores, torch {machine['torch']}")
