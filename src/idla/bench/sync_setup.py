"""The settings and the clock shared by `idla bench sync` and its workers: the config, speed
jitter (compute-time dilation on top of cgroup throttling) and the run clock."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from idla.demo import accuracy
from idla.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class SyncBenchConfig:
    """Settings of one `idla bench sync` invocation."""

    speeds: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.5, 0.25],
                                metadata={"parse": "speeds_or_one", "metavar": "LIST"})
    """Relative CPU speed per worker."""
    base_cores: float = 0.33  # cores of a speed-1 worker (×1.5 headroom for jitter)
    target_accuracy: float = field(default=0.97, metadata={"flag": "--target"})
    """Test accuracy that stops the clock."""
    budget_s: float = field(default=10.0, metadata={"flag": "--budget", "metavar": "SECONDS"})
    """Wall seconds of training per run."""
    global_batch_size: int = field(default=128, metadata={"json_key": "global_batch"})
    """Synchronous modes: samples per step over all workers."""
    local_batch: int = 32  # local SGD, DiLoCo and async: samples per worker step
    lr: float = 3e-3  # Adam (inner optimizer / server optimizer)
    period_steps: int = field(default=20, metadata={
        "flag": "--period", "parse": "positive_int", "metavar": "H"})
    """H of local SGD and DiLoCo."""
    staleness_bound: int = field(default=4, metadata={"flag": "--staleness", "metavar": "S"})
    """Staleness bound S of async."""
    delay_compensation: float = field(default=2.0, metadata={"metavar": "LAMBDA"})
    """DC-ASGD λ of the async_dc run."""
    jitter_every_steps: int = 5
    eval_every_steps: int = 5
    repeats: int = field(default=3, metadata={"parse": "positive_int"})
    """Runs of each mode and scenario."""
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

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and the mean loss, then the sleep (counted as compute): a `LossFn`."""
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        self.after_forward(time.perf_counter() - start)
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
