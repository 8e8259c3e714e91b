"""Where `idla serve` takes its token from, and the one-line errors when it cannot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from idla.cli.token import FLAG_WARNING, resolve_token
from idla.errors import ConfigError


def test_a_private_file_wins_and_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret-token\n")
    path.chmod(0o600)
    assert resolve_token(None, str(path), {"IDLA_TOKEN": "env"}) == ("s3cret-token", "file", [])
    path.chmod(0o644)
    _, _, warnings = resolve_token(None, str(path), {})
    assert len(warnings) == 1 and "readable by other users" in warnings[0]


def test_the_flag_warns_the_environment_does_not_and_none_generates() -> None:
    assert resolve_token("flag-token", None, {"IDLA_TOKEN": "env"}) == (
        "flag-token", "flag", [FLAG_WARNING])
    assert resolve_token(None, None, {"IDLA_TOKEN": " env-token "}) == ("env-token", "env", [])
    token, source, warnings = resolve_token(None, None, {})
    assert source == "generated" and len(token) >= 24 and warnings == []


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "no such file"),
    ("empty", "is empty"),
    ("blank", "is empty"),
    ("directory", "is a directory"),
    ("binary", "not UTF-8"),
    ("spaces", "one word of printable ASCII"),
    ("unreadable", "permission denied"),
])
def test_a_bad_token_file_is_one_line_naming_it(tmp_path: Path, setup: str,
                                                message: str) -> None:
    path = tmp_path / "token"
    if setup == "empty":
        path.write_text("")
    elif setup == "blank":
        path.write_text("  \n\n")
    elif setup == "directory":
        path.mkdir()
    elif setup == "binary":
        path.write_bytes(b"\xff\xfe")
    elif setup == "spaces":
        path.write_text("two words\n")
    elif setup == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_text("token")
        path.chmod(0)
    with pytest.raises(ConfigError) as caught:
        resolve_token(None, str(path), {})
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_two_sources_or_an_empty_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give one"):
        resolve_token("a", str(tmp_path / "t"), {})
    with pytest.raises(ConfigError, match="IDLA_TOKEN is empty"):
        resolve_token(None, None, {"IDLA_TOKEN": ""})
