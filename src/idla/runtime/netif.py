"""Which network interface gloo should use: the one holding the address routed to MASTER_ADDR.

Without ``GLOO_SOCKET_IFNAME`` gloo binds to the address the machine's host name resolves to.
Debian, Ubuntu and most images map the host name to 127.0.1.1 (or 127.0.0.1) in /etc/hosts, so
under plain ``torchrun`` on several hosts every rank publishes a loopback address and the job
hangs until its timeout. :func:`ensure_gloo_interface` fills the gap the way a user would: it
asks the kernel which local address it would use to reach MASTER_ADDR (a connected UDP socket;
``connect`` sends nothing) and names the interface that holds that address.

One case needs more: on the master's own host MASTER_ADDR (torchrun's c10d rendezvous puts the
rank-0 node's host name there) may itself resolve to loopback. When the job spans several
hosts loopback cannot be right, so the interface of the default route is taken instead, or
the only interface with a global address when there is no default route.

Linux only (``SIOCGIFCONF`` and /proc/net); elsewhere every lookup answers None.
"""

from __future__ import annotations

import array
import ipaddress
import socket
import struct
from collections.abc import Iterable, Mapping, MutableMapping

GLOO_SOCKET_IFNAME = "GLOO_SOCKET_IFNAME"
SIOCGIFCONF = 0x8912  # from <linux/sockios.h>: every IPv4 address with its interface's label
IFNAMSIZ = 16  # bytes of the name at the head of a struct ifreq
IFREQ_BYTES = 40 if struct.calcsize("P") == 8 else 32  # sizeof(struct ifreq): name + a union
MAX_ADDRESSES = 4096  # SIOCGIFCONF's buffer grows by doubling up to this many entries
PROBE_PORT = 9  # the discard port; a UDP connect() needs some port and sends nothing to it
RTF_UP = 0x0001  # from <linux/route.h>
IPV4_ROUTES = "/proc/net/route"
IPV6_ROUTES = "/proc/net/ipv6_route"
IPV6_ADDRESSES = "/proc/net/if_inet6"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def interface_addresses() -> list[tuple[str, str]]:
    """(interface, address) for every address on this host: IPv4 first, then IPv6.

    IPv4 names are the labels ``getifaddrs`` also reports (``eth0``, or ``eth0:1`` for a
    labelled alias), which is what gloo matches ``GLOO_SOCKET_IFNAME`` against. Empty where the
    kernel cannot be asked (not Linux).
    """
    return _ipv4_addresses() + _ipv6_addresses()


def interface_holding(address: str, table: Iterable[tuple[str, str]]) -> str | None:
    """The interface in ``table`` ((interface, address) pairs) that holds ``address``.

    A loopback address other than the one assigned (127.0.1.1, say, on a device holding
    127.0.0.1/8) belongs to the interface holding a loopback address of the same family.
    """
    wanted = _parse(address)
    if wanted is None:
        return None
    entries = [(name, parsed) for name, text in table if (parsed := _parse(text)) is not None]
    for name, held in entries:
        if held == wanted:
            return name
    if wanted.is_loopback:
        for name, held in entries:
            if held.is_loopback and held.version == wanted.version:
                return name
    return None


def local_address_toward(address: str) -> str | None:
    """The local address the kernel would send from to reach ``address`` (a name or an IP).

    Resolves the name and connects a UDP socket to each result in turn (no packet leaves);
    None when the name does not resolve or no route leads to any of its addresses.
    """
    try:
        results = socket.getaddrinfo(address, PROBE_PORT, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, kind, protocol, _name, target in results:
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.connect(target)
                return str(probe.getsockname()[0]).split("%", 1)[0]
        except OSError:
            continue
    return None


def interface_for(address: str) -> str | None:
    """The name of the local interface the kernel would use to reach ``address``.

    Precisely: the interface holding the source address of that route. ``"lo"`` for a loopback
    address; for one of this host's own addresses, the interface holding it (the kernel sends
    such traffic over loopback, but that interface is where peers reach this host). None when
    the name does not resolve, nothing routes to it, or the kernel cannot be asked.
    """
    local = local_address_toward(address)
    return None if local is None else interface_holding(local, interface_addresses())


def outward_interface() -> str | None:
    """The interface other hosts most likely reach this one on.

    The interface of the default route (IPv4, then IPv6) with the lowest metric; without a
    default route, the only interface that holds a global (not loopback, not link-local)
    address; otherwise None.
    """
    for path, parse in ((IPV4_ROUTES, default_route_ipv4), (IPV6_ROUTES, default_route_ipv6)):
        try:
            with open(path, encoding="ascii") as routes:
                name = parse(routes.read())
        except OSError:
            continue
        if name is not None:
            return name
    return sole_global_interface(interface_addresses())


def default_route_ipv4(table: str) -> str | None:
    """The interface of the lowest-metric default route in /proc/net/route's text."""
    best: tuple[int, str] | None = None
    for line in table.splitlines()[1:]:  # the first line names the columns
        fields = line.split()
        if len(fields) < 8:
            continue
        name, destination, flags, metric, mask = (fields[i] for i in (0, 1, 3, 6, 7))
        try:
            up = int(flags, 16) & RTF_UP
            default = int(destination, 16) == 0 and int(mask, 16) == 0
            candidate = (int(metric), name)
        except ValueError:
            continue
        if up and default and (best is None or candidate < best):
            best = candidate
    return None if best is None else best[1]


def default_route_ipv6(table: str) -> str | None:
    """The interface of the lowest-metric default route in /proc/net/ipv6_route's text.

    The kernel lists unreachable defaults on ``lo``; those are skipped.
    """
    best: tuple[int, str] | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) != 10:
            continue
        destination, prefix, metric, flags, name = (fields[i] for i in (0, 1, 5, 8, 9))
        try:
            up = int(flags, 16) & RTF_UP
            default = int(destination, 16) == 0 and int(prefix, 16) == 0
            candidate = (int(metric, 16), name)
        except ValueError:
            continue
        if up and default and name != "lo" and (best is None or candidate < best):
            best = candidate
    return None if best is None else best[1]


def sole_global_interface(table: Iterable[tuple[str, str]]) -> str | None:
    """The one interface in ``table`` holding a global address, or None if none or several."""
    names = set()
    for name, text in table:
        parsed = _parse(text)
        if parsed is not None and not (parsed.is_loopback or parsed.is_link_local):
            names.add(name)
    return names.pop() if len(names) == 1 else None


def spans_several_hosts(environ: Mapping[str, str]) -> bool:
    """Whether torchrun's environment describes ranks on more than this host.

    torchrun sets WORLD_SIZE (all ranks) and LOCAL_WORLD_SIZE (ranks on this host); when either
    is missing or not a number the answer is False.
    """
    try:
        return int(environ["WORLD_SIZE"]) > int(environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return False


def ensure_gloo_interface(environ: MutableMapping[str, str]) -> str | None:
    """Set ``GLOO_SOCKET_IFNAME`` in ``environ`` from the route to MASTER_ADDR, if unset.

    A value already there (the user's) is left alone, as is an environment without
    MASTER_ADDR. A loopback answer is kept for a job on one host and replaced by
    :func:`outward_interface` for a job on several. Returns the name it set, or None when it
    set nothing (a value was there, no MASTER_ADDR, or nothing could be found); never raises.
    Call it before ``init_process_group``: gloo reads the variable when a group is created.
    """
    if environ.get(GLOO_SOCKET_IFNAME) or not environ.get("MASTER_ADDR"):
        return None
    try:
        name = interface_for(environ["MASTER_ADDR"])
        if name is not None and _is_loopback_interface(name) and spans_several_hosts(environ):
            name = outward_interface()
    except Exception:  # a guess that fails must never stop the job: gloo's default remains
        return None
    if name is None:
        return None
    environ[GLOO_SOCKET_IFNAME] = name
    return name


def _is_loopback_interface(name: str) -> bool:
    """Whether interface ``name`` holds only loopback addresses."""
    held = [_parse(text) for interface, text in interface_addresses() if interface == name]
    return bool(held) and all(address is not None and address.is_loopback for address in held)


def _parse(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _ipv4_addresses() -> list[tuple[str, str]]:
    """Every IPv4 address with its interface label, from one ``SIOCGIFCONF`` ioctl."""
    try:
        import fcntl  # POSIX only; elsewhere there is nothing to ask
    except ImportError:
        return []
    entries = 64
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            while True:
                size = entries * IFREQ_BYTES
                buffer = array.array("B", bytes(size))
                pointer, _length = buffer.buffer_info()
                request = struct.pack("iP", size, pointer)  # struct ifconf {int len; char *buf}
                used, _pointer = struct.unpack(
                    "iP", fcntl.ioctl(sock.fileno(), SIOCGIFCONF, request)
                )
                if used < size or entries >= MAX_ADDRESSES:  # a full buffer may have cut it
                    break
                entries *= 2
    except OSError:
        return []
    data = buffer.tobytes()[:used]
    result = []
    for offset in range(0, used - IFREQ_BYTES + 1, IFREQ_BYTES):
        name = data[offset : offset + IFNAMSIZ].split(b"\0", 1)[0].decode("ascii", "replace")
        (family,) = struct.unpack_from("H", data, offset + IFNAMSIZ)  # sockaddr_in.sin_family
        if family == socket.AF_INET:  # sin_port (2 bytes) comes before sin_addr
            result.append((name, socket.inet_ntoa(data[offset + 20 : offset + 24])))
    return result


def _ipv6_addresses() -> list[tuple[str, str]]:
    """Every IPv6 address with its interface, from /proc/net/if_inet6."""
    try:
        with open(IPV6_ADDRESSES, encoding="ascii") as table:
            lines = table.read().splitlines()
    except OSError:
        return []
    result = []
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and len(fields[0]) == 32:
            try:
                address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            except ValueError:
                continue
            result.append((fields[5], str(address)))
    return result
