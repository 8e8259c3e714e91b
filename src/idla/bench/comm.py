"""`idla bench comm`: gradient compression on shaped multi-host links.

Every run trains the demo CNN (151k parameters, 0.6 MB of fp32 gradient per step: at 10 Mbit/s
one uncompressed ring all-reduce over 4 hosts takes about 0.7 s, against ~15 ms of compute) on
digits with the same global batch, seed, optimizer and step budget, one worker per network
namespace of the rig, every link shaped both ways. Baselines: plain DDP, DDP with PyTorch's
`fp16_compress_hook`, and DDP with PyTorch's `powerSGD_hook` (rank 2). Then idla with each codec,
with and without error feedback, and `auto`.

Measured per run: seconds of training until the test accuracy first reaches the target
(evaluation time excluded, same for all), the accuracy after the whole step budget, bytes each
host's eth0 sent per step (kernel counters, read by the worker in its namespace: TCP/IP headers
included) beside the codec's own payload count, and whether the replicas ended identical.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from idla.agent import Agent, AgentConfig, parameter_digest
from idla.bench.ddp import CommHook, DDPBaseline
from idla.bench.machine import machine_info
from idla.bench.reached import median_reached, seconds
from idla.compress import parse_codec
from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.emulate.netns import NetnsRig, parse_rate
from idla.errors import ConfigError
from idla.report import settings_dict
from idla.runtime.group import Group
from idla.runtime.launch import launch_local

DEFAULT_CODECS = ["fp16", "topk:0.01", "randk:0.01", "sign", "powersgd:2"]


@dataclass(kw_only=True, slots=True)
class CommConfig:
    """Settings of one `idla bench comm` invocation."""

    hosts: int = field(default=4, metadata={"parse": "positive_int", "metavar": "N"})
    """Hosts (network namespaces), one worker each."""
    bandwidth: str = field(default="10mbit", metadata={"metavar": "RATE"})
    """Link rate of every host, each way, in tc syntax."""
    target_accuracy: float = field(default=0.95, metadata={"flag": "--target"})
    """Test accuracy that stops the clock."""
    steps: int = field(default=100, metadata={"parse": "positive_int"})
    """Optimizer steps per run (the final accuracy is taken after them)."""
    eval_every_steps: int = 5  # test accuracy is checked this often
    global_batch_size: int = field(default=128, metadata={"json_key": "global_batch"})
    """Samples per step, summed over hosts."""
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    lr: float = 3e-3  # learning rate of that optimizer
    repeats: int = field(default=3, metadata={"parse": "positive_int"})
    """Runs of each setting (seeds 0..repeats-1); the table shows medians."""
    codecs: list[str] = field(default_factory=lambda: list(DEFAULT_CODECS),
                              metadata={"parse": "names", "metavar": "LIST"})
    """idla codecs to compare."""
    powersgd_start_iter: int = 2  # PyTorch hook: plain all-reduce before this step

    def __post_init__(self) -> None:
        if self.hosts < 2:
            raise ConfigError("--hosts must be at least 2")
        parse_rate(self.bandwidth)
        for spec in self.codecs:
            parse_codec(spec)
        if not 0 < self.target_accuracy <= 1:
            raise ConfigError("--target must be in (0, 1]")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.steps < self.eval_every_steps:
            raise ConfigError("--steps must be at least the evaluation interval")


@dataclass(frozen=True, slots=True)
class CommRun:
    """One run: a baseline (`ddp`, `ddp_fp16`, `ddp_powersgd`) or idla with a codec."""

    name: str
    kind: str
    codec: str = "none"
    error_feedback: bool = True
    seed: int = 0


def _tx_bytes(interface: str = "eth0") -> int:
    """Bytes this network namespace's interface has sent (/proc/net/dev is per namespace)."""
    with open("/proc/net/dev") as stats:
        for line in stats:
            name, _, rest = line.partition(":")
            if name.strip() == interface:
                return int(rest.split()[8])
    return 0


class _Clock:
    """Training seconds (evaluation excluded) and the first time the target was reached."""

    def __init__(self, config: CommConfig, model: torch.nn.Module, test_set: Any) -> None:
        self.config, self.model, self.test_set = config, model, test_set
        self.start = time.perf_counter()
        self.eval_s = 0.0
        self.time_to_target_s: float | None = None
        self.steps_to_target: int | None = None

    def after_step(self, step: int) -> None:
        if self.time_to_target_s is not None or step % self.config.eval_every_steps:
            return
        begin = time.perf_counter()
        reached = accuracy(self.model, self.test_set, torch.device("cpu"))
        flag = torch.tensor([1.0 if reached >= self.config.target_accuracy else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank stops the clock together
        if flag.item() > 0:
            self.time_to_target_s = begin - self.start - self.eval_s
            self.steps_to_target = step
        self.eval_s += time.perf_counter() - begin


def _optimizer(config: CommConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def _comm_hook(config: CommConfig, kind: str) -> CommHook | None:
    """PyTorch's own compression for the DDP baselines: fp16, or PowerSGD of rank 2."""
    if kind == "ddp_fp16":
        return None, default_hooks.fp16_compress_hook
    if kind == "ddp_powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=2,
            start_powerSGD_iter=config.powersgd_start_iter)
        return state, powerSGD_hook.powerSGD_hook
    return None


def comm_worker(config: CommConfig, run: CommRun) -> dict[str, Any]:
    torch.set_num_threads(1)
    train_set, test_set = load_digits_split()
    torch.manual_seed(run.seed)
    model = DigitsCNN()
    optimizer = _optimizer(config, model)
    if run.kind == "idla":
        agent = Agent(model, optimizer, train_set, config=AgentConfig(
            global_batch_size=config.global_batch_size, seed=run.seed, compress=run.codec,
            error_feedback=run.error_feedback, check_every_steps=0))
        group = agent.group
    else:
        group = Group()
        baseline = DDPBaseline(model, optimizer, train_set, group, config.global_batch_size,
                               run.seed, _comm_hook(config, run.kind))
    group.barrier()
    tx_start = _tx_bytes()
    clock = _Clock(config, model, test_set)
    if run.kind == "idla":
        epoch = 0
        while agent.step < config.steps:
            for x, y in agent.batches(epoch):
                agent.backward(F.cross_entropy(model(x), y))
                optimizer.step()
                clock.after_step(agent.step)
                if agent.step == config.steps:
                    break
            epoch += 1
    else:
        baseline.train(lambda step: step == config.steps,
                       after_step=lambda step, _: clock.after_step(step))
    train_s = time.perf_counter() - clock.start - clock.eval_s
    tx_per_step = (_tx_bytes() - tx_start) / config.steps
    result = {
        "time_to_target_s": clock.time_to_target_s,
        "steps_to_target": clock.steps_to_target,
        "train_s": train_s,
        "final_accuracy": accuracy(model, test_set, torch.device("cpu")),
        "tx_bytes_per_step": tx_per_step,
        "param_hash": parameter_digest(model),
    }
    if run.kind == "idla":
        report = agent.report()["compression"]
        result.update(payload_bytes_per_step=report["payload_bytes_per_step"],
                      chosen_codec=report["codec"], reason=report["reason"])
        agent.close()
    else:
        numel = sum(p.numel() for p in model.parameters())
        result["payload_bytes_per_step"] = {"ddp": 4 * numel, "ddp_fp16": 2 * numel}.get(
            run.kind)
        baseline.close()
        group.close()
    return result


def _runs(config: CommConfig) -> list[CommRun]:
    runs = [CommRun("ddp", "ddp"), CommRun("ddp_fp16_hook", "ddp_fp16"),
            CommRun("ddp_powersgd_hook", "ddp_powersgd")]
    for spec in config.codecs:
        runs.append(CommRun(f"idla_{spec}", "idla", spec, True))
        if spec != "fp16":  # fp16 rounding is tiny: without feedback it is the same codec
            runs.append(CommRun(f"idla_{spec}_no_ef", "idla", spec, False))
    runs.append(CommRun("idla_auto", "idla", "auto", True))
    return runs


def run_comm(config: CommConfig, on_run: Any = None) -> dict[str, Any]:
    """All settings, `repeats` times each (interleaved), on one shaped rig."""
    rate_bit_s = parse_rate(config.bandwidth)
    plan = _runs(config)
    rows: dict[str, list[dict[str, Any]]] = {run.name: [] for run in plan}
    with NetnsRig(config.hosts, rate_bit_s) as rig:
        namespaces = [host.namespace for host in rig.hosts]
        for repeat in range(config.repeats):
            for run in plan:
                seeded = CommRun(run.name, run.kind, run.codec, run.error_feedback, repeat)
                results = launch_local(comm_worker, (config, seeded), config.hosts,
                                       netns=namespaces, timeout_s=900)
                row = dict(results[0])
                row["tx_bytes_per_step"] = statistics.mean(r["tx_bytes_per_step"] for r in results)
                row["replicas_identical"] = len({r["param_hash"] for r in results}) == 1
                rows[run.name].append(row)
                if on_run is not None:
                    on_run(run.name, repeat, row)
    return summarize(config, rows)


def summarize(config: CommConfig, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for name, results in rows.items():
        runs[name] = {
            "time_to_target_s": median_reached(r["time_to_target_s"] for r in results),
            "steps_to_target": median_reached(r["steps_to_target"] for r in results),
            "final_accuracy": statistics.median(r["final_accuracy"] for r in results),
            "wire_bytes_per_step": statistics.median(r["tx_bytes_per_step"] for r in results),
            "payload_bytes_per_step": results[0]["payload_bytes_per_step"],
            "train_s": statistics.median(r["train_s"] for r in results),
            "replicas_identical": all(r["replicas_identical"] for r in results),
            "reached_target": sum(r["time_to_target_s"] is not None for r in results),
            "repeats": results,
        }
    return {"settings": settings_dict(config), "machine": machine_info(), "runs": runs,
            "summary": headline(runs)}


def headline(runs: dict[str, Any]) -> dict[str, Any]:
    """The targets' ratios: the best idla setting against DDP and PyTorch's PowerSGD hook."""
    def ttt(name: str) -> float:
        return seconds(runs[name]["time_to_target_s"])

    idla = [n for n in runs if n.startswith("idla_")]
    best = min(idla, key=ttt)
    fixed = [n for n in idla if n != "idla_auto"]
    best_fixed = min(fixed, key=ttt)
    out: dict[str, Any] = {"best_idla": best, "best_fixed": best_fixed}
    out["speedup_vs_ddp"] = ttt("ddp") / ttt(best)
    out["speedup_vs_powersgd_hook"] = ttt("ddp_powersgd_hook") / ttt(best)
    out["accuracy_gap_pp"] = 100 * (runs["ddp"]["final_accuracy"] - runs[best]["final_accuracy"])
    out["auto_vs_best_fixed"] = ttt("idla_auto") / ttt(best_fixed)
    if "idla_topk:0.01" in runs:
        ddp_wire = runs["ddp"]["wire_bytes_per_step"]
        out["topk_wire_reduction"] = ddp_wire / runs["idla_topk:0.01"]["wire_bytes_per_step"]
        out["topk_payload_reduction"] = (runs["ddp"]["payload_bytes_per_step"]
                                         / runs["idla_topk:0.01"]["payload_bytes_per_step"])
    return out


def print_comm(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    settings, machine, runs = result["settings"], result["machine"], result["runs"]
    table = Table(title=f"idla bench comm: {settings['hosts']} hosts, {settings['bandwidth']} "
                  f"links, target {100 * settings['target_accuracy']:.0f}% "
                  f"(medians of {settings['repeats']})")
    for column in ("run", "time to target", "steps", "vs DDP", "final acc", "wire B/step",
                   "payload B/step", "identical"):
        table.add_column(column, justify="right")
    ddp = runs["ddp"]["time_to_target_s"]
    for name, run in runs.items():
        ttt = run["time_to_target_s"]
        table.add_row(
            name, "not reached" if ttt is None else f"{ttt:.1f} s",
            "" if run["steps_to_target"] is None else f"{run['steps_to_target']:.0f}",
            "" if ttt is None or ddp is None else f"{ddp / ttt:.1f}×",
            f"{100 * run['final_accuracy']:.2f}%", f"{run['wire_bytes_per_step']:,.0f}",
            "" if run["payload_bytes_per_step"] is None
            else f"{run['payload_bytes_per_step']:,.0f}",
            "yes" if run["replicas_identical"] else "NO",
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    summary = result["summary"]
    console.print(
        f"best idla: {summary['best_idla']} — {summary['speedup_vs_ddp']:.1f}× DDP, "
        f"{summary['speedup_vs_powersgd_hook']:.2f}× PyTorch PowerSGD hook, accuracy gap "
        f"{summary['accuracy_gap_pp']:+.2f} pp; auto / best fixed = "
        f"{summary['auto_vs_best_fixed']:.2f}"
    )
    console.print(
        f"demo CNN (151k params), digits, global batch {settings['global_batch']}, Adam lr "
        f"{settings['lr']}, {settings['steps']} steps; {machine['cpu_model']}, "
        f"{machine['cpu_count']} cores, torch {machine['torch']}"
    )
