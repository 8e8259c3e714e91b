"""Where `idla serve` gets its bearer token: ``--token-file``, ``IDLA_TOKEN``, ``--token``, or a
random one.

``--token`` stays for scripts that use it, but every user of the machine reads it in the
process list (``ps``, ``/proc/PID/cmdline``), so it earns a warning. A file (mode 600) or the
environment (``/proc/PID/environ`` is readable by the same user and root only) keep it private.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping

from idla.errors import ConfigError, read_user_text

ENV = "IDLA_TOKEN"
FLAG_WARNING = ("idla serve: warning: --token is visible to every user of this machine in the "
                "process list; pass it with --token-file PATH or the IDLA_TOKEN environment "
                "variable")


def _checked(token: str, where: str) -> str:
    token = token.strip()
    if not token:
        raise ConfigError(f"{where} is empty")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ConfigError(f"{where}: the token must be one word of printable ASCII (it travels "
                          "in an HTTP header)")
    return token


def read_token_file(path: str) -> tuple[str, str | None]:
    """The token in ``path`` (surrounding white space dropped) and a warning when other users
    may read the file; a `ConfigError` of one line when it is missing, unreadable or empty."""
    where = f"--token-file {path}"
    text = read_user_text(path, where)
    mode = os.stat(path).st_mode
    warning = None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warning = (f"idla serve: warning: {where} is readable by other users (mode "
                   f"{stat.S_IMODE(mode):o}); chmod 600 it")
    return _checked(text, where), warning


def resolve_token(flag: str | None, file: str | None, env: Mapping[str, str]
                  ) -> tuple[str, str, list[str]]:
    """(token, where it came from: "file" | "env" | "flag" | "generated", warnings)."""
    if flag is not None and file is not None:
        raise ConfigError("--token and --token-file: give one of them")
    if file is not None:
        token, warning = read_token_file(file)
        return token, "file", [warning] if warning else []
    if flag is not None:
        return _checked(flag, "--token"), "flag", [FLAG_WARNING]
    if ENV in env:
        return _checked(env[ENV], ENV), "env", []
    return secrets.token_urlsafe(24), "generated", []
