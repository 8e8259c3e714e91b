"""GLOO_SOCKET_IFNAME from the route to MASTER_ADDR, on two real network namespaces.

Two hosts on one bridge, each with its own host name and an /etc/hosts the way Debian and Ubuntu
write it (the machine's own name on 127.0.1.1, the other host's name on its address)::

    <tag>-a: nic-a 10.201.0.1/24 ─veth─ port-a ┐
    <tag>-b: nic-b 10.201.0.2/24 ─veth─ port-b ┴─ br0   (in namespace <tag>-br)

``ip netns exec`` bind-mounts /etc/netns/<namespace>/hosts over /etc/hosts and ``unshare --uts``
gives each host its name, so plain ``torchrun --rdzv-endpoint <tag>-a:29500`` on both behaves as
on two such machines: gloo, left to itself, binds to 127.0.1.1 and the hosts cannot meet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).resolve().parent / "netif_worker.py"
SUBNET = "10.201.0."  # 10.200.0.x belongs to idla.emulate.netns's rigs
RENDEZVOUS_PORT = 29500  # torchrun's default, free in a fresh namespace
COMMAND_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 90.0


@dataclass(frozen=True, slots=True)
class Host:
    namespace: str  # also the host name inside it
    interface: str  # its veth end
    address: str  # IPv4 without prefix length


def _require_root_tools() -> None:
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"needs root, iproute2 and util-linux's unshare (missing: {missing or 'root'})")


def _run(args: Sequence[str]) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)


@contextmanager
def _two_hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaces on a bridge with per-host /etc/hosts; removed afterwards, always."""
    tag = f"idlanetif{os.getpid()}"
    bridge = f"{tag}-br"
    hosts = (Host(f"{tag}-a", "nic-a", f"{SUBNET}1"), Host(f"{tag}-b", "nic-b", f"{SUBNET}2"))
    created: list[str] = []
    try:
        for namespace in (bridge, *(host.namespace for host in hosts)):
            _run(["ip", "netns", "add", namespace])
            created.append(namespace)
            _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        _run(["ip", "-n", bridge, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", bridge, "link", "set", "br0", "up"])
        for host, peer in zip(hosts, hosts[::-1], strict=True):
            port = f"port-{host.interface[-1]}"
            _run(["ip", "-n", bridge, "link", "add", port, "type", "veth", "peer", "name",
                  host.interface, "netns", host.namespace])
            _run(["ip", "-n", bridge, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev",
                  host.interface])
            _run(["ip", "-n", host.namespace, "link", "set", host.interface, "up"])
            etc = Path("/etc/netns") / host.namespace
            etc.mkdir(parents=True)
            own, other = f"127.0.1.1 {host.namespace}", f"{peer.address} {peer.namespace}"
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{own}\n{other}\n")
        yield hosts
    finally:
        for host in hosts:
            shutil.rmtree(Path("/etc/netns") / host.namespace, ignore_errors=True)
        with suppress(OSError):  # left in place while another test's hosts are in it
            Path("/etc/netns").rmdir()
        for namespace in reversed(created):
            subprocess.run(["ip", "netns", "del", namespace], check=False,
                           timeout=COMMAND_TIMEOUT_S)


def _on(host: Host, command: Sequence[str]) -> list[str]:
    """``command`` inside ``host``: its namespace, its /etc/hosts, its host name."""
    set_name = 'hostname "$0" && exec "$@"'
    return ["ip", "netns", "exec", host.namespace, "unshare", "--uts", "sh", "-c", set_name,
            host.namespace, *command]


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would choose for the workers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def _torchrun_on_both(hosts: tuple[Host, Host], mode: str, env: dict[str, str],
                      tmp_path: Path, *, until_first_exit: bool = False,
                      ) -> list[tuple[int | None, str, str]]:
    """Plain torchrun, two nodes of one process each, on both hosts at once.

    Returns (exit code, stdout, stderr) per host; with ``until_first_exit`` the other host is
    killed as soon as one exits (its code is then None).
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0].namespace}:{RENDEZVOUS_PORT}",
        "--rdzv-id", "netif", "--max-restarts", "0", str(WORKER), mode,
    ]
    processes = []
    outputs = []
    for host in hosts:
        # Files, not pipes: an agent blocked on a full pipe would never reach its exit barrier.
        out, err = (tmp_path / f"{host.interface}.{kind}" for kind in ("out", "err"))
        with out.open("w") as stdout, err.open("w") as stderr:
            processes.append(subprocess.Popen(_on(host, command), env=env, cwd=tmp_path,
                                              stdout=stdout, stderr=stderr, text=True,
                                              start_new_session=True))
        outputs.append((out, err))
    codes: list[int | None] = [None, None]
    try:
        deadline_s = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline_s:
            codes = [process.poll() for process in processes]
            if all(code is not None for code in codes) or (
                until_first_exit and any(code is not None for code in codes)
            ):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:  # the agent and its worker: its session's process group
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return [(code, out.read_text(), err.read_text())
            for code, (out, err) in zip(codes, outputs, strict=True)]


def _reports(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_interface_for_names_the_veth_of_the_namespace() -> None:
    # Prepare
    _require_root_tools()
    probe = (
        "import json; from idla.runtime import netif; print(json.dumps(["
        "netif.interface_for('10.201.0.2'), netif.interface_for('10.201.0.1'),"
        "netif.interface_for('127.0.0.1'), netif.interface_for('10.202.0.1'),"
        "netif.ensure_gloo_interface({'MASTER_ADDR': '127.0.1.1', 'WORLD_SIZE': '2',"
        " 'LOCAL_WORLD_SIZE': '1'})]))"
    )

    # Execute
    with _two_hosts() as (first, _second):
        result = subprocess.run(_on(first, [sys.executable, "-c", probe]), env=_clean_env(),
                                capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

    # Assert: the peer, this host's own address, loopback, an unroutable address, and a
    # loopback master in a two-host job (no default route here: the one global interface)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == ["nic-a", "nic-a", "lo", None, "nic-a"]


def test_plain_torchrun_on_two_hosts_meets_once_idla_picks_the_interface(
    tmp_path: Path,
) -> None:
    # Prepare
    _require_root_tools()

    # Execute
    with _two_hosts() as hosts:
        results = _torchrun_on_both(hosts, "fix", _clean_env(), tmp_path)

    # Assert: both ranks summed 1 + 2 over the bridge, each through its own veth, although
    # MASTER_ADDR is rank 0's host name, which resolves to 127.0.1.1 on that host itself
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    reports = sorted((report for _c, out, _e in results for report in _reports(out)),
                     key=lambda report: report["rank"])
    assert [report["sum"] for report in reports] == [3.0, 3.0]
    assert {report["chosen"] for report in reports} == {"nic-a", "nic-b"}
    assert reports[0]["master_addr"] in {host.namespace for host in hosts}
    assert reports[0]["master_port"] != str(RENDEZVOUS_PORT)  # the workers' store is another


def test_plain_torchrun_on_two_hosts_fails_when_gloo_chooses(tmp_path: Path) -> None:
    # Prepare: gloo binds to what the host name resolves to, 127.0.1.1
    _require_root_tools()
    env = {**_clean_env(), "NETIF_TEST_TIMEOUT_S": "5"}

    # Execute: the first host to give up is enough
    with _two_hosts() as hosts:
        results = _torchrun_on_both(hosts, "plain", env, tmp_path, until_first_exit=True)

    # Assert: it failed, having tried to reach its peer on the peer's loopback alias
    failed = [(code, err) for code, _out, err in results if code is not None]
    assert failed and all(code != 0 for code, _err in failed)
    assert any("127.0.1.1" in err for _code, err in failed), failed[0][1][-3000:]
    assert not any(_reports(out) for _code, out, _err in results)
