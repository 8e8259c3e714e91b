"""A store on its own host, for elastic runs across the multi-host rig.

torchrun's store lives in the elastic agent; the local launcher's is a file. Across network
namespaces the store must be reachable over the network only, so that a worker whose link is cut
also loses the store (as it would across real hosts) instead of looking alive through the shared
file system. The lighthouse (torchft's name for its coordinator) is a process that enters one
host's namespace and serves a c10d TCPStore there; it holds keys and counters, no model state.

A TCPStore server given an address still listens on every interface (torch binds the wildcard
address); the lighthouse binds the socket itself and hands it to the store
(``master_listen_fd``, libuv backend), so a store on 127.0.0.1 is reachable from this host only.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from idla.errors import EmulationError


def bind_listen_socket(address: str, port: int) -> socket.socket:
    """A TCP socket listening on exactly `address`:`port` (not on every interface)."""
    family, kind, proto, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(where)
    sock.listen(128)
    return sock


def _serve(namespace: str | None, address: str, port: int, ready: Any, stop: Any) -> None:
    import torch.distributed as dist

    if namespace is not None:
        from idla.emulate.netns import enter_netns

        enter_netns(namespace)
    with bind_listen_socket(address, port) as sock:
        store = dist.TCPStore(address, port, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=60), master_listen_fd=sock.fileno(),
                              use_libuv=True)
        ready.set()
        stop.wait()
        del store


@contextmanager
def lighthouse(address: str, port: int = 29400, namespace: str | None = None) -> Iterator[str]:
    """Serve a store at address:port (inside `namespace`); yield its IDLA_RENDEZVOUS spec."""
    context = mp.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    process = context.Process(target=_serve, args=(namespace, address, port, ready, stop),
                              daemon=True)
    process.start()
    try:
        if not ready.wait(timeout=30):
            raise EmulationError(f"the lighthouse store at {address}:{port} did not start")
        yield f"tcp:{address}:{port}"
    finally:
        stop.set()
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
