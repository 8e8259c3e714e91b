"""`idla bench faults`: the fault-injection suite for elastic training.

Every trial trains the demo CNN elastically (`idla/agent/elastic.py`) on 4 local workers with the
same data, seed, global batch and epochs; one fault strikes at a random step (seeded):
- `kill`: a worker sends itself SIGKILL (kill -9) before computing the step;
- `link`: the workers run on the multi-host rig (one network namespace each, the store on a fifth
  "lighthouse" host) and the launcher takes a worker's eth0 down (`ip link set down`) when rank 0
  reports the step; it brings the link back once the survivors have re-formed, so the cut-off
  worker can learn it was left out and stop;
- `slow`: a worker's CPU quota is divided by 10 from the step on (compute dilation without cgroups);
- `nan`: a worker's inputs are NaN for 3 steps (the agent's guard leaves it out, then drops it).
Measured per trial: whether the run finished (every survivor returned all planned steps with
identical parameters), steps whose work was lost, samples skipped or repeated (from the committed
cursor: every global batch of every epoch exactly once), seconds from the fault to the report that
names the lost worker, and final test accuracy beside a clean run's.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from idla.bench.machine import machine_info
from idla.elastic.membership import ElasticConfig
from idla.errors import ConfigError, EmulationError
from idla.jobs.elastic import elastic_worker
from idla.jobs.train import TrainConfig
from idla.runtime.launch import launch_local

KINDS = ("kill", "link", "slow", "nan")
NAN_STEPS = 3


@dataclass(kw_only=True, slots=True)
class FaultBenchConfig:
    workers: int = 4
    epochs: int = 4
    global_batch: int = 128
    kills: int = 3
    """kill trials (each at its own random worker and step)."""
    kinds: tuple[str, ...] = KINDS
    base_cores: float = 0.45
    """CPU cores per worker (cgroup throttling, so `slow` lowers a real quota)."""
    seed: int = 0
    collective_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ConfigError(f"--kinds: unknown fault {unknown[0]!r} (choose from "
                              f"{', '.join(KINDS)})")
        if self.workers < 2:
            raise ConfigError("--workers must be at least 2 (a fault needs a survivor)")
        if self.kills < 0 or self.epochs < 1:
            raise ConfigError("--kills must be ≥ 0 and --epochs ≥ 1")


def _train_config(config: FaultBenchConfig) -> TrainConfig:
    return TrainConfig(workers=config.workers, emulate_speeds=None, epochs=config.epochs,
                       global_batch=config.global_batch, seed=config.seed, out=None)


def _speeds(config: FaultBenchConfig) -> list[float] | None:
    from idla.emulate.cgroup import CpuThrottle

    try:
        with CpuThrottle([1.0] * config.workers, config.base_cores):
            return [1.0] * config.workers
    except EmulationError:
        return None  # `slow` falls back to compute dilation


def _run(config: FaultBenchConfig, faults: str, speeds: list[float] | None,
         link: tuple[int, int] | None = None) -> dict[str, Any]:
    train = _train_config(config)
    elastic = ElasticConfig(collective_timeout_s=config.collective_timeout_s)
    env = {"IDLA_FAULTS": faults}
    marks: dict[str, float] = {}
    start = time.time()
    if link is None:
        results = launch_local(elastic_worker, (train, elastic), config.workers, speeds,
                               config.base_cores, env=env, allow_lost=True)
    else:
        results = _run_on_rig(config, train, elastic, env, speeds, link, marks)
    return {"results": results, "wall_s": time.time() - start, **marks}


def _run_on_rig(config: FaultBenchConfig, train: TrainConfig, elastic: ElasticConfig,
                env: dict[str, str], speeds: list[float] | None, link: tuple[int, int],
                marks: dict[str, float]) -> list[Any]:
    from idla.emulate.lighthouse import lighthouse
    from idla.emulate.netns import NetnsRig

    victim, at_step = link
    with NetnsRig(config.workers + 1) as rig:
        store_host = rig.hosts[config.workers]
        with lighthouse(store_host.address, 29400, store_host.namespace) as spec:
            def on_progress(message: dict[str, Any]) -> None:
                if "event" in message and "cut_at" in marks and "healed_at" not in marks:
                    rig.set_link(victim, True)
                    marks["healed_at"] = time.time()
                elif message.get("step", 0) >= at_step and "cut_at" not in marks:
                    rig.set_link(victim, False)
                    marks["cut_at"] = time.time()

            return launch_local(
                elastic_worker, (train, elastic), config.workers, speeds, config.base_cores,
                env={**env, "IDLA_RENDEZVOUS": spec}, allow_lost=True,
                netns=[h.namespace for h in rig.hosts[: config.workers]],
                on_progress=on_progress)


def _summarize(name: str, kind: str, member: int | None, step: int | None,
               run: dict[str, Any], clean_accuracy: float | None) -> dict[str, Any]:
    survivors = [r for r in run["results"] if r and "lost" not in r]
    lost = [i for i, r in enumerate(run["results"]) if not r or "lost" in r]
    if not survivors:
        return {"name": name, "kind": kind, "finished": False, "lost_workers": lost}
    first = survivors[0]
    planned = first["config"]["epochs"] * _steps_per_epoch(first)
    counts = Counter(tuple(c) for c in first["committed"])
    expected = {(e, b) for e in range(first["config"]["epochs"])
                for b in range(_steps_per_epoch(first))}
    batch = first["config"]["global_batch"]
    events = first["events"]
    fault_at = run.get("cut_at") or next((e["fault_at"] for e in events if e["fault_at"]), None)
    detection_s = (events[0]["declared_at"] - fault_at) if events and fault_at else None
    finished = (all(r["step"] == planned for r in survivors)
                and len({r["param_digest"] for r in survivors}) == 1)
    accuracy = first["test_accuracy"]
    return {
        "name": name, "kind": kind, "member": member, "step": step,
        "finished": finished, "steps": first["step"], "planned_steps": planned,
        "steps_lost": max(r["steps_lost"] for r in survivors),
        "samples_skipped": batch * len(expected - set(counts)),
        "samples_repeated": batch * sum(n - 1 for n in counts.values() if n > 1),
        "nan_excluded_steps": sum(first["agent"].get("nonfinite_steps", [])),
        "final_accuracy": accuracy,
        "accuracy_gap_pp": None if clean_accuracy is None
        else round(100 * (clean_accuracy - accuracy), 3),
        "detection_s": detection_s,
        "lost_workers": lost,
        "reported_lost": sorted({m for e in events for m in e["lost_members"]}),
        "world_size_end": first["world_size"],
        "wall_s": run["wall_s"],
    }


def _steps_per_epoch(report: dict[str, Any]) -> int:
    return int(report["steps_per_epoch"])


def run_fault_bench(config: FaultBenchConfig, on_trial: Any = None) -> dict[str, Any]:
    rng = random.Random(config.seed)
    speeds = _speeds(config)
    clean = _summarize("clean", "none", None, None, _run(config, "", speeds), None)
    trials = [clean]
    planned = clean["planned_steps"]
    if on_trial:
        on_trial(clean)

    def pick() -> tuple[int, int]:
        return rng.randrange(config.workers), rng.randrange(3, planned - NAN_STEPS - 2)

    plan = [("kill", i) for i in range(config.kills if "kill" in config.kinds else 0)]
    plan += [(k, 0) for k in ("link", "slow", "nan") if k in config.kinds]
    for kind, index in plan:
        member, step = pick()
        name = f"{kind}{index + 1}" if kind == "kill" else kind
        if kind == "link":
            run = _run(config, "", speeds, link=(member, step))
        else:
            spec = {"kill": f"kill:{member}@{step}", "slow": f"slow:{member}@{step}x10",
                    "nan": f"nan:{member}@{step}+{NAN_STEPS}"}[kind]
            run = _run(config, spec, speeds)
        trial = _summarize(name, kind, member, step, run, clean["final_accuracy"])
        trials.append(trial)
        if on_trial:
            on_trial(trial)
    faulty = [t for t in trials[1:] if t["kind"] in ("kill", "link")]
    detections = [t["detection_s"] for t in faulty if t.get("detection_s") is not None]
    return {
        "settings": {**asdict(config), "throttled": speeds is not None},
        "machine": machine_info(),
        "trials": trials,
        "summary": {
            "all_finished": all(t["finished"] for t in trials),
            "max_steps_lost": max((t.get("steps_lost", 0) for t in trials), default=0),
            "max_accuracy_gap_pp_after_kill": max(
                (t["accuracy_gap_pp"] for t in trials if t["kind"] == "kill"), default=None),
            "max_detection_s": max(detections) if detections else None,
            "median_detection_s": statistics.median(detections) if detections else None,
        },
    }


def print_fault_bench(result: dict[str, Any]) -> None:
    print(f"{'trial':<7} {'fault':<16} {'finished':>8} {'lost steps':>10} {'skip/rep':>9} "
          f"{'detect s':>8} {'accuracy':>9} {'gap pp':>7} {'wall s':>7}")
    for t in result["trials"]:
        fault = "-" if t["kind"] == "none" else f"{t['kind']} w{t['member']}@{t['step']}"
        detect = "-" if t.get("detection_s") is None else f"{t['detection_s']:.1f}"
        gap = "-" if t.get("accuracy_gap_pp") is None else f"{t['accuracy_gap_pp']:+.2f}"
        print(f"{t['name']:<7} {fault:<16} {t['finished']!s:>8} {t.get('steps_lost', '-')!s:>10} "
              f"{t.get('samples_skipped', 0)}/{t.get('samples_repeated', 0):<7} {detect:>8} "
              f"{100 * t.get('final_accuracy', 0):>8.2f}% {gap:>7} {t.get('wall_s', 0):>7.1f}")
    s = result["summary"]
    print(f"all finished: {s['all_finished']}, max steps lost: {s['max_steps_lost']}, "
          f"max detection: {s['max_detection_s']} s, settings: {result['settings']}")
