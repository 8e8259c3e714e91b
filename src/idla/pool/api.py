"""The pool's control API: HTTP on 127.0.0.1 (stdlib `http.server`, one thread per request).

- ``POST /jobs``: a job spec, TOML (``Content-Type: application/toml``) or its JSON form
  (``application/json``), at most `MAX_SPEC_BYTES`; 201 ``{"id": ...}``. Paths in a spec sent
  over the API must be absolute (the client resolves them against the spec file's folder).
- ``GET /jobs``, ``GET /jobs/<id>``: jobs with their devices; ``DELETE /jobs/<id>``: cancel.
- ``GET /devices``: every device with its state (``up``, ``drained``, ``lost``) and job;
  ``POST /devices/<id>/drain``: take it out of the pool (its worker leaves at a step boundary;
  a JSON body ``{"lost": true}`` kills the worker instead, as a dead device would);
  ``POST /devices/<id>/restore``: give it back.
- ``GET /agent``: the agent's own health (ticks that raised, its log's path).
- ``GET /``: the status page (`idla.pool.page`).

Every endpoint needs the bearer token (``Authorization: Bearer <token>``; the page also takes
``?token=...`` so that a browser can open it), because the page and the job list show what runs
where: 401 without a token, 403 with a wrong one (compared in constant time). The token comes
from ``--token-file`` or ``IDLA_TOKEN`` as for `idla serve`. A bad call gets a 4xx with
``{"error": "<one line>"}`` and changes nothing.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from idla.errors import ConfigError
from idla.pool.agent import PoolAgent
from idla.pool.page import render_page
from idla.pool.spec import MAX_SPEC_BYTES, parse_spec, spec_from_mapping
from idla.pool.store import FINAL_STATES, JobRecord


def job_row(agent: PoolAgent, record: JobRecord) -> dict[str, Any]:
    """A job as the API shows it: the stored record, where it runs now, its latest
    measurements (``metrics``: kept after it ends) and its run dir (logs, reports)."""
    row = record.as_json()
    info = agent.run_info(record.job_id) or {}
    metrics = agent.store.metrics(record.job_id)
    row["devices"] = info.get("devices", [])
    row["resizes"] = info.get("resizes", metrics.get("resizes", 0))
    row["formed"] = info.get("formed", False)
    row["step"] = info.get("step", metrics.get("step", 0))
    row["samples_done"] = info.get("samples_done", metrics.get("samples_done", 0.0))
    row["metrics"] = metrics
    row["run_dir"] = str(agent.config.run_root / record.job_id)
    return row


class _Handler(BaseHTTPRequestHandler):
    server: PoolServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: the agent prints its own lines

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status: int, reason: str) -> None:
        self._json(status, {"error": reason})

    def _authorised(self, query: dict[str, list[str]], allow_query: bool) -> bool:
        header = self.headers.get("Authorization", "")
        given: str | None = None
        if header.lower().startswith("bearer "):
            given = header[len("bearer "):].strip()
        elif allow_query and query.get("token"):
            given = query["token"][0]
        if given is None:
            self._error(401, "missing bearer token (Authorization: Bearer <token>)")
            return False
        if not hmac.compare_digest(given.encode(), self.server.token.encode()):
            self._error(403, "wrong token")
            return False
        return True

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        parts = [p for p in url.path.split("/") if p]
        if not self._authorised(query, allow_query=method == "GET" and not parts):
            return
        agent = self.server.agent
        if method == "GET" and not parts:
            self._send(200, self.server.page().encode(), "text/html; charset=utf-8")
        elif method == "GET" and parts == ["devices"]:
            self._json(200, {"devices": self.server.devices()})
        elif method == "GET" and parts == ["jobs"]:
            self._json(200, {"jobs": [job_row(agent, r) for r in agent.store.jobs()]})
        elif parts[:1] == ["jobs"] and len(parts) == 2 and method in ("GET", "DELETE"):
            record = agent.store.job(parts[1])
            if record is None:
                self._error(404, f"no job {parts[1]!r}")
            elif method == "GET":
                self._json(200, job_row(agent, record))
            elif record.state in FINAL_STATES:
                self._error(409, f"job {record.job_id} is already {record.state}")
            else:
                self._json(200, job_row(agent, agent.cancel(record.job_id)))
        elif method == "GET" and parts == ["agent"]:
            self._json(200, {"tick_errors": agent.tick_errors, "log": str(agent.log_path),
                             "started_s": agent.started_s})
        elif method == "POST" and parts == ["jobs"]:
            self._submit()
        elif (method == "POST" and len(parts) == 3 and parts[0] == "devices"
              and parts[2] in ("drain", "restore")):
            self._device(parts[1], parts[2])
        else:
            self._error(404 if method == "GET" else 405, f"no {method} {url.path}")

    def _device(self, device_id: str, verb: str) -> None:
        lost = False
        text = self.headers.get("Content-Length", "0") or "0"
        length = int(text) if text.isdigit() else -1
        if length:
            if not 0 < length <= 1024:
                self._error(413, "a drain body is a small JSON object")
                self.close_connection = True
                return
            try:
                body = json.loads(self.rfile.read(length).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self._error(400, 'body must be JSON {"lost": true|false}')
                return
            if not isinstance(body, dict) or not isinstance(body.get("lost", False), bool):
                self._error(400, 'body must be JSON {"lost": true|false}')
                return
            lost = bool(body.get("lost", False))
        agent = self.server.agent
        try:
            if verb == "drain":
                agent.drain(device_id, lost=lost)
            else:
                agent.restore(device_id)
        except KeyError:
            self._error(404, f"no device {device_id!r}")
            return
        self._json(200, {"id": device_id, "state": agent.device_states()[device_id]})

    def _submit(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(411, "POST /jobs needs a Content-Length")
            return
        if not 0 < length <= MAX_SPEC_BYTES:
            self._error(413, f"a job spec is 1..{MAX_SPEC_BYTES} bytes, got {length}")
            self.close_connection = True
            return
        body = self.rfile.read(length)
        kind = self.headers.get("Content-Type", "application/toml").split(";")[0].strip()
        try:
            text = body.decode("utf-8")
            if kind == "application/json":
                table = json.loads(text)
                if not isinstance(table, dict):
                    raise ConfigError("POST /jobs: the JSON body must be an object")
                spec = spec_from_mapping(table, "POST /jobs")
            elif kind in ("application/toml", "text/plain"):
                spec = parse_spec(text, "POST /jobs")
            else:
                self._error(415, f"Content-Type {kind!r}: send application/toml or "
                            "application/json")
                return
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            self._error(400, f"POST /jobs: not a valid body ({type(error).__name__})")
            return
        except ConfigError as error:
            self._error(400, str(error))
            return
        job_id = self.server.agent.submit(spec)
        self._json(201, {"id": job_id})

    def do_GET(self) -> None:
        self._route("GET")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")


class PoolServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, agent: PoolAgent, token: str, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.agent, self.token = agent, token
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def devices(self) -> list[dict[str, Any]]:
        held = {d: job for job, devices in self.agent.allocation().items() for d in devices}
        states = self.agent.device_states()
        return [{"id": d.device_id, "kind": d.kind, "node": d.node,
                 "memory_bytes": d.memory_bytes, "job": held.get(d.device_id),
                 "state": states.get(d.device_id, "up")}
                for d in self.agent.backend.devices()]

    def page(self) -> str:
        jobs = [job_row(self.agent, r) for r in self.agent.store.jobs()]
        return render_page(self.agent.backend.devices(), jobs, self.agent.store.allocations(),
                           time.time())


@contextmanager
def serving(agent: PoolAgent, token: str, host: str = "127.0.0.1", port: int = 0
            ) -> Iterator[PoolServer]:
    """The API on a thread, and the agent's loop on another, until the block ends."""
    server = PoolServer(agent, token, host, port)
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,), name="idla-pool-agent", daemon=True)
    http = threading.Thread(target=server.serve_forever, name="idla-pool-api", daemon=True)
    loop.start()
    http.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        stop.set()
        loop.join(timeout=30)
