"""How much fp32 summation order alone moves the ResNet benchmark's held-out accuracy after 60
Adam steps: one process over the global batches of `idla bench hetero --model resnet`, its
gradient summed in 1, 2 or 4 parts, in float32 and float64 (output: resnet_rounding.txt).

Run: .venv/bin/python benchmarks/resnet_rounding.py
"""
import torch

from idla.demo.workloads import WORKLOADS
from idla.runtime.data import GlobalBatchSampler
torch.set_num_threads(1)
w = WORKLOADS["resnet"]
train, test = w.split(0)
def run(dtype, parts):
    torch.manual_seed(0)
    model = w.model().to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_all, y_all = train.tensors
    sampler = GlobalBatchSampler(len(train), 256, 0)
    step, epoch = 0, 0
    while step < 60:
        for b in sampler.epoch(epoch):
            opt.zero_grad()
            idx = b.indices
            cuts = torch.tensor_split(idx, parts)
            for c in cuts:
                if len(c) == 0: continue
                (w.loss(model, x_all[c].to(dtype), y_all[c]) * (len(c) / len(idx))).backward()
            opt.step(); step += 1
            if step == 60: break
        epoch += 1
    xt, yt = test.tensors
    with torch.no_grad():
        return float((model(xt.to(dtype)).argmax(1) == yt).float().mean())
for dtype, parts in [(torch.float32, 1), (torch.float32, 2), (torch.float32, 4), (torch.float64, 1), (torch.float64, 4)]:
    print(dtype, parts, run(dtype, parts), flush=True)
