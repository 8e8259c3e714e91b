"""Argument types shared by every command's parser (`idla/cli.py` and the parts' own CLIs)."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not in 0..65535")
    return value


def optional_speeds(text: str, option: str = "--emulate-speeds") -> list[float] | None:
    """A speed list such as 1,0.5,0.25; None for '', 'none' or 'off' (no emulation)."""
    from idla.emulate.cgroup import parse_speeds

    if text.strip().lower() in {"", "none", "off"}:
        return None
    return parse_speeds(text, option)
