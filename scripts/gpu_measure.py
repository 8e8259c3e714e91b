"""Throughput of a GPU rank beside CPU ranks, against each alone: the measurements (NUM lines)
of `scripts/gpu_check.sh`.

    PYTHONPATH=src python scripts/gpu_measure.py [--workloads digits,resnet] [--steps 45]

For each workload (`idla.demo.workloads`) three jobs train the same model on the same global
batch, launched by idla's own launcher: the GPU alone (one rank on cuda:0), the CPUs alone (two
CPU ranks), and the mixed fleet (cuda:0 beside the two CPU ranks, over gloo). Each runs
`--warmup` steps for the planner to settle, then `--steps` timed ones. Prints, one line each:

    NUM throughput_<workload>_<job>: <samples/s> (fleet, final shares, median compute ms)
    NUM throughput_<workload>_ratio: mixed / (gpu_alone + cpu_alone) (the target is >= 0.9)

and a FAIL line for a job that did not finish. Reported, not asserted: the ratio depends on
the machine, and the tests (tests/gpu) hold the assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

JOBS = {"gpu_alone": ["cuda:0"], "cpu_alone": ["cpu", "cpu"], "mixed": ["cuda:0", "cpu", "cpu"]}
"""The fleets, one device per rank."""


def say(kind: str, key: str, message: object) -> None:
    print(f"{kind} {key}: {message}", flush=True)


def throughput_worker(workload: str, devices: list[str], warmup: int, steps: int,
                      cpu_threads: int) -> dict[str, Any]:
    """One rank of a timed job; rank 0 returns the job's samples/s and what the plan was."""
    import torch

    from idla import Agent, AgentConfig
    from idla.demo.workloads import WORKLOADS

    rank = int(os.environ["RANK"])
    os.environ["IDLA_DEVICE"] = devices[rank]
    on_gpu = devices[rank].startswith("cuda")
    torch.set_num_threads(1 if on_gpu else cpu_threads)
    job = WORKLOADS[workload]
    train_set, _ = job.split(0)
    torch.manual_seed(0)
    model = job.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    mixed = len({d.split(":")[0] for d in devices}) > 1  # a GPU's and a CPU's Adam round apart
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=job.global_batch_size, replica_check="tolerance" if mixed else "exact"))

    def synchronize() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    done, epoch, start = 0, 0, 0.0
    while done < warmup + steps:
        for x, y in agent.batches(epoch):
            if done == warmup:
                synchronize()
                start = time.perf_counter()
            agent.backward(job.loss(model, x, y))
            optimizer.step()
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    synchronize()
    elapsed_s = time.perf_counter() - start
    history = agent.report()["history"]
    agent.close()
    if rank != 0:
        return {}
    timed = history["shares"][-steps:]
    compute = history["compute_s"][-steps:]
    return {
        "samples_per_s": sum(sum(s) for s in timed) / elapsed_s,
        "fleet": agent.group.describe_fleet(),
        "shares": timed[-1],
        "compute_ms": [round(1e3 * statistics.median(c), 2) for c in zip(*compute, strict=True)],
        "staged_ops": agent.group.staged_ops,
    }


def measure(workload: str, warmup: int, steps: int, cpu_threads: int,
            timeout_s: float) -> dict[str, float]:
    """Every job of `workload`; returns samples/s by job (those that finished)."""
    from idla.runtime.launch import launch_local

    rates: dict[str, float] = {}
    for name, devices in JOBS.items():
        key = f"throughput_{workload}_{name}"
        started = time.perf_counter()
        try:
            result = launch_local(throughput_worker,
                                  (workload, devices, warmup, steps, cpu_threads),
                                  len(devices), timeout_s=timeout_s)[0]
        except Exception as error:  # one failed job must not hide the others' numbers
            say("FAIL", key, f"{type(error).__name__}: {' '.join(str(error).split())[-400:]}")
            continue
        rates[name] = result["samples_per_s"]
        say("NUM", key, f"{result['samples_per_s']:.0f} samples/s ({result['fleet']}; final "
                        f"shares {result['shares']}; median compute ms per rank "
                        f"{result['compute_ms']}; staged ops {result['staged_ops']}; "
                        f"{time.perf_counter() - started:.0f} s with start-up)")
    if len(rates) == len(JOBS):
        ideal = rates["gpu_alone"] + rates["cpu_alone"]
        ratio = rates["mixed"] / ideal
        say("NUM", f"throughput_{workload}_ratio",
            f"{ratio:.3f} = mixed {rates['mixed']:.0f} / (gpu_alone {rates['gpu_alone']:.0f} "
            f"+ cpu_alone {rates['cpu_alone']:.0f}) samples/s; target >= 0.9 "
            f"({'met' if ratio >= 0.9 else 'not met'}); mixed / gpu_alone "
            f"{rates['mixed'] / rates['gpu_alone']:.3f}")
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="digits,resnet",
                        help="comma-separated names from idla.demo.workloads")
    parser.add_argument("--warmup", type=int, default=15, help="steps before the clock starts")
    parser.add_argument("--steps", type=int, default=45, help="timed steps")
    parser.add_argument("--cpu-threads", type=int, default=4, help="torch threads per CPU rank")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per job")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        say("SKIP", "measure", "no CUDA device visible to this torch")
        return 0
    for workload in args.workloads.split(","):
        measure(workload.strip(), args.warmup, args.steps, args.cpu_threads, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
