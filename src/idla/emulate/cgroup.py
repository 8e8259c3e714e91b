"""Real CPU-speed heterogeneity on one host through the cgroup v1 ``cpu`` controller.

Each local worker gets its own cgroup whose CFS bandwidth limit is ``base_cores × speed`` CPUs:
every ``period_us`` the kernel lets the group run for ``quota_us`` of CPU time, then stalls it
until the next period. A short period (10 ms) keeps the stalls short, so a throttled worker looks
slower rather than frozen. See the kernel's Documentation/scheduler/sched-bwc.rst.
"""

from __future__ import annotations

import atexit
import errno
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from idla.errors import ConfigError, EmulationError

OPTION = "--emulate-speeds"
DEFAULT_ROOT = "/sys/fs/cgroup/cpu"
MIN_QUOTA_US = 1_000  # the kernel refuses cpu.cfs_quota_us below 1 ms
MIN_PERIOD_US = 1_000  # cpu.cfs_period_us range accepted by the kernel: 1 ms ...
MAX_PERIOD_US = 1_000_000  # ... to 1 s
_CONTROL_FILES = ("cgroup.procs", "cpu.cfs_period_us", "cpu.cfs_quota_us")


def parse_speeds(text: str, option: str = OPTION) -> list[float]:
    """Parse ``"1,1,0.5,0.25"`` into ``[1.0, 1.0, 0.5, 0.25]``; anything else is a ConfigError."""
    error = ConfigError(f"{option}: {text!r} is not a comma-separated list of positive numbers")
    speeds = []
    for part in text.split(","):
        try:
            speed = float(part.strip())
        except ValueError:
            raise error from None
        if not math.isfinite(speed) or speed <= 0:
            raise error
        speeds.append(speed)
    return speeds


def cgroups_available(root: str = DEFAULT_ROOT) -> bool:
    """True when ``root`` is a cgroup v1 cpu controller this process may create groups in."""
    base = Path(root)
    return all((base / name).is_file() for name in _CONTROL_FILES) and os.access(base, os.W_OK)


class CpuThrottle:
    """One cgroup per local worker: period 10 ms (smooth throttling), quota = base_cores × speed.

    Use as a context manager: entering creates ``root/idla-<pid>-<i>`` for each speed, leaving
    moves any remaining tasks back to ``root`` and removes the groups. Cleanup is also registered
    with ``atexit`` so an exception or Ctrl-C in the launcher does not leave groups behind.
    """

    def __init__(
        self,
        speeds: Sequence[float],
        base_cores: float = 0.5,
        period_us: int = 10_000,
        root: str = DEFAULT_ROOT,
    ) -> None:
        self.speeds = [float(speed) for speed in speeds]  # relative CPU speed per local worker
        self.base_cores = float(base_cores)  # CPUs a worker of speed 1.0 gets
        self.period_us = int(period_us)  # CFS period, microseconds
        self.root = Path(root)  # mount point of the cgroup v1 cpu controller
        self.quotas_us = self._validate()  # CFS quota per worker, microseconds per period
        self.paths = [  # cgroup directory per local worker
            self.root / f"idla-{os.getpid()}-{index}" for index in range(len(self.speeds))
        ]
        self._entered = False

    def _validate(self) -> list[int]:
        if not self.speeds or any(not math.isfinite(s) or s <= 0 for s in self.speeds):
            raise ConfigError(
                f"{OPTION}: {self.speeds} must be a non-empty list of positive speeds"
            )
        if not math.isfinite(self.base_cores) or self.base_cores <= 0:
            raise ConfigError(f"{OPTION}: base_cores {self.base_cores} must be a positive number")
        if not MIN_PERIOD_US <= self.period_us <= MAX_PERIOD_US:
            raise ConfigError(
                f"{OPTION}: period {self.period_us} µs is outside the kernel's "
                f"{MIN_PERIOD_US}..{MAX_PERIOD_US} µs"
            )
        cpu_count = os.cpu_count() or 1
        total_speed = sum(self.speeds)
        total_cores = self.base_cores * total_speed
        if total_cores >= cpu_count:
            raise ConfigError(
                f"{OPTION}: base_cores {self.base_cores:g} × sum of speeds {total_speed:g} = "
                f"{total_cores:g} CPUs, must stay below the {cpu_count} CPUs of this host"
            )
        quotas_us = [round(self.base_cores * speed * self.period_us) for speed in self.speeds]
        for speed, quota_us in zip(self.speeds, quotas_us, strict=True):
            if quota_us < MIN_QUOTA_US:
                raise ConfigError(
                    f"{OPTION}: speed {speed:g} × base_cores {self.base_cores:g} × period "
                    f"{self.period_us} µs = {quota_us} µs, below the kernel minimum of "
                    f"{MIN_QUOTA_US} µs"
                )
        return quotas_us

    def _check_available(self) -> None:
        if not all((self.root / name).is_file() for name in _CONTROL_FILES):
            raise EmulationError(
                f"{OPTION}: no cgroup v1 cpu controller at {self.root} (cgroup v2 only, or not "
                f"mounted); run without {OPTION}"
            )
        if not os.access(self.root, os.W_OK):
            raise EmulationError(
                f"{OPTION}: {self.root} is not writable (needs root and a read-write cgroup v1 "
                f"cpu controller); run without {OPTION}"
            )

    def __enter__(self) -> CpuThrottle:
        if self._entered:
            return self
        self._check_available()
        atexit.register(self.close)
        self._entered = True
        try:
            for path, quota_us in zip(self.paths, self.quotas_us, strict=True):
                path.mkdir()
                # Period first: the kernel checks the quota against the period already set.
                (path / "cpu.cfs_period_us").write_text(f"{self.period_us}\n")
                (path / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
        except OSError as exc:
            self.close()
            raise EmulationError(
                f"{OPTION}: cannot set up a cgroup under {self.root} ({exc.strerror or exc}); "
                f"run without {OPTION}"
            ) from exc
        return self

    def attach(self, index: int, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the cgroup of local worker ``index``."""
        if not self._entered:
            raise RuntimeError("CpuThrottle.attach called outside its 'with' block")
        if not 0 <= index < len(self.paths):
            raise IndexError(f"CpuThrottle.attach: index {index} not in 0..{len(self.paths) - 1}")
        try:
            (self.paths[index] / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as exc:
            raise EmulationError(
                f"{OPTION}: cannot move pid {pid} into {self.paths[index]} ({exc.strerror or exc})"
            ) from exc

    def _evacuate(self, path: Path) -> None:
        """Move every task still in ``path`` back to the root group."""
        try:
            pids = (path / "cgroup.procs").read_text().split()
        except OSError:
            return
        for pid in pids:
            try:
                (self.root / "cgroup.procs").write_text(f"{pid}\n")
            except OSError as exc:
                if exc.errno != errno.ESRCH:  # ESRCH: the task exited meanwhile
                    raise

    def close(self, attempts: int = 20) -> None:
        """Move remaining tasks back to the root group and remove every group; idempotent."""
        if not self._entered:
            return
        leftover: list[Path] = []
        for path in self.paths:
            for _ in range(attempts):
                if not path.exists():
                    break
                try:
                    self._evacuate(path)
                    path.rmdir()
                    break
                except OSError as exc:
                    # EBUSY: a task forked into the group during evacuation; try again.
                    if exc.errno not in (errno.EBUSY, errno.ENOENT):
                        break
                    time.sleep(0.01)
            if path.exists():
                leftover.append(path)
        self._entered = False
        atexit.unregister(self.close)
        if leftover:
            warnings.warn(
                f"CpuThrottle: could not remove {', '.join(map(str, leftover))}", stacklevel=2
            )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
