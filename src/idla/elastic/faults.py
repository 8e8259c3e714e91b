"""Faults a worker injects into itself, for the fault-injection suite and chaos tests.

`IDLA_FAULTS` lists them, comma-separated, as `KIND:MEMBER@STEP`:
- `kill:2@30`: member 2 sends itself SIGKILL before computing step 30 (it cannot clean up);
- `term:2@30`: member 2 sends itself SIGTERM before computing step 30, or before its first step
  after that when it joins later (a graceful stop: it leaves at the next agreed boundary);
- `nan:1@20+5`: member 1's inputs are NaN for steps 20..24 (a corrupt batch: its loss and
  gradients are not finite);
- `slow:3@10x10`: member 3 runs 10× slower from step 10 on: its cgroup's CPU quota is divided
  by 10 when it runs in a throttled cgroup, otherwise each step sleeps 9× its last duration.
MEMBER `*` means every process that sees the variable (set it for one torchrun agent only).
A cut network link is injected from outside (`NetnsRig.set_link`), not here.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from idla.errors import ConfigError
from idla.runtime.tree import map_tensors

if TYPE_CHECKING:
    from idla.elastic.rendezvous import Rendezvous

_FAULT = re.compile(r"^(kill|term|nan|slow):(\d+|\*)@(\d+)(?:\+(\d+))?(?:x(\d+(?:\.\d+)?))?$")
FAULT_TIME_KEY = "fault/time"


@dataclass(frozen=True)
class Fault:
    kind: str
    """"kill", "term", "nan" or "slow"."""
    member: int
    """The member (original rank) it strikes; -1 for every process that reads the spec."""
    step: int
    """The (0-based) optimizer step before which the fault strikes."""
    steps: int = 1
    """For "nan": how many consecutive steps."""
    factor: float = 10.0
    """For "slow": how many times slower."""


def parse_faults(text: str) -> list[Fault]:
    """Parse an `IDLA_FAULTS` value; a clear error names the bad item."""
    faults = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = _FAULT.match(item)
        if match is None:
            raise ConfigError(
                f"IDLA_FAULTS: {item!r} is not KIND:MEMBER@STEP (kill:2@30, term:2@30, "
                "nan:1@20+5, slow:3@10x10)"
            )
        kind, member, step, count, factor = match.groups()
        fault = Fault(kind, -1 if member == "*" else int(member), int(step), int(count or 1),
                      float(factor or 10.0))
        if fault.steps < 1 or fault.factor < 1:
            raise ConfigError(f"IDLA_FAULTS: {item!r} needs +COUNT ≥ 1 and xFACTOR ≥ 1")
        faults.append(fault)
    return faults


def injected_fault_time(rdzv: Rendezvous) -> float | None:
    """When a `kill` fault struck (its victim wrote the time just before dying), else None."""
    entry = rdzv.read_entry(FAULT_TIME_KEY)
    value = entry.value if entry is not None else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def own_cpu_cgroup() -> Path | None:
    """This process's cgroup v1 cpu directory when it has a writable CFS quota, else None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(",") and path != "/":
            directory = Path("/sys/fs/cgroup/cpu") / path.lstrip("/")
            quota = directory / "cpu.cfs_quota_us"
            if quota.is_file() and os.access(quota, os.W_OK):
                return directory
    return None


class FaultInjector:
    """Applies this member's faults at the start of each step."""

    def __init__(self, member: int, faults: list[Fault], rdzv: Rendezvous | None) -> None:
        self.member = member
        self.faults = [f for f in faults if f.member in (member, -1)]
        self.rdzv = rdzv
        self.slow_factor = 1.0
        self._last_start: float | None = None
        self._termed = False

    @classmethod
    def from_env(cls, member: int, rdzv: Rendezvous | None) -> FaultInjector | None:
        text = os.environ.get("IDLA_FAULTS", "")
        faults = parse_faults(text)
        mine = cls(member, faults, rdzv)
        return mine if mine.faults else None

    def before_step(self, step: int, parts: Any) -> Any:
        """Strike the faults due at `step`; return the (possibly corrupted) batch."""
        self._dilate()
        for fault in self.faults:
            if fault.kind == "kill" and step == fault.step:
                if self.rdzv is not None:  # tells the benchmark when the fault struck
                    self.rdzv.write_entry(FAULT_TIME_KEY, step, time.time())
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.kind == "term" and step >= fault.step and not self._termed:
                self._termed = True
                os.kill(os.getpid(), signal.SIGTERM)
            elif fault.kind == "slow" and step == fault.step:
                self._slow_down(fault.factor)
            elif fault.kind == "nan" and fault.step <= step < fault.step + fault.steps:
                parts = map_tensors(
                    lambda t: torch.full_like(t, float("nan")) if t.is_floating_point() else t,
                    parts)
        return parts

    def _slow_down(self, factor: float) -> None:
        directory = own_cpu_cgroup()
        if directory is not None:
            quota = directory / "cpu.cfs_quota_us"
            current = int(quota.read_text())
            if current > 0:
                quota.write_text(str(max(1000, round(current / factor))))  # kernel min 1 ms
                return
        self.slow_factor = factor  # no quota to lower: dilate each step instead

    def _dilate(self) -> None:
        """Sleep (factor − 1) × the time the last step took, inside this step's compute."""
        if self.slow_factor > 1 and self._last_start is not None:
            time.sleep((self.slow_factor - 1) * (time.perf_counter() - self._last_start))
        self._last_start = time.perf_counter()
