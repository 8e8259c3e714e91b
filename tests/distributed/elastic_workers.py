"""Worker functions for the elastic security tests: forged joiners and a poisoned survivor.

A forger is attacker code: it may patch its own process (here, the state it claims) and write
to the store directly. The honest workers run idla unchanged.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import idla.agent.elastic as elastic_module
from idla.agent import Agent, parameter_digest
from idla.agent.elastic import ElasticState, run_elastic
from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.elastic.auth import seal
from idla.elastic.membership import store_prefix
from idla.elastic.rendezvous import open_store
from idla.jobs.train import TrainConfig

FORGED_STEP = 1000
AWAIT_STEP = 3
"""The step before which `honest_worker` waits for the join requests it expects (the first
join check is at step 5)."""


def _await_joins(count: int, timeout_s: float = 120.0) -> None:
    """Wait until `count` newcomers have asked to join (the store's join counter; a forged
    request counts too), or `timeout_s` passed (the test's assertions then say what is missing)."""
    store = open_store(os.environ["IDLA_RENDEZVOUS"], timeout_s)
    key = f"{store_prefix()}/join/count"
    deadline = time.monotonic() + timeout_s
    while int(store.add(key, 0)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int,
           poison_at: int | None = None, await_joins: int = 0) -> Any:
    def train(agent: Agent, state: ElasticState) -> None:
        for x, y in state.batches(epochs):
            if await_joins and state.step == AWAIT_STEP:
                _await_joins(await_joins)
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            state.commit()
            if state.step == poison_at:  # this replica's weights go bad between two steps
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))

    return train


def _result(report: Any, model: torch.nn.Module, test_set: Any) -> dict[str, Any]:
    result: dict[str, Any] = report.as_dict()
    result.update(test_accuracy=accuracy(model, test_set, next(model.parameters()).device),
                  param_digest=parameter_digest(model),
                  finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()))
    return result


def honest_worker(config: TrainConfig, await_joins: int) -> dict[str, Any]:
    """An honest worker of the demo on idla's elastic loop, unchanged, except that before step
    AWAIT_STEP it waits until `await_joins` newcomers have asked to join: the first join check
    then sees every request, however slowly the joiners' processes start (the whole run takes
    about a second once formed, less than a loaded machine may take to start a joiner)."""
    torch.set_num_threads(config.threads)
    train_set, test_set = load_digits_split(seed=config.agent.seed)
    torch.manual_seed(config.agent.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    report = run_elastic(_train(model, optimizer, config.epochs, await_joins=await_joins),
                         model, optimizer, train_set, config.agent)
    return _result(report, model, test_set)


def poisoned_survivor_worker(config: TrainConfig, poison_member: int, poison_at: int
                             ) -> dict[str, Any]:
    """An honest worker of the demo, except that member `poison_member`'s parameters become NaN
    after step `poison_at` (as a bit flip or a bad kernel would leave them)."""
    torch.set_num_threads(config.threads)
    train_set, test_set = load_digits_split(seed=config.agent.seed)
    torch.manual_seed(config.agent.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    poison = poison_at if int(os.environ["RANK"]) == poison_member else None
    report = run_elastic(_train(model, optimizer, config.epochs, poison), model, optimizer,
                         train_set, config.agent)
    return _result(report, model, test_set)


def forged_joiner(config: TrainConfig, fill: float, stop_file: str) -> dict[str, Any]:
    """A joiner (``IDLA_JOIN=1``) whose weights all hold `fill` and that claims FORGED_STEP
    committed steps with a consistent cursor. With ``FORGE_RAW_JOIN=1`` it first writes a join
    request and a heartbeat itself, signed with its own ``IDLA_JOB_SECRET`` (a wrong one).
    It stops when `stop_file` exists or its run ends; returns its report if the run ended."""
    torch.set_num_threads(config.threads)
    train_set, test_set = load_digits_split(seed=config.agent.seed)
    model = DigitsCNN()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps_per_epoch = -(-len(train_set[0]) // config.agent.global_batch_size)

    class ForgedState(ElasticState):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.step = self.started = FORGED_STEP
            self.epoch, self.batch = divmod(FORGED_STEP, steps_per_epoch)

    elastic_module.ElasticState = ForgedState  # type: ignore[misc]  # run_elastic builds this
    if os.environ.get("FORGE_RAW_JOIN") == "1":
        _raw_join(os.environ["IDLA_RENDEZVOUS"], os.environ["IDLA_JOB_SECRET"].encode())
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            report = run_elastic(_train(model, optimizer, config.epochs), model, optimizer,
                                 train_set, config.agent)
            outcome["report"] = _result(report, model, test_set)
        except Exception as error:
            outcome["error"] = f"{type(error).__name__}: {error}"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive() and not Path(stop_file).exists():
        thread.join(timeout=0.5)
    return {"ended": not thread.is_alive(), **outcome}


def _raw_join(spec: str, secret: bytes) -> None:
    store = open_store(spec, 30.0)
    prefix = store_prefix()
    store.wait([f"{prefix}/world0"])
    world0 = int(json.loads(json.loads(store.get(f"{prefix}/world0"))["v"]))  # unchecked
    member = world0 + int(store.add(f"{prefix}/join/count", 1)) - 1
    for name, value in ((f"join/{member}", {"join": member}), (f"hb/{member}", time.time())):
        key = f"{prefix}/{name}"
        store.set(key, seal(secret, key, member, 0, value))
