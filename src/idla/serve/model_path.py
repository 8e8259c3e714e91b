"""Where ``POST /admin/model`` may load a model from, and what its errors may say about paths.

With a model root (``idla serve --model-root DIR``) a rollout path is taken relative to the root
(an absolute one must lie inside it); symlinks are resolved before the check, so neither ``..``
nor a link leads out. A path that does not exist and one outside the root get the same answer,
and answers name paths relative to the root, never the server's absolute paths: a token holder
learns nothing about the file system outside the root. Without a root any path the server can
read is allowed (the token holder is an administrator), and a missing path is answered the same
way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from idla.errors import ConfigError
from idla.serve.request_body import BadRequest

NO_MODEL = "no model directory at that path"
"""The one answer for a path that is missing, unreadable or outside the model root."""


def model_root(directory: str | Path) -> Path:
    """``directory`` resolved, for `confine`; a `ConfigError` unless it is a directory."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--model-root {directory}: not a directory")
    return path.resolve()


@dataclass(frozen=True, slots=True)
class ModelPath:
    resolved: Path
    """The path to load: absolute, symlinks resolved."""
    shown: str
    """How answers name it: relative to the root, or as the client wrote it (no root)."""

    def scrub(self, message: str, root: Path | None) -> str:
        """``message`` (a worker's refusal) with the resolved path, and the root, replaced by
        how the client may see them."""
        message = message.replace(str(self.resolved), self.shown)
        return message if root is None else message.replace(str(root), "<model root>")


def confine(requested: str, root: Path | None) -> ModelPath:
    """The path a rollout of ``requested`` loads; 422 `NO_MODEL` when it does not exist, cannot
    be resolved, or (with ``root``, itself resolved) resolves outside ``root``."""
    if not requested or "\0" in requested:
        raise BadRequest(422, NO_MODEL)
    candidate = Path(requested) if root is None else root / requested
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, unreadable, a symlink loop (RuntimeError ≤ 3.12)
        raise BadRequest(422, NO_MODEL) from None
    if root is None:
        return ModelPath(resolved, requested)
    if resolved != root and root not in resolved.parents:
        raise BadRequest(422, NO_MODEL)
    return ModelPath(resolved, str(resolved.relative_to(root)))
