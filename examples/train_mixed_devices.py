"""GPU and CPU workers in one job: the case idla is for.

On a box with one GPU and some spare cores, start one process more than there are GPUs:

    torchrun --nproc-per-node 3 examples/train_mixed_devices.py

Rank 0 computes on cuda:0, ranks 1 and 2 on the CPU (each rank's own choice: a GPU no lower
rank of its host took, else the CPU; IDLA_DEVICE=cpu|cuda:N pins it). Because not every
rank has a GPU, all ranks agree on gloo for the data plane; the GPU rank stages its gradients
through pinned host buffers. The planner measures every rank and gives each the share of the
global batch it finishes in time, so the GPU is not held back to the CPUs' speed, and the
result is the model one process would train on the whole global batch. The replica check
compares the GPU's and the CPUs' parameters with a tolerance
(``AgentConfig.replica_check="tolerance"``): their optimizer arithmetic rounds differently.

Without a GPU every rank is a CPU rank and the script runs all the same. Rank 0 prints one
JSON line: every rank's device, the backend, the final shares and the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import idla
from idla.demo import DigitsCNN, accuracy, load_digits_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    train_set, test_set = load_digits_split(seed=args.seed)
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    group = idla.Group()  # chooses this rank's device; all ranks agree on the backend
    mixed = len({report.device.split(":")[0] for report in group.fleet}) > 1
    config = idla.AgentConfig(global_batch_size=args.global_batch,
                              replica_check="tolerance" if mixed else "exact")
    agent = idla.Agent(model, optimizer, train_set, config=config, group=group)

    start_s = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y in agent.batches(epoch):  # x, y on this rank's device
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
    elapsed_s = time.perf_counter() - start_s

    agent.close()
    if agent.rank == 0:
        print(json.dumps({
            "fleet": group.describe_fleet(),
            "steps": agent.step,
            "shares": agent.shares,
            "samples_per_s": agent.step * args.global_batch / elapsed_s,
            "test_accuracy": accuracy(model, test_set, group.device),
        }))


if __name__ == "__main__":
    main()
