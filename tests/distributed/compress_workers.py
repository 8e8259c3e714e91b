"""Worker functions for the compression tests (real processes over gloo)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from idla import Agent, AgentConfig
from idla.agent.replicas import parameter_digest
from idla.runtime.data import GlobalBatchSampler
from tests.distributed.workers import _digits_pair, _optimizer, param_hash


def compressed_steps(
    codec: str, shares: list[int], steps: int, error_feedback: bool, min_numel: int
) -> dict[str, Any]:
    """Train the demo CNN with fixed uneven shares through a codec; report the parameter
    hash, the compression report and whether the first step matched a single process."""
    train_set, model, reference, optimizer = _digits_pair("sgd")
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=sum(shares), initial_shares=shares, rebalance=False,
        compress=codec, error_feedback=error_feedback, min_compress_numel=min_numel,
        check_every_steps=2))
    first_grads: list[torch.Tensor] = []
    epoch = 0
    while agent.step < steps:
        for x, y in agent.batches(epoch):
            agent.backward(F.cross_entropy(model(x), y))
            if agent.step == 1:
                first_grads = [p.grad.detach().clone() for p in model.parameters()]
            optimizer.step()
            if agent.step == steps:
                break
        epoch += 1
    agent.close()
    result = {"hash": param_hash(model), "report": agent.report()["compression"]}
    if agent.rank == 0:
        batch = GlobalBatchSampler(len(train_set), sum(shares), 0).epoch(0)[0].indices
        images, labels = train_set.tensors
        _optimizer("sgd", reference)
        F.cross_entropy(reference(images[batch]), labels[batch]).backward()
        result["first_step_max_diff"] = max(
            float((g - p.grad).abs().max())
            for g, p in zip(first_grads, reference.parameters(), strict=True))
        result["grad_scale"] = max(float(p.grad.abs().max()) for p in reference.parameters())
    return result


def auto_choice(steps: int) -> dict[str, Any]:
    """`compress="auto"` over loopback: which codec it chose and why, identical everywhere."""
    train_set, model, _, optimizer = _digits_pair("adam")
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=128, compress="auto"))
    epoch = 0
    while agent.step < steps:
        for x, y in agent.batches(epoch):
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            if agent.step == steps:
                break
        epoch += 1
    agent.close()
    return {"hash": param_hash(model), "report": agent.report()["compression"]}


def half_precision_steps(codec: str, dtype_name: str, steps: int) -> dict[str, Any]:
    """Train the demo CNN in `dtype_name` ("bfloat16", "float16", "float32") through `codec`
    on uneven shares, from the float32 initialisation rounded to bf16 (so every dtype starts
    from the same values); return the replica digest and the gradient dtype, and on rank 0 the
    parameters (float64) and the loss on the whole training set before and after."""
    dtype = getattr(torch, dtype_name)
    train_set, model, _, _ = _digits_pair("sgd")
    model.to(torch.bfloat16).to(dtype)
    images, labels = train_set.tensors
    with torch.no_grad():
        initial_loss = float(F.cross_entropy(model(images.to(dtype)).float(), labels))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    agent = Agent(model, optimizer, train_set, config=AgentConfig(
        global_batch_size=64, initial_shares=[40, 24], rebalance=False, compress=codec,
        min_compress_numel=256, check_every_steps=2))
    grad_dtypes: set[str] = set()
    epoch = 0
    while agent.step < steps:
        for x, y in agent.batches(epoch):
            agent.backward(F.cross_entropy(model(x.to(dtype)).float(), y))
            grad_dtypes |= {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}
            optimizer.step()
            if agent.step == steps:
                break
        epoch += 1
    agent.close()  # checks the replicas one last time: bit-identical, or it raises
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    result: dict[str, Any] = {"digest": parameter_digest(model), "grad_dtypes": grad_dtypes,
                              "payload_bytes": agent.report()["compression"].get(
                                  "payload_bytes_per_step")}
    if agent.rank == 0:
        with torch.no_grad():
            result["loss"] = float(F.cross_entropy(model(images.to(dtype)).float(), labels))
        result["initial_loss"] = initial_loss
        result["params"] = flat.numpy()  # numpy: a tensor would travel by shared memory
    return result
