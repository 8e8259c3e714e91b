"""GLOO_SOCKET_IFNAME from the route to MASTER_ADDR: the lookups on this host and the parsers."""

from __future__ import annotations

import sys

import pytest

from idla.runtime import netif

linux = pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's interface tables")
UNRESOLVABLE = "no-such-host.invalid"  # RFC 6761: never resolves

IPV4_ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
"""
IPV6_ROUTES = """\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 \
00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
"""


@linux
def test_loopback_is_lo() -> None:
    assert netif.interface_for("127.0.0.1") == "lo"
    assert netif.interface_for("localhost") == "lo"


@linux
def test_loopback_master_on_one_host_sets_lo() -> None:
    # Prepare
    environ = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}

    # Execute
    chosen = netif.ensure_gloo_interface(environ)

    # Assert
    assert chosen == "lo"
    assert environ["GLOO_SOCKET_IFNAME"] == "lo"


def test_a_users_value_is_kept() -> None:
    # Prepare
    environ = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "eth7"}

    # Execute
    chosen = netif.ensure_gloo_interface(environ)

    # Assert
    assert chosen is None
    assert environ["GLOO_SOCKET_IFNAME"] == "eth7"


def test_an_unresolvable_master_sets_nothing() -> None:
    # Prepare
    environ = {"MASTER_ADDR": UNRESOLVABLE}

    # Execute
    chosen = netif.ensure_gloo_interface(environ)

    # Assert
    assert netif.interface_for(UNRESOLVABLE) is None
    assert chosen is None
    assert "GLOO_SOCKET_IFNAME" not in environ


def test_no_master_sets_nothing() -> None:
    environ: dict[str, str] = {}

    assert netif.ensure_gloo_interface(environ) is None
    assert environ == {}


@linux
def test_loopback_master_of_a_job_on_several_hosts_is_not_lo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: as on the master's own host, where its name resolves to 127.0.1.1
    monkeypatch.setattr(netif, "outward_interface", lambda: "eth9")
    environ = {"MASTER_ADDR": "127.0.1.1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}

    # Execute
    chosen = netif.ensure_gloo_interface(environ)

    # Assert
    assert chosen == "eth9"
    assert environ["GLOO_SOCKET_IFNAME"] == "eth9"


def test_a_failing_lookup_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    def broken(address: str) -> str | None:
        raise RuntimeError(f"no kernel to ask about {address}")

    monkeypatch.setattr(netif, "interface_for", broken)
    environ = {"MASTER_ADDR": "10.0.0.1"}

    # Execute
    chosen = netif.ensure_gloo_interface(environ)

    # Assert
    assert chosen is None
    assert "GLOO_SOCKET_IFNAME" not in environ


@linux
def test_this_hosts_addresses_include_loopback() -> None:
    table = netif.interface_addresses()

    assert ("lo", "127.0.0.1") in table


def test_interface_holding_matches_exactly_then_loopback_aliases() -> None:
    # Prepare
    table = [("lo", "127.0.0.1"), ("eth0", "192.0.2.2"), ("eth0:1", "192.0.2.7"),
             ("eth0", "fe80::1"), ("lo", "::1"), ("bond0", "fd00::2")]

    # Execute / Assert
    assert netif.interface_holding("192.0.2.2", table) == "eth0"
    assert netif.interface_holding("192.0.2.7", table) == "eth0:1"
    assert netif.interface_holding("fd00::2", table) == "bond0"
    assert netif.interface_holding("fe80::1%eth0", table) == "eth0"
    assert netif.interface_holding("127.0.1.1", table) == "lo"
    assert netif.interface_holding("::1", table) == "lo"
    assert netif.interface_holding("198.51.100.1", table) is None
    assert netif.interface_holding("not an address", table) is None


def test_default_routes_take_the_lowest_metric_and_skip_unreachable() -> None:
    assert netif.default_route_ipv4(IPV4_ROUTES) == "eth0"
    assert netif.default_route_ipv6(IPV6_ROUTES) == "eth1"
    assert netif.default_route_ipv4(IPV4_ROUTES.splitlines()[0]) is None
    assert netif.default_route_ipv6(IPV6_ROUTES.splitlines()[-1]) is None


def test_sole_global_interface_ignores_loopback_and_link_local() -> None:
    one = [("lo", "127.0.0.1"), ("nic-a", "10.201.0.1"), ("nic-a", "fe80::1"), ("lo", "::1")]
    two = [*one, ("nic-b", "10.202.0.1")]

    assert netif.sole_global_interface(one) == "nic-a"
    assert netif.sole_global_interface(two) is None
    assert netif.sole_global_interface([("lo", "127.0.0.1")]) is None


@pytest.mark.parametrize(
    ("environ", "several"),
    [({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, True),
     ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, False),
     ({"WORLD_SIZE": "8"}, False),
     ({"WORLD_SIZE": "eight", "LOCAL_WORLD_SIZE": "4"}, False)],
)
def test_spans_several_hosts(environ: dict[str, str], several: bool) -> None:
    assert netif.spans_several_hosts(environ) is several
