"""Worker functions for the data-pipeline tests: a user's DataLoader (dict samples of variable
length, a padding collate_fn, worker processes) under idla against one plain process over the
same global batches."""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from idla import Agent, AgentConfig
from idla.errors import ConfigError
from idla.runtime.data import GlobalBatchSampler
from idla.runtime.group import Group

SIZE = 62  # samples: 6 global batches an epoch, the last of 2
GLOBAL_BATCH = 12
EPOCHS = 2
K = 2  # micro-batches per step in "accumulate"
CASES: dict[str, dict[str, Any]] = {
    "uneven": {"shares": [9, 3], "rebalance": False, "persistent": True},
    "rank_1_idle": {"shares": [12, 0], "rebalance": False},
    "rebalance": {"shares": None, "rebalance": True, "slow_rank_1_s_per_sample": 0.004,
                  "persistent": True},
    "accumulate": {"shares": [4, 8], "rebalance": False, "micro": K},
    "custom_batch": {"shares": [7, 5], "rebalance": False, "batch_object": True},
}


class Tokens(Dataset):
    """Sample i: 1 + i % 5 random tokens, a dense feature and a label, as a dict."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.tokens = [torch.randn(1 + i % 5, dtype=torch.float64, generator=generator)
                       for i in range(SIZE)]
        self.dense = torch.randn(SIZE, dtype=torch.float64, generator=generator)
        self.labels = torch.randint(0, 3, (SIZE,), generator=generator)

    def __len__(self) -> int:
        return SIZE

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": self.tokens[index], "dense": self.dense[index],
                "label": self.labels[index], "id": index}


def pad(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The user's collate: pad the tokens, keep the lengths and the ids."""
    return {
        "tokens": nn.utils.rnn.pad_sequence([i["tokens"] for i in items], batch_first=True),
        "lengths": torch.tensor([len(i["tokens"]) for i in items]),
        "dense": torch.stack([i["dense"] for i in items]),
        "label": torch.stack([i["label"] for i in items]),
        "ids": [i["id"] for i in items],
    }


class Batch:
    """A collate result that is an object of its own, moved by its ``.to``."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def to(self, device: torch.device) -> Batch:
        return Batch({k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in self.fields.items()})


def pad_to_object(items: list[dict[str, Any]]) -> Batch:
    return Batch(pad(items))


class Net(nn.Module):
    """Padding-invariant: masked sum and mean of the tokens, and the dense feature."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        tokens, lengths = batch["tokens"], batch["lengths"]
        mask = torch.arange(tokens.shape[1]) < lengths[:, None]
        total = (tokens * mask).sum(dim=1)
        features = torch.stack([total, total / lengths.clamp(min=1), batch["dense"]], dim=1)
        return self.head(torch.tanh(self.body(features)))


def _fresh() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _train(case: dict[str, Any], batches: Any, model: Net, optimizer: torch.optim.Optimizer,
           backward: Any, no_sync: Any, slow_s: float = 0.0) -> None:
    micro = case.get("micro", 1)
    for i, batch in enumerate(batches):
        fields = batch.fields if isinstance(batch, Batch) else batch
        if i % micro == 0:
            optimizer.zero_grad()
        time.sleep(slow_s * len(fields["ids"]))
        loss = F.cross_entropy(model(fields), fields["label"]) / micro
        if (i + 1) % micro:
            with no_sync():
                backward(loss)
            continue
        backward(loss)
        optimizer.step()


def _reference(case: dict[str, Any], dataset: Tokens) -> Net:
    """One process over the same global batches."""
    model, optimizer = _fresh()
    sampler = GlobalBatchSampler(SIZE, GLOBAL_BATCH, 0)
    for epoch in range(EPOCHS):
        batches = (pad([dataset[int(i)] for i in b.indices]) for b in sampler.epoch(epoch))
        _train(case, batches, model, optimizer, lambda loss: loss.backward(),
               contextlib.nullcontext)
    return model


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class _Stream(IterableDataset):
    def __iter__(self) -> Any:
        return iter(range(3))


def run_cases(cases: list[str]) -> dict[str, Any]:
    """Every case under idla against one process; each rank returns, per case, the largest
    parameter difference, its parameters, the ids it saw per epoch, the replaced-settings
    warnings it showed and the shares of every step."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    owner = Group()
    dataset = Tokens()
    out: dict[str, Any] = {}
    for name in cases:
        case = CASES[name]
        model, optimizer = _fresh()
        collate = pad_to_object if case.get("batch_object") else pad
        # fork: the launcher's ranks are spawned, and spawned loader workers start slowly
        loader = DataLoader(dataset, batch_size=5, shuffle=True, collate_fn=collate,
                            num_workers=2, multiprocessing_context="fork",
                            persistent_workers=case.get("persistent", False))
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            agent = Agent(model, optimizer, loader, group=Group(), config=AgentConfig(
                global_batch_size=GLOBAL_BATCH, initial_shares=case["shares"],
                rebalance=case["rebalance"], check_every_steps=3))
        slow = case.get("slow_rank_1_s_per_sample", 0.0) if agent.rank == 1 else 0.0
        seen: list[list[int]] = []
        for epoch in range(EPOCHS):
            ids: list[int] = []

            def record(batches: Any, ids: list[int] = ids) -> Any:
                for batch in batches:
                    fields = batch.fields if isinstance(batch, Batch) else batch
                    ids.extend(fields["ids"])
                    yield batch

            _train(case, record(agent.batches(epoch)), model, optimizer, agent.backward,
                   agent.no_sync, slow)
            seen.append(ids)
        report = agent.report()
        agent.close()
        out[name] = {
            "max_abs_diff": float((_flat(model) - _flat(_reference(case, dataset))).abs().max()),
            "params": _flat(model).tolist(), "seen": seen, "lag": agent._loader.lag,
            "warnings": [str(w.message) for w in shown if "give way" in str(w.message)],
            "shares": report["history"]["shares"],
        }
    try:
        Agent(Net(), None, DataLoader(_Stream()), group=owner, global_batch_size=2)
    except ConfigError as error:
        out["iterable_refused"] = str(error)
    owner.close()
    return out
