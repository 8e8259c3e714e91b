"""Error-feedback residuals and PowerSGD's warm Q survive a save/load through safetensors;
an exchange that holds no state refuses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from idla import Agent, AgentConfig
from idla.agent import restore_agent, save_agent
from idla.compress import ErrorFeedback, parse_codec
from idla.errors import ConfigError
from idla.runtime.checkpoint import load_checkpoint
from idla.runtime.group import Group
from idla.runtime.stats import WIDTH
from idla.sync.compressed import CompressedExchange, compressed_exchange
from idla.sync.size_rule import CompressedSetup


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 10))


def _exchange(model: torch.nn.Module, codec: str) -> CompressedExchange:
    setup = CompressedSetup(list(model.parameters()), Group(), WIDTH, ErrorFeedback(),
                            min_compress_numel=16)
    return compressed_exchange(setup, parse_codec(codec))


def _step(sync: CompressedExchange, model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 64, generator=generator)
    y = torch.randint(0, 10, (16,), generator=generator)
    sync.start_step([16])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    sync.finish(torch.zeros(WIDTH))
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("codec", ["topk:0.05", "sign", "powersgd:2"])
def test_state_round_trip_gives_the_same_next_step(codec: str, tmp_path: Path) -> None:
    # Prepare: two steps, then save the compression state
    model = _model()
    sync = _exchange(model, codec)
    for seed in range(2):
        _step(sync, model, seed)
    save_file(sync.state_dict(), tmp_path / "compress.safetensors")
    expected = _step(sync, model, 2)

    # Execute: a fresh sync on the same model, loaded from the file
    fresh = _exchange(model, codec)
    fresh.load_state_dict(load_file(tmp_path / "compress.safetensors"))
    got = _step(fresh, model, 2)

    # Assert
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_loading_state_of_another_model_is_refused() -> None:
    model = _model()
    sync = _exchange(model, "topk:0.05")
    _step(sync, model, 0)
    state = sync.state_dict()
    state["ef.p0"] = torch.zeros(3)

    with pytest.raises(ValueError, match="p0"):
        sync.load_state_dict(state)


def test_resuming_compression_state_into_the_exact_exchange_is_refused(tmp_path: Path) -> None:
    # Prepare: a one-process agent that compresses, checkpointed after one step
    data = TensorDataset(torch.randn(32, 64), torch.randint(0, 10, (32,)))

    def agent(compress: str) -> Agent:
        model = _model()
        return Agent(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                     config=AgentConfig(global_batch_size=16, compress=compress,
                                        min_compress_numel=16))

    first = agent("topk:0.05")
    for x, y in first.batches(0):
        first.backward(torch.nn.functional.cross_entropy(first.model(x), y))
        break
    path = save_agent(tmp_path, first, epoch=0, batch_in_epoch=1)
    assert any(k.startswith("rank0.sync.ef.") for k in load_checkpoint(path).extra_tensors)

    # Execute / Assert
    with pytest.raises(ConfigError, match="holds compression state but this agent compresses"):
        restore_agent(agent("none"), load_checkpoint(path))
