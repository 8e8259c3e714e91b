"""Run the router and its HTTP app over a `WorkerPool`: in the foreground (``idla serve``) or on
a background thread with its own event loop (tests and benchmarks, which drive it from the main
thread). A `Supervisor` on the same loop brings lost workers back."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from idla.errors import ConfigError
from idla.serve.connections import guarded_protocol
from idla.serve.http import HttpLimits, create_app
from idla.serve.metrics import ServeMetrics
from idla.serve.router import Router, RouterConfig
from idla.serve.supervisor import Supervisor, SupervisorConfig
from idla.serve.worker import WorkerPool

T = TypeVar("T")
START_TIMEOUT_S = 60.0


@dataclass(kw_only=True)
class ServeOptions:
    token: str
    """Bearer token that /v1/* and /admin/* require."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds."""
    port: int = 8000
    """TCP port (0: any free port; read it back from `Running.port`)."""
    router: RouterConfig = field(default_factory=RouterConfig)
    limits: HttpLimits = field(default_factory=HttpLimits)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    model_root: Path | None = None
    """Directory that POST /admin/model may load from (resolved; None: any readable path)."""
    head_timeout_s: float = 10.0
    """Seconds a request line and headers may take to arrive (then 408, closed)."""
    keep_alive_s: int = 5
    """Seconds an idle keep-alive connection stays open after a response."""
    max_connections: int = 1000
    """Open HTTP connections at most: one more closes the oldest connection waiting for a request
    (408), or gets 503 when every one is inside a request."""

    def __post_init__(self) -> None:
        if self.head_timeout_s <= 0:
            raise ConfigError(f"head_timeout_s {self.head_timeout_s} must be positive")
        if self.keep_alive_s < 1:
            raise ConfigError(f"keep_alive_s {self.keep_alive_s} must be at least 1")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections {self.max_connections} must be at least 1")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (cheaper per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


@dataclass
class Running:
    router: Router
    metrics: ServeMetrics
    server: Any  # uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    supervisor: Supervisor
    parse_pool: ThreadPoolExecutor | None = None

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task
        await self.close()

    async def close(self) -> None:
        await self.supervisor.close()
        await self.router.close()
        if self.parse_pool is not None:
            self.parse_pool.shutdown(wait=False)


async def start(pool: WorkerPool, options: ServeOptions,
                indices: Sequence[int] | None = None) -> Running:
    """Connect a router to the pool's workers (those at ``indices``, default all), supervise
    them, and start serving HTTP."""
    import uvicorn

    indices = list(range(len(pool.workers))) if indices is None else list(indices)
    router = Router(options.router)
    await router.connect([pool.addresses[i] for i in indices], pool.secret)
    supervisor = Supervisor(router, pool, indices, options.supervisor)
    supervisor.start()
    metrics = ServeMetrics()
    model_root = None if options.model_root is None else options.model_root.resolve()
    app = create_app(router, options.token, metrics, options.limits, model_root)
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that name TCP, and without it
    # a response sent as head and body waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((options.host, options.port))
    except OSError as error:
        sock.close()
        await supervisor.close()
        await router.close()
        raise ConfigError(f"cannot listen on {options.host}:{options.port} ({error})") from None
    port = int(sock.getsockname()[1])
    protocol = guarded_protocol(options.head_timeout_s, options.max_connections,
                                metrics.close_connection)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none",
                            http=protocol, timeout_keep_alive=options.keep_alive_s,
                            timeout_graceful_shutdown=2, backlog=1024)
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        await supervisor.close()
        await router.close()
        app.state.parse_pool.shutdown(wait=False)
        task.result()
    return Running(router, metrics, server, task, options.host, port, supervisor,
                   app.state.parse_pool)


async def serve_until_stopped(pool: WorkerPool, options: ServeOptions,
                              on_ready: Callable[[Running], None]) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (uvicorn catches them on the main thread)."""
    running = await start(pool, options)
    on_ready(running)
    try:
        await running.task
    finally:
        await running.close()


class ServingThread:
    """The router and HTTP server on a background thread; ``with ServingThread(...) as s``."""

    def __init__(self, pool: WorkerPool, options: ServeOptions,
                 indices: Sequence[int] | None = None) -> None:
        self.pool, self.options = pool, options
        self.indices = None if indices is None else list(indices)
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="idla-router")
        self._running: Running | None = None

    @property
    def running(self) -> Running:
        if self._running is None:
            raise RuntimeError("ServingThread is not started")
        return self._running

    @property
    def router(self) -> Router:
        return self.running.router

    @property
    def url(self) -> str:
        return self.running.url

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coroutine`` on the router's loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def call(self, function: Callable[[], T]) -> T:
        """Call ``function`` on the router's loop (safe access to router state)."""
        async def wrapper() -> T:
            return function()
        return self.run(wrapper(), 30.0)

    def __enter__(self) -> ServingThread:
        self._thread.start()
        try:
            self._running = self.run(start(self.pool, self.options, self.indices),
                                     START_TIMEOUT_S)
        except BaseException:
            self._shutdown()
            raise
        return self

    def _shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._running is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                self.run(self._running.stop(), 15.0)
        self._shutdown()
