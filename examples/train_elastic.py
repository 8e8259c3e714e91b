"""A user's elastic training script: the survivors of a lost worker go on without a restart.

    python examples/train_elastic.py
    # one torchrun agent per host (here 3 on one machine), each with one worker:
    torchrun --nnodes 1:3 --nproc-per-node 1 --rdzv-backend c10d \
        --rdzv-endpoint HOST0:29400 --rdzv-id job1 --max-restarts 0 examples/train_elastic.py

Each survivor prints one JSON line: its member id, the world it finished in, the failures it saw.
`IDLA_FAULTS=kill:2@5` makes member 2 kill itself (SIGKILL) before step 5, to try it out.
Set `IDLA_JOB_SECRET` (the same on every host) so that only holders of it can join the job.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import idla
from idla.demo import DigitsCNN, accuracy, load_digits_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    train_set, test_set = load_digits_split(seed=args.seed)
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def train(agent: idla.Agent, state: idla.ElasticState) -> None:
        for x, y in state.batches(args.epochs):  # continues at the committed cursor
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            state.commit()  # the in-memory commit a re-formed group starts from

    report = idla.run_elastic(
        train, model, optimizer, train_set, idla.AgentConfig(global_batch_size=args.global_batch)
    )
    print(json.dumps({
        "member": report.member, "world_size": report.world_size, "steps": report.state.step,
        "steps_lost": sum(e.steps_lost for e in report.events),
        "lost_members": sorted({m for e in report.events for m in e.lost_members}),
        "test_accuracy": accuracy(model, test_set, next(model.parameters()).device),
    }))


if __name__ == "__main__":
    main()
