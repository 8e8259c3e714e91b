"""The job secret: every store entry idla writes is signed with it, every one it reads checked.

torch.distributed's stores have no authentication, so whoever reaches the store could forge a
join request, a heartbeat, a member list or a claim of progress. With a job secret
(``IDLA_JOB_SECRET``, or ``IDLA_JOB_SECRET_FILE`` naming a file that holds it) each entry is an
envelope ``{"v": VALUE_JSON, "m": MEMBER, "n": COUNTER, "mac": HEX}`` whose MAC is
HMAC-SHA256 (RFC 2104) over the key, the writer's member id, a counter (the generation, step or
heartbeat number the entry belongs to) and the value text. The key is under the MAC, so an
entry copied to another key is refused. A reader checks the MAC with `hmac.compare_digest`
before it parses the value; entries that fail are ignored, counted, and logged once per key
kind. Cost: one HMAC and one small JSON encode per write and per read (~10 µs in Python).

What it does not cover: the store's counters (``store.add``; they only order arrivals, and the
entries they point at are signed), the keys gloo and NCCL meet under, and the tensors they
carry, none of which torch authenticates; and a replayed old entry under its own key (idla's
keys name their generation, so a replay can only delay, never change, what is adopted). Anyone
who reaches the store can still stop the job (delete or flood keys).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idla.errors import ConfigError

SECRET_ENV = "IDLA_JOB_SECRET"
SECRET_FILE_ENV = "IDLA_JOB_SECRET_FILE"
MIN_SECRET_CHARS = 16
_log = logging.getLogger("idla.elastic")


def job_secret_from_env(environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The job secret from ``IDLA_JOB_SECRET`` or the file ``IDLA_JOB_SECRET_FILE`` names
    (surrounding whitespace stripped), or None when neither is set.

    Raises:
        ConfigError: Both are set, the file cannot be read, or the secret is shorter than
            `MIN_SECRET_CHARS` characters.
    """
    text, source = environ.get(SECRET_ENV), SECRET_ENV
    path = environ.get(SECRET_FILE_ENV)
    if text is not None and path is not None:
        raise ConfigError(f"set one of {SECRET_ENV} and {SECRET_FILE_ENV}, not both")
    if path is not None:
        source = f"{SECRET_FILE_ENV}={path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else (
                type(error).__name__)
            raise ConfigError(f"{source}: cannot read the job secret ({reason})") from None
    if text is None:
        return None
    secret = text.strip()
    if len(secret) < MIN_SECRET_CHARS:
        what = "is empty" if not secret else f"has {len(secret)} characters"
        raise ConfigError(f"{source}: the job secret {what}; use at least {MIN_SECRET_CHARS} "
                          "(e.g. the output of `openssl rand -hex 32`)")
    return secret.encode("utf-8")


def entry_mac(secret: bytes, key: str, member: int, counter: int, value_json: str) -> str:
    """HMAC-SHA256 of one entry, in hex. The fields are length-prefixed, so no two different
    entries have the same message."""
    message = "\n".join(f"{len(part)}:{part}"
                        for part in (key, str(member), str(counter), value_json))
    return hmac.new(secret, message.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    """A store entry that passed the check."""

    member: int
    """The member id of its writer."""
    counter: int
    """The generation, step or heartbeat number it belongs to."""
    value: Any
    """The parsed JSON value."""


def seal(secret: bytes | None, key: str, member: int, counter: int, value: Any) -> str:
    """The envelope to store under `key` (unsigned without a secret)."""
    value_json = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    mac = entry_mac(secret, key, member, counter, value_json) if secret is not None else ""
    return json.dumps({"v": value_json, "m": member, "n": counter, "mac": mac})


def unseal(secret: bytes | None, key: str, raw: bytes | str) -> tuple[Entry | None, str]:
    """(the entry, "") when `raw` is a well-formed envelope for `key` whose MAC checks (any
    well-formed one without a secret), else (None, why)."""
    try:
        envelope = json.loads(raw)
        value_json, member, counter, mac = (envelope["v"], envelope["m"], envelope["n"],
                                            envelope["mac"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None, "not an idla entry"
    if not (isinstance(value_json, str) and isinstance(mac, str)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in (member, counter))):
        return None, "not an idla entry"
    if secret is not None:
        if not mac:
            return None, "unsigned"
        if not hmac.compare_digest(mac, entry_mac(secret, key, member, counter, value_json)):
            return None, "signed with another secret, or altered"
    try:
        return Entry(member, counter, json.loads(value_json)), ""
    except ValueError:
        return None, "not an idla entry"


class StoreAuth:
    """Seals what this worker writes and checks what it reads; remembers what it refused."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret
        self.refused: dict[str, str] = {}
        """Each key whose entry was refused, with why (the first time)."""
        self._kinds_logged: set[str] = set()

    @property
    def authenticated(self) -> bool:
        return self.secret is not None

    def seal(self, key: str, member: int, counter: int, value: Any) -> str:
        return seal(self.secret, key, member, counter, value)

    def unseal(self, key: str, raw: bytes | str, member: int | None = None) -> Entry | None:
        """The checked entry, or None (remembered, and logged the first time for its kind of
        key: the key with each number written N). With `member`, an entry written by another
        member is refused too."""
        entry, why = unseal(self.secret, key, raw)
        if entry is not None and member is not None and entry.member != member:
            why = f"written by member {entry.member}, not {member}"
            entry = None
        if entry is None:
            kind = re.sub(r"\d+", "N", key)
            if kind not in self._kinds_logged:
                self._kinds_logged.add(kind)
                _log.warning("idla: ignored the store entry %s (%s); further refused %s "
                             "entries are only counted", key, why, kind)
            self.refused.setdefault(key, why)
        return entry
