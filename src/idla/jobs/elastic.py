"""`idla train --elastic`: the demo job, surviving lost workers (see idla/agent/elastic.py)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from idla.agent import Agent, parameter_digest
from idla.agent.elastic import ElasticState, run_elastic
from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.elastic.membership import ElasticConfig, FailureEvent
from idla.jobs.train import TrainConfig
from idla.runtime.launch import report_progress


def elastic_worker(config: TrainConfig, elastic: ElasticConfig | None = None) -> dict[str, Any]:
    """One worker of the elastic demo; every survivor returns its report (any may be lost)."""
    torch.set_num_threads(config.threads)
    train_set, test_set = load_digits_split(seed=config.agent.seed)
    torch.manual_seed(config.agent.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    def train(agent: Agent, state: ElasticState) -> None:
        steps = config.epochs * agent.sampler.steps_per_epoch()
        for x, y in state.batches(config.epochs):
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            state.commit()
            if agent.rank == 0:
                report_progress({"step": state.step, "steps": steps, "shares": agent.shares,
                                 "loss": agent.history["loss"][-1], "time": time.time()})

    member = int(os.environ.get("RANK", "0"))

    def on_event(event: FailureEvent) -> None:
        if event.members and event.members[0] == member:  # one survivor tells the launcher
            report_progress({"event": event.as_dict()})

    start = time.perf_counter()
    report = run_elastic(train, model, optimizer, train_set, config.agent, elastic,
                         on_event=on_event)
    elapsed_s = time.perf_counter() - start
    result = report.as_dict()
    result.update(
        test_accuracy=accuracy(model, test_set, next(model.parameters()).device),
        elapsed_s=elapsed_s, config=config.as_dict(),
        param_digest=parameter_digest(model),
    )
    return result


def launch_elastic(config: TrainConfig, speeds: list[float] | None, faults: str) -> int:
    """`idla train --elastic`: run the workers, print who was lost and how the run ended."""
    from idla.elastic.faults import parse_faults
    from idla.report import write_json_atomic
    from idla.runtime.launch import launch_local

    parse_faults(faults)  # a clear error before any worker starts

    def on_progress(message: dict[str, Any]) -> None:
        if "event" in message:
            event = message["event"]
            if event["lost_members"]:
                change = f"lost worker(s) {event['lost_members']}: {event['error'][:80]}"
            elif event.get("left_members"):
                change = f"worker(s) {event['left_members']} left"
            else:
                change = f"worker(s) {event['joined_members']} joined"
            print(f"{change}; re-formed as {event['members']} in "
                  f"{event['declared_at'] - event['failed_at']:.1f} s", flush=True)

    results = launch_local(elastic_worker, (config,), config.workers, speeds, config.base_cores,
                           env={"IDLA_FAULTS": faults}, allow_lost=True, on_progress=on_progress)
    survivors = [r for r in results if r and "lost" not in r and not r.get("left")]
    if not survivors:
        print("no worker finished", flush=True)
        return 1
    report = survivors[0]
    print(f"finished {report['step']} steps on {report['world_size']} of {config.workers} "
          f"workers; steps lost {report['steps_lost']}; test accuracy "
          f"{100 * report['test_accuracy']:.2f}%; {report['elapsed_s']:.1f} s")
    if config.out:
        from pathlib import Path

        Path(config.out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(config.out) / "report.json", report)
    return 0
