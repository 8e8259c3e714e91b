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

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from idla.bench.reached import median_reached, seconds
from idla.errors import ConfigError
from idla.runtime.demo import accuracy


@dataclass(kw_only=True, slots=True)
class SyncBenchConfig:
    """Settings of one `idla bench sync` invocation."""

    speeds: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.5, 0.25])
    base_cores: float = 0.33  # cores of a speed-1 worker (×1.5 headroom for jitter)
    target_accuracy: float = 0.97
    budget_s: float = 10.0  # wall seconds of training per run
    global_batch: int = 128  # synchronous modes: samples per step over all workers
    local_batch: int = 32  # local SGD, DiLoCo and async: samples per worker step
    lr: float = 3e-3  # Adam (inner optimizer / server optimizer)
    period_steps: int = 20  # H of local SGD and DiLoCo
    staleness_bound: int = 4  # S of async
    delay_compensation: float = 2.0  # λ of DC-ASGD in the "async_dc" run
    jitter_every_steps: int = 5
    eval_every_steps: int = 5
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.speeds or any(s <= 0 for s in self.speeds):
            raise ConfigError("--speeds must be positive")
        if len(self.speeds) < 2:
            raise ConfigError("--speeds needs at least 2 workers")
        if self.period_steps < 1:
            raise ConfigError(f"--period must be at least 1 step, got {self.period_steps}")
        if self.staleness_bound < 0:
            raise ConfigError(f"--staleness must be 0 or more, got {self.staleness_bound}")
        if self.delay_compensation < 0:
            raise ConfigError("--delay-compensation must be 0 or more")
        if not 0 < self.target_accuracy <= 1:
            raise ConfigError("--target must be in (0, 1]")
        if self.budget_s <= 0:
            raise ConfigError("--budget must be positive")


class Jitter:
    """Compute-time dilation of one worker (see the module docstring); off: no sleeping."""

    HEADROOM = 1.5

    def __init__(self, enabled: bool, rank: int, seed: int, every_steps: int) -> None:
        self.enabled = enabled
        self.every_steps = every_steps
        self._random = random.Random(seed * 7919 + rank)
        self._steps = 0
        self.multiplier = 1.0
        self._draw()

    def _draw(self) -> None:
        self.multiplier = self._random.uniform(0.5, 1.5) if self.enabled else self.HEADROOM

    def after_forward(self, forward_s: float) -> None:
        if self.enabled:
            time.sleep((self.HEADROOM / self.multiplier - 1.0) * 3.0 * forward_s)
        self._steps += 1
        if self._steps % self.every_steps == 0:
            self._draw()


def dilated_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 jitter: Jitter) -> torch.Tensor:
    """Forward and the mean loss, then the jitter's sleep (counted as compute)."""
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    jitter.after_forward(time.perf_counter() - start)
    return loss


class RunClock:
    """Training seconds (evaluation excluded), first time at the target, and the budget."""

    def __init__(self, config: SyncBenchConfig, model: torch.nn.Module, test_set: Any) -> None:
        self.config, self.model, self.test_set = config, model, test_set
        self.start = time.perf_counter()
        self.eval_s = 0.0
        self.time_to_target_s: float | None = None
        self.accuracy = 0.0
        self.curve: list[tuple[float, float]] = []  # (training seconds, test accuracy)

    def train_s(self) -> float:
        return time.perf_counter() - self.start - self.eval_s

    def evaluate(self) -> float:
        begin = time.perf_counter()
        self.accuracy = accuracy(self.model, self.test_set, torch.device("cpu"))
        at = begin - self.start - self.eval_s
        self.curve.append((at, self.accuracy))
        if self.time_to_target_s is None and self.accuracy >= self.config.target_accuracy:
            self.time_to_target_s = at
        self.eval_s += time.perf_counter() - begin
        return self.accuracy

    def over_budget(self) -> bool:
        return self.train_s() >= self.config.budget_s

    def result(self) -> dict[str, Any]:
        return {"time_to_target_s": self.time_to_target_s, "train_s": self.train_s(),
                "final_accuracy": self.accuracy, "curve": self.curve}


RUNS: tuple[tuple[str, str], ...] = (
    ("ddp", "PyTorch DDP, equal shares, every step"),
    ("allreduce", "idla synchronous (planned shares), every step"),
    ("local", "local SGD, average every H steps"),
    ("diloco", "DiLoCo, H inner steps (fewer for slower workers), outer Nesterov"),
    ("async", "parameter server, staleness ≤ S, no delay compensation"),
    ("async_dc", "parameter server, staleness ≤ S, DC-ASGD"),
)


def _launch(config: SyncBenchConfig, name: str, jitter: bool, seed: int) -> dict[str, Any]:
    from idla.bench import sync_workers
    from idla.runtime.launch import launch_local

    speeds = [s * Jitter.HEADROOM for s in config.speeds]
    world = len(speeds)
    if name in ("ddp", "allreduce"):
        args: tuple[Any, ...] = (config, name, jitter, seed)
        return launch_local(sync_workers.synchronous, args, world, speeds, config.base_cores)[0]
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
    from dataclasses import asdict

    return asdict(config)


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
