"""One worker of a small elastic job, run as its own process (``python leave_worker.py OUT``),
the way a scheduler starts workers: RANK, WORLD_SIZE and IDLA_RENDEZVOUS in its environment
(IDLA_JOIN=1 for a newcomer). It writes its report, with every sample it trained on, to OUT.

Each sample carries its index in its last input column, so the test can check that the union
of what all workers trained on covers each sample exactly once per epoch. Settings:
LEAVE_EPOCHS, LEAVE_PACE_S (a sleep per step, so that a stop arrives mid-run) and
LEAVE_AWAIT_JOIN=STEP (before that step every founder waits until a newcomer has asked to
join, so that a grow happens at a known point of the run).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from idla.agent import Agent, AgentConfig, parameter_digest
from idla.agent.elastic import ElasticState, run_elastic
from idla.elastic.membership import ElasticConfig, store_prefix
from idla.elastic.rendezvous import open_store

SAMPLES, FEATURES, GLOBAL_BATCH = 240, 4, 24


def dataset() -> list[torch.Tensor]:
    """(SAMPLES, FEATURES + 1) inputs whose last column is the sample's index, and labels."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    index = torch.arange(SAMPLES, dtype=torch.float32).unsqueeze(1)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return [torch.cat([x, index], dim=1), y]


def check_every_sample_once_per_epoch(reports: list[dict[str, Any]], epochs: int) -> None:
    """Union of what all workers trained on, per committed step: exactly the global batches,
    so every sample once per epoch (none skipped, none repeated)."""
    per_step: dict[int, list[int]] = {}
    for report in reports:
        for step, *indices in report["trained"]:
            per_step.setdefault(step, []).extend(indices)
    steps_per_epoch = -(-SAMPLES // GLOBAL_BATCH)
    assert sorted(per_step) == list(range(epochs * steps_per_epoch))
    for epoch in range(epochs):
        seen = [i for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
                for i in per_step[s]]
        assert sorted(seen) == list(range(SAMPLES))


def _await_join(deadline_s: float = 60.0) -> None:
    store = open_store(os.environ["IDLA_RENDEZVOUS"], deadline_s)
    key = f"{store_prefix()}/join/count"
    end = time.monotonic() + deadline_s
    while int(store.add(key, 0)) == 0 and time.monotonic() < end:
        time.sleep(0.05)


def main(out: str) -> None:
    torch.set_num_threads(1)
    epochs = int(os.environ.get("LEAVE_EPOCHS", "3"))
    pace_s = float(os.environ.get("LEAVE_PACE_S", "0"))
    await_join = int(os.environ.get("LEAVE_AWAIT_JOIN", "-1"))
    founder = os.environ.get("IDLA_JOIN") != "1"
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trained: list[list[int]] = []  # [step, index, index, ...] per committed step

    def train(agent: Agent, state: ElasticState) -> None:
        for x, y in state.batches(epochs):
            if founder and state.step == await_join:
                _await_join()
            agent.backward(F.cross_entropy(model(x[:, :FEATURES]), y))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = state.step
            state.commit()
            trained.append([step, *(int(i) for i in x[:, FEATURES].tolist())])
            time.sleep(pace_s)

    report = run_elastic(train, model, optimizer, dataset(),
                         AgentConfig(global_batch_size=GLOBAL_BATCH),
                         ElasticConfig(collective_timeout_s=20.0))
    result: dict[str, Any] = report.as_dict()
    result.pop("agent")
    result.update(param_digest=parameter_digest(model), trained=trained, pid=os.getpid())
    path = Path(out)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result))
    temporary.replace(path)


if __name__ == "__main__":
    main(sys.argv[1])
