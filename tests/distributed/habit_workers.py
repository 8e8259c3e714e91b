"""Worker functions for the habits tests: one training script, run under idla and as one plain
PyTorch process over the same global batches, with one habit switched on at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from idla import Agent, AgentConfig, GradientError
from idla.errors import ConfigError, IdlaError
from idla.plan.topology import Topology
from idla.runtime.data import GlobalBatchSampler, local_slice
from idla.runtime.group import Group

GLOBAL_BATCH = 12
BATCHES = 9  # one epoch; three steps of K = 3 micro-batches
K = 3
LEAF_IDLE, LEAF_BUSY = [12, 0], [9, 3]
"""Shares of "accumulate_leaf_joins_mid_step" (two ranks): each step's first micro-batch
gives rank 1 nothing, the others give it samples, so a leaf joins the exchange mid-step."""
GUARDED = {"zero_grad_none_after_step", "accumulate_zero_grad_none", "accumulate_nan_on_rank_1"}
"""Habits run with the NaN guard (which holds buckets to the end); the others let buckets
start during backward, so a gradient must be in its view before its hook launches it."""
RESHARES = [[7, 5], [4, 8], [12, 0], [1, 11]]
"""Shares of the rebalancing world, moved at the start of every step with the planner on."""
OWN_SHARES = {"accumulate_nan_on_rank_1", "accumulate_leaf_joins_mid_step"}
"""Habits whose reference depends on shares they fix themselves: not run re-shared."""
DDP_HABITS = [
    "plain", "zero_grad_none_before_forward", "zero_grad_none_after_step", "grad_set_to_zeros",
    "unused_everywhere", "unused_on_some_ranks", "unused_on_some_ranks_zero_grad_none",
    "freeze_after_agent", "accumulate", "accumulate_zero_grad_none",
]
"""Habits plain DDP supports at equal shares (with ``find_unused_parameters=True``, as the
spare head needs); DDP cannot unfreeze a parameter after it is wrapped, and
averages a summed loss over ranks instead of summing it."""

HABITS = [
    "plain",
    "zero_grad_none_before_forward",
    "zero_grad_none_after_step",
    "grad_set_to_zeros",
    "unused_everywhere",
    "unused_on_some_ranks",
    "unused_on_some_ranks_zero_grad_none",
    "freeze_after_agent",
    "unfreeze_after_agent",
    "accumulate",
    "accumulate_zero_grad_none",
    "accumulate_nan_on_rank_1",
    "sum_loss",
    "sum_loss_accumulate",
    "accumulate_leaf_joins_mid_step",
]


class Net(nn.Module):
    """A small MLP whose `spare` head runs only on flagged samples (last input column)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.spare = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, use_spare: bool) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        out = self.head(h)
        flagged = x[:, -1] > 0.5
        if use_spare and bool(flagged.any()):
            out = out.clone()
            out[flagged] = out[flagged] + self.spare(h[flagged])
        return out


def _dataset(shares: list[int]) -> TensorDataset:
    """Random inputs; the first sample of rank 0's part of every batch is flagged, so the
    spare head is used on rank 0 and on no other rank."""
    generator = torch.Generator().manual_seed(1)
    size = GLOBAL_BATCH * BATCHES
    x = torch.randn(size, 6, generator=generator, dtype=torch.float64)
    x[:, -1] = 0.0
    for batch in GlobalBatchSampler(size, GLOBAL_BATCH, 0).epoch(0):
        x[int(batch.indices[local_slice(shares, 0)][0]), -1] = 1.0
    y = torch.randint(0, 3, (size,), generator=generator)
    return TensorDataset(x, y)


@dataclass
class Loop:
    """What differs between idla and one process: where batches come from, backward, no_sync
    and what happens when a step begins."""

    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[[torch.Tensor, str], None]
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]]
    begin_step: Callable[[], None]
    rank: int
    set_shares: Callable[[list[int]], None] = lambda _: None
    forward: Callable[..., torch.Tensor] | None = None  # the wrapper, where there is one


def script(habit: str, loop: Loop, model: Net, optimizer: torch.optim.Optimizer) -> None:
    """The user's training script, with `habit` switched on."""
    micro = K if "accumulate" in habit else 1
    reduction = "sum" if "sum_loss" in habit else "mean"
    for i, (x, y) in enumerate(loop.batches):
        if i % micro == 0:
            loop.begin_step()
        if habit in ("zero_grad_none_before_forward", "unused_on_some_ranks_zero_grad_none"):
            optimizer.zero_grad(set_to_none=True)
        if habit == "grad_set_to_zeros":
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        if habit == "freeze_after_agent" and i == 2:
            model.body.requires_grad_(False)
        if habit == "unfreeze_after_agent" and i == 2:
            model.body.requires_grad_(True)
        out = (loop.forward or model)(x, use_spare=habit.startswith("unused_on_some_ranks"))
        loss = F.cross_entropy(out, y, reduction=reduction) / micro
        if habit == "accumulate_nan_on_rank_1" and loop.rank == 1 and i == 1:
            loss = loss * float("nan")
        if (i + 1) % micro:
            with loop.no_sync():
                loop.backward(loss, reduction)
            if habit == "accumulate_leaf_joins_mid_step":
                loop.set_shares(LEAF_BUSY)
            continue
        loop.backward(loss, reduction)
        optimizer.step()
        if habit == "accumulate_leaf_joins_mid_step":
            loop.set_shares(LEAF_IDLE)  # the next step starts with rank 1 idle
        if habit in ("zero_grad_none_after_step", "accumulate_zero_grad_none"):
            optimizer.zero_grad(set_to_none=True)


def _fresh(habit: str) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    if habit == "unfreeze_after_agent":
        model.body.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    return model, optimizer


def _reference_batches(
    habit: str, dataset: TensorDataset, shares: list[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches in order; a step whose rank 1 was non-finite without rank 1."""
    x, y = dataset.tensors
    for i, batch in enumerate(GlobalBatchSampler(len(dataset), GLOBAL_BATCH, 0).epoch(0)):
        indices = batch.indices
        if habit == "accumulate_nan_on_rank_1" and len(shares) > 1 and i < K:
            indices = indices[local_slice(shares, 0)]
        yield x[indices], y[indices]


def _reference(habit: str, dataset: TensorDataset, shares: list[int]) -> Net:
    model, optimizer = _fresh(habit)
    loop = Loop(_reference_batches(habit, dataset, shares),
                backward=lambda loss, _: loss.backward(), no_sync=contextlib.nullcontext,
                begin_step=lambda: optimizer.zero_grad(set_to_none=False), rank=0)
    script(habit, loop, model, optimizer)
    return model


def _idla_loop(agent: Agent) -> Loop:
    return Loop(agent.batches(0), backward=agent.backward,  # type: ignore[arg-type]
                no_sync=agent.no_sync, begin_step=lambda: None, rank=agent.rank)


def _ddp_loop(habit: str, dataset: TensorDataset, world: int) -> Net:
    """The same script under plain DDP, each rank on its equal part of every global batch."""
    model, optimizer = _fresh(habit)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # `spare` may idle
    rank = dist.get_rank()
    x, y = dataset.tensors
    part = local_slice([GLOBAL_BATCH // world] * world, rank)
    batches = ((x[b.indices[part]], y[b.indices[part]])
               for b in GlobalBatchSampler(len(dataset), GLOBAL_BATCH, 0).epoch(0))
    loop = Loop(batches, backward=lambda loss, _: loss.backward(), no_sync=ddp.no_sync,
                begin_step=lambda: optimizer.zero_grad(set_to_none=False), rank=rank,
                forward=ddp)
    script(habit, loop, model, optimizer)
    return model


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_habits(
    habits: list[str], shares: list[int] | None, leaves: dict[int, int] | None = None,
    fp16: bool = False, reshare: bool = False,
) -> dict[str, Any]:
    """Every habit under idla (fixed `shares`, None: equal; `leaves`: leaf -> hub) against
    one process; rank 0 returns the largest parameter difference per habit, every rank its
    parameters. `fp16`: also `fp16_zero_grad`'s check, under "fp16". `reshare`: the planner
    on and the shares moved at every step (`RESHARES`). At equal shares also plain DDP's
    result, for the habits DDP supports ("ddp_max_abs_diff")."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    owner = Group()
    world = owner.world_size
    plan = shares or [GLOBAL_BATCH // world] * world
    dataset = _dataset(plan)
    out: dict[str, Any] = {}
    for habit in habits:
        if reshare and habit in OWN_SHARES:
            continue
        model, optimizer = _fresh(habit)
        joins = habit == "accumulate_leaf_joins_mid_step" and world == 2
        agent = Agent(model, optimizer, dataset, group=Group(), config=AgentConfig(
            global_batch_size=GLOBAL_BATCH, initial_shares=LEAF_IDLE if joins else plan,
            rebalance=reshare, check_every_steps=2, bucket_cap_bytes=128,
            nan_guard=habit in GUARDED))
        if leaves:
            core = tuple(r for r in range(world) if r not in leaves)
            agent.set_topology(Topology(world, core, leaves))
        loop = _idla_loop(agent)
        if joins:
            loop.set_shares = lambda new, agent=agent: setattr(agent, "shares", new)
        if reshare:
            loop.begin_step = lambda agent=agent: setattr(
                agent, "shares", RESHARES[agent.step % len(RESHARES)])
        script(habit, loop, model, optimizer)
        agent.close()
        reference = _reference(habit, dataset, plan)
        out[habit] = {
            "max_abs_diff": float((_flat(model) - _flat(reference)).abs().max()),
            "params": _flat(model).tolist(),
            "steps": agent.step,
            "shares": [list(s) for s in agent.history["shares"]],
            "nonfinite_steps": list(agent.nonfinite_steps),
        }
        if shares is None and world > 1 and habit in DDP_HABITS:
            ddp = _ddp_loop(habit, dataset, world)
            out[habit]["ddp_max_abs_diff"] = float((_flat(model) - _flat(ddp)).abs().max())
    if fp16:
        out["fp16"] = fp16_zero_grad(shares or plan)
    owner.close()
    return out


def fp16_zero_grad(shares: list[int]) -> dict[str, Any]:
    """The fp16 codec (float32) with ``zero_grad(set_to_none=True)`` before forward gives bit
    for bit the parameters it gives without it."""
    dataset = _dataset(shares)
    dataset = TensorDataset(dataset.tensors[0].float(), dataset.tensors[1])
    params = {}
    for habit in ("plain", "zero_grad_none_before_forward"):
        model, optimizer = _fresh(habit)
        model.float()
        agent = Agent(model, optimizer, dataset, group=Group(), config=AgentConfig(
            global_batch_size=GLOBAL_BATCH, compress="fp16", min_compress_numel=16,
            initial_shares=shares, rebalance=False))  # measured shares would differ per run
        loop = _idla_loop(agent)
        script(habit, loop, model, optimizer)
        agent.close()
        params[habit] = _flat(model)
    return {"equal": torch.equal(params["plain"], params["zero_grad_none_before_forward"])}


COMPRESSED_HABITS = ["accumulate", "accumulate_zero_grad_none", "zero_grad_none_before_forward",
                     "unused_on_some_ranks", "freeze_after_agent", "unfreeze_after_agent"]
"""Habits run through the lossy exchanges (float32: codecs take fp32 gradients)."""


def compressed_habits(codecs: list[str], shares: list[int]) -> dict[str, Any]:
    """Each habit in `COMPRESSED_HABITS` through each codec at fixed `shares` (every tensor
    compressed); per case this rank's parameters, and on rank 0 the largest difference from
    one float32 process over the same global batches, relative to the largest parameter."""
    torch.set_num_threads(1)
    owner = Group()  # one process group for every agent below
    dataset = _dataset(shares)
    dataset = TensorDataset(dataset.tensors[0].float(), dataset.tensors[1])
    out: dict[str, Any] = {}
    for codec in codecs:
        for habit in COMPRESSED_HABITS:
            model, optimizer = _fresh(habit)
            model.float()
            agent = Agent(model, optimizer, dataset, group=Group(), config=AgentConfig(
                global_batch_size=GLOBAL_BATCH, compress=codec, min_compress_numel=16,
                initial_shares=shares, rebalance=False, check_every_steps=1))
            script(habit, _idla_loop(agent), model, optimizer)
            agent.close()
            reference = _reference(habit, dataset, shares)
            scale = float(_flat(reference).abs().max())
            out[f"{codec}/{habit}"] = {
                "params": _flat(model).tolist(), "steps": agent.step,
                "relative_diff": float((_flat(model) - _flat(reference)).abs().max()) / scale,
            }
    owner.close()
    return out


def trainable_mismatch() -> dict[str, Any]:
    """Rank 1 freezes a layer the other ranks keep training: every rank must stop."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dataset = _dataset([GLOBAL_BATCH // 2] * 2)
    model, optimizer = _fresh("plain")
    agent = Agent(model, optimizer, dataset, global_batch_size=GLOBAL_BATCH)
    for i, (x, y) in enumerate(agent.batches(0)):
        if i == 1 and agent.rank == 1:
            model.head.requires_grad_(False)
        agent.backward(F.cross_entropy(model(x, use_spare=False), y))
        optimizer.step()
    agent.close()
    return {}


def trainable_mismatch_error() -> str:
    """`trainable_mismatch` with its error caught: this rank's message ("" if it went on)."""
    try:
        trainable_mismatch()
    except IdlaError as error:
        return f"{type(error).__name__}: {error}"
    return ""


def local_errors() -> dict[str, str]:
    """One process: the mistakes that must fail loudly, each with its message."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dataset = _dataset([GLOBAL_BATCH])
    messages: dict[str, str] = {}
    cases: dict[str, Callable[[Agent, Net, torch.optim.Optimizer, torch.Tensor], None]] = {
        "bad_reduction": lambda agent, _, __, loss: agent.backward(loss, "none"),  # type: ignore
        "foreign_grad_with_values": _foreign_grad,
        "step_inside_window": _step_inside_window,
    }
    for name, case in cases.items():
        model, optimizer = _fresh("plain")
        agent = Agent(model, optimizer, dataset, global_batch_size=GLOBAL_BATCH)
        try:
            for x, y in agent.batches(0):
                case(agent, model, optimizer, F.cross_entropy(model(x, use_spare=False), y))
                break
        except (GradientError, ConfigError) as error:
            messages[name] = f"{type(error).__name__}: {error}"
        agent.close()
    return messages


def _foreign_grad(agent: Agent, model: Net, _: torch.optim.Optimizer,
                  loss: torch.Tensor) -> None:
    model.head.weight.grad = torch.ones_like(model.head.weight)
    agent.backward(loss)


def _step_inside_window(agent: Agent, _: Net, optimizer: torch.optim.Optimizer,
                        loss: torch.Tensor) -> None:
    with agent.no_sync():
        agent.backward(loss)
    optimizer.step()

