"""The directory a run checkpoints into: one directory per save, and a ``latest`` pointer.

``<directory>/step-<step>/`` holds the first save of a step; a later save of the same step goes
to a fresh ``step-<step>.<8 hex>/``. ``<directory>/latest`` is a one-line file naming the
directory saved last. A save never renames onto or away from a directory `latest` may name:

1. the files are written into ``.tmp-step-<step>-*/`` and renamed to an unused step name;
2. `latest` is replaced (a temporary file, fsynced, then ``os.replace``, which is atomic);
3. only then are superseded directories removed: the other directories of the step just saved
   and of the step `latest` named before, and ``.tmp-*`` / ``.old-*`` leftovers of earlier
   saves (older than this save) that a crash left behind.

A crash at any point leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from idla.errors import ConfigError

LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)(?:\.[0-9a-f]{8})?$")
_LEFTOVER_PREFIXES = (".tmp-", ".old-")


def step_of(name: str) -> int | None:
    """The step a step directory's name holds (``step-12`` or ``step-12.1a2b3c4d``), or None."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def unused_step_dir(directory: Path, step: int) -> Path:
    """``step-<step>`` when no entry has that name, else ``step-<step>.<8 random hex>``."""
    first = directory / f"step-{step}"
    if not os.path.lexists(first):
        return first
    while True:
        candidate = directory / f"step-{step}.{uuid.uuid4().hex[:8]}"
        if not os.path.lexists(candidate):
            return candidate


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_latest(directory: Path, name: str) -> None:
    """Make ``directory/latest`` name `name`, atomically and durably."""
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-latest-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(name + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, directory / LATEST)
        fsync_path(directory)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def latest_name(directory: Path) -> str | None:
    """What ``directory/latest`` names, or None when there is no such file.

    Raises:
        ConfigError: The file is unreadable or names something that is not a plain entry.
    """
    latest = directory / LATEST
    if not latest.is_file():
        return None
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"checkpoint {directory} is damaged: {LATEST} cannot be read") from None
    if not name or os.sep in name or name in (".", "..") or "\n" in name:
        raise ConfigError(f"checkpoint {directory} is damaged: {LATEST} holds {name[:80]!r}")
    return name


def resolve(path: Path) -> Path:
    """A step directory: `path` itself, or the one its ``latest`` file names."""
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist")
    name = latest_name(path)
    if name is None:
        return path
    if not (path / name).is_dir():
        raise ConfigError(f"checkpoint {path}: {LATEST} names {name}, which does not exist")
    return path / name


def tidy(directory: Path, keep: str, previous: str | None, started_s: float) -> None:
    """Remove what the save of `keep` superseded: the other directories of its step and of
    `previous`'s step (`previous` itself stays unless it is of `keep`'s step), and leftovers
    of earlier saves whose mtime is before `started_s` (a concurrent save's are newer)."""
    steps = {step_of(keep)} | ({step_of(previous)} if previous else set())
    steps.discard(None)
    for entry in directory.iterdir():
        name = entry.name
        superseded = (step_of(name) in steps and name != keep
                      and not (name == previous and step_of(name) != step_of(keep)))
        try:
            leftover = (name.startswith(_LEFTOVER_PREFIXES)
                        and entry.lstat().st_mtime < started_s)
        except FileNotFoundError:
            continue
        if superseded or leftover:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
