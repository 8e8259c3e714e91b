"""How much fp32 summation order alone moves the ResNet benchmark's held-out accuracy after 60
Adam steps: one process over the global batches of `idla bench hetero --model resnet`, its
gradient summed in 1, 2 or 4 parts, in float32 and float64 (output: resnet_rounding.txt).

Run: .venv/bin/python benchmarks/resnet_rounding.py
"""

import torch

from idla.demo.workloads import WORKLOADS
from idla.runtime.data import GlobalBatchSampler

STEPS, GLOBAL_BATCH, LR = 60, 256, 3e-3  # bench hetero's defaults for --model resnet


def held_out_accuracy(dtype: torch.dtype, parts: int) -> float:
    workload = WORKLOADS["resnet"]
    train, test = workload.split(0)
    torch.manual_seed(0)
    model = workload.model().to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    images, labels = train.tensors
    sampler = GlobalBatchSampler(len(train), GLOBAL_BATCH, 0)
    step, epoch = 0, 0
    while step < STEPS:
        for batch in sampler.epoch(epoch):
            optimizer.zero_grad()
            for part in torch.tensor_split(batch.indices, parts):
                weight = len(part) / batch.size  # the mean over the global batch
                loss = workload.loss(model, images[part].to(dtype), labels[part])
                (loss * weight).backward()
            optimizer.step()
            step += 1
            if step == STEPS:
                break
        epoch += 1
    test_images, test_labels = test.tensors
    with torch.no_grad():
        predicted = model(test_images.to(dtype)).argmax(1)
    return float((predicted == test_labels).float().mean())


if __name__ == "__main__":
    torch.set_num_threads(1)
    for dtype, parts in [(torch.float32, 1), (torch.float32, 2), (torch.float32, 4),
                         (torch.float64, 1), (torch.float64, 4)]:
        print(dtype, parts, held_out_accuracy(dtype, parts), flush=True)
