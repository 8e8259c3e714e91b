"""The lighthouse store listens on the address it is given, not on every interface."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from idla.emulate.lighthouse import lighthouse
from idla.runtime.launch import free_port


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_a_loopback_lighthouse_listens_on_loopback_only() -> None:
    port = free_port()

    with lighthouse("127.0.0.1", port) as spec:
        listening = _listening_addresses(port)
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        client.set("k", "v")
        value = client.get("k")

    assert spec == f"tcp:127.0.0.1:{port}"
    assert listening == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or [::]
    assert value == b"v"
