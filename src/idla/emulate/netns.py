"""Several emulated hosts on one machine: network namespaces on a bridge, shaped with ``tc tbf``.

Layout of one rig with tag ``<tag>``::

    <tag>-h0: eth0 10.200.0.10/24 ─veth─ h0 ┐
    <tag>-h1: eth0 10.200.0.11/24 ─veth─ h1 ┼─ br0   (all in namespace <tag>-br)
    ...                                      ┘

A worker joins its host with :func:`enter_netns` before it opens a socket; from then on its
traffic crosses the bridge instead of the loopback device. A rate shapes both directions of a
host's link with a token bucket (``tbf``): ``eth0`` egress inside the host is its upload, ``h<i>``
egress inside the bridge namespace is its download. This emulates bandwidth only: the kernel here
has no ``netem``, so the rig adds no delay and no loss beyond what the queues themselves cause.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

from idla.errors import ConfigError, EmulationError

MAX_HOSTS = 50
SUBNET_PREFIX = "10.200.0."  # every rig uses 10.200.0.0/24, isolated inside its own namespaces
FIRST_HOST_OCTET = 10  # host i gets 10.200.0.<10 + i>
PREFIX_LENGTH = 24
MIN_BURST_BYTES = 16 * 1024  # about ten full-size Ethernet frames
BURST_WINDOW_S = 0.01  # the bucket holds 10 ms of traffic at the shaped rate, if that is larger
QUEUE_LATENCY_MS = 400  # longest a packet may wait in the tbf queue before it is dropped
COMMAND_TIMEOUT_S = 30.0
CLONE_NEWNET = 0x40000000  # from <sched.h>; Python 3.11 has no os.setns
NETNS_DIR = "/var/run/netns"  # where ``ip netns add`` binds the namespace files
UNAVAILABLE = "the multi-host rig needs root and iproute2 (ip netns, tc)"

_RATE_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE | re.ASCII)
_BITS_PER_UNIT = {  # tc's units: "bit" suffixes count bits, "bps" suffixes count bytes
    "": 1,
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "tbit": 10**12,
    "bps": 8,
    "kbps": 8 * 10**3,
    "mbps": 8 * 10**6,
    "gbps": 8 * 10**9,
    "tbps": 8 * 10**12,
}
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_rig_numbers = itertools.count()
_CLEANUP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_live_rigs: list[NetnsRig] = []  # started and not yet closed, oldest first
_previous_handlers: dict[int, Any] = {}  # what _on_signal replaced; empty when not installed


def parse_rate(text: str) -> int:
    """Bits per second from a tc-style rate: ``10mbit``, ``1.5mbit``, ``100mbps`` (bytes), ``8000``.

    Units are decimal as in tc (``kbit`` = 1000 bit/s); a plain number is bit/s. Anything else,
    and any rate that rounds to zero, is a ConfigError naming the input.
    """
    match = _RATE_PATTERN.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _BITS_PER_UNIT:
        raise ConfigError(f"bandwidth {text!r} does not parse; use e.g. 10mbit, 500kbit, 1gbit")
    rate_bit_s = round(float(match.group(1)) * _BITS_PER_UNIT[unit])
    if rate_bit_s <= 0:
        raise ConfigError(f"bandwidth {text!r} must be a positive rate, e.g. 10mbit")
    return rate_bit_s


def tbf_burst_bytes(rate_bit_s: int) -> int:
    """Token-bucket size for ``rate_bit_s``: 10 ms of traffic, but never under 16 KiB.

    tc-tbf(8) asks for at least rate/HZ bytes or the shaper cannot reach its rate; 10 ms covers
    HZ=100. The 16 KiB floor keeps several full frames (and a segmented GSO packet) in the bucket
    at low rates; it lets a link start with at most that many bytes unshaped.
    """
    return max(round(rate_bit_s * BURST_WINDOW_S / 8), MIN_BURST_BYTES)


def rig_unavailable_reason() -> str | None:
    """Why :class:`NetnsRig` cannot run here (not root, iproute2 missing), or None if it can."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        details = f"missing: {', '.join(missing)}" if missing else "not running as root"
        return f"{UNAVAILABLE}; {details}"
    return None


def enter_netns(namespace: str) -> None:
    """Move the calling thread into network namespace ``namespace`` (made by ``ip netns add``).

    Call it first thing in a spawned worker, before any socket exists: sockets stay in the
    namespace they were opened in. Threads and processes started afterwards inherit it.
    """
    path = os.path.join(NETNS_DIR, namespace)
    if "/" in namespace or not namespace:
        raise EmulationError(f"network namespace {namespace!r} is not a valid name")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EmulationError(
            f"network namespace {namespace!r} does not exist ({path}: {exc.strerror or exc})"
        ) from exc
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise EmulationError(
                f"cannot enter network namespace {namespace!r}: {os.strerror(error)}"
            )
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Host:
    """One emulated host: a network namespace whose ``interface`` carries ``address``."""

    index: int  # position in the rig, 0-based
    namespace: str  # name for enter_netns / ip -n
    address: str  # IPv4 address without prefix length, e.g. "10.200.0.10"
    interface: str = "eth0"  # the host's only link, inside its namespace


@dataclass(frozen=True, slots=True)
class LinkCounters:
    """Kernel statistics of a host's ``eth0``, counted since the rig was created."""

    tx_bytes: int  # bytes the host sent (upload)
    rx_bytes: int  # bytes the host received (download)
    tx_packets: int
    rx_packets: int


def _run(args: Sequence[str]) -> str:
    """Run one iproute2 command; a failure raises EmulationError carrying its stderr."""
    command = " ".join(args)
    try:
        result = subprocess.run(
            list(args), check=False, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulationError(f"netns rig: `{command}` did not run: {exc}") from exc
    if result.returncode != 0:
        reason = result.stderr.strip() or f"exit status {result.returncode}"
        raise EmulationError(f"netns rig: `{command}` failed: {reason}")
    return result.stdout


def _ip(namespace: str, *args: str) -> str:
    """``ip -n namespace args...``."""
    return _run(["ip", "-n", namespace, *args])


def _tc(namespace: str, *args: str) -> str:
    """``tc -n namespace args...``."""
    return _run(["tc", "-n", namespace, *args])


class NetnsRig:
    """``hosts`` namespaces on one bridge, each link optionally shaped to ``rate_bit_s``.

    Use as a context manager (or call :meth:`start` and :meth:`close`). Everything lives in
    namespaces the rig creates, so deleting them removes the veths and the bridge too; cleanup
    runs on leaving the ``with`` block, at interpreter exit, and on SIGINT/SIGTERM (after which
    the previous handler runs).
    """

    def __init__(
        self, hosts: int, rate_bit_s: int | None = None, *, name: str | None = None
    ) -> None:
        reason = rig_unavailable_reason()
        if reason is not None:
            raise EmulationError(reason)
        if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise ConfigError(f"hosts must be an integer in 1..{MAX_HOSTS}, got {hosts!r}")
        _check_rate(rate_bit_s)
        tag = name if name is not None else f"idla{os.getpid()}x{next(_rig_numbers)}"
        if not _NAME_PATTERN.fullmatch(tag):
            raise ConfigError(f"rig name {tag!r} must be 1-40 letters, digits, '_', '.' or '-'")
        self.tag = tag  # prefix of every namespace this rig owns
        self.bridge_namespace = f"{tag}-br"
        self.hosts = [
            Host(i, f"{tag}-h{i}", f"{SUBNET_PREFIX}{FIRST_HOST_OCTET + i}") for i in range(hosts)
        ]
        self._initial_rate_bit_s = rate_bit_s
        self._rates_bit_s: list[int | None] = [None] * hosts  # shaping now in force per host
        self._created: list[str] = []  # namespaces that exist because of this rig
        self._owner_pid = os.getpid()  # a forked child must never tear down its parent's rig
        self._started = False

    @property
    def namespaces(self) -> list[str]:
        """Every namespace the rig owns: the bridge's, then one per host."""
        return [self.bridge_namespace] + [host.namespace for host in self.hosts]

    def host(self, index: int) -> Host:
        """Host ``index`` (0-based)."""
        if not 0 <= index < len(self.hosts):
            raise IndexError(f"NetnsRig: host {index} not in 0..{len(self.hosts) - 1}")
        return self.hosts[index]

    def start(self) -> NetnsRig:
        """Create the bridge and the hosts; on any failure remove what was made and raise."""
        if self._started:
            return self
        self._started = True
        _register(self)
        try:
            self._build()
        except BaseException as exc:
            try:
                self.close()
            except EmulationError as cleanup:
                raise EmulationError(f"{exc}; cleaning up also failed: {cleanup}") from exc
            raise
        return self

    def _build(self) -> None:
        bridge = self.bridge_namespace
        self._add_namespace(bridge)
        _ip(bridge, "link", "add", "br0", "type", "bridge")
        _ip(bridge, "link", "set", "br0", "up")
        for host in self.hosts:
            port, eth, ns = f"h{host.index}", host.interface, host.namespace
            self._add_namespace(ns)
            _ip(bridge, "link", "add", port, "type", "veth", "peer", "name", eth, "netns", ns)
            _ip(bridge, "link", "set", port, "master", "br0")
            _ip(bridge, "link", "set", port, "up")
            _ip(ns, "addr", "add", f"{host.address}/{PREFIX_LENGTH}", "dev", eth)
            _ip(ns, "link", "set", eth, "up")
            if self._initial_rate_bit_s is not None:
                self.set_rate(host.index, self._initial_rate_bit_s)

    def _add_namespace(self, namespace: str) -> None:
        if not self._started:  # a signal handler closed the rig while it was being built
            raise EmulationError(f"netns rig {self.tag}: closed while being created")
        _run(["ip", "netns", "add", namespace])
        self._created.append(namespace)
        _ip(namespace, "link", "set", "lo", "up")

    def _links(self, index: int) -> list[tuple[str, str]]:
        """(namespace, device) of both egress points of host ``index``: upload, then download."""
        host = self.host(index)
        return [(host.namespace, host.interface), (self.bridge_namespace, f"h{index}")]

    def _check_started(self, method: str) -> None:
        if not self._started:
            raise RuntimeError(f"NetnsRig.{method} called before start() or outside its 'with'")

    def set_rate(self, index: int, rate_bit_s: int | None) -> None:
        """Shape both directions of host ``index`` to ``rate_bit_s``; None removes the shaping."""
        self._check_started("set_rate")
        _check_rate(rate_bit_s)
        for namespace, device in self._links(index):
            if rate_bit_s is None:
                if self._rates_bit_s[index] is not None:
                    _tc(namespace, "qdisc", "del", "dev", device, "root")
                continue
            burst_bytes = str(tbf_burst_bytes(rate_bit_s))
            tbf = ["tbf", "rate", f"{rate_bit_s}bit", "burst", burst_bytes]
            latency = ["latency", f"{QUEUE_LATENCY_MS}ms"]
            _tc(namespace, "qdisc", "replace", "dev", device, "root", *tbf, *latency)
        self._rates_bit_s[index] = rate_bit_s

    def rate_bit_s(self, index: int) -> int | None:
        """The shaping now in force on host ``index``, or None when unshaped."""
        self.host(index)
        return self._rates_bit_s[index]

    def set_link(self, index: int, up: bool) -> None:
        """Bring host ``index``'s ``eth0`` up or down, e.g. to cut a worker off mid-run."""
        self._check_started("set_link")
        host = self.host(index)
        state = "up" if up else "down"
        _ip(host.namespace, "link", "set", host.interface, state)

    def counters(self) -> list[LinkCounters]:
        """Bytes and packets each host's ``eth0`` has sent and received, in host order."""
        self._check_started("counters")
        result = []
        for host in self.hosts:
            text = _ip(host.namespace, "-s", "-j", "link", "show", "dev", host.interface)
            try:
                stats = json.loads(text)[0]["stats64"]
                tx, rx = stats["tx"], stats["rx"]
                result.append(LinkCounters(tx["bytes"], rx["bytes"], tx["packets"], rx["packets"]))
            except (ValueError, LookupError, TypeError) as exc:
                raise EmulationError(
                    f"netns rig: unexpected `ip -s -j link` output for {host.namespace}: {exc!r}"
                ) from exc
        return result

    def close(self) -> None:
        """Delete every namespace this rig created and restore signal handlers; idempotent."""
        if not self._started or os.getpid() != self._owner_pid:
            return
        self._started = False
        _unregister(self)
        failures = []
        for namespace in reversed(self._created):
            try:
                _run(["ip", "netns", "del", namespace])
            except EmulationError as exc:
                failures.append(str(exc))
        self._created.clear()
        if failures:
            raise EmulationError("; ".join(failures))

    def __enter__(self) -> NetnsRig:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check_rate(rate_bit_s: int | None) -> None:
    """A rate is None (unshaped) or a positive whole number of bit/s."""
    if rate_bit_s is None:
        return
    if isinstance(rate_bit_s, bool) or not isinstance(rate_bit_s, int) or rate_bit_s <= 0:
        raise ConfigError(f"rate_bit_s must be a positive integer or None, got {rate_bit_s!r}")


def _register(rig: NetnsRig) -> None:
    """Remove ``rig`` at interpreter exit and on SIGINT/SIGTERM, until it is closed.

    One handler serves every live rig, so rigs may close in any order and the handlers that were
    there before the first rig come back after the last. Only the main thread may set handlers;
    from another thread the rig is still removed at exit.
    """
    _live_rigs.append(rig)
    atexit.register(rig.close)
    if _previous_handlers or threading.current_thread() is not threading.main_thread():
        return
    for signum in _CLEANUP_SIGNALS:
        _previous_handlers[signum] = signal.getsignal(signum)
        signal.signal(signum, _on_signal)


def _unregister(rig: NetnsRig) -> None:
    """Undo :func:`_register`; the last rig out restores the previous handlers if still ours."""
    if rig in _live_rigs:
        _live_rigs.remove(rig)
    atexit.unregister(rig.close)
    if _live_rigs or threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in _previous_handlers.items():
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _previous_handlers.clear()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Remove every live rig, then do what the previous handler would have done."""
    previous = _previous_handlers.get(signum)
    try:
        for rig in reversed(list(_live_rigs)):
            rig.close()
    finally:
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # SIG_DFL, or a handler set outside Python
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
