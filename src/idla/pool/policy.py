"""The pool's policy: one pure function from jobs, devices and models to an allocation.

`allocate` maximises Σ pᵢ·Uᵢ over the jobs under their min/max worker counts and memory needs.
The utility of a training or inference job is the fraction of its remaining work done over the
re-planning horizon H:

    Uᵢ = rateᵢ(Aᵢ) · H / workᵢ

(workᵢ: its remaining work when known, else ``unknown_work_s`` seconds on one device of its
best kind). Maximising Σ pᵢ·rateᵢ/workᵢ is Smith's weighted-shortest-processing-time rule
(Smith 1956) generalised to jobs that run on several devices at once, which minimises the
priority-weighted completion time on one machine; rates that grow less than linearly with
devices make Uᵢ concave. ``work_exponent`` γ < 1 multiplies Uᵢ by (workᵢ / W)^(1−γ), W an
hour on one best device, so that long jobs are not starved to the end (where, capped at
``max_workers``, they set the makespan). A serving job's utility is the fraction of its offered
load it carries within its latency target, min(1, capacity / offered), i.e. the fraction of
time the target holds when capacity is steady, times ``serve_weight`` (targets first).
``Utility.LOG_SPEEDUP`` (log(1 + rate/rate on one best device), proportional fairness without
knowledge of the work left) drives the Pollux-style baseline.

The search is greedy on marginal utility with a heap (lazy re-evaluation): a queued job's first
step is a bundle of ``min_workers`` devices of one kind, then devices of whichever kind add
most (devices of several kinds per job are allowed unless ``one_kind_per_job``). For a
concave objective over a matroid-like budget this is the classical greedy, within (1 − 1/e) of
the optimum for monotone submodular objectives (Nemhauser, Wolsey & Fisher 1978); the tests
check it against brute force on small pools. Measured rates are not concave in the device count
(in the Pollux/Sia traces, deepspeech2 runs faster on 3 A100s than on 4 at some epochs), and a
one-device-at-a-time greedy stops at the first dip; so each step weighs bundles of 1, 2, 4, 8 …
devices of a kind and takes the largest gain per device (the smaller bundle on a tie). Cost:
O((D + J)·K·log M·(log J + rate cost)) for D devices, J jobs, K device classes and M the
largest ``max_workers``.

Urgent jobs (priority ≥ ``guarantee_priority``) are served first, after the devices running
serving jobs hold: each gets the fewest devices (its current ones when they suffice) giving it
1/``guarantee_slowdown`` of its utility alone on the whole pool, while its work left takes at
most ``guarantee_max_s`` alone; the others then share the rest by Σ pᵢ·Uᵢ. (Saturn-1:
strict priority classes bring 84 % of p=4 jobs within 1.2x alone at twice the average JCT.)

Hysteresis: rigid running jobs keep their devices; for the rest, the re-plan is compared with
"stay" (every running job keeps its devices, free ones are filled) over the horizon, each job
whose devices change losing its measured resize cost, and the re-plan wins only by ``margin``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

from idla.pool.model import Allocation, Device, JobKind, JobView, PerfModels
from idla.pool.policy_config import PolicyConfig, Utility

__all__ = ["PolicyConfig", "Utility", "allocate"]


class _Scorer:
    """Uᵢ of a job on a device list, with the per-job constants computed once."""

    def __init__(self, jobs: Sequence[JobView], classes: Sequence[Device], models: PerfModels,
                 config: PolicyConfig) -> None:
        self._models = models
        self._config = config
        self._jobs = {job.job_id: job for job in jobs}
        self._scale: dict[str, float] = {}
        self._work: dict[str, float] = {}
        for job in jobs:
            fits = [c for c in classes if c.memory_bytes >= job.memory_bytes_per_worker]
            best = max((models.rate_per_s(job.job_id, [c]) for c in fits), default=0.0)
            if job.kind is JobKind.SERVE and job.offered_requests_per_s > 0:
                self._scale[job.job_id] = 1.0 / job.offered_requests_per_s
            elif config.utility is Utility.LOG_SPEEDUP or job.remaining_samples is None:
                work = best * (1.0 if config.utility is Utility.LOG_SPEEDUP
                               else config.unknown_work_s)
                self._scale[job.job_id] = 1.0 / work if work > 0 else 0.0
            else:
                work = self._work[job.job_id] = max(job.remaining_samples, 1e-9)
                reference = best * config.unknown_work_s
                stretch = (work / reference) ** (1 - config.work_exponent) if reference > 0 else 1
                self._scale[job.job_id] = stretch / work

    def rate_per_s(self, job_id: str, devices: Sequence[Device]) -> float:
        return self._models.rate_per_s(job_id, devices)

    def seconds_left(self, job_id: str, devices: Sequence[Device]) -> float:
        """Seconds ``job_id`` needs to finish on ``devices`` (inf when its work is unknown)."""
        rate = self._models.rate_per_s(job_id, devices)
        work = self._work.get(job_id)
        return work / rate if work is not None and rate > 0 else math.inf

    def utility(self, job_id: str, devices: Sequence[Device]) -> float:
        if not devices:
            return 0.0
        rate = self._models.rate_per_s(job_id, devices) * self._scale[job_id]
        job = self._jobs[job_id]
        if job.kind is JobKind.SERVE and job.offered_requests_per_s > 0:
            return min(1.0, rate) * self._config.serve_weight
        if self._config.utility is Utility.LOG_SPEEDUP:
            return math.log1p(rate)
        return rate * self._config.horizon_s

    def weighted(self, allocation: Mapping[str, Sequence[Device]],
                 changed: Mapping[str, float]) -> float:
        """Σ pᵢ·Uᵢ over the horizon, a changed job losing ``changed[job]`` seconds of it."""
        total = 0.0
        horizon_s = self._config.horizon_s
        for job_id, held in allocation.items():
            kept = max(0.0, 1.0 - changed.get(job_id, 0.0) / horizon_s)
            total += self._jobs[job_id].priority * self.utility(job_id, held) * kept
        return total


def _class_key(device: Device) -> tuple[str, int]:
    return device.kind, device.memory_bytes


class _Pool:
    """Free devices by class, handed out on the job's own nodes first, then on the fullest."""

    def __init__(self, devices: Sequence[Device]) -> None:
        self.free: dict[tuple[str, int], dict[str, list[Device]]] = {}
        self.count: dict[tuple[str, int], int] = {}
        for device in sorted(devices, key=lambda d: d.device_id, reverse=True):
            by_node = self.free.setdefault(_class_key(device), {})
            by_node.setdefault(device.node, []).append(device)
            self.count[_class_key(device)] = self.count.get(_class_key(device), 0) + 1

    def take(self, key: tuple[str, int], held: Sequence[Device],
             prefer: Sequence[Device]) -> Device:
        by_node = self.free[key]
        for device in prefer:
            if _class_key(device) == key and device in by_node.get(device.node, ()):
                by_node[device.node].remove(device)
                return self._taken(key, device)
        nodes = dict.fromkeys([*(d.node for d in held), *(d.node for d in prefer)])
        mine = [n for n in nodes if by_node.get(n)]
        node = mine[0] if mine else max(by_node, key=lambda n: len(by_node[n]))
        return self._taken(key, by_node[node].pop())

    def has(self, device: Device) -> bool:
        return device in self.free.get(_class_key(device), {}).get(device.node, ())

    def discard(self, devices: Sequence[Device]) -> None:
        for device in devices:
            self.free[_class_key(device)][device.node].remove(device)
            self._taken(_class_key(device), device)

    def _taken(self, key: tuple[str, int], device: Device) -> Device:
        self.count[key] -= 1
        by_node = self.free[key]
        if not by_node[device.node]:
            del by_node[device.node]
        return device


def _greedy(jobs: Sequence[JobView], pool: _Pool, scorer: _Scorer,
            prefer: Mapping[str, Sequence[Device]], config: PolicyConfig,
            start: Mapping[str, Sequence[Device]] | None = None,
            enough: Mapping[str, float] | None = None,
            path: list[tuple[tuple[str, int], int, float]] | None = None,
            ) -> dict[str, list[Device]]:
    """Greedy on marginal pᵢ·Uᵢ (module docstring) from ``start``; a job stops growing once its
    utility reaches ``enough[job]``. ``path`` receives (class, devices, utility after) per
    step."""
    classes = {key: next(iter(nodes.values()))[0] for key, nodes in pool.free.items() if nodes}
    start = start or {}
    enough = enough or {}
    held = {job.job_id: list(start.get(job.job_id, ())) for job in jobs}
    base = {job_id: scorer.utility(job_id, mine) for job_id, mine in held.items()}
    version: dict[str, int] = dict.fromkeys(held, 0)
    by_id = {job.job_id: job for job in jobs}
    heap: list[tuple[float, int, str, tuple[str, int], int, int]] = []
    order = {job.job_id: index for index, job in enumerate(jobs)}

    def push(job: JobView) -> None:
        mine = held[job.job_id]
        room = job.max_workers - len(mine)
        if room <= 0 or base[job.job_id] >= enough.get(job.job_id, math.inf):
            return
        first = job.min_workers if not mine else 1
        kinds = {_class_key(d) for d in mine}
        best: tuple[float, float, int, tuple[str, int]] | None = None
        for key, sample in classes.items():
            if pool.count[key] < first or sample.memory_bytes < job.memory_bytes_per_worker:
                continue
            if config.one_kind_per_job and kinds and key not in kinds:
                continue
            # Equal gains: a serving job (its target met either way) takes the slower kind.
            slower = -scorer.rate_per_s(job.job_id, [sample]) if job.kind is JobKind.SERVE else 0
            for size in _bundle_sizes(first, min(room, pool.count[key])):
                gain = (scorer.utility(job.job_id, mine + [sample] * size)
                        - base[job.job_id]) / size
                if best is None or (gain, slower, -size) > best[:3]:
                    best = (gain, slower, -size, key)
        if best is not None and best[0] * job.priority > 0:
            heapq.heappush(heap, (-best[0] * job.priority, order[job.job_id], job.job_id,
                                  best[3], -best[2], version[job.job_id]))

    for job in jobs:
        push(job)
    while heap:
        _, _, job_id, key, need, seen = heapq.heappop(heap)
        job = by_id[job_id]
        if seen != version[job_id] or pool.count[key] < need:
            if seen == version[job_id]:
                push(job)
            continue
        for _ in range(need):
            held[job_id].append(pool.take(key, held[job_id], prefer.get(job_id, ())))
        base[job_id] = scorer.utility(job_id, held[job_id])
        if path is not None:
            path.append((key, need, base[job_id]))
        version[job_id] += 1
        push(job)
    return {job_id: devices for job_id, devices in held.items() if devices}


def _bundle_sizes(first: int, most: int) -> list[int]:
    """Devices one greedy step may add: ``first``, then first + 1, 3, 7, … (bundles of 2, 4,
    8 … beyond it), and ``most`` itself."""
    sizes, extra = [], 1
    size = first
    while size <= most:
        sizes.append(size)
        size, extra = first + 2 * extra - 1, 2 * extra
    if sizes and sizes[-1] < most:
        sizes.append(most)
    return sizes


def allocate(jobs: Sequence[JobView], devices: Sequence[Device], models: PerfModels,
             current: Allocation, config: PolicyConfig | None = None,
             ) -> dict[str, tuple[str, ...]]:
    """The allocation maximising Σ pᵢ·Uᵢ (module docstring), as job id → sorted device ids.

    ``current`` is what runs now; devices it names that are gone are treated as lost (a rigid
    job that lost one is re-placed from scratch). Jobs absent from the result are queued.
    With ``priority_tiers`` the classes are planned one after the other, highest first, each on
    the devices the classes above left (strict priority between classes, Σ pᵢ·Uᵢ within one).
    """
    config = config or PolicyConfig()
    by_id = {device.device_id: device for device in devices}
    held_now: dict[str, list[Device]] = {}
    for job in jobs:
        ids = current.get(job.job_id, ())
        alive = [by_id[i] for i in ids if i in by_id]
        if ids and (len(alive) == len(ids) or job.resizable) and len(alive) >= job.min_workers:
            held_now[job.job_id] = alive[:job.max_workers]
    pinned = {job.job_id: held_now[job.job_id] for job in jobs
              if not job.resizable and job.job_id in held_now}
    taken = {d.device_id for held in pinned.values() for d in held}
    free = [d for d in devices if d.device_id not in taken]
    open_jobs = [job for job in jobs if job.job_id not in pinned]
    classes: dict[tuple[str, int], Device] = {}
    for device in devices:
        classes.setdefault(_class_key(device), device)
    scorer = _Scorer(jobs, list(classes.values()), models, config)

    serving = {d.device_id for job in open_jobs if job.kind is JobKind.SERVE
               for d in held_now.get(job.job_id, ())}  # a latency target outranks a guarantee
    floor = _guarantees(open_jobs, devices, [d for d in free if d.device_id not in serving],
                        scorer, held_now, config)
    used = {d.device_id for held in floor.values() for d in held}
    free = [d for d in free if d.device_id not in used]
    left = {d.device_id for d in free}
    now = {job.job_id: alive for job in open_jobs if job.job_id in held_now
           and len(alive := [d for d in held_now[job.job_id] if d.device_id in left])
           >= job.min_workers}
    target = _plan(open_jobs, free, scorer, now, floor, held_now, models, config)
    return {job_id: tuple(sorted(d.device_id for d in held))
            for job_id, held in {**target, **pinned}.items() if held}


def _guarantees(jobs: Sequence[JobView], devices: Sequence[Device], free: Sequence[Device],
                scorer: _Scorer, now: Mapping[str, Sequence[Device]], config: PolicyConfig,
                ) -> dict[str, list[Device]]:
    """The floor of each job of priority ≥ ``guarantee_priority``: the fewest devices (its
    current ones when they suffice) reaching 1/``guarantee_slowdown`` of its utility alone on
    all of ``devices``; urgent jobs in order of their utility alone (Smith's rule). Cost: two
    greedy runs of at most ``max_workers`` steps per urgent job, the second one only when the
    devices it would take alone are not free."""
    urgent = [job for job in jobs if job.priority >= config.guarantee_priority
              and job.kind is not JobKind.SERVE]
    if not urgent:
        return {}
    sampler = _Sampler(devices)
    alone: dict[str, float] = {}
    alone_s: dict[str, float] = {}
    paths: dict[str, list[tuple[tuple[str, int], int, float]]] = {}
    for job in urgent:
        path = paths[job.job_id] = []
        solo = _greedy([job], sampler.pool(job.max_workers), scorer, {}, config, path=path)
        alone[job.job_id] = path[-1][2] if path else 0.0
        alone_s[job.job_id] = scorer.seconds_left(job.job_id, solo.get(job.job_id, []))
    urgent = [job for job in urgent if alone_s[job.job_id] <= config.guarantee_max_s
              or math.isinf(alone_s[job.job_id])]
    shared = _Pool(free)
    floor: dict[str, list[Device]] = {}
    for job in sorted(urgent, key=lambda j: -alone[j.job_id]):
        job_id = job.job_id
        enough = {job_id: alone[job_id] / config.guarantee_slowdown}
        mine = [d for d in now.get(job_id, ()) if shared.has(d)]
        if mine and scorer.utility(job_id, mine) >= enough[job_id]:
            held = _greedy([job], _Pool(mine), scorer, {}, config, enough=enough)[job_id]
            shared.discard(held)
        else:
            # The devices it would take alone, class by class, as far as they are free here.
            held = []
            for key, need, utility in paths[job_id]:
                if shared.count.get(key, 0) < need:
                    break
                held += [shared.take(key, held, mine) for _ in range(need)]
                if utility >= enough[job_id]:
                    break
            if scorer.utility(job_id, held) < enough[job_id]:
                held = _greedy([job], shared, scorer, {job_id: mine}, config,
                               start={job_id: held}, enough=enough).get(job_id, held)
        if held:
            floor[job_id] = held
    return floor


class _Sampler:
    """Per device class, devices on its fullest nodes first: a small stand-in pool for "this
    job alone on all the devices", built in O(devices) once and O(classes × workers) per job."""

    def __init__(self, devices: Sequence[Device]) -> None:
        by_class: dict[tuple[str, int], dict[str, list[Device]]] = {}
        for device in devices:
            by_class.setdefault(_class_key(device), {}).setdefault(device.node, []).append(device)
        self._ordered = [[d for node in sorted(nodes.values(), key=lambda n: (-len(n), n[0].node))
                          for d in node] for nodes in by_class.values()]

    def pool(self, workers: int) -> _Pool:
        return _Pool([d for ordered in self._ordered for d in ordered[:workers]])


def _plan(jobs: Sequence[JobView], free: Sequence[Device], scorer: _Scorer,
          now: Mapping[str, Sequence[Device]], floor: Mapping[str, Sequence[Device]],
          before: Mapping[str, Sequence[Device]], models: PerfModels, config: PolicyConfig,
          ) -> dict[str, list[Device]]:
    """Greedy on ``free`` from each job's ``floor``, unless "stay" (each job keeps its ``now``
    devices, the rest filled) scores within ``margin`` of it, resize costs counted against
    ``before``."""
    target = _greedy(jobs, _Pool(free), scorer, now, config, start=floor)
    running = [job for job in jobs if job.job_id in now]
    if any(sorted(d.device_id for d in target.get(j.job_id, ())) !=
           sorted(d.device_id for d in (*floor.get(j.job_id, ()), *now[j.job_id]))
           for j in running):
        kept = {job.job_id: [*floor.get(job.job_id, ()), *now[job.job_id]] for job in running}
        kept_ids = {d.device_id for held in kept.values() for d in held}
        stay = _greedy(jobs, _Pool([d for d in free if d.device_id not in kept_ids]), scorer,
                       now, config, start={**floor, **kept})
        if _score(scorer, stay, before, models) * (1 + config.margin) >= _score(
                scorer, target, before, models):
            target = stay
    return target


def _score(scorer: _Scorer, allocation: Mapping[str, Sequence[Device]],
           now: Mapping[str, Sequence[Device]], models: PerfModels) -> float:
    changed = {}
    for job_id, held in allocation.items():
        before = now.get(job_id)
        if before and {d.device_id for d in before} != {d.device_id for d in held}:
            changed[job_id] = models.resize_cost_s(job_id)
    return scorer.weighted(allocation, changed)
