"""Checkpoints: exact round trips, atomic saves, and damage reported as one line."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from idla.errors import ConfigError
from idla.runtime.checkpoint import load_checkpoint, restore_rng, save_checkpoint


def _trained(steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _step(model, optimizer)
    return model, optimizer


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _save(directory: Path, step: int = 3, **extra: Any) -> Path:
    model, optimizer = _trained()
    return save_checkpoint(directory, model=model, optimizer=optimizer, step=step, epoch=1,
                           batch_in_epoch=0, shares=[80, 48], **extra)


def test_round_trip_restores_model_optimizer_and_the_next_step(tmp_path: Path) -> None:
    # Prepare
    model, optimizer = _trained()
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=3, epoch=1,
                    batch_in_epoch=0, shares=[80, 48],
                    extra_tensors={"residual": torch.arange(5.0)},
                    extra_state={"note": "x", "pair": (1, 2)})

    # Execute: a fresh model and optimizer take the state; both then take one more step
    checkpoint = load_checkpoint(tmp_path)
    torch.manual_seed(7)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh.load_state_dict(checkpoint.model_state)
    fresh_optimizer.load_state_dict(checkpoint.optimizer_state)
    _step(model, optimizer)
    _step(fresh, fresh_optimizer)

    # Assert
    assert checkpoint.path == tmp_path / "step-3"
    assert (checkpoint.step, checkpoint.epoch, checkpoint.batch_in_epoch) == (3, 1, 0)
    assert checkpoint.shares == [80, 48]
    assert checkpoint.optimizer_state["param_groups"][0]["betas"] == (0.9, 0.999)
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-2
    assert torch.equal(checkpoint.extra_tensors["residual"], torch.arange(5.0))
    assert checkpoint.extra_state == {"note": "x", "pair": (1, 2)}
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], fresh_optimizer.state[q][key])


def test_rng_states_come_back(tmp_path: Path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    _save(tmp_path)
    expected = (torch.rand(3), random.random())
    torch.rand(10)
    random.random()

    restore_rng(load_checkpoint(tmp_path))

    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]


def test_latest_follows_the_newest_save_and_a_step_dir_loads_directly(tmp_path: Path) -> None:
    _save(tmp_path, step=3)
    _save(tmp_path, step=6)

    assert (tmp_path / "latest").read_text().strip() == "step-6"
    assert load_checkpoint(tmp_path).step == 6
    assert load_checkpoint(tmp_path / "step-3").step == 3


def test_a_flipped_byte_is_reported_naming_the_file(tmp_path: Path) -> None:
    step_dir = _save(tmp_path)
    target = step_dir / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match=r"optimizer\.safetensors does not match the sha256"):
        load_checkpoint(tmp_path)


def test_a_truncated_file_is_reported_with_both_sizes(tmp_path: Path) -> None:
    step_dir = _save(tmp_path)
    target = step_dir / "model.safetensors"
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[: size - 10])

    with pytest.raises(ConfigError, match=rf"model\.safetensors is {size - 10} bytes, "
                                          rf"the manifest says {size}"):
        load_checkpoint(tmp_path)


def test_a_missing_manifest_or_file_is_reported(tmp_path: Path) -> None:
    step_dir = _save(tmp_path)
    (step_dir / "rng.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"rng\.safetensors is missing"):
        load_checkpoint(step_dir)

    (step_dir / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"manifest\.json is missing"):
        load_checkpoint(step_dir)


def test_a_garbled_manifest_or_missing_directory_is_reported(tmp_path: Path) -> None:
    step_dir = _save(tmp_path)
    (step_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"manifest\.json is not a valid manifest"):
        load_checkpoint(step_dir)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a good checkpoint at step 3, then a save of the same step that dies half-way
    _save(tmp_path, step=3)
    before = json.loads((tmp_path / "step-3" / "manifest.json").read_text())
    real_save = safetensors.torch.save_file

    def failing_save(tensors: dict[str, torch.Tensor], filename: str) -> None:
        if filename.endswith("optimizer.safetensors"):  # the second file of each save
            raise OSError("disk full")
        real_save(tensors, filename)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)

    # Execute
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, step=3)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, step=9)
    monkeypatch.undo()

    # Assert: the old checkpoint is untouched and still what latest names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-3"]
    assert json.loads((tmp_path / "step-3" / "manifest.json").read_text()) == before
    assert load_checkpoint(tmp_path).step == 3


def test_resaving_a_step_replaces_it_under_a_fresh_name(tmp_path: Path) -> None:
    _save(tmp_path, step=3, extra_state={"v": 1})
    path = _save(tmp_path, step=3, extra_state={"v": 2})

    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", path.name]
    assert path.name.startswith("step-3.") and load_checkpoint(path).step == 3
    assert (tmp_path / "latest").read_text().strip() == path.name
    assert load_checkpoint(tmp_path).extra_state == {"v": 2}


def test_values_json_cannot_hold_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot store"):
        _save(tmp_path, extra_state={"when": object()})
    assert [p.name for p in tmp_path.iterdir()] == []
