"""A user's own training script: runs as one process or under torchrun, unchanged.

    python examples/train_torchrun.py
    torchrun --nproc-per-node 3 examples/train_torchrun.py --epochs 5

gloo on CPU, nccl when every rank has a GPU of its own, chosen automatically (a GPU and CPU
ranks together: examples/train_mixed_devices.py). Rank 0 prints the test accuracy and shares.
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
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    train_set, test_set = load_digits_split(seed=args.seed)
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    agent = idla.Agent(model, optimizer, train_set, global_batch_size=args.global_batch)

    for epoch in range(args.epochs):
        for x, y in agent.batches(epoch):
            loss = F.cross_entropy(model(x), y)  # the mean over this rank's share
            agent.backward(loss)
            optimizer.step()

    agent.close()  # checks that every replica holds the same parameters
    if agent.rank == 0:
        result = {
            "world_size": agent.world_size,
            "steps": agent.step,
            "shares": agent.shares,
            "test_accuracy": accuracy(model, test_set, agent.group.device),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
