"""The multi-host rig: real namespaces on a real bridge, real tbf shaping, and cleanup.

Workers are real spawned processes that join a host's namespace and talk TCP across the bridge.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from typing import Any

import pytest

from idla.emulate.netns import NetnsRig, enter_netns, parse_rate, rig_unavailable_reason
from idla.errors import EmulationError

PORT = 29611  # free in any fresh namespace
DIGEST_BYTES = 32  # SHA-256 of the payload, sent back by the receiver
TRANSFER_TIMEOUT_S = 20.0


def _require_rig() -> None:
    reason = rig_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _namespaces_now() -> set[str]:
    """Names ``ip netns list`` shows (each line is ``name`` or ``name (id: N)``)."""
    listing = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True)
    return {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}


def _receive(namespace: str, address: str, connections: int, results: Queue[Any]) -> None:
    """In host ``namespace``: accept ``connections`` transfers; answer each with its SHA-256."""
    enter_netns(namespace)
    with socket.create_server((address, PORT)) as server:
        results.put("listening")
        for _ in range(connections):
            connection, _peer = server.accept()
            with connection:
                digest = hashlib.sha256()
                while chunk := connection.recv(1 << 16):
                    digest.update(chunk)
                connection.sendall(digest.digest())


def _send(namespace: str, address: str, sizes: Queue[Any], results: Queue[Any]) -> None:
    """In host ``namespace``: for each size from ``sizes`` (None stops), send that many bytes.

    Reports (seconds from first byte sent to the receiver's digest arriving, digest matched).
    """
    enter_netns(namespace)
    while (size_bytes := sizes.get()) is not None:
        payload = os.urandom(size_bytes)
        with socket.create_connection((address, PORT), timeout=TRANSFER_TIMEOUT_S) as connection:
            start_s = time.perf_counter()
            connection.sendall(payload)
            connection.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < DIGEST_BYTES and (chunk := connection.recv(DIGEST_BYTES)):
                reply += chunk
            elapsed_s = time.perf_counter() - start_s
        results.put((elapsed_s, reply == hashlib.sha256(payload).digest()))


@contextmanager
def _tcp_pair(rig: NetnsRig, connections: int) -> Iterator[Callable[[int], float]]:
    """Host 1 listens, host 0 sends; yields ``transfer(size_bytes) -> seconds``."""
    context = multiprocessing.get_context("spawn")
    sizes: Queue[Any] = context.Queue()
    results: Queue[Any] = context.Queue()
    sender, receiver = rig.host(0), rig.host(1)
    processes = [
        context.Process(
            target=_receive, args=(receiver.namespace, receiver.address, connections, results)
        ),
        context.Process(target=_send, args=(sender.namespace, receiver.address, sizes, results)),
    ]
    for process in processes:
        process.start()

    def transfer(size_bytes: int) -> float:
        sizes.put(size_bytes)
        elapsed_s, digest_matches = results.get(timeout=TRANSFER_TIMEOUT_S)
        assert digest_matches, "the receiver got different bytes than were sent"
        return float(elapsed_s)

    try:
        assert results.get(timeout=TRANSFER_TIMEOUT_S) == "listening"
        yield transfer
        sizes.put(None)
        for process in processes:
            process.join(timeout=TRANSFER_TIMEOUT_S)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()


def test_two_hosts_talk_over_the_bridge() -> None:
    # Prepare
    _require_rig()
    size_bytes = 200_000

    # Execute
    with NetnsRig(2) as rig, _tcp_pair(rig, connections=1) as transfer:
        transfer(size_bytes)
        counters = rig.counters()

    # Assert: payload plus TCP/IP headers went out of host 0 and into host 1
    assert counters[0].tx_bytes >= size_bytes
    assert counters[1].rx_bytes >= size_bytes
    assert counters[1].tx_bytes >= DIGEST_BYTES
    assert counters[0].tx_packets > 0 and counters[1].rx_packets > 0


def test_shaping_limits_throughput_and_can_be_removed() -> None:
    # Prepare: 1 MB at 8 Mbit/s takes 1.0 s in theory
    _require_rig()
    size_bytes = 1_000_000

    # Execute
    with NetnsRig(2, parse_rate("8mbit")) as rig, _tcp_pair(rig, connections=2) as transfer:
        shaped_s = transfer(size_bytes)
        rig.set_rate(0, None)
        rig.set_rate(1, None)
        unshaped_s = transfer(size_bytes)
    print(f"1 MB host0->host1: 8mbit {shaped_s:.3f} s, unshaped {unshaped_s:.4f} s")

    # Assert
    assert 0.8 <= shaped_s < 3.0
    assert unshaped_s < 0.3


def test_namespaces_are_removed_after_the_with_block() -> None:
    # Prepare
    _require_rig()

    # Execute
    with NetnsRig(3, 10_000_000) as rig:
        during = _namespaces_now()

    # Assert
    assert set(rig.namespaces) <= during
    assert not set(rig.namespaces) & _namespaces_now()


def test_namespaces_are_removed_when_the_with_block_raises() -> None:
    # Prepare
    _require_rig()
    handler_before = signal.getsignal(signal.SIGTERM)
    rig = NetnsRig(2, 1_000_000)

    # Execute
    with pytest.raises(RuntimeError, match="boom"), rig:
        raise RuntimeError("boom")

    # Assert
    assert not set(rig.namespaces) & _namespaces_now()
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_signal_handlers_come_back_whatever_order_rigs_close_in() -> None:
    # Prepare
    _require_rig()
    handlers_before = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)]
    first, second = NetnsRig(1).start(), NetnsRig(1).start()

    # Execute: not the reverse of the order they started in
    first.close()
    during = signal.getsignal(signal.SIGTERM)
    second.close()

    # Assert
    assert during is not handlers_before[1]  # second is still protected
    assert [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)] == handlers_before


def test_failed_creation_removes_what_it_made_and_keeps_what_it_did_not() -> None:
    # Prepare: a namespace in the way of host 1 makes creation fail half way
    _require_rig()
    tag = f"idlatest{os.getpid()}"
    blocker = f"{tag}-h1"
    subprocess.run(["ip", "netns", "add", blocker], check=True)
    try:
        # Execute
        with pytest.raises(EmulationError, match=rf"ip netns add {blocker}.* failed: .*exists"):
            NetnsRig(2, name=tag).start()
        left = _namespaces_now()
    finally:
        subprocess.run(["ip", "netns", "del", blocker], check=True)

    # Assert
    assert blocker in left
    assert not {f"{tag}-br", f"{tag}-h0"} & left


def test_sigterm_removes_the_rig_then_terminates() -> None:
    # Prepare: a separate interpreter holds a rig until it is sent SIGTERM
    _require_rig()
    script = textwrap.dedent(
        """
        import sys, time
        from idla.emulate.netns import NetnsRig
        rig = NetnsRig(2, 8_000_000).start()
        print(" ".join(rig.namespaces), flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    namespaces = set(child.stdout.readline().split())
    assert len(namespaces) == 3 and namespaces <= _namespaces_now()

    # Execute
    child.send_signal(signal.SIGTERM)
    returncode = child.wait(timeout=TRANSFER_TIMEOUT_S)

    # Assert: cleaned up, then the default action (death by SIGTERM) still happened
    assert not namespaces & _namespaces_now()
    assert returncode == -signal.SIGTERM


def test_entering_a_missing_namespace_is_a_clear_error() -> None:
    with pytest.raises(EmulationError, match="network namespace 'idla-no-such-ns' does not exist"):
        enter_netns("idla-no-such-ns")


def test_without_root_the_rig_refuses_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    with pytest.raises(EmulationError, match=r"needs root and iproute2 \(ip netns, tc\)"):
        NetnsRig(2)
