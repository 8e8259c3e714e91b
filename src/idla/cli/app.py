"""`idla`: the root parser, the commands' registration, and the one error boundary.

User mistakes end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from idla.cli.fields import CommandParser
from idla.errors import ConfigError, IdlaError

# Every command module has `add_commands(commands, benches)`: it adds sub-parsers with
# `set_defaults(handler=f)` (f(args) -> exit code) to ``commands`` and with
# `set_defaults(bench_handler=f)` (f(args) -> result dict, written by --json) to ``benches``.
# Options built from config dataclasses are added with `parser.defer(...)`, and heavy imports
# stay inside the handlers, so that `idla --help` is fast.
COMMAND_MODULES = ("idla.cli.train", "idla.cli.bench", "idla.cli.fl", "idla.cli.serve",
                   "idla.cli.infer", "idla.cli.pool", "idla.cli.pool_sim")


class _Benches:
    """`idla bench`'s sub-parsers, made when the first benchmark is added, so that `bench`
    lists after the commands registered before it (train, profile)."""

    def __init__(self, commands: Any) -> None:
        self._commands = commands
        self._benches: Any = None

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self._benches is None:
            bench = self._commands.add_parser("bench",
                                              help="benchmarks (each prints a table; --json)")
            bench.set_defaults(handler=_bench)
            self._benches = bench.add_subparsers(dest="bench", metavar="BENCH")
        return self._benches.add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="idla",
        description="idla, an intelligent deep-learning agent: measures every worker, gives "
        "each the share of the global batch it can carry, and keeps replicas exactly in sync.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    benches = _Benches(commands)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(commands, benches)
    return parser


def _bench(args: argparse.Namespace) -> int:
    handler = getattr(args, "bench_handler", None)
    if handler is None:
        raise ConfigError(
            "name a benchmark: idla bench hetero | comm | sync | plan | fl | serve | infer "
            "(see idla bench --help)")
    result: dict[str, Any] = handler(args)
    if args.json:
        from idla.report import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except IdlaError as error:
        print(f"idla: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idla: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
