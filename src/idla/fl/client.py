"""What one virtual federated client does: local SGD from the global weights on its own data.

The same code runs in idla's simulation workers, in the Flower baseline of ``idla bench fl`` and
in ``examples/flower_app.py``, so every runner trains identically. The default model is a small
MLP (64 → 32 → 10, 2,410 parameters): with ~14 samples per client at 100 clients, a client's
work is a few SGD steps, so round time measures the federated machinery rather than a CNN. The
demo CNN (``idla.demo.DigitsCNN``, ~150k parameters) is available as ``model="cnn"``.

Determinism: the batch order depends only on ``client_seed(seed, client_id, round)``, and the
model starts from the global weights, so a client's result is a function of (global weights,
client, round, seed) whichever process runs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from idla.demo import MLP, DigitsCNN
from idla.errors import ConfigError
from idla.fl.attacks import Attack, attack_update, flip_labels

MODEL_KINDS = ("mlp", "cnn")
NUM_CLASSES = 10


def build_model(kind: str, seed: int) -> nn.Module:
    """The model of a run, initialised from ``seed`` (the server's starting weights)."""
    if kind not in MODEL_KINDS:
        raise ConfigError(f"--model: unknown model {kind!r}; choose {'|'.join(MODEL_KINDS)}")
    torch.manual_seed(seed)
    if kind == "cnn":
        return DigitsCNN()
    return MLP(hidden=32, layers=1, classes=NUM_CLASSES)


def model_arrays(model: nn.Module) -> list[np.ndarray]:
    """The model's parameters as float32 numpy copies, in ``model.parameters()`` order."""
    return [p.detach().cpu().numpy().astype(np.float32, copy=True) for p in model.parameters()]


@torch.no_grad()
def load_arrays(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Copy ``arrays`` into the model's parameters; ValueError on a count or shape mismatch."""
    params = list(model.parameters())
    if len(arrays) != len(params):
        raise ValueError(f"{len(arrays)} arrays for a model with {len(params)} parameters")
    for index, (param, array) in enumerate(zip(params, arrays, strict=True)):
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(f"array {index}: shape {array.shape}, expected {tuple(param.shape)}")
        param.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains in one round."""

    local_epochs: int = 3
    """Passes over the client's own samples."""
    batch_size: int = 8
    """Samples per SGD step."""
    lr: float = 0.3
    """Plain SGD learning rate."""
    proximal_mu: float = 0.0
    """FedProx μ: adds μ/2·‖w − w_global‖² to the loss when > 0."""
    work_fraction: float = 1.0
    """Share of the local SGD steps to do (a straggler's partial solution, FedProx), in (0, 1];
    at least one step is always taken."""


@dataclass(frozen=True)
class LocalResult:
    """A client's answer: its new weights, how many samples it trained on, and its cost."""

    arrays: list[np.ndarray]
    num_samples: int
    compute_s: float
    """CPU seconds of this thread spent training (``time.thread_time``): with one torch thread
    this is the work itself, unaffected by other processes competing for the cores."""
    loss: float
    """Mean training loss over the last local epoch."""


def client_seed(seed: int, client_id: int, round_index: int) -> int:
    """A 63-bit seed for (run seed, client, round), stable across processes and runners."""
    state = np.random.SeedSequence([seed, client_id, round_index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def train_local(
    model: nn.Module,
    global_arrays: Sequence[np.ndarray],
    images: torch.Tensor,  # (n, 1, 8, 8)
    labels: torch.Tensor,  # (n,)
    training: LocalTraining,
    seed: int,
) -> LocalResult:
    """Local SGD from the global weights (FedAvg's ClientUpdate, McMahan et al. 2017), with the
    FedProx proximal term μ/2·‖w − w_global‖² (Li et al. 2020) when μ > 0.

    Cost: local_epochs × n samples of forward + backward; the proximal term adds O(P) per step.
    """
    start_s = time.thread_time()
    load_arrays(model, global_arrays)
    model.train()
    params = list(model.parameters())
    mu = training.proximal_mu
    anchors = [p.detach().clone() for p in params] if mu > 0 else []
    generator = torch.Generator().manual_seed(seed)
    num_samples = int(labels.shape[0])
    steps_per_epoch = math.ceil(num_samples / training.batch_size)
    steps_left = max(1, math.ceil(training.work_fraction * training.local_epochs * steps_per_epoch))
    epoch_loss = 0.0
    for _ in range(training.local_epochs):
        order = torch.randperm(num_samples, generator=generator)
        total, seen = 0.0, 0
        for begin in range(0, num_samples, training.batch_size):
            if steps_left == 0:
                break
            steps_left -= 1
            batch = order[begin : begin + training.batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            total += float(loss.detach()) * int(batch.numel())
            seen += int(batch.numel())
            # Plain SGD by hand: torch.optim's per-step bookkeeping costs more than this tiny
            # model's arithmetic. The proximal term's gradient is μ(w − w_global), exactly.
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
                    if anchors:
                        grad = grad + mu * (param - anchors[index])
                    param.add_(grad, alpha=-training.lr)
        epoch_loss = total / max(seen, 1)
        if steps_left == 0:
            break
    arrays = model_arrays(model)
    return LocalResult(arrays, num_samples, time.thread_time() - start_s, epoch_loss)


def client_update(
    model: nn.Module,
    global_arrays: Sequence[np.ndarray],
    images: torch.Tensor,  # (n, 1, 8, 8)
    labels: torch.Tensor,  # (n,)
    training: LocalTraining,
    seed: int,
    attack: Attack = Attack.NONE,
) -> LocalResult:
    """One client's round: honest local training, then its attack if it is malicious.

    ``labelflip`` trains on labels 9 − y; the weight attacks change the trained weights (see
    ``idla.fl.attacks``) with noise drawn from ``seed``.
    """
    if attack is Attack.LABELFLIP:
        labels = torch.from_numpy(flip_labels(labels.numpy(), NUM_CLASSES))
    result = train_local(model, global_arrays, images, labels, training, seed)
    if attack in (Attack.NONE, Attack.LABELFLIP):
        return result
    rng = np.random.default_rng(seed)
    arrays = attack_update(attack, global_arrays, result.arrays, rng)
    return LocalResult([a.astype(np.float32) for a in arrays], result.num_samples,
                       result.compute_s, result.loss)


@torch.no_grad()
def evaluate_arrays(
    model: nn.Module,
    arrays: Sequence[np.ndarray],
    images: torch.Tensor,  # (n, 1, 8, 8)
    labels: torch.Tensor,  # (n,)
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the weights ``arrays`` on a labelled set."""
    load_arrays(model, arrays)
    model.eval()
    logits = model(images)
    model.train()
    loss = float(F.cross_entropy(logits, labels))
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    return loss, accuracy
