"""The option generator (`idla.cli.fields`): flags, help and values from config dataclasses."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from idla.cli import fields
from idla.errors import ConfigError
from tests.cli.cli_driver import run_many


@dataclass(kw_only=True)
class Inner:
    size: int = field(default=8, metadata={"flag": "--size-of", "metavar": "B"})
    """Samples per step."""
    exact: bool = True
    """Check every step."""


@dataclass(kw_only=True)
class Outer:
    workers: int = field(default=2, metadata={"parse": "positive_int", "metavar": "N"})
    """Worker processes (at least 1)."""
    speeds: list[float] | None = field(default_factory=lambda: [1.0, 0.5],
                                       metadata={"parse": "speeds", "metavar": "LIST"})
    """Relative speed per worker."""
    loud: bool = False
    """Print every step."""
    rate: float = 2.5
    """Learning rate, 100% of the base."""
    inner: Inner = field(default_factory=lambda: Inner(size=16))
    """The nested part."""

    def __post_init__(self) -> None:
        if self.speeds is not None and len(self.speeds) != self.workers:
            raise ConfigError(f"--speeds lists {len(self.speeds)} speeds for {self.workers}")


NAMES = ("workers", "speeds", "loud", "rate", "inner.size", "inner.exact")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    fields.add_options(parser, Outer, NAMES)
    return parser


def _help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return str(action.help)


def test_field_docstrings_are_read_from_the_class_source() -> None:
    docs = fields.field_docs(Outer)

    assert docs["workers"] == "Worker processes (at least 1)."
    assert docs["inner"] == "The nested part."
    assert fields.field_docs(Inner)["size"] == "Samples per step."


def test_help_is_the_docstring_with_the_default() -> None:
    parser = _parser()

    assert _help_of(parser, "--workers") == "Worker processes (at least 1; default: 2)"
    assert _help_of(parser, "--speeds") == "Relative speed per worker (default: 1,0.5)"
    assert _help_of(parser, "--rate") == "Learning rate, 100%% of the base (default: 2.5)"
    assert "100% of the base" in parser.format_help()  # argparse un-escapes the %


def test_default_joins_a_closing_note_but_not_a_call() -> None:
    assert fields._with_default("Rate (0: off).", "2") == "Rate (0: off; default: 2)"
    shown = fields._with_default("0 picks min(2, cores).", "0")
    assert shown == "0 picks min(2, cores) (default: 0)"


def test_flag_override_and_nested_default_come_from_the_parent() -> None:
    parser = _parser()

    args = parser.parse_args([])
    assert _help_of(parser, "--size-of") == "Samples per step (default: 16)"
    assert "B" in parser.format_usage()
    assert fields.build(Outer, args, NAMES).inner == Inner(size=16, exact=True)


def test_bool_defaulting_true_becomes_no_flag_and_false_a_plain_flag() -> None:
    parser = _parser()

    args = parser.parse_args(["--no-exact", "--loud"])
    config = fields.build(Outer, args, NAMES)

    assert config.inner.exact is False and config.loud is True
    assert _help_of(parser, "--no-exact") == "Check every step (default: on)"
    assert _help_of(parser, "--loud") == "Print every step (default: off)"


def test_list_values_are_parsed_in_build_and_a_default_override_is_text() -> None:
    parser = argparse.ArgumentParser(prog="t")
    fields.add_options(parser, Outer, ("workers", "speeds"), defaults={"speeds": "none"})

    assert fields.build(Outer, parser.parse_args([]), ("workers", "speeds")).speeds is None
    assert fields.build(Outer, parser.parse_args(["--workers", "3", "--speeds", "1,1,0.5"]),
                        ("workers", "speeds")).speeds == [1.0, 1.0, 0.5]
    assert _help_of(parser, "--speeds").endswith("(default: none)")


def test_bad_list_is_a_config_error_naming_the_flag() -> None:
    args = _parser().parse_args(["--speeds", "1,x"])

    with pytest.raises(ConfigError, match="--speeds"):
        fields.build(Outer, args, NAMES)


def test_value_checks_stay_in_the_config() -> None:
    args = _parser().parse_args(["--workers", "3"])

    with pytest.raises(ConfigError, match="2 speeds for 3"):
        fields.build(Outer, args, NAMES)


def test_command_parser_adds_deferred_options_when_used() -> None:
    parser = fields.CommandParser(prog="t")
    commands = parser.add_subparsers(dest="command")
    sub = commands.add_parser("run")
    sub.defer(lambda p: fields.add_options(p, Outer, ("workers",)))

    assert parser.parse_args(["run", "--workers", "5"]).workers == 5


BAD_VALUES = [
    (["train", "--workers", "2", "--max-local-batch", "1,x"], "--max-local-batch"),
    (["bench", "sync", "--speeds", "1,0"], "--speeds"),
    (["fl", "simulate", "--alpha", "0"], "--alpha"),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES)
def test_bad_values_through_generated_options_give_one_line_and_exit_2(
    args: list[str], message: str
) -> None:
    result = run_many([a for a, _ in BAD_VALUES])[BAD_VALUES.index((args, message))]

    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == 2
    assert len(lines) == 1 and message in lines[0], result["stderr"]
