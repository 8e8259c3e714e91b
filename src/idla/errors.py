"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import os
from pathlib import Path


class IdlaError(Exception):
    """A mistake in the user's input or environment, reported without a traceback."""


class ConfigError(IdlaError, ValueError):
    """A configuration value is invalid; the message names the field."""


class PlanError(IdlaError, ValueError):
    """No allocation satisfies the constraints (e.g. memory caps cannot hold the global batch)."""


class EmulationError(IdlaError, RuntimeError):
    """Heterogeneity emulation (cgroups, namespaces) is not available here."""


class ReplicaMismatchError(IdlaError, RuntimeError):
    """Replicas diverged: parameter hashes differ across ranks."""


class GradientError(IdlaError, RuntimeError):
    """A gradient the exchange cannot make exact (a foreign ``.grad`` with values in it, a
    sparse gradient, ranks that disagree on which parameters train); the message names it."""


def read_user_text(path: str | os.PathLike[str], where: str, max_bytes: int | None = None,
                   ) -> str:
    """The UTF-8 text of a file the user named; every way it cannot be read is one ConfigError
    starting with ``where`` (the option or file it came from). ``max_bytes``: refuse a larger
    file before reading it."""
    file = Path(path)
    try:
        if max_bytes is not None and file.stat().st_size > max_bytes:
            raise ConfigError(f"{where}: larger than {max_bytes} bytes")
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{where}: not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"{where}: cannot be read ({error.strerror})") from None
