"""The training job of `idla bench pool`'s live part: a benchmark workload (`idla.demo.workloads`:
the digits CNN, whose step is mostly fixed costs, or the small ResNet, mostly compute) under
`run_elastic`, so the pool can resize it in place, written like a user's script (as
`examples/pool/train_pool.py`).

The pool runs it as a plain script on each device it gives the job (``RANK``, ``WORLD_SIZE``,
the rendezvous and the job secret in the environment; ``IDLA_JOIN=1`` for a worker added
later; SIGTERM for one taken away). Each worker writes ``report-<member>-<pid>.json`` into
its working folder (the job's run dir; a job restarted after a preemption meets in a new
rendezvous, named in the report, with member ids from 0 again): the elastic report
(`ElasticReport.as_dict`: the step it ended at, every re-form with the steps it lost, the
committed batches) and its wall time, so that the bench reads what each resize cost from the
job itself. Cost: the training, plus one small JSON file per worker at its end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from idla.agent import Agent, AgentConfig, ElasticState, run_elastic
from idla.demo.workloads import WORKLOADS
from idla.elastic.membership import ElasticConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--global-batch", type=int, default=None,
                        help="samples per step (default: the workload's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--collective-timeout-s", type=float, default=60.0,
                        help="how long a collective (the group's first one too) waits for a "
                        "peer: a worker on a slow emulated device imports torch in tens of s")
    args = parser.parse_args()

    torch.set_num_threads(1)
    workload = WORKLOADS[args.model]
    train_set, _ = workload.split(args.seed)
    torch.manual_seed(args.seed)
    model = workload.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    started_s = time.time()

    def train(agent: Agent, state: ElasticState) -> None:
        for x, y in state.batches(args.epochs):
            agent.backward(workload.loss(model, x, y))
            optimizer.step()
            state.commit()

    report = run_elastic(
        train, model, optimizer, train_set, AgentConfig(
            global_batch_size=args.global_batch or workload.global_batch_size),
        ElasticConfig(collective_timeout_s=args.collective_timeout_s))
    row = report.as_dict()
    del row["agent"]  # per-step statistics: large, and not what the bench reads
    row.update(joined=os.environ.get("IDLA_JOIN") == "1", started_s=started_s,
               ended_s=time.time(), rendezvous=os.environ.get("IDLA_RENDEZVOUS", ""))
    path = Path(f"report-{report.member}-{os.getpid()}.json")  # a restart reuses member ids
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(row) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
