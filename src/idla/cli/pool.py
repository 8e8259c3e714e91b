"""`idla pool start | submit | status | cancel | drain | restore`, and `idla submit | status |
cancel` for short.

`idla pool start` runs the agent in the foreground (Ctrl-C or SIGTERM stops it and its
workers). Its state lives in ``--home`` (default ``$IDLA_POOL_HOME``, else ``~/.idla/pool``):
``pool.db`` (jobs, history), ``runs/<job>/`` (logs, rendezvous, checkpoints) and
``agent.json`` (mode 600: the API's URL and token), which the other commands read, so that
``idla submit job.toml`` needs no flag on the same machine. ``--url`` and ``--token-file`` /
``IDLA_TOKEN`` point them elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from idla.cli import pool_sim
from idla.cli.args import optional_speeds, port, positive_int
from idla.errors import ConfigError, IdlaError

HOME_ENV = "IDLA_POOL_HOME"


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home or os.environ.get(HOME_ENV) or Path.home() / ".idla" / "pool")


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", metavar="DIR", help=f"the agent's folder (default: "
                        f"${HOME_ENV}, else ~/.idla/pool); its agent.json names URL and token")
    parser.add_argument("--url", help="the agent's API (default: from agent.json)")
    parser.add_argument("--token-file", metavar="PATH",
                        help="file holding the API token (default: $IDLA_TOKEN, else agent.json)")


def add_commands(commands: Any, benches: Any) -> None:
    """Add `idla pool ...` and the top-level `submit`, `status`, `cancel`."""
    pool = commands.add_parser("pool", help="run several jobs on one pool of devices",
                               description="An agent that splits a pool of unequal devices "
                               "between jobs by priority and resizes training jobs in place.")
    pool.set_defaults(handler=_pool_help)
    verbs = pool.add_subparsers(dest="pool_command", metavar="VERB")
    start = verbs.add_parser("start", help="run the pool agent in the foreground")
    start.add_argument("--home", metavar="DIR", help=f"state folder (default: ${HOME_ENV}, "
                       "else ~/.idla/pool)")
    start.add_argument("--db", metavar="PATH", help="the SQLite database (default: HOME/pool.db)")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    start.add_argument("--port", type=port, default=8470, help="API port; 0 picks a free one "
                       "(default: 8470)")
    start.add_argument("--devices", type=positive_int, metavar="N",
                       help="local CPU worker slots (default: one per speed, else 2)")
    start.add_argument("--emulate-speeds", default="none", metavar="LIST",
                       help="relative CPU speed per slot, e.g. 1,1,0.5,0.25 (cgroup quota)")
    start.add_argument("--base-cores", type=float, default=0.5, metavar="CORES",
                       help="CPUs a slot of speed 1 gets when throttled (default: 0.5)")
    start.add_argument("--token-file", metavar="PATH",
                       help="file holding the API token (default: $IDLA_TOKEN, else random)")
    start.add_argument("--ray", metavar="ADDRESS",
                       help="place workers on a Ray cluster's nodes (ray://HOST:10001, HOST:6379, "
                       "auto, or local for a new one here) instead of local processes")
    start.add_argument("--policy", choices=("idla", "fifo", "static"), default="idla",
                       help="who gets which devices: idla (priorities, resizes; default), fifo "
                       "or static (one fixed device per job), the baselines of idla bench pool")
    start.set_defaults(handler=_start)
    for parsers in (verbs, commands):
        _add_client_verbs(parsers)
    drain = verbs.add_parser("drain", help="take a device out of the pool (its worker leaves "
                             "at a step boundary; the job shrinks in place)")
    drain.add_argument("device", metavar="DEVICE")
    drain.add_argument("--lost", action="store_true",
                       help="kill its worker instead, as if the device had died")
    _client_options(drain)
    drain.set_defaults(handler=_drain)
    restore = verbs.add_parser("restore", help="give a drained or lost device back to the pool")
    restore.add_argument("device", metavar="DEVICE")
    _client_options(restore)
    restore.set_defaults(handler=_drain)
    pool_sim.add_simulate(verbs)


def _add_client_verbs(parsers: Any) -> None:
    submit = parsers.add_parser("submit", help="submit a job spec (TOML) to the pool agent")
    submit.add_argument("spec", metavar="JOB.toml")
    _client_options(submit)
    submit.set_defaults(handler=_submit)
    status = parsers.add_parser("status", help="the pool's jobs (a table; --json)")
    status.add_argument("job", nargs="?", metavar="JOB", help="one job only")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _client_options(status)
    status.set_defaults(handler=_status)
    cancel = parsers.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job", metavar="JOB")
    _client_options(cancel)
    cancel.set_defaults(handler=_cancel)


def _pool_help(args: argparse.Namespace) -> int:
    if getattr(args, "pool_command", None) is None:
        raise ConfigError("name a verb: idla pool start | submit | status | cancel "
                          "(see idla pool --help)")
    return 2


def _write_private(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(value, file)
    os.replace(tmp, path)


def _start(args: argparse.Namespace) -> int:
    from idla.cli.token import resolve_token
    from idla.pool.agent import PoolAgent, PoolConfig
    from idla.pool.api import serving
    from idla.pool.baselines_live import live_policy
    from idla.pool.store import Store

    token, source, warnings = resolve_token(None, args.token_file, os.environ)
    for warning in warnings:
        print(warning.replace("idla serve", "idla pool"), file=sys.stderr)
    home = _home(args)
    home.mkdir(parents=True, exist_ok=True)
    speeds = optional_speeds(args.emulate_speeds, "--emulate-speeds")
    store = Store(args.db or home / "pool.db")
    backend = _backend(args, speeds)
    agent = PoolAgent(store, backend, PoolConfig(run_root=home / "runs"),
                      policy=live_policy(args.policy))
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        with serving(agent, token, args.host, args.port) as server:
            _write_private(home / "agent.json", {"url": server.url, "token": token,
                                                 "pid": os.getpid()})
            devices = ", ".join(d.device_id for d in backend.devices())
            print(f"idla pool: {server.url}  devices {devices}  (db {store.path})", flush=True)
            if source == "generated":
                print(f"  token in {home / 'agent.json'} (choose one with --token-file or "
                      "IDLA_TOKEN)", flush=True)
            print(f"  status page: {server.url}/?token=...; Ctrl-C stops", flush=True)
            signal.pause()
    except (KeyboardInterrupt, SystemExit):
        print("idla pool: stopping; running jobs resume at the next start", flush=True)
    finally:
        (home / "agent.json").unlink(missing_ok=True)
        store.close()
    return 0



def _backend(args: argparse.Namespace, speeds: list[float] | None) -> Any:
    """Local processes (cgroup-throttled slots with --emulate-speeds), or Ray actors."""
    if args.ray is None:
        from idla.pool.local import LocalBackend, LocalConfig

        return LocalBackend(LocalConfig(devices=args.devices, speeds=speeds,
                                        base_cores=args.base_cores))
    if speeds is not None or args.devices is not None:
        raise ConfigError("--ray takes its devices from the cluster's nodes: drop --devices "
                          "and --emulate-speeds")
    try:
        from idla.pool.ray_backend import RayBackend, RayConfig
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'idla[flower]'") from None
    return RayBackend(RayConfig(address=args.ray))


def _exit_quietly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _endpoint(args: argparse.Namespace) -> tuple[str, str]:
    from idla.cli.token import ENV, read_token_file

    found: dict[str, Any] = {}
    state = _home(args) / "agent.json"
    if state.exists():
        try:
            found = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            found = {}
    url = args.url or found.get("url")
    token = (read_token_file(args.token_file)[0] if args.token_file is not None
             else os.environ.get(ENV) or found.get("token"))
    if not url or not token:
        raise ConfigError(f"no pool agent found ({state} is missing): start one with "
                          "`idla pool start`, or give --url and --token-file")
    return str(url).rstrip("/"), str(token)


def _call(args: argparse.Namespace, method: str, path: str, body: bytes | None = None,
          content_type: str = "application/json") -> Any:
    url, token = _endpoint(args)
    request = urllib.request.Request(f"{url}{path}", data=body, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            reason = json.loads(error.read()).get("error", error.reason)
        except (json.JSONDecodeError, AttributeError):
            reason = error.reason
        raise IdlaError(f"{method} {path}: {error.code} {reason}") from None
    except (urllib.error.URLError, OSError) as error:
        raise IdlaError(f"cannot reach the pool agent at {url} ({error}); is "
                        "`idla pool start` running?") from None


def _submit(args: argparse.Namespace) -> int:
    from idla.pool.spec import load_spec

    spec = load_spec(args.spec)  # checked here, with paths resolved from its folder
    answer = _call(args, "POST", "/jobs", json.dumps(spec.as_json()).encode())
    print(answer["id"])
    return 0


def _drain(args: argparse.Namespace) -> int:
    verb = "drain" if hasattr(args, "lost") else "restore"
    body = json.dumps({"lost": bool(getattr(args, "lost", False))}).encode()
    answer = _call(args, "POST", f"/devices/{args.device}/{verb}", body)
    print(f"{answer['id']}: {answer['state']}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    answer = _call(args, "DELETE", f"/jobs/{args.job}")
    print(f"{answer['id']}: {answer['state']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    jobs = ([_call(args, "GET", f"/jobs/{args.job}")] if args.job
            else _call(args, "GET", "/jobs")["jobs"])
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="idla pool")
    for column in ("job", "name", "kind", "priority", "state", "devices", "starts", "note"):
        table.add_column(column)
    for job in jobs:
        table.add_row(job["id"], job["name"], job["kind"], f"{job['priority']:g}",
                      job["state"], ", ".join(job["devices"]) or "-", str(job["starts"]),
                      job["message"][:60])
    Console().print(table)
    return 0
