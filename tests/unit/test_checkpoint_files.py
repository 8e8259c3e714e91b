"""Checkpoint files under crashes and crafted input: `latest` always names a complete
checkpoint, leftovers of crashed saves are removed, crafted values are one `ConfigError` line."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from idla.agent import Agent
from idla.agent.resume import check_shares, restore_agent
from idla.errors import ConfigError
from idla.runtime import checkpoint as checkpoint_module
from idla.runtime.checkpoint import load_checkpoint, save_checkpoint
from idla.serve.model_io import ModelFormatError, save_model


def _save(directory: Path, step: int = 3, shares: list[int] | None = None,
          **extra: Any) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return save_checkpoint(directory, model=model, optimizer=optimizer, step=step, epoch=1,
                           batch_in_epoch=0, shares=shares or [80, 48], **extra)


def _latest_is_complete(directory: Path) -> bool:
    name = (directory / "latest").read_text().strip()
    return (directory / name / "manifest.json").is_file()


def test_latest_names_a_complete_checkpoint_after_every_rename_of_a_resave(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, extra_state={"v": 1})
    real_replace = os.replace
    checks: list[bool] = []

    def checked_replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        checks.append(_latest_is_complete(tmp_path))

    monkeypatch.setattr(os, "replace", checked_replace)
    _save(tmp_path, extra_state={"v": 2})

    assert checks and all(checks)  # the old code's window: step-3 moved aside, latest dangling
    assert load_checkpoint(tmp_path).extra_state == {"v": 2}


def test_a_crash_before_latest_moves_keeps_the_old_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _save(tmp_path, extra_state={"v": 1})
    real_replace = os.replace

    def crash_at_latest(src: Any, dst: Any) -> None:
        if Path(dst).name == "latest":
            monkeypatch.setattr(os, "replace", real_replace)  # once
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_latest)
    with pytest.raises(OSError, match="power cut"):
        _save(tmp_path, extra_state={"v": 2})

    assert load_checkpoint(tmp_path).extra_state == {"v": 1}  # latest still names it
    assert (tmp_path / "latest").read_text().strip() == old.name
    newest = _save(tmp_path, extra_state={"v": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", newest.name]


def test_a_crash_after_latest_moves_leaves_an_old_copy_the_next_save_removes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, extra_state={"v": 1})

    def crash(*args: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(checkpoint_module, "tidy", crash)
    with pytest.raises(OSError, match="power cut"):
        _save(tmp_path, extra_state={"v": 2})
    monkeypatch.undo()

    def step_3_dirs() -> list[Path]:
        return [p for p in tmp_path.iterdir() if p.name.startswith("step-3")]

    assert load_checkpoint(tmp_path).extra_state == {"v": 2}
    assert len(step_3_dirs()) == 2
    _save(tmp_path, step=6)
    (kept,) = step_3_dirs()  # the superseded copy went, the one latest named stays
    assert load_checkpoint(kept).extra_state == {"v": 2}


def test_leftovers_of_crashed_saves_are_removed_at_the_next_save(tmp_path: Path) -> None:
    _save(tmp_path)
    hour_ago = time.time() - 3600
    stale = [tmp_path / ".tmp-step-4-crashed", tmp_path / ".old-step-3-1a2b3c4d"]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 100)
        os.utime(path, (hour_ago, hour_ago))
    (tmp_path / ".tmp-latest-crashed").write_text("step-4\n")
    os.utime(tmp_path / ".tmp-latest-crashed", (hour_ago, hour_ago))
    concurrent = tmp_path / ".tmp-step-9-running"  # newer than this save: not touched
    concurrent.mkdir()
    future = time.time() + 3600
    os.utime(concurrent, (future, future))

    _save(tmp_path, step=5)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-step-9-running", "latest", "step-3", "step-5"]


def _craft(step_dir: Path, text: str) -> None:
    """Replace state.json with `text` and fix the manifest, as a careful forger would."""
    (step_dir / "state.json").write_text(text)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"bytes": len(text.encode()),
                                       "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _edit(change: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], str]:
    def apply(state: dict[str, Any]) -> str:
        change(state)
        return json.dumps(state)
    return apply


CRAFTED: dict[str, tuple[Callable[[dict[str, Any]], str], str]] = {
    "bad json": (lambda state: "{not json", "state.json cannot be read"),
    "deep nesting": (lambda state: "[" * 100_000 + "]" * 100_000, "state.json cannot be read"),
    "not an object": (lambda state: "[1, 2]", "state.json is not a JSON object"),
    "missing key": (_edit(lambda s: s.pop("shares")), "state.json has no 'shares'"),
    "other format": (_edit(lambda s: s.update(format="x")), "state.json has format 'x'"),
    "step as text": (_edit(lambda s: s.update(step="3")), "step '3' is not an integer"),
    "negative step": (_edit(lambda s: s.update(step=-1)), "step -1 is not an integer"),
    "boolean epoch": (_edit(lambda s: s.update(epoch=True)), "epoch True is not an integer"),
    "negative share": (_edit(lambda s: s.update(shares=[-1, 129])), r"shares \[-1, 129\] are"),
    "fractional share": (_edit(lambda s: s.update(shares=[80.5, 47.5])), r"shares \[80.5"),
    "no shares": (_edit(lambda s: s.update(shares=[])), r"shares \[\] are not"),
    "shares as text": (_edit(lambda s: s.update(shares="80,48")), "shares '80,48' are not"),
    "python rng": (_edit(lambda s: s["rng"].update(python=[1, 2])), "rng.python is not"),
    "numpy rng": (_edit(lambda s: s["rng"].update(numpy=["MT19937", [1], 0, 0, 0.0])),
                  "rng.numpy is not"),
    "optimizer": (_edit(lambda s: s.update(optimizer=5)), "optimizer or extra_state is not"),
    "unknown tensor": (_edit(lambda s: s.update(extra_state={"__idla_tensor__": "nope"})),
                       "state.json cannot be read"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_state_file_is_one_line_naming_it(tmp_path: Path, case: str) -> None:
    step_dir = _save(tmp_path)
    craft, message = CRAFTED[case]
    _craft(step_dir, craft(json.loads((step_dir / "state.json").read_text())))

    with pytest.raises(ConfigError, match=message) as caught:
        load_checkpoint(tmp_path)

    assert "\n" not in str(caught.value) and str(step_dir) in str(caught.value)


def test_a_crafted_latest_pointer_is_one_line(tmp_path: Path) -> None:
    _save(tmp_path)
    (tmp_path / "latest").write_bytes(b"\xff\xfe../x")

    with pytest.raises(ConfigError, match="latest cannot be read"):
        load_checkpoint(tmp_path)
    _save(tmp_path, step=4)  # a save repairs the pointer
    assert load_checkpoint(tmp_path).step == 4


@pytest.mark.parametrize("shares, step", [([-1, 129], 3), ([True, 127], 3), ([], 3),
                                          ([80, 48], -1)])
def test_a_save_refuses_negative_or_non_integer_values(
        tmp_path: Path, shares: list[Any], step: int) -> None:
    with pytest.raises(ConfigError, match="must be"):
        save_checkpoint(tmp_path, model=torch.nn.Linear(2, 2), optimizer=None, step=step,
                        epoch=0, batch_in_epoch=0, shares=shares)
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("shares, message", [
    ([64, 64], "taken with 2 ranks, this job has 1"),
    ([100], r"summing to 100, this job's global batch is 128"),
])
def test_shares_are_checked_on_resume(tmp_path: Path, shares: list[int], message: str) -> None:
    model = torch.nn.Linear(4, 3)
    agent = Agent(model, torch.optim.SGD(model.parameters(), lr=0.1),
                  [torch.randn(256, 4), torch.randint(0, 3, (256,))], global_batch_size=128)
    path = save_checkpoint(tmp_path, model=model, optimizer=agent.optimizer, step=2, epoch=0,
                           batch_in_epoch=2, shares=shares)

    with pytest.raises(ConfigError, match=message):
        restore_agent(agent, load_checkpoint(path))
    agent.close()


def test_check_shares_names_each_condition() -> None:
    with pytest.raises(ConfigError, match="each must be an integer"):
        check_shares([130, -2], 2, 128, "checkpoint x")
    check_shares([80, 48], 2, 128, "checkpoint x")


def test_save_model_refuses_non_finite_weights(tmp_path: Path) -> None:
    from idla.serve.model_io import ARCHITECTURES

    kwargs = {"in_features": 4, "hidden": 8, "layers": 1, "classes": 3}
    model = ARCHITECTURES["mlp"](**kwargs)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")

    with pytest.raises(ModelFormatError, match="NaN or infinite weights"):
        save_model(tmp_path / "model", model, "mlp", kwargs, [4])
    assert not (tmp_path / "model" / "model.safetensors").exists()
