"""The HTTP face of the router (FastAPI on uvicorn, 127.0.0.1 by default).

- ``POST /v1/predict``: JSON ``{"inputs": [[...], ...]}`` (rows × features, or rows × the
  model's input shape), or ``application/octet-stream`` with an ``X-Shape: rows,d1,...`` header
  and little-endian float32 bytes; answers JSON, or raw float32 when the client accepts
  ``application/octet-stream``. Every answer names the model version (body and
  ``X-Model-Version``).
- ``GET /healthz`` (no token), ``GET /metrics`` (Prometheus text), ``POST /admin/model``
  (``{"path": DIR}``: roll a checkpoint out to every worker, all or nothing: 200 when every
  worker switched; 409 while another rollout runs or a worker still loads an aborted one, 422
  for a model that is refused or fails to build, 503 when a worker was lost while loading,
  504 when it did not load within the load timeout; after any of these the old model serves).

``/v1/*`` and ``/admin/*`` need ``Authorization: Bearer <token>`` (401 without, 403 when wrong).
A bad request gets a 4xx with ``{"error": reason}``; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from idla.serve import wire
from idla.serve.link import WorkerError
from idla.serve.metrics import ServeMetrics
from idla.serve.router import Overloaded, Prediction, RolloutError, Router, Unavailable

BINARY = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_request_rows: int = 1024
    """Rows one predict request may carry (more: 413)."""
    max_body_bytes: int = 16 << 20
    """Bytes one request body may have (more: 413)."""


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def check_token(authorization: str | None, token: str) -> int | None:
    """None when ``authorization`` carries the bearer token; else 401 (missing) or 403."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return 401
    given = authorization[len("bearer "):].strip().encode()
    return None if hmac.compare_digest(given, token.encode()) else 403


def shape_inputs(array: np.ndarray, input_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    """``array`` as (rows, *input_shape) float32; accepts (rows, prod(input_shape)) too."""
    want = ", ".join(map(str, input_shape))
    flat = math.prod(input_shape)
    if array.ndim == 2 and array.shape[1] == flat and len(input_shape) > 1:
        array = array.reshape((array.shape[0], *input_shape))
    if array.ndim != 1 + len(input_shape) or tuple(array.shape[1:]) != input_shape:
        raise BadRequest(422, f"inputs have shape {list(array.shape)}; the model takes "
                              f"(rows, {want}) or (rows, {flat})")
    if array.shape[0] < 1:
        raise BadRequest(422, "inputs hold no rows")
    if array.shape[0] > max_rows:
        raise BadRequest(413, f"{array.shape[0]} rows in one request; at most {max_rows}")
    if not np.isfinite(array).all():
        raise BadRequest(422, "inputs hold NaN or infinite values")
    return array


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(413, f"body of {declared} bytes; at most {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BadRequest(413, f"body over {max_bytes} bytes")
    return bytes(body)


def parse_json_inputs(body: bytes) -> np.ndarray:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(400, f"body is not valid JSON ({error})") from None
    if not isinstance(document, dict) or "inputs" not in document:
        raise BadRequest(422, 'body must be a JSON object {"inputs": [[...], ...]}')
    try:
        return np.asarray(document["inputs"], dtype=np.float32)
    except (ValueError, TypeError):
        raise BadRequest(422, "inputs must be a rectangular array of numbers") from None


def parse_binary_inputs(body: bytes, shape_header: str | None) -> np.ndarray:
    if not shape_header:
        raise BadRequest(400, "a binary body needs an X-Shape header, e.g. 'X-Shape: 4,64'")
    try:
        shape = [int(part) for part in shape_header.split(",")]
    except ValueError:
        raise BadRequest(400, f"X-Shape {shape_header!r} is not a comma-separated list of "
                              "integers") from None
    try:
        return wire.from_payload(shape, body)
    except wire.WireError as error:
        raise BadRequest(400, f"binary body does not match X-Shape: {error}") from None


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


def create_app(router: Router, token: str, metrics: ServeMetrics | None = None,
               limits: HttpLimits | None = None) -> FastAPI:
    """The FastAPI app over a connected `Router`."""
    app = FastAPI(title="idla serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = metrics if metrics is not None else ServeMetrics()
    limits = limits if limits is not None else HttpLimits()
    app.state.metrics, app.state.router = metrics, router

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        start_s = time.perf_counter()
        response = await _predict(request, start_s)
        metrics.count("predict", response.status_code)
        return response

    async def _predict(request: Request, start_s: float) -> Response:
        denied = check_token(request.headers.get("authorization"), token)
        if denied is not None:
            return _error(denied, "missing bearer token" if denied == 401 else "wrong token",
                          {"WWW-Authenticate": "Bearer"})
        try:
            body = await _read_body(request, limits.max_body_bytes)
            content_type = request.headers.get("content-type", "application/json")
            if content_type.startswith(BINARY):
                raw = parse_binary_inputs(body, request.headers.get("x-shape"))
            elif content_type.startswith("application/json"):
                raw = parse_json_inputs(body)
            else:
                raise BadRequest(415, f"content type {content_type!r}; send application/json "
                                      f"or {BINARY}")
            inputs = shape_inputs(raw, router.input_shape, limits.max_request_rows)
        except BadRequest as error:
            return _error(error.status, error.reason)
        submitted_s = time.perf_counter()
        try:
            prediction = await router.submit(inputs)
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
                              router.last_rollout)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/admin/model")
    async def admin_model(request: Request) -> Response:
        denied = check_token(request.headers.get("authorization"), token)
        if denied is not None:
            metrics.count("admin_model", denied)
            return _error(denied, "missing bearer token" if denied == 401 else "wrong token",
                          {"WWW-Authenticate": "Bearer"})
        response = await _admin_model(request)
        metrics.count("admin_model", response.status_code)
        return response

    async def _admin_model(request: Request) -> Response:
        try:
            document = json.loads(await _read_body(request, 1 << 16))
        except (BadRequest, UnicodeDecodeError, json.JSONDecodeError):
            return _error(400, 'body must be JSON {"path": "/dir/of/the/model"}')
        if not isinstance(document, dict) or not isinstance(document.get("path"), str):
            return _error(422, 'body must be JSON {"path": "/dir/of/the/model"}')
        try:
            result = await router.rollout(document["path"])
        except RolloutError as error:  # 409, 422, 503 or 504: `idla.serve.rollout`
            return _error(error.status, str(error))
        except Unavailable as error:
            return _error(503, str(error))
        return JSONResponse(result, headers={"X-Model-Version": str(result["version"])})

    return app
