"""idla: an intelligent deep-learning agent for heterogeneous devices.

The public API, one name per idea:

- training: `Agent` and its `AgentConfig` for a user's own script, over a `Group` (each
  rank's device, the job's data and control planes); `run_elastic` (with
  `ElasticState`, `ElasticConfig`) for one that survives lost workers; `save_agent` /
  `restore_agent` and `load_checkpoint` to resume exactly;
- gradient compression: `parse_codec` and the codecs, `ErrorFeedback`;
- federated learning: `FedStrategy` with its `StrategyConfig`, `FlowerStrategy` (Flower's
  `Strategy` around it), `run_simulation` with its `SimulationConfig`;
- serving: `save_model` / `load_model` (safetensors + JSON), `Router` with its `RouterConfig`,
  `create_app` (the FastAPI app), `infer_offline`;
- `write_json_atomic`: reports and benchmark JSON, written to a temporary file and renamed.

Federated learning and serving are imported on first use, so ``import idla`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from idla.agent import AgentConfig, ElasticState, restore_agent, run_elastic, save_agent
from idla.agent.agent import Agent
from idla.compress import (
    Codec,
    ErrorFeedback,
    Fp16,
    NoCompression,
    PowerSGD,
    RandomK,
    ScaledSign,
    TopK,
    parse_codec,
)
from idla.elastic.membership import ElasticConfig
from idla.errors import ConfigError, GradientError, IdlaError
from idla.report import write_json_atomic
from idla.runtime.checkpoint import load_checkpoint
from idla.runtime.group import Group

_LAZY = {
    "FedStrategy": "idla.fl.strategy",
    "StrategyConfig": "idla.fl.strategy",
    "FlowerStrategy": "idla.fl.flower",
    "SimulationConfig": "idla.fl.simulate",
    "run_simulation": "idla.fl.simulate",
    "save_model": "idla.serve.model_io",
    "load_model": "idla.serve.model_io",
    "Router": "idla.serve.router",
    "RouterConfig": "idla.serve.router",
    "create_app": "idla.serve.http",
    "infer_offline": "idla.serve.offline",
}

__all__ = [
    "Agent",
    "AgentConfig",
    "Codec",
    "ConfigError",
    "ElasticConfig",
    "ElasticState",
    "ErrorFeedback",
    "GradientError",
    "Group",
    "Fp16",
    "IdlaError",
    "NoCompression",
    "PowerSGD",
    "RandomK",
    "ScaledSign",
    "TopK",
    "load_checkpoint",
    "parse_codec",
    "restore_agent",
    "run_elastic",
    "save_agent",
    "write_json_atomic",
    *sorted(_LAZY),
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'idla' has no attribute {name!r}")
