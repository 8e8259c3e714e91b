"""The pool's devices: the backend's, less those an operator drained or a test marked lost.

A drained device leaves the pool gently (its worker departs at a step boundary, a serving
worker is retired first); a lost one as if it had died (its worker is killed). A device the
backend stops listing (a Ray node gone) counts as lost. Either comes back with `restore`.
Cost: O(D) per call for D devices.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from idla.pool.backend import Backend
from idla.pool.model import Device


class Inventory:
    """Which of the backend's devices the pool may use now; safe from any thread."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._out: dict[str, bool] = {}  # device id → lost (True) or drained (False)
        self._lock = threading.Lock()

    def up(self) -> list[Device]:
        """The backend's devices that are neither drained nor lost."""
        with self._lock:
            out = set(self._out)
        return [d for d in self._backend.devices() if d.device_id not in out]

    def states(self) -> dict[str, str]:
        """Every backend device: ``up``, ``drained`` or ``lost``."""
        with self._lock:
            out = dict(self._out)
        return {d.device_id: "up" if d.device_id not in out else
                "lost" if out[d.device_id] else "drained" for d in self._backend.devices()}

    def lost(self, device_id: str) -> bool:
        """A device not up was lost (its worker is killed), not drained."""
        with self._lock:
            return self._out.get(device_id, True)

    def set(self, device_id: str, lost: bool | None) -> str:
        """Drain (``lost`` False), lose (True) or restore (None) ``device_id``; the event's
        name. KeyError when the backend has no such device."""
        known: Sequence[str] = [d.device_id for d in self._backend.devices()]
        if device_id not in known:
            raise KeyError(device_id)
        with self._lock:
            if lost is None:
                self._out.pop(device_id, None)
                return "device_restored"
            self._out[device_id] = lost
        return "device_lost" if lost else "device_drained"
