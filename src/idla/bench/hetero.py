"""`idla bench hetero`: plain DDP (equal shares) vs idla under emulated heterogeneous speeds.

Both runs use the same data (digits), model (the demo CNN), global batch, seed and step count,
under the same cgroup throttling, launched the same way. The ideal is the sum of each worker's
standalone throughput (training alone on the whole global batch at its speed).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from idla.agent import Agent, AgentConfig
from idla.bench.ddp import DDPBaseline
from idla.bench.machine import machine_info
from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.errors import ConfigError
from idla.report import settings_dict
from idla.runtime.group import Group
from idla.runtime.launch import launch_local


@dataclass(kw_only=True, slots=True)
class HeteroConfig:
    """Settings of one `idla bench hetero` invocation."""

    speeds: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.5, 0.25],
                                metadata={"parse": "speeds_or_one", "metavar": "LIST"})
    """Relative CPU speed per worker."""
    base_cores: float = field(default=0.5, metadata={"metavar": "CORES"})
    """CPU cores a speed-1 worker gets."""
    steps: int = field(default=60, metadata={"parse": "positive_int"})
    """Optimizer steps per run."""
    warmup_steps: int = 10  # steps excluded from the throughput (both kinds)
    repeats: int = field(default=3, metadata={"parse": "positive_int"})
    """Runs of each kind; the table shows medians."""
    global_batch_size: int = field(default=512, metadata={
        "flag": "--global-batch", "json_key": "global_batch", "parse": "positive_int",
        "metavar": "B"})
    """Samples per step, summed over workers."""
    seed: int = 0
    """Seeds the model, the data order and the split."""
    lr: float = 3e-3  # Adam

    def __post_init__(self) -> None:
        if self.steps <= self.warmup_steps:
            raise ConfigError(f"--steps must exceed the {self.warmup_steps} warm-up steps")
        if self.global_batch_size < len(self.speeds):
            raise ConfigError("--global-batch is smaller than the number of workers")


def _setup(config: HeteroConfig) -> tuple[Any, Any, torch.nn.Module, torch.optim.Optimizer]:
    torch.set_num_threads(1)
    train_set, test_set = load_digits_split(seed=config.seed)
    torch.manual_seed(config.seed)
    model = DigitsCNN()
    return train_set, test_set, model, torch.optim.Adam(model.parameters(), lr=config.lr)


class _Throughput:
    """Samples per second over the steps after the warm-up."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.start = time.perf_counter()
        self.samples = 0

    def after_step(self, step: int, samples: int) -> None:
        if step == self.warmup_steps:
            self.start = time.perf_counter()
        elif step > self.warmup_steps:
            self.samples += samples

    def samples_per_s(self) -> float:
        return self.samples / (time.perf_counter() - self.start)


def ddp_worker(config: HeteroConfig) -> dict[str, Any]:
    """Plain DistributedDataParallel (bench/ddp.py): equal shares of the same batches. Alone
    (one rank) it is the standalone run: the whole global batch at this worker's speed."""
    train_set, test_set, model, optimizer = _setup(config)
    group = Group()
    baseline = DDPBaseline(model, optimizer, train_set, group, config.global_batch_size,
                           config.seed)
    meter = _Throughput(config.warmup_steps)
    group.barrier()
    baseline.train(lambda step: step == config.steps, after_step=meter.after_step)
    rate = meter.samples_per_s()
    baseline.close()
    cpu = torch.device("cpu")  # the baseline trains where the data lies
    result = {"samples_per_s": rate, "test_accuracy": accuracy(model, test_set, cpu)}
    group.close()
    return result


def idla_worker(config: HeteroConfig) -> dict[str, Any]:
    """The same job through idla's Agent."""
    train_set, test_set, model, optimizer = _setup(config)
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=config.global_batch_size, seed=config.seed))
    agent.group.barrier()
    sizes: list[int] = []
    start, epoch = 0.0, 0
    while len(sizes) < config.steps:
        for x, y in agent.batches(epoch):
            if len(sizes) == config.warmup_steps:
                start = time.perf_counter()
            sizes.append(x.shape[0])
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            if agent.step == config.steps:
                break
        epoch += 1
    elapsed_s = time.perf_counter() - start
    shares = list(agent.history["shares"])
    samples = sum(sum(s) for s in shares[config.warmup_steps :])
    agent.close()
    return {
        "samples_per_s": samples / elapsed_s,
        "test_accuracy": accuracy(model, test_set, agent.group.device),
        "final_shares": agent.shares,
        "topology": agent.topology.describe(),
        "replan_steps": agent.report()["replan_steps"],
    }


def run_hetero(config: HeteroConfig) -> dict[str, Any]:
    world = len(config.speeds)
    runs: dict[str, list[dict[str, Any]]] = {"ddp": [], "idla": []}
    for _ in range(config.repeats):  # interleaved, so drift in the machine hits both alike
        runs["ddp"].append(
            launch_local(ddp_worker, (config,), world, config.speeds, config.base_cores)[0])
        runs["idla"].append(
            launch_local(idla_worker, (config,), world, config.speeds, config.base_cores)[0])
    standalone: dict[float, float] = {}
    alone = replace(config, steps=config.warmup_steps + 20)  # a steady rate needs few steps
    for speed in sorted(set(config.speeds)):
        rates = [launch_local(ddp_worker, (alone,), 1, [speed],
                              config.base_cores)[0]["samples_per_s"]
                 for _ in range(config.repeats)]
        standalone[speed] = statistics.median(rates)
    ideal = sum(standalone[s] for s in config.speeds)
    result: dict[str, Any] = {"settings": settings_dict(config), "machine": machine_info()}
    for name, rows in runs.items():
        result[name] = {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
            "test_accuracy": statistics.median(r["test_accuracy"] for r in rows),
            "runs": rows,
        }
    result["standalone_samples_per_s"] = {str(s): v for s, v in standalone.items()}
    result["ideal_samples_per_s"] = ideal
    result["speedup_vs_ddp"] = result["idla"]["samples_per_s"] / result["ddp"]["samples_per_s"]
    result["efficiency"] = result["idla"]["samples_per_s"] / ideal
    return result


def print_hetero(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    settings, machine = result["settings"], result["machine"]
    table = Table(title="idla bench hetero (medians of "
                  f"{settings['repeats']} runs, {settings['steps']} steps each)")
    for column in ("run", "samples/s", "vs DDP", "of ideal", "test acc"):
        table.add_column(column, justify="right")
    ddp, ideal = result["ddp"]["samples_per_s"], result["ideal_samples_per_s"]
    for name in ("ddp", "idla"):
        row = result[name]
        table.add_row(name, f"{row['samples_per_s']:.0f}", f"{row['samples_per_s'] / ddp:.2f}×",
                      f"{row['samples_per_s'] / ideal:.2f}", f"{100 * row['test_accuracy']:.2f}%")
    table.add_row("ideal (Σ standalone)", f"{ideal:.0f}", f"{ideal / ddp:.2f}×", "1.00", "")
    console = Console()
    console.print(table)
    console.print(
        f"speeds {settings['speeds']} × {settings['base_cores']} core, global batch "
        f"{settings['global_batch']}, warm-up {settings['warmup_steps']} steps excluded; "
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch']}"
    )
