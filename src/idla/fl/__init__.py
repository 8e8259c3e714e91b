"""Federated learning: strategies (selection, robust aggregation, trust), a fast local
simulation without Ray, and an adapter that runs the same strategy inside Flower.

`FlowerStrategy` is imported on first use (it needs the `flower` extra)."""

from __future__ import annotations

import importlib
from typing import Any

from idla.fl.client import (
    LocalTraining,
    build_model,
    client_seed,
    client_update,
    evaluate_arrays,
    model_arrays,
)
from idla.fl.data import dirichlet_partition
from idla.fl.strategy import FedStrategy, StrategyConfig
from idla.plan.selection import ClientProfile

__all__ = [
    "ClientProfile",
    "FedStrategy",
    "FlowerStrategy",
    "LocalTraining",
    "StrategyConfig",
    "build_model",
    "client_seed",
    "client_update",
    "dirichlet_partition",
    "evaluate_arrays",
    "model_arrays",
]


def __getattr__(name: str) -> Any:
    if name == "FlowerStrategy":
        return importlib.import_module("idla.fl.flower").FlowerStrategy
    raise AttributeError(f"module 'idla.fl' has no attribute {name!r}")
