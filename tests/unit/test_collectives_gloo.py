"""all_gather_json and measure_link_bandwidth across 2 real processes over gloo."""

import datetime
import ipaddress
import json
import os
from pathlib import Path

import psutil
import torch.distributed as dist
import torch.multiprocessing as mp

from idla.profile.probe import measure_link_bandwidth, probe_all
from idla.runtime.collectives import all_gather_json

WORLD_SIZE = 2


def _listening_addresses() -> list[str]:
    return [
        conn.laddr.ip
        for conn in psutil.Process().net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _worker(rank: int, out_dir: str) -> None:
    # Gloo binds its pair sockets on this interface only. The rendezvous is a file store because
    # TCPStore listens on every interface ("::") whatever MASTER_ADDR says.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/store",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        # Payloads of different lengths exercise the padding; non-ASCII checks the UTF-8 path.
        gathered = all_gather_json({"rank": rank, "text": "é" * (rank + 1), "xs": [0.5] * rank})
        bandwidth_bytes_per_s = measure_link_bandwidth(nbytes=2**20, repeats=3)
        profiles = probe_all(rank)
        listening = _listening_addresses()
    finally:
        dist.destroy_process_group()
    result = {
        "gathered": gathered,
        "bandwidth_bytes_per_s": bandwidth_bytes_per_s,
        "profile_ranks": [p.rank for p in profiles],
        "profile_bandwidths": [p.link_bandwidth_bytes_per_s for p in profiles],
        "listening": listening,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_gather_and_bandwidth_across_two_processes(tmp_path: Path) -> None:
    expected = [{"rank": r, "text": "é" * (r + 1), "xs": [0.5] * r} for r in range(WORLD_SIZE)]

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)

    for rank in range(WORLD_SIZE):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["gathered"] == expected
        assert isinstance(result["bandwidth_bytes_per_s"], float)
        assert result["bandwidth_bytes_per_s"] > 0
        assert result["profile_ranks"] == list(range(WORLD_SIZE))
        assert all(b is not None and b > 0 for b in result["profile_bandwidths"])
        assert all(_is_loopback(ip) for ip in result["listening"]), result["listening"]
