"""The HTTP face of the router (FastAPI on uvicorn, 127.0.0.1 by default).

- ``POST /v1/predict``: JSON ``{"inputs": [[...], ...]}`` (rows × features, or rows × the
  model's input shape), or ``application/octet-stream`` with an ``X-Shape: rows,d1,...`` header
  and little-endian float32 bytes; answers JSON, or raw float32 when the client accepts
  ``application/octet-stream``. Every answer names the model version (body and
  ``X-Model-Version``).
- A request that cannot be served in time (no worker predicted to answer within the latency
  target, or every queue full) gets 429 with ``Retry-After``: a refusal, counted in
  ``idla_refused_requests_total`` apart from failures (5xx, ``idla_failed_requests_total``).
- ``GET /healthz`` (no token), ``GET /metrics`` (Prometheus text), ``POST /admin/model``
  (``{"path": DIR}``: roll a checkpoint out to every worker, all or nothing: 200 when every
  worker switched; 409 while another rollout runs or a worker still loads an aborted one, 422
  for a model that is refused or fails to build, 503 when a worker was lost while loading,
  504 when it did not load within the load timeout; after any of these the old model serves);
  ``POST /admin/workers`` (``{"add": "host:port"}``: serve with one more worker, which holds the
  pool's link secret; ``{"retire": index}``: stop routing to a worker, move its queue to the
  others, let its batches finish, close it; 404 for no such worker, 409 for the last one).

``/v1/*`` and ``/admin/*`` need ``Authorization: Bearer <token>`` (401 without, 403 when wrong;
compared in constant time). A bad request gets a 4xx with ``{"error": reason}`` (the checks are in
`idla.serve.request_body`), counted in ``/metrics`` like every answer; the server keeps serving.
A JSON body over `INLINE_PARSE_BYTES` is parsed on a small thread pool, so that a big one (up
to 16 MiB) does not hold the event loop, and the other clients, while it is parsed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from idla.errors import ConfigError
from idla.serve import model_path, wire
from idla.serve.link import WorkerError, WorkerLost
from idla.serve.metrics import ServeMetrics
from idla.serve.request_body import (
    BadRequest,
    json_inputs,
    load_json,
    parse_binary_inputs,
    shape_inputs,
)
from idla.serve.router import Overloaded, Prediction, RolloutError, Router, Unavailable

BINARY = "application/octet-stream"
INLINE_PARSE_BYTES = 64 << 10  # a JSON body this small parses in well under a millisecond
ADMIN_BODY_BYTES = 1 << 16
ADMIN_FORM = 'body must be JSON {"path": "dir/of/the/model"}'
WORKERS_FORM = 'body must be JSON {"add": "host:port"} or {"retire": worker_index}'
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_request_rows: int = 1024
    """Rows one predict request may carry (more: 413)."""
    max_body_bytes: int = 16 << 20
    """Bytes one request body may have (more: 413)."""
    body_timeout_s: float = 30.0
    """Seconds a request body may take to arrive once its head has (more: 408)."""
    parse_threads: int = 2
    """Threads that parse big JSON bodies (more such bodies at once wait their turn)."""


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def check_token(authorization: str | None, token: str) -> int | None:
    """None when ``authorization`` carries the bearer token; else 401 (missing) or 403."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return 401
    given = authorization[len("bearer "):].strip().encode()
    return None if hmac.compare_digest(given, token.encode()) else 403


async def _read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (
            len(declared) > 12 or int(declared) > max_bytes):
        raise BadRequest(413, f"body of {declared[:12]} bytes; at most {max_bytes}")

    async def receive() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise BadRequest(413, f"body over {max_bytes} bytes")
        return bytes(body)

    try:
        return await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(408, f"body not received within {timeout_s:g} s") from None
    except ClientDisconnect:  # nobody reads the answer, but it is counted
        raise BadRequest(400, "the client disconnected before its body ended") from None


def _answer(prediction: Prediction, binary: bool) -> Response:
    headers = {"X-Model-Version": prediction.version, "X-Worker": str(prediction.worker),
               "X-Batch-Rows": str(prediction.batch_rows),
               "X-Queue-Ms": f"{1e3 * prediction.queue_s:.3f}",
               "X-Service-Ms": f"{1e3 * prediction.service_s:.3f}"}
    if binary:
        shape, data = wire.to_payload(prediction.outputs)
        headers["X-Shape"] = ",".join(map(str, shape))
        return Response(data, media_type=BINARY, headers=headers)
    return JSONResponse({"outputs": prediction.outputs.tolist(), "model_version":
                         prediction.version, "worker": prediction.worker,
                         "batch_rows": prediction.batch_rows,
                         "queue_ms": 1e3 * prediction.queue_s}, headers=headers)



def _denied(status: int) -> JSONResponse:
    return _error(status, "missing bearer token" if status == 401 else "wrong token",
                  {"WWW-Authenticate": "Bearer"})


def create_app(router: Router, token: str, metrics: ServeMetrics | None = None,
               limits: HttpLimits | None = None, model_root: Path | None = None) -> FastAPI:
    """The FastAPI app over a connected `Router`; rollouts stay inside ``model_root`` (resolved,
    see `idla.serve.model_path`) when one is given. Its JSON parser threads are
    ``app.state.parse_pool``, for the caller to shut down."""
    app = FastAPI(title="idla serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = metrics if metrics is not None else ServeMetrics()
    limits = limits if limits is not None else HttpLimits()
    parse_pool = ThreadPoolExecutor(max_workers=limits.parse_threads,
                                    thread_name_prefix="idla-parse")
    app.state.metrics, app.state.router, app.state.parse_pool = metrics, router, parse_pool

    async def counted(endpoint: str, handler: Callable[[], Awaitable[Response]]) -> Response:
        try:
            response = await handler()
        except Exception:  # a bug, not the client's mistake: still one JSON answer, counted
            log.exception("idla serve: %s failed", endpoint)
            response = _error(500, "internal error")
        metrics.count(endpoint, response.status_code)
        return response

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        start_s = time.perf_counter()
        return await counted("predict", lambda: _predict(request, start_s))

    async def _inputs(request: Request, body: bytes) -> np.ndarray:
        content_type = request.headers.get("content-type", "application/json")
        if content_type.startswith(BINARY):
            raw = parse_binary_inputs(body, request.headers.get("x-shape"))
        elif content_type.startswith("application/json"):
            args = (body, router.input_shape, limits.max_request_rows)
            if len(body) <= INLINE_PARSE_BYTES:
                raw = json_inputs(*args)
            else:
                raw = await asyncio.get_running_loop().run_in_executor(parse_pool, json_inputs,
                                                                       *args)
        else:
            raise BadRequest(415, f"content type {content_type!r}; send application/json or "
                                  f"{BINARY}")
        return shape_inputs(raw, router.input_shape, limits.max_request_rows)

    async def _predict(request: Request, start_s: float) -> Response:
        denied = check_token(request.headers.get("authorization"), token)
        if denied is not None:
            return _denied(denied)
        try:
            body = await _read_body(request, limits.max_body_bytes, limits.body_timeout_s)
            inputs = await _inputs(request, body)
        except BadRequest as error:
            return _error(error.status, error.reason)
        submitted_s = time.perf_counter()
        try:
            prediction = await router.submit(inputs, start_s)
        except Overloaded as error:
            retry = str(max(1, math.ceil(error.retry_after_s)))
            return _error(429, str(error), {"Retry-After": retry})
        except Unavailable as error:
            return _error(503, str(error), {"Retry-After": "1"})
        except WorkerError as error:
            return _error(500, f"the worker failed: {error}")
        except asyncio.TimeoutError:
            return _error(504, "no answer within the request timeout")
        answered_s = time.perf_counter()
        response = _answer(prediction, BINARY in request.headers.get("accept", ""))
        end_s = time.perf_counter()
        overhead_s = (submitted_s - start_s) + prediction.route_s + (end_s - answered_s)
        metrics.observe(end_s - start_s, overhead_s)
        return response

    @app.get("/healthz")
    async def healthz() -> Response:
        up = sum(1 for w in router.workers if w.alive)
        body = {"status": "ok" if up else "down", "workers_up": up,
                "workers": len(router.workers)}
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        text = metrics.render(router.stats(), router.failovers, router.retried_requests,
                              router.last_rollout, router.refused, router.stolen_requests)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/admin/model")
    async def admin_model(request: Request) -> Response:
        return await counted("admin_model", lambda: _admin_model(request))

    async def _admin_document(request: Request, form: str) -> Any:
        """The token-checked JSON body of an admin call, or the Response refusing it."""
        denied = check_token(request.headers.get("authorization"), token)
        if denied is not None:
            return _denied(denied)
        try:
            return load_json(await _read_body(request, ADMIN_BODY_BYTES, limits.body_timeout_s))
        except BadRequest as error:
            return _error(error.status, f"{error.reason}; {form}")

    async def _admin_model(request: Request) -> Response:
        document = await _admin_document(request, ADMIN_FORM)
        if isinstance(document, Response):
            return document
        if not isinstance(document, dict) or not isinstance(document.get("path"), str):
            return _error(422, ADMIN_FORM)
        try:
            target = model_path.confine(document["path"], model_root)
        except BadRequest as error:
            return _error(error.status, error.reason)
        try:
            result = await router.rollout(str(target.resolved))
        except RolloutError as error:  # 409, 422, 503 or 504: `idla.serve.rollout`
            return _error(error.status, target.scrub(str(error), model_root))
        except Unavailable as error:
            return _error(503, str(error))
        return JSONResponse(result, headers={"X-Model-Version": str(result["version"])})

    @app.post("/admin/workers")
    async def admin_workers(request: Request) -> Response:
        return await counted("admin_workers", lambda: _admin_workers(request))

    async def _admin_workers(request: Request) -> Response:
        document = await _admin_document(request, WORKERS_FORM)
        if isinstance(document, Response):
            return document
        if not isinstance(document, dict) or len(document) != 1:
            return _error(422, WORKERS_FORM)
        try:
            retire = document.get("retire")  # load_json makes every number a float
            if isinstance(retire, float) and retire.is_integer():
                return JSONResponse(await router.retire_worker(int(retire)))
            host, _, port = str(document.get("add", "")).rpartition(":")
            if "add" not in document or not host or not port.isdigit() or int(port) > 65535:
                return _error(422, WORKERS_FORM)
            slot = await router.add_worker((host.strip("[]"), int(port)))
        except ConfigError as error:
            return _error(404, str(error))
        except Unavailable as error:
            return _error(409, str(error))
        except RolloutError as error:
            return _error(error.status, str(error))
        except (WorkerLost, OSError, asyncio.TimeoutError) as error:
            return _error(503, f"cannot join the worker: {error}")
        return JSONResponse(slot.stats(router.config.request_rows))

    return app
