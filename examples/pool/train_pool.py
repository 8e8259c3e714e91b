"""A training script for the device pool: it uses run_elastic, so the pool can resize it in place.

    idla pool start --emulate-speeds 1,1,0.5,0.25 &
    idla submit examples/pool/finetune.toml

The pool starts one process per device with RANK, WORLD_SIZE, the rendezvous and the job
secret in the environment; a worker it adds later comes with IDLA_JOIN=1 and adopts the
running state; a worker it takes away gets SIGTERM. It runs as a plain script too (one
process). Each worker writes what it saw to ``report-<member>.json`` in its working folder
(the job's run dir under the pool).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import idla
from idla.demo import DigitsCNN, accuracy, load_digits_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--collective-timeout-s", type=float, default=30.0,
                        help="how long a rank waits for a peer: above the slowest device's "
                        "start (a throttled slot imports torch slowly) and step")
    parser.add_argument("--step-s", type=float, default=0.0,
                        help="least seconds a step takes (it sleeps the rest): a slower model")
    args = parser.parse_args()

    torch.set_num_threads(1)
    train_set, test_set = load_digits_split(seed=args.seed)
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    started_s = time.time()

    def train(agent: idla.Agent, state: idla.ElasticState) -> None:
        for x, y in state.batches(args.epochs):  # continues at the committed cursor
            began_s = time.monotonic()
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            time.sleep(max(0.0, args.step_s - (time.monotonic() - began_s)))
            state.commit()

    report = idla.run_elastic(
        train, model, optimizer, train_set, idla.AgentConfig(global_batch_size=args.global_batch),
        idla.ElasticConfig(collective_timeout_s=args.collective_timeout_s))
    summary = {
        "member": report.member, "world_size": report.world_size, "steps": report.state.step,
        "left": report.left,
        "steps_lost": sum(e.steps_lost for e in report.events),
        "committed": [list(c) for c in report.state.committed],
        "joined": os.environ.get("IDLA_JOIN") == "1", "wall_s": time.time() - started_s,
        "generations": len(report.events) + 1,
        "test_accuracy": accuracy(model, test_set, next(model.parameters()).device),
    }
    Path(f"report-{report.member}.json").write_text(json.dumps(summary) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
