"""`idla bench hetero`: plain DDP (equal shares) vs idla under emulated heterogeneous speeds.

Both runs use the same data, model (`--model`: the digits CNN, a small ResNet or a small
Transformer LM, demo/workloads.py), global batch, seed and step count, under the same cgroup
throttling, launched the same way. Two references stand beside them:
- the ideal, the sum of each worker's standalone throughput (training alone on the whole global
  batch at its speed): no synchronization cost at all;
- the balanced limit, plain DDP on as many equal workers at the mean speed (the same total CPU):
  what the same CPU gives when nothing is heterogeneous, synchronization included.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from idla.agent import Agent, AgentConfig
from idla.bench.ddp import DDPBaseline
from idla.bench.machine import machine_info
from idla.demo.workloads import WORKLOADS, Workload
from idla.errors import ConfigError
from idla.report import settings_dict
from idla.runtime.group import Group
from idla.runtime.launch import launch_local

_BATCH_DEFAULTS = ", ".join(f"{w.global_batch_size} {name}" for name, w in WORKLOADS.items())


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
    warmup_steps: int = 10  # steps excluded from the throughput (every kind of run)
    repeats: int = field(default=3, metadata={"parse": "positive_int"})
    """Runs of each kind; the table shows medians."""
    global_batch_size: int | None = field(default=None, metadata={
        "flag": "--global-batch", "json_key": "global_batch", "parse": "positive_int",
        "metavar": "B", "default_text": _BATCH_DEFAULTS})
    """Samples per step, summed over workers."""
    seed: int = 0
    """Seeds the model, the data order and the split."""
    lr: float = 3e-3  # Adam
    model: str = field(default="digits", metadata={"metavar": "NAME"})
    """The workload: digits is the demo CNN on 8×8 digits, resnet a small ResNet on synthetic
    32×32 images, transformer a small causal LM on synthetic tokens"""

    def __post_init__(self) -> None:
        if self.model not in WORKLOADS:
            raise ConfigError(f"--model: unknown model {self.model!r}; choose one of "
                              f"{', '.join(WORKLOADS)}")
        if self.global_batch_size is None:
            self.global_batch_size = WORKLOADS[self.model].global_batch_size
        if self.steps <= self.warmup_steps:
            raise ConfigError(f"--steps must exceed the {self.warmup_steps} warm-up steps")
        if self.global_batch_size < len(self.speeds):
            raise ConfigError("--global-batch is smaller than the number of workers")

    @property
    def global_batch(self) -> int:
        """Samples per step, the model's default resolved."""
        if self.global_batch_size is None:
            raise ConfigError("HeteroConfig.global_batch_size was not resolved")
        return self.global_batch_size

    @property
    def workload(self) -> Workload:
        return WORKLOADS[self.model]


def _setup(config: HeteroConfig) -> tuple[Any, Any, torch.nn.Module, torch.optim.Optimizer]:
    torch.set_num_threads(1)
    train_set, test_set = config.workload.split(config.seed)
    torch.manual_seed(config.seed)
    model = config.workload.model()
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
    baseline = DDPBaseline(model, optimizer, train_set, group, config.global_batch,
                           config.seed)
    meter = _Throughput(config.warmup_steps)
    group.barrier()
    baseline.train(lambda step: step == config.steps, loss_fn=config.workload.loss,
                   after_step=meter.after_step)
    rate = meter.samples_per_s()
    baseline.close()
    cpu = torch.device("cpu")  # the baseline trains where the data lies
    workload = config.workload
    result = {"samples_per_s": rate, workload.metric: workload.evaluate(model, test_set, cpu)}
    group.close()
    return result


def idla_worker(config: HeteroConfig) -> dict[str, Any]:
    """The same job through idla's Agent."""
    train_set, test_set, model, optimizer = _setup(config)
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=config.global_batch, seed=config.seed))
    agent.group.barrier()
    sizes: list[int] = []
    start, epoch = 0.0, 0
    while len(sizes) < config.steps:
        for x, y in agent.batches(epoch):
            if len(sizes) == config.warmup_steps:
                start = time.perf_counter()
            sizes.append(x.shape[0])
            agent.backward(config.workload.loss(model, x, y))
            optimizer.step()
            if agent.step == config.steps:
                break
        epoch += 1
    elapsed_s = time.perf_counter() - start
    shares = list(agent.history["shares"])
    samples = sum(sum(s) for s in shares[config.warmup_steps :])
    agent.close()
    workload = config.workload
    return {
        "samples_per_s": samples / elapsed_s,
        workload.metric: workload.evaluate(model, test_set, agent.group.device),
        "final_shares": agent.shares,
        "topology": agent.topology.describe(),
        "replan_steps": agent.report()["replan_steps"],
    }


def _summary(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
        metric: statistics.median(r[metric] for r in rows),
        "runs": rows,
    }


def run_hetero(config: HeteroConfig) -> dict[str, Any]:
    world = len(config.speeds)
    balanced_speeds = [statistics.fmean(config.speeds)] * world
    kinds: dict[str, tuple[Callable[[HeteroConfig], dict[str, Any]], list[float]]] = {
        "ddp": (ddp_worker, config.speeds), "idla": (idla_worker, config.speeds)}
    if len(set(config.speeds)) > 1:  # with equal workers the DDP run is the balanced one
        kinds["balanced"] = (ddp_worker, balanced_speeds)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in kinds}
    for _ in range(config.repeats):  # interleaved, so drift in the machine hits each kind alike
        for name, (worker, speeds) in kinds.items():
            runs[name].append(
                launch_local(worker, (config,), world, speeds, config.base_cores)[0])
    standalone: dict[float, float] = {}
    alone = replace(config, steps=config.warmup_steps + 20)  # a steady rate needs few steps
    for speed in sorted(set(config.speeds)):
        rates = [launch_local(ddp_worker, (alone,), 1, [speed],
                              config.base_cores)[0]["samples_per_s"]
                 for _ in range(config.repeats)]
        standalone[speed] = statistics.median(rates)
    ideal = sum(standalone[s] for s in config.speeds)
    metric = config.workload.metric
    result: dict[str, Any] = {"settings": settings_dict(config), "machine": machine_info(),
                              "metric": metric}
    for name, rows in runs.items():
        result[name] = _summary(rows, metric)
    if "balanced" not in result:
        result["balanced"] = {**result["ddp"], "same_run_as": "ddp"}
    result["balanced_speeds"] = balanced_speeds
    result["standalone_samples_per_s"] = {str(s): v for s, v in standalone.items()}
    result["ideal_samples_per_s"] = ideal
    idla_rate = result["idla"]["samples_per_s"]
    result["speedup_vs_ddp"] = idla_rate / result["ddp"]["samples_per_s"]
    result["of_balanced"] = idla_rate / result["balanced"]["samples_per_s"]
    result["efficiency"] = idla_rate / ideal
    return result


def _metric_text(metric: str, value: float) -> str:
    return f"{100 * value:.2f}%" if metric == "test_accuracy" else f"{value:.4f}"


def print_hetero(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    settings, machine, metric = result["settings"], result["machine"], result["metric"]
    table = Table(title=f"idla bench hetero --model {settings['model']} (medians of "
                  f"{settings['repeats']} runs, {settings['steps']} steps each)")
    metric_column = "test acc" if metric == "test_accuracy" else "test loss"
    for column in ("run", "samples/s", "vs DDP", "of balanced", "of ideal", metric_column):
        table.add_column(column, justify="right")
    ddp, ideal = result["ddp"]["samples_per_s"], result["ideal_samples_per_s"]
    balanced = result["balanced"]["samples_per_s"]
    world, mean_speed = len(result["balanced_speeds"]), result["balanced_speeds"][0]
    for name in ("ddp", "idla", "balanced"):
        row = result[name]
        rate = row["samples_per_s"]
        table.add_row(name, f"{rate:.0f}", f"{rate / ddp:.2f}×", f"{rate / balanced:.2f}",
                      f"{rate / ideal:.2f}", _metric_text(metric, row[metric]))
    table.add_row("ideal (Σ alone)", f"{ideal:.0f}", f"{ideal / ddp:.2f}×",
                  f"{ideal / balanced:.2f}", "1.00", "")
    console = Console()
    console.print(table)
    console.print(
        f"model {settings['model']}, speeds {settings['speeds']} × {settings['base_cores']} "
        f"core, global batch {settings['global_batch']}, warm-up {settings['warmup_steps']} "
        f"steps excluded; balanced: plain DDP on {world} workers at speed {mean_speed:g} (the "
        f"same total CPU); ideal: Σ of each worker's standalone rate; {machine['cpu_model']}, "
        f"{machine['cpu_count']} cores, torch {machine['torch']}"
    )
