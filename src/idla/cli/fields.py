"""Argparse options generated from config dataclasses, and the configs built back from them.

A config dataclass is the one place that names a setting, its type, its default and what it
means (the docstring under the field). `add_options(parser, Config, names)` turns the named
fields into options; `build(Config, args, names)` turns the parsed options back into a
validated `Config` (its ``__post_init__`` is the one check of each value). A name may reach
into a nested config: ``"agent.seed"`` is the field ``seed`` of ``Config.agent``.

What an option looks like comes from the field:
- the flag is ``--field-name``, or ``metadata={"flag": "--global-batch"}`` where today's flag
  differs from the field's name (the CLI keeps its spellings);
- the help is the field's docstring (read with ``ast`` from the class source) and the default;
- a ``bool`` field that defaults to True becomes ``--no-field-name`` (one that defaults to False,
  ``--field-name``);
- ``metadata["parse"]`` names a parser in `SCALAR_PARSERS` (an argparse ``type``) or, for list
  fields, in `LIST_PARSERS`; a list is parsed in `build`, so a bad list ends as one line
  (ConfigError, exit 2) like every other bad value;
- ``metadata["metavar"]`` and ``metadata["default_text"]`` set how the option is shown.
Metadata holds plain strings because the configs live on floors below ``cli/``.

Why not tyro (which torchtitan uses): tyro derives every flag's spelling from the field path
(``--agent.global-batch-size``), lays out help its own way and reports errors in its own
format. The CLI must stay as it is (the same flags, defaults, exit codes and one-line errors
that scripts and the README rely on), and ~200 lines of our own keep that with no dependency.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from idla.cli.args import optional_speeds, port, positive_float, positive_int
from idla.errors import ConfigError

SCALAR_PARSERS: dict[str, Callable[[str], Any]] = {
    "positive_int": positive_int,
    "positive_float": positive_float,
    "port": port,
}


def _speeds(text: str, flag: str) -> list[float] | None:
    return optional_speeds(text, flag)


def _speeds_or_one(text: str, flag: str) -> list[float]:
    """A benchmark's speeds; 'none' runs one worker at full speed."""
    return optional_speeds(text, flag) or [1.0]


def _caps(text: str, flag: str) -> list[int]:
    try:
        caps = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    if any(c < 0 for c in caps):
        raise ConfigError(f"{flag}: {text!r} has a negative cap")
    return caps


def _names(text: str, flag: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


LIST_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "speeds": _speeds,
    "speeds_or_one": _speeds_or_one,
    "caps": _caps,
    "names": _names,
}


class CommandParser(argparse.ArgumentParser):
    """A parser whose options may be added when it is first used: `defer(add)` runs
    ``add(parser)`` before the parser parses or prints, so that `idla --help` imports none of
    the (torch-heavy) modules that hold the config dataclasses. Sub-parsers inherit the class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._deferred.append(add)

    def _add_deferred(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._add_deferred()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_deferred()
        return super().format_help()

    def format_usage(self) -> str:
        self._add_deferred()
        return super().format_usage()


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of ``cls`` (and its dataclass bases), whitespace folded."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    """One field reached from the top config by a dotted name."""

    name: str  # "agent.seed"
    owner: type  # the dataclass that declares it
    field: dataclasses.Field[Any]
    kind: Any  # the resolved annotation
    default: Any  # dataclasses.MISSING when it has none

    @property
    def flag(self) -> str:
        flag = self.field.metadata.get("flag")
        return str(flag) if flag else "--" + self.field.name.replace("_", "-")

    @property
    def list_parser(self) -> str | None:
        parse = self.field.metadata.get("parse")
        return str(parse) if parse in LIST_PARSERS else None


def _default_of(owner_default: Any, field: dataclasses.Field[Any]) -> Any:
    if owner_default is not dataclasses.MISSING:
        return getattr(owner_default, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _resolve(cls: type, name: str) -> _Field:
    owner, owner_default = cls, dataclasses.MISSING
    *parents, last = name.split(".")
    for parent in parents:
        field = {f.name: f for f in dataclasses.fields(owner)}[parent]
        owner_default = _default_of(owner_default, field)
        owner = typing.get_type_hints(owner)[parent]
    field = {f.name: f for f in dataclasses.fields(owner)}[last]
    return _Field(name, owner, field, typing.get_type_hints(owner)[last],
                  _default_of(owner_default, field))


def _scalar_type(kind: Any) -> Any:
    """int, float or str from an annotation such as ``float | None``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def _with_default(doc: str, shown: str) -> str:
    """``doc`` with its default: "text (default: 4)", or "text (note; default: 4)"."""
    doc = doc.rstrip(".")
    depth = 0
    for at in range(len(doc) - 1, -1, -1):  # the "(" that the final ")" closes
        depth += {")": 1, "(": -1}.get(doc[at], 0)
        if depth == 0:
            break
    if doc.endswith(")") and depth == 0 and doc[at - 1 : at] == " ":  # a closing note
        return f"{doc[:-1]}; default: {shown})"
    return f"{doc} (default: {shown})"


def _help(item: _Field) -> str:
    doc = field_docs(item.owner).get(item.field.name, "").replace("%", "%%")
    if _scalar_type(item.kind) is bool:
        return _with_default(doc, "on" if item.default else "off")
    shown = item.field.metadata.get("default_text")
    if item.list_parser is not None and isinstance(item.default, str):
        shown = item.default  # a per-parser default, as typed
    elif shown is None and item.default not in (None, dataclasses.MISSING):
        shown = _shown(item.default)
    return _with_default(doc, shown) if shown else doc


def add_options(parser: argparse.ArgumentParser, cls: type, names: Sequence[str],
                defaults: Mapping[str, Any] | None = None) -> None:
    """Add an option for each named field of ``cls``, in the order given.

    ``defaults`` replaces a field's default for this parser only; for a list field it is the
    text a user would type (``{"emulate_speeds": "none"}``).
    """
    for name in names:
        item = _resolve(cls, name)
        if defaults and name in defaults:
            item = dataclasses.replace(item, default=defaults[name])
        meta = item.field.metadata
        kind = _scalar_type(item.kind)
        if kind is bool:
            negate = item.default is True
            flag = "--no-" + item.flag[2:] if negate and "flag" not in meta else item.flag
            parser.add_argument(flag, dest=name, default=item.default,
                                action="store_false" if negate else "store_true",
                                help=_help(item))
            continue
        metavar = meta.get("metavar") or item.flag[2:].replace("-", "_").upper()
        if item.list_parser is not None:
            # Parsed in values(), so that a bad list is one line on stderr; None: the default.
            text = defaults.get(name) if defaults else None
            parser.add_argument(item.flag, dest=name, default=text, metavar=metavar,
                                help=_help(item))
            continue
        value_type = SCALAR_PARSERS[meta["parse"]] if "parse" in meta else kind
        required = item.default is dataclasses.MISSING
        parser.add_argument(item.flag, dest=name, type=value_type, metavar=metavar,
                            required=required,
                            default=None if required else item.default, help=_help(item))


def values(cls: type, args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from the parsed options ``names``; a nested config
    (``"agent.seed"``) is built from its own names. A list option left out keeps the field's
    default."""
    found: dict[str, Any] = {}
    nested: dict[str, list[str]] = {}
    for name in names:
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, []).append(rest)
            continue
        item = _resolve(cls, name)
        value = getattr(args, name)
        if item.list_parser is not None:
            if value is None:
                continue
            value = LIST_PARSERS[item.list_parser](value, item.flag)
            if typing.get_origin(_scalar_type(item.kind)) is tuple and value is not None:
                value = tuple(value)
        found[name] = value
    for head, rests in nested.items():
        sub = argparse.Namespace(**{rest: getattr(args, f"{head}.{rest}") for rest in rests})
        found[head] = build(typing.get_type_hints(cls)[head], sub, rests)
    return found


def build(cls: type, args: argparse.Namespace, names: Sequence[str], **given: Any) -> Any:
    """``cls`` from the parsed options ``names`` and the keyword arguments ``given``; its
    ``__post_init__`` is the one check of every value."""
    return cls(**values(cls, args, names), **given)
