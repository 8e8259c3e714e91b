"""User mistakes: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from idla import Agent, AgentConfig
from idla.errors import ConfigError
from tests.cli.cli_driver import run_many


def run_idla(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idla.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


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


HELP = [["--help"], ["train", "--help"], ["profile", "--help"], ["bench", "hetero", "--help"],
        ["bench", "plan", "--help"], ["bench", "data", "--help"]]
DRIVEN = [*(args for args, _ in BAD_INPUT), ["train", "--workers", "zero"], *HELP]
"""Every command line this module runs through the driver, in one interpreter."""


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_gives_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_many(DRIVEN)[DRIVEN.index(args)]

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
    result = run_many(DRIVEN)[DRIVEN.index(["train", "--workers", "zero"])]

    assert result["code"] == 2
    assert "Traceback" not in result["stderr"]
    assert "--workers" in result["stderr"]


def test_help_explains_every_option() -> None:
    for result in run_many(DRIVEN)[-len(HELP):]:
        assert result["code"] == 0
        assert "usage: idla" in result["stdout"]


def test_wrong_world_size_in_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(2, 2)
    data = (torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))

    with pytest.raises(ConfigError, match="wrong world size"):
        Agent(model, None, data, config=AgentConfig(global_batch_size=4))
