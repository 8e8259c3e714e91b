"""Who may talk to a serving worker: the router that started it, proven by a per-run secret.

`WorkerPool` draws a secret (`new_secret`, 32 random bytes) and hands it to each worker on the
worker's stdin, an inherited pipe: it is never on a command line, in the environment or in a
file. A connection then opens with a mutual HMAC-SHA256 challenge-response:

1. worker → ``{"op": "challenge", "nonce": N_w}``;
2. router → ``{"op": "auth", "mac": HMAC(secret, "router" N_w), "nonce": N_r}``;
3. worker checks the mac (`hmac.compare_digest`) and answers ``hello`` with
   ``"mac": HMAC(secret, "worker" N_r)``, which the router checks; a wrong mac gets an
   ``error`` frame and the connection is closed.

Nonces are 32 random bytes, so a recorded exchange proves nothing on a later connection; the
secret never crosses the socket. Cost: two HMACs per connection.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import IO, Any

from idla.errors import ConfigError

SECRET_BYTES = 32
NONCE_BYTES = 32
PROTOCOL = b"idla-worker-link/1"


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def proof(secret: bytes, role: str, nonce: str) -> str:
    """Hex HMAC-SHA256 that ``role`` ("router" or "worker") knows ``secret``, bound to ``nonce``
    (the other side's challenge)."""
    message = b"|".join((PROTOCOL, role.encode(), nonce.encode()))
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify(secret: bytes, role: str, nonce: str, mac: Any) -> bool:
    """Whether ``mac`` (anything a peer sent) is `proof` (secret, role, nonce); constant time."""
    if not isinstance(mac, str) or not mac.isascii():
        return False
    return hmac.compare_digest(mac.encode(), proof(secret, role, nonce).encode())


def valid_nonce(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 2 * NONCE_BYTES
            and all(c in "0123456789abcdef" for c in value))


def read_secret(stream: IO[bytes]) -> bytes:
    """The secret a worker's launcher wrote on its stdin: one line of 64 hex digits."""
    line = stream.readline(4 * SECRET_BYTES).strip()
    try:
        secret = bytes.fromhex(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"a serving worker reads its link secret ({2 * SECRET_BYTES} hex "
                          "digits, one line) on stdin; start workers with WorkerPool or "
                          "`idla serve`")
    return secret
