"""User mistakes: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from idla import Agent, AgentConfig
from idla.errors import ConfigError


def run_idla(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idla.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


DRIVER = """
import contextlib, io, json, sys, traceback
from idla.cli.app import main
out = []
for args in json.loads(sys.argv[1]):
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            code = main(args)
        except SystemExit as stop:
            code = stop.code
        except BaseException:
            code, err = 1, io.StringIO(traceback.format_exc())
    out.append({"code": code, "stderr": err.getvalue(), "stdout": std.getvalue()})
print(json.dumps(out))
"""
"""Runs many command lines through the CLI's `main` in one fresh interpreter (one start of
Python and torch instead of one per case); an exception escaping `main` is recorded with
its traceback, as the interpreter would print it."""
_driven: dict[str, dict[str, Any]] = {}


def run_many(commands: list[list[str]]) -> list[dict[str, Any]]:
    key = [json.dumps(c) for c in commands]
    missing = [c for c, k in zip(commands, key, strict=True) if k not in _driven]
    if missing:
        result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(missing)],
                                capture_output=True, text=True, timeout=300, check=True)
        for command, outcome in zip(missing, json.loads(result.stdout), strict=True):
            _driven[json.dumps(command)] = outcome
    return [_driven[k] for k in key]


BAD_INPUT = [
        (["train", "--emulate-speeds", "1,x"], "--emulate-speeds"),
        (["train", "--workers", "4", "--emulate-speeds", "none", "--global-batch", "3"],
         "smaller than the number of workers"),
        (["train", "--workers", "2", "--emulate-speeds", "none", "--max-local-batch", "100,100"],
         "--max-local-batch"),
        (["train", "--workers", "2", "--emulate-speeds", "none", "--global-batch", "5000"],
         "larger than the data set"),
        (["train", "--workers", "3", "--emulate-speeds", "1,1"], "3 workers"),
        (["bench", "hetero", "--speeds", "1,-2"], "--speeds"),
        (["bench", "hetero", "--model", "vgg"],
         "--model: unknown model 'vgg'; choose one of digits, resnet, transformer"),
        (["train", "--compress", "zip"], "unknown codec 'zip'"),
        (["train", "--compress", "topk:2"], "ratio must be in (0, 1]"),
        (["train", "--compress", "topk:0"], "ratio must be in (0, 1]"),
        (["train", "--compress", "powersgd:0"], "rank must be an integer >= 1"),
        (["bench", "comm", "--bandwidth", "10potatoes"], "does not parse"),
        (["bench", "comm", "--codecs", "fp16,bogus"], "unknown codec 'bogus'"),
        (["train", "--sync", "bogus"], "unknown sync mode"),
        (["train", "--workers", "2", "--emulate-speeds", "none", "--resume", "/nonexistent/ck"],
         "does not exist"),
        (["train", "--sync", "local:0"], "at least 1"),
        (["train", "--sync", "async:-1"], "0 or more"),
        (["bench", "sync", "--staleness", "-1"], "--staleness"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_gives_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_many([a for a, _ in BAD_INPUT])[BAD_INPUT.index((args, message))]

    assert result["code"] == 2
    assert "Traceback" not in result["stderr"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1, result["stderr"]
    assert message in lines[0]


def test_a_user_mistake_exits_2_from_the_real_command() -> None:
    result = run_idla("train", "--compress", "zip")

    assert result.returncode == 2
    assert result.stderr.startswith("idla: error: compress: unknown codec 'zip'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_argparse_mistake_exits_2_without_traceback() -> None:
    result = run_idla("train", "--workers", "zero")

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--workers" in result.stderr


def test_help_explains_every_option() -> None:
    commands = [["--help"], ["train", "--help"], ["profile", "--help"],
                ["bench", "hetero", "--help"], ["bench", "plan", "--help"],
                ["bench", "data", "--help"]]
    for result in run_many(commands):
        assert result["code"] == 0
        assert "usage: idla" in result["stdout"]


def test_wrong_world_size_in_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(2, 2)
    data = (torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))

    with pytest.raises(ConfigError, match="wrong world size"):
        Agent(model, None, data, config=AgentConfig(global_batch_size=4))
