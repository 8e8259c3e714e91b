"""Many command lines through the CLI's `main` in one fresh interpreter: one start of Python
and torch instead of one per case, for tests that check what a command prints and returns."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

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
