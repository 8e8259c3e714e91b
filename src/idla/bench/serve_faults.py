"""`idla bench faults --serving`: the fault and abuse suite for `idla serve`.

One pool of N CPU workers (an MLP 64 → 128 × 2 → 10) serves every trial. Each trial starts the
router and its HTTP server over that pool on 127.0.0.1 (its own `RouterConfig`, so that the two
rollout trials differ only in their load timeout, and its own counters), drives steady
open-loop Poisson load from another process (`idla.bench.serve_fault_load`) for the whole
trial, strikes once a quarter of the way in (`idla.bench.serve_fault_trials`), and keeps the
load on for at least another quarter after the fault is over:

- ``clean``: nothing (the baseline);
- ``kill``: SIGKILL a worker while it holds requests; recovery: /healthz reports every worker
  up again (the supervisor restarts it);
- ``rollout_raises``: POST /admin/model a checkpoint whose kwargs make torch raise at build;
- ``rollout_hangs``: POST /admin/model a valid checkpoint whose load hangs past the load
  timeout, then again while the aborted loads still run. The hang is injected through the
  worker's test-only hook ``IDLA_TEST_ONLY_LOAD_DELAY_S``, set for the whole pool: every hot
  load (the raising one too) first sleeps the load timeout + 1 s;
- ``strangers``: connections to the workers' ports without the link secret (silent ones on
  every connection worker 0 takes, a wrong MAC, no handshake, HTTP), then the router's own link
  to worker 0 is cut (a network blip); recovery: the router is linked to it again;
- ``bad_frames``: malformed frames from a peer that holds the secret;
- ``slow_clients``: K half-open HTTP connections held past the server's keep-alive timeout;
- ``bad_bodies``: predict requests whose bodies are malformed (deep nesting, 10**400, ...).

Per trial: requests finished (2xx), failed (any other status but 429, or no answer), refused
(429), lost (no HTTP answer at all: the serving counterpart of training's steps lost), the
admin answer and its latency, seconds to recover, whether the model served before the trial
still serves on every worker (each worker's answer to a ping, and every version the load's
answers carried), and whether the service is up after it (/healthz: every worker up, and a few
predict requests all answered 200).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idla.errors import ConfigError

TRIALS = ("clean", "kill", "rollout_raises", "rollout_hangs", "strangers", "bad_frames",
          "slow_clients", "bad_bodies")
MODEL = {"in_features": 64, "hidden": 128, "layers": 2, "classes": 10}
HANG_EXTRA_S = 1.0  # the injected hang outlasts the load timeout by this much
LEAD_FRACTION = 0.25  # of a trial: load before the fault, and at least this much after it
PROBES = 5  # predict requests after each trial, all of which must be answered 200


@dataclass(kw_only=True, slots=True)
class ServeFaultsConfig:
    workers: int = field(default=3, metadata={"parse": "positive_int"})
    """With --serving: serving worker processes in the pool (CPU)."""
    clients: int = field(default=4, metadata={"parse": "positive_int"})
    """With --serving: keep-alive connections the load generator spreads its requests over."""
    rate_rps: float = field(default=25.0, metadata={"flag": "--rate", "metavar": "RPS",
                                                    "parse": "positive_float"})
    """With --serving: open-loop request rate (Poisson arrivals, one row per request)."""
    trial_s: float = field(default=4.0, metadata={"flag": "--duration", "metavar": "S",
                                                  "parse": "positive_float"})
    """With --serving: seconds of load per trial, at least (a fault that takes longer
    stretches it)."""
    load_timeout_s: float = field(default=1.0, metadata={"flag": "--load-timeout",
                                                         "metavar": "S", "parse": "positive_float"})
    """With --serving: the router's load timeout in the hanging-rollout trial (seconds; the
    injected hang lasts 1 s longer)."""
    slow_clients: int = field(default=24, metadata={"parse": "positive_int"})
    """With --serving: half-open HTTP connections in the slow-clients trial."""
    trials: tuple[str, ...] = field(default=TRIALS, metadata={"parse": "names",
                                                              "metavar": "LIST"})
    """With --serving: trials to run, in this order."""
    seed: int = 0

    def __post_init__(self) -> None:
        from idla.serve.worker import MAX_LOAD_DELAY_S

        unknown = [t for t in self.trials if t not in TRIALS]
        if unknown:
            raise ConfigError(f"--trials: unknown trial {unknown[0]!r} (choose from "
                              f"{', '.join(TRIALS)})")
        if self.workers < 2:
            raise ConfigError("--workers must be at least 2 with --serving (a kill needs a "
                              "survivor)")
        if self.load_timeout_s + HANG_EXTRA_S > MAX_LOAD_DELAY_S:
            raise ConfigError(f"--load-timeout must be at most "
                              f"{MAX_LOAD_DELAY_S - HANG_EXTRA_S:g} s")


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment (so in every worker it starts, restarts
    too) for the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _save_models(root: Path, seed: int) -> dict[str, str]:
    import torch

    from idla.bench.serve_fault_probes import save_unbuildable_model
    from idla.serve.model_io import MLP, save_model

    paths = {}
    for offset, version in enumerate(("v1", "v2")):
        torch.manual_seed(seed + offset)
        save_model(root / version, MLP(**MODEL), "mlp", MODEL, (MODEL["in_features"],), version)
        paths[version] = str(root / version)
    paths["broken"] = str(save_unbuildable_model(root / "broken"))
    return paths


def _run_trial(config: ServeFaultsConfig, pool: Any, name: str, index: int, token: str,
               models: dict[str, str], hang_s: float) -> dict[str, Any]:
    import httpx

    from idla.bench.serve_fault_load import SteadyLoad, count_answers
    from idla.bench.serve_fault_trials import (
        FAULTS,
        HEAD_TIMEOUT_S,
        Trial,
        worker_versions,
        workers_up,
    )
    from idla.serve.router import RouterConfig
    from idla.serve.server import ServeOptions, ServingThread

    # The raising rollout must fail at build, not on the timeout, after the injected sleep.
    load_timeout_s = hang_s + 30 if name == "rollout_raises" else config.load_timeout_s
    options = ServeOptions(token=token, port=0, router=RouterConfig(load_timeout_s=load_timeout_s),
                           head_timeout_s=HEAD_TIMEOUT_S)
    row = [[0.25] * MODEL["in_features"]]
    with ServingThread(pool, options) as serving, httpx.Client(
            base_url=serving.url, headers={"Authorization": f"Bearer {token}"},
            timeout=60 + hang_s) as client:
        trial = Trial(pool, serving, client, token, models, hang_s, MODEL["in_features"],
                      config.slow_clients)
        before = worker_versions(serving)
        with SteadyLoad(serving.running.port, token, config.rate_rps, config.clients,
                        MODEL["in_features"], config.seed + index) as load:
            start_s = time.monotonic()
            time.sleep(LEAD_FRACTION * config.trial_s)
            observed = FAULTS[name](trial)
            time.sleep(max(LEAD_FRACTION * config.trial_s,
                           config.trial_s - (time.monotonic() - start_s)))
            records = load.stop()
        load_s = time.monotonic() - start_s
        up = workers_up(client)
        probes = [client.post("/v1/predict", json={"inputs": row}).status_code
                  for _ in range(PROBES)]
        after = worker_versions(serving)
    answers = count_answers(records)
    kept = (after == before and len(set(before)) == 1
            and set(answers["versions"]) <= set(before))
    return {"name": name, **observed, **answers, "load_s": load_s, "versions_before": before,
            "versions_after": after, "old_model_kept": kept, "workers_up_after": up,
            "probe_codes": probes,
            "up_after": up == len(pool.workers) and probes == [200] * PROBES}


def run_serve_fault_bench(config: ServeFaultsConfig,
                          on_trial: Callable[[dict[str, Any]], None] | None = None
                          ) -> dict[str, Any]:
    from idla.bench.machine import machine_info
    from idla.report import settings_dict
    from idla.serve.model_server import HANDSHAKE_TIMEOUT_S
    from idla.serve.worker import LOAD_DELAY_ENV, WorkerPool

    token = secrets.token_urlsafe(16)
    hang_s = config.load_timeout_s + HANG_EXTRA_S
    load_before = os.getloadavg()
    trials = []
    with tempfile.TemporaryDirectory(prefix="idla-serve-faults-") as root, \
            _environment(LOAD_DELAY_ENV, f"{hang_s:g}"):
        models = _save_models(Path(root), config.seed)
        start_s = time.monotonic()
        with WorkerPool(models["v1"], config.workers) as pool:
            pool_start_s = time.monotonic() - start_s
            for index, name in enumerate(config.trials):
                trial = _run_trial(config, pool, name, index, token, models, hang_s)
                trials.append(trial)
                if on_trial:
                    on_trial(trial)
    return {
        "settings": {**settings_dict(config), "model": {"architecture": "mlp", **MODEL},
                     "injected_hang_s": hang_s, "hang_hook": LOAD_DELAY_ENV,
                     "worker_handshake_timeout_s": HANDSHAKE_TIMEOUT_S},
        "machine": {**machine_info(), "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())},
        "pool_start_s": pool_start_s,
        "trials": trials,
        "summary": _summary(trials),
    }


def _summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    by_name = {t["name"]: t for t in trials}
    return {
        "up_after_every_trial": all(t["up_after"] for t in trials),
        "old_model_kept_in_every_trial": all(t["old_model_kept"] for t in trials),
        "failed_requests": {t["name"]: t["failed"] for t in trials},
        "kill_recover_s": by_name.get("kill", {}).get("recover_s"),
        "rollout_answers": {n: by_name[n]["admin_status"] for n in ("rollout_raises",
                                                                   "rollout_hangs")
                            if n in by_name},
        "slow_clients_still_open": by_name.get("slow_clients", {}).get("stalled_still_open"),
        "bad_body_codes": by_name.get("bad_bodies", {}).get("body_codes"),
    }


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_serve_fault_bench(result: dict[str, Any]) -> None:
    s, m = result["settings"], result["machine"]
    model = s["model"]
    print(f"\nidla bench faults --serving: {s['workers']} CPU workers, MLP "
          f"{model['in_features']}→{model['hidden']}×{model['layers']}→{model['classes']}, "
          f"{s['rate_rps']:g} req/s open loop over {s['clients']} connections, ≥ "
          f"{s['trial_s']:g} s per trial, load timeout {s['load_timeout_s']:g} s, hang "
          f"{s['injected_hang_s']:g} s injected through {s['hang_hook']}, "
          f"{s['slow_clients']} slow clients")
    before, after = m["load_average_before"], m["load_average_after"]
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']}, load "
          f"average {before[0]:.1f} before / {after[0]:.1f} after (1 min); pool started in "
          f"{result['pool_start_s']:.1f} s")
    print(f"\n{'trial':<15}{'finished':>9}{'failed':>7}{'refused':>8}{'lost':>5}  "
          f"{'admin':<14}{'recover s':>10}{'old model':>10}{'up after':>9}")
    for t in result["trials"]:
        admin = (f"{t['admin_status']} in {t['admin_s']:.2f} s" if "admin_status" in t
                 else "-")
        print(f"{t['name']:<15}{t['finished']:>9}{t['failed']:>7}{t['refused']:>8}"
              f"{t['lost']:>5}  {admin:<14}{_seconds(t.get('recover_s')):>10}"
              f"{_yes(t['old_model_kept']):>10}{_yes(t['up_after']):>9}")
    print()
    for t in result["trials"]:
        print(f"  {t['name']}: {t['fault']}; {_note(t)}")


def _note(t: dict[str, Any]) -> str:
    """One line of what the trial's fault met."""
    if t["name"] == "kill":
        return (f"detected in {_seconds(t['detect_s'])} s, restarts {t['restarts']}, new pid "
                f"{t['new_pid']}")
    if t["name"] in ("rollout_raises", "rollout_hangs"):
        note = f"answered {t['admin_status']}: {t['admin_error'].split('; the rollout')[0]}"
        if "second_status" in t:
            note += (f"; again at once: {t['second_status']}; after the hang the workers "
                     f"serve {sorted(set(map(str, t['versions_once_hang_ended'])))}")
        return note
    if t["name"] == "strangers":
        seen = t["strangers"]
        answers = ", ".join(f"{k} → {v}{' (closed)' if seen['closed'][k] else ''}"
                            for k, v in seen["answers"].items())
        return (f"{answers}; router relinked in {_seconds(t['recover_s'])} s; "
                f"{t['silent_still_open']} of {seen['silent']} silent strangers still open "
                f"{t['handshake_timeout_s'] + 1:g} s later")
    if t["name"] == "bad_frames":
        f = t["frames"]
        return (f"{f['error_replies']}/{f['frames']} answered with an error, ping after: "
                f"{_yes(f['pong_after'])}, garbage answered and closed: "
                f"{_yes(f['garbage_answered'] and f['closed_after_garbage'])}, workers "
                f"alive: {_yes(t['workers_alive'])}")
    if t["name"] == "slow_clients":
        kinds = ", ".join(f"{k} {v['open']}/{v['clients']} open {v['answers']}"
                          for k, v in t["slow_clients"].items())
        return (f"{t['stalled_still_open']} of {t['stalled']} stalled connections still open "
                f"after the keep-alive timeout ({t['keep_alive_timeout_s']:g} s) + 1 s: "
                f"{kinds}; unhandled exceptions logged when they hung up: "
                f"{t['unhandled_exceptions']}")
    if t["name"] == "bad_bodies":
        bodies = ", ".join(f"{b['body']} → {b['status']}" for b in t["bodies"])
        return f"{bodies}; unhandled exceptions logged: {t['unhandled_exceptions']}"
    return f"codes {t['codes']}"
