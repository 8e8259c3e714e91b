"""Rollout paths under --model-root: escapes refused, one answer for missing and forbidden."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from idla.errors import ConfigError
from idla.serve.model_path import NO_MODEL, ModelPath, confine, model_root
from idla.serve.request_body import BadRequest


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "models"
    (root / "v2").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "link-out")
    os.symlink(root / "v2", root / "link-in")
    return model_root(root), tmp_path


def test_paths_inside_the_root_resolve_and_are_shown_relative(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    assert confine("v2", root) == ModelPath(root / "v2", "v2")
    assert confine(str(root / "v2"), root).resolved == root / "v2"
    assert confine("link-in", root) == ModelPath(root / "v2", "v2")
    assert confine("v2/../v2", root).resolved == root / "v2"


@pytest.mark.parametrize("requested", [
    "../secret", "link-out", "/etc", "/", "v2/../../secret", "missing", "/no/such/dir", "",
    "v2\0x", "../../../../../../etc/passwd",
])
def test_missing_and_forbidden_paths_get_one_answer(tree: tuple[Path, Path],
                                                    requested: str) -> None:
    root, _ = tree
    with pytest.raises(BadRequest) as caught:
        confine(requested, root)
    assert (caught.value.status, caught.value.reason) == (422, NO_MODEL)


def test_without_a_root_any_existing_path_loads_and_a_missing_one_is_not_named(
        tree: tuple[Path, Path]) -> None:
    _, tmp_path = tree
    assert confine(str(tmp_path / "secret"), None).resolved == tmp_path / "secret"
    with pytest.raises(BadRequest, match=NO_MODEL):
        confine(str(tmp_path / "nothing"), None)


def test_worker_messages_are_scrubbed_of_absolute_paths(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    target = confine("v2", root)
    message = f"{root}/v2/model.json is not valid JSON; see {root}"
    assert target.scrub(message, root) == "v2/model.json is not valid JSON; see <model root>"


def test_the_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        model_root(tmp_path / "absent")
