"""Performance models per job × device kind: a job's predicted rate on any set of devices.

Two implementations of `idla.pool.model.PerfModels`:

- `OnlineModels` (the live agent): per (job, device kind) a compute fit ``α_k + β_k·b`` learned
  online from idla's per-worker meters with `idla.profile.perf_model.StepTimeFit`, seeded by a
  short profile, plus the job's communication time per step (link probe, then measured).
- `TraceModels` (the simulator): the measured step times of the Pollux/Sia artifacts
  (`idla.pool.sim.traces`), interpolated on the local batch, and their statistical efficiency.
  On several kinds it splits the batch over each kind's measured compute curve (not a linear
  fit) the same way, so that a split over two kinds of equal speed costs what one kind does.

A job on devices of several kinds is split the way idla splits a global batch over unequal
workers (`idla.plan.shares`): every device finishes the step together, so with compute
``α_k + β_k·b_k`` the common compute time is

    T = (B + Σ_d α_d/β_d) / (Σ_d 1/β_d)      (sum over devices d; b_d = (T − α_d)/β_d)

and a step costs ``T + comm``; the rate is ``B / (T + comm)``. A device whose share would be
negative (too slow to help) is left idle. Cost O(kinds) per call after counting the devices.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from idla.errors import ConfigError
from idla.pool.model import Device
from idla.pool.sim.traces import AppTrace, FloatArray, KindTrace
from idla.profile.perf_model import StepTimeFit

_MAX_ACCUMULATION = 64
"""Gradient-accumulation steps tried before a batch is declared not to fit."""


def uneven_step_s(global_batch: float, fits: Sequence[tuple[int, float, float]]) -> float:
    """Compute seconds of one step of ``global_batch`` samples split so that all devices finish
    together; ``fits`` = (devices, α seconds, β seconds per sample) per device kind. Kinds whose
    share would be negative are dropped (they would slow the step). inf with no devices."""
    active = [fit for fit in fits if fit[0] > 0 and fit[2] > 0]
    while active:
        inv = sum(n / beta for n, _, beta in active)
        fixed = sum(n * alpha / beta for n, alpha, beta in active)
        step_s = (global_batch + fixed) / inv
        kept = [fit for fit in active if step_s >= fit[1]]
        if len(kept) == len(active):
            return step_s
        active = kept
    return math.inf


@dataclass(kw_only=True, slots=True)
class OnlineConfig:
    """Settings of the live agent's performance models."""

    forget: float = 0.8
    """Forgetting factor of each (job, kind) compute fit (see StepTimeFit)."""
    prior_rate_per_s: float = 1.0
    """Rate per device assumed for a job with no observation yet (samples/s), so that a new
    job is placed and then measured."""


class OnlineModels:
    """Per (job, device kind) compute fits learned from observations; implements PerfModels.

    A kind a job has not run on borrows the mean fit of the kinds it has run on (optimistic
    enough to be tried, then measured). Step times are cached per (job, devices per kind) until
    the job's next observation, so a policy's many candidate evaluations cost one dictionary
    look-up each after the first.
    """

    def __init__(self, config: OnlineConfig | None = None) -> None:
        self._config = config or OnlineConfig()
        self._fits: dict[tuple[str, str], StepTimeFit] = {}
        self._global_batch: dict[str, int] = {}
        self._comm_s: dict[str, float] = {}
        self._resize_s: dict[str, float] = {}
        self._step_cache: dict[str, dict[tuple[tuple[str, int], ...], float]] = {}

    def set_job(self, job_id: str, global_batch: int, comm_s: float = 0.0) -> None:
        """Declare ``job_id``'s global batch (samples per step) and its communication seconds
        per step from the link probe (replaced by measurements as they come)."""
        if global_batch < 1:
            raise ConfigError(f"job {job_id}: global batch must be >= 1, got {global_batch}")
        self._global_batch[job_id] = global_batch
        self._comm_s.setdefault(job_id, comm_s)
        self._step_cache.pop(job_id, None)

    def observe(self, job_id: str, device_kind: str, local_batch: int, compute_s: float,
                comm_s: float | None = None) -> None:
        """One worker's step: ``local_batch`` samples in ``compute_s`` seconds on ``device_kind``
        and ``comm_s`` seconds of communication."""
        fit = self._fits.setdefault((job_id, device_kind), StepTimeFit(self._config.forget))
        fit.observe(local_batch, compute_s, comm_s)
        self._step_cache.pop(job_id, None)
        if comm_s is not None and math.isfinite(comm_s) and comm_s >= 0:
            old = self._comm_s.get(job_id, comm_s)
            self._comm_s[job_id] = self._config.forget * old + (1 - self._config.forget) * comm_s

    def seed(self, job_id: str, device_kind: str,
             profile: Sequence[tuple[int, float]]) -> None:
        """A short profile: (local batch, compute seconds) pairs measured before the job runs."""
        for local_batch, compute_s in profile:
            self.observe(job_id, device_kind, local_batch, compute_s)

    def observe_resize(self, job_id: str, seconds: float) -> None:
        """The measured progress a resize cost (seconds)."""
        if math.isfinite(seconds) and seconds >= 0:
            self._resize_s[job_id] = seconds

    def _kind_fit(self, job_id: str, kind: str) -> tuple[float, float] | None:
        fit = self._fits.get((job_id, kind))
        model = fit.model() if fit is not None else None
        if model is not None:
            return model.compute_fixed_s, model.compute_per_sample_s
        known = [m for (job, _), f in self._fits.items() if job == job_id
                 and (m := f.model()) is not None]
        if not known:
            return None
        return (float(np.mean([m.compute_fixed_s for m in known])),
                float(np.mean([m.compute_per_sample_s for m in known])))

    def step_s(self, job_id: str, devices: Sequence[Device]) -> float:
        """Predicted seconds per step on ``devices`` (inf if unknown or empty)."""
        batch = self._global_batch.get(job_id)
        if batch is None or not devices:
            return math.inf
        counts: dict[str, int] = {}
        for device in devices:
            counts[device.kind] = counts.get(device.kind, 0) + 1
        key = tuple(sorted(counts.items()))
        cache = self._step_cache.setdefault(job_id, {})
        step_s = cache.get(key)
        if step_s is None:
            step_s = cache[key] = self._predict_step_s(job_id, batch, key)
        return step_s

    def _predict_step_s(self, job_id: str, batch: int,
                        counts: tuple[tuple[str, int], ...]) -> float:
        fits = []
        for kind, count in counts:
            fit = self._kind_fit(job_id, kind)
            if fit is None:
                return math.inf
            fits.append((count, fit[0], fit[1]))
        return uneven_step_s(batch, fits) + self._comm_s.get(job_id, 0.0)

    def rate_per_s(self, job_id: str, devices: Sequence[Device]) -> float:
        if not devices:
            return 0.0
        step_s = self.step_s(job_id, devices)
        if math.isinf(step_s):
            return self._config.prior_rate_per_s * len(devices)
        return self._global_batch[job_id] / step_s

    def resize_cost_s(self, job_id: str) -> float:
        """Measured, else one step on one device of the job's best kind (≤ one step lost)."""
        if job_id in self._resize_s:
            return self._resize_s[job_id]
        kinds = [kind for job, kind in self._fits if job == job_id]
        steps = [self.step_s(job_id, [Device("probe", kind, "probe", 0)]) for kind in kinds]
        finite = [s for s in steps if math.isfinite(s)]
        return min(finite) if finite else 0.0


@dataclass(slots=True)
class _TraceJob:
    app: AppTrace
    rigid_batch: int
    """The user's global batch for a rigid job; 0 lets the model choose (adaptive)."""
    epoch: int = 0
    devices: tuple[Device, ...] = ()


class TraceModels:
    """Rates from the artifacts' measured step times; implements PerfModels.

    Rates are in progress units per second: one unit is one iteration at the application's
    initial batch (the validation files' ``progress``), so a job's work is its target progress.
    An adaptive job's global batch is the goodput-maximising one (Pollux's batch choice) among
    powers of two times the initial batch; a rigid one keeps the user's batch, with gradient
    accumulation when it does not fit. Goodput = gain / iteration seconds / calibration, gain =
    (var + sqr) / (var/s + sqr) at batch scale s, var and sqr as measured when training at that
    batch (McCandlish et al. 2018, as in Pollux).
    Results are cached per (application, epoch, batch, devices per kind and node count), so a
    simulated round costs dictionary look-ups once the shapes have been seen.

    Args:
        apps: The loaded applications by name.
        restart_resize: True: a resize costs the application's checkpoint-restart seconds
            (Pollux, Sia); False: one iteration at the current allocation (idla's in-place
            elastic resize).
    """

    def __init__(self, apps: Mapping[str, AppTrace], *, restart_resize: bool) -> None:
        self._apps = dict(apps)
        self._restart = restart_resize
        self._jobs: dict[str, _TraceJob] = {}
        self._cache: dict[tuple[object, ...], tuple[float, float]] = {}

    def add_job(self, job_id: str, application: str, rigid_batch: int = 0) -> None:
        if application not in self._apps:
            raise ConfigError(f"job {job_id}: no traces for application {application!r}")
        self._jobs[job_id] = _TraceJob(self._apps[application], rigid_batch)

    def set_progress(self, job_id: str, progress: float) -> None:
        """Where the job is (progress units): its epoch picks the gradient statistics."""
        job = self._jobs[job_id]
        job.epoch = min(int(np.searchsorted(job.app.epoch_progress, progress, side="right")),
                        len(job.app.epoch_progress) - 1)

    def set_devices(self, job_id: str, devices: Sequence[Device]) -> None:
        """The job's current devices (its resize cost is one iteration on them)."""
        self._jobs[job_id].devices = tuple(devices)

    def target_progress(self, job_id: str) -> float:
        return self._jobs[job_id].app.target_progress

    def rate_per_s(self, job_id: str, devices: Sequence[Device]) -> float:
        return self._evaluate(job_id, devices)[0]

    def iteration_s(self, job_id: str, devices: Sequence[Device]) -> float:
        return self._evaluate(job_id, devices)[1]

    def resize_cost_s(self, job_id: str) -> float:
        job = self._jobs[job_id]
        if self._restart:
            return job.app.restart_s
        if not job.devices:
            return 0.0
        return self._evaluate(job_id, job.devices)[1]

    def _evaluate(self, job_id: str, devices: Sequence[Device]) -> tuple[float, float]:
        if not devices:
            return 0.0, math.inf
        job = self._jobs[job_id]
        per_kind: dict[str, set[str]] = {}
        counts: Counter[str] = Counter()
        for device in devices:
            per_kind.setdefault(device.kind, set()).add(device.node)
            counts[device.kind] += 1
        shape = tuple(sorted((k, counts[k], len(nodes)) for k, nodes in per_kind.items()))
        key = (job.app.name, job.epoch, job.rigid_batch, shape)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = _goodput(job.app, job.epoch, job.rigid_batch, shape)
        return cached


def _interp(kind: KindTrace, nodes: int, replicas: int, local_bsz: float) -> tuple[float, float]:
    """(step seconds, sync seconds) at a local batch, from the table nearest (nodes, replicas)."""
    table = kind.tables.get((nodes, replicas))
    if table is None:
        key = min(kind.tables, key=lambda k: (abs(k[0] - nodes), abs(k[1] - replicas)))
        table = kind.tables[key]
    step = float(np.interp(local_bsz, table.local_bsz, table.step_s))
    sync = float(np.interp(local_bsz, table.local_bsz, table.sync_s))
    return step, min(sync, step)


def _compute_curve(kind: KindTrace, nodes: int, replicas: int,
                   ) -> tuple[FloatArray, FloatArray]:
    """(local batch, compute seconds) of one replica of ``kind`` placed on ``nodes`` nodes with
    ``replicas`` GPUs: measured step − sync of the nearest table, made increasing, with a point
    at batch 0 (extrapolated from the first segment) and one at the kind's largest local batch
    (extrapolated from the last), so that it can be inverted."""
    table = kind.tables.get((nodes, replicas))
    if table is None:
        key = min(kind.tables, key=lambda k: (abs(k[0] - nodes), abs(k[1] - replicas)))
        table = kind.tables[key]
    batch = table.local_bsz
    compute = np.maximum.accumulate(np.maximum(table.step_s - table.sync_s, 1e-6))
    compute = compute + 1e-9 * np.arange(len(compute))
    if len(batch) > 1:
        first = (compute[1] - compute[0]) / (batch[1] - batch[0])
        last = (compute[-1] - compute[-2]) / (batch[-1] - batch[-2])
    else:
        first = last = compute[0] / batch[0]
    zero = min(max(compute[0] - first * batch[0], 0.0), compute[0] - 1e-9)
    points_b, points_s = [0.0, *batch], [zero, *compute]
    if kind.max_local_bsz > batch[-1]:
        points_b.append(float(kind.max_local_bsz))
        points_s.append(compute[-1] + max(last, 1e-9) * (kind.max_local_bsz - batch[-1]))
    return np.array(points_b), np.array(points_s)


def mixed_compute_s(global_batch: float,
                    curves: Sequence[tuple[int, FloatArray, FloatArray]]) -> float:
    """Compute seconds T of one step of ``global_batch`` samples split over several kinds so
    that every device finishes together: Σ_k n_k·b_k(T) = B, b_k the inverse of kind k's
    increasing compute curve (``curves`` = (devices, local batches, seconds) per kind). With
    linear curves α_k + β_k·b this is T = (B + Σ n_k α_k/β_k) / Σ n_k/β_k; a kind whose curve
    starts above T gets no share. inf when B exceeds every device's largest local batch.
    Cost: O(P log P) for P measured points in all."""
    breaks = np.unique(np.concatenate([seconds for _, _, seconds in curves]))
    total = sum(n * np.interp(breaks, seconds, batch) for n, batch, seconds in curves)
    if global_batch > total[-1] * (1 + 1e-12):
        return math.inf
    index = int(np.searchsorted(total, global_batch))
    if index == 0:
        return float(breaks[0])
    low, high = total[index - 1], total[index]
    weight = (global_batch - low) / (high - low) if high > low else 1.0
    return float(breaks[index - 1] + weight * (breaks[index] - breaks[index - 1]))


def _iteration_s(app: AppTrace, batch: float,
                 shape: tuple[tuple[str, int, int], ...]) -> float:
    """Seconds per iteration of a global ``batch`` on devices of ``shape`` (inf if it cannot
    fit within the accumulation limit or a kind has no measurements). Several kinds: each
    kind's compute curve measured at its own placement (`_compute_curve`), split so that all
    finish together (`mixed_compute_s`), plus the slowest kind's sync time measured at the
    whole placement's nodes and replicas; a single kind reads its measured step directly."""
    if any(kind not in app.kinds for kind, _, _ in shape):
        return math.inf
    if len(shape) == 1:
        kind_name, replicas, nodes = shape[0]
        kind = app.kinds[kind_name]
        accumulation = max(0, math.ceil(batch / (replicas * kind.max_local_bsz)) - 1)
        if accumulation > _MAX_ACCUMULATION:
            return math.inf
        step_s, sync_s = _interp(kind, nodes, replicas, batch / replicas / (accumulation + 1))
        return step_s + (step_s - sync_s) * accumulation
    replicas = sum(n for _, n, _ in shape)
    nodes = sum(m for _, _, m in shape)
    curves = [(n, *_compute_curve(app.kinds[k], m, n)) for k, n, m in shape]
    capacity = sum(n * batch_points[-1] for n, batch_points, _ in curves)
    accumulation = max(0, math.ceil(batch / capacity) - 1)
    if accumulation > _MAX_ACCUMULATION:
        return math.inf
    micro = batch / (accumulation + 1)
    compute_s = mixed_compute_s(micro, curves)
    sync_s = max(_interp(app.kinds[k], nodes, replicas, micro / replicas)[1] for k, _, _ in shape)
    return compute_s * (accumulation + 1) + sync_s


def _goodput(app: AppTrace, epoch: int, rigid_batch: int,
             shape: tuple[tuple[str, int, int], ...]) -> tuple[float, float]:
    """(progress units per second, seconds per iteration) at the best (or the given) batch."""
    replicas = sum(n for _, n, _ in shape)
    if rigid_batch:
        candidates = [float(rigid_batch)]
    else:
        candidates = []
        batch = float(app.init_batch)
        while batch <= app.max_batch:
            candidates.append(batch)
            batch *= 2
        capacities = [replicas * app.kinds[k].max_local_bsz for k, _, _ in shape
                      if k in app.kinds]
        if len(shape) > 1 and len(capacities) == len(shape):
            capacities.append(sum(n * app.kinds[k].max_local_bsz for k, n, _ in shape))
        candidates += [float(min(app.max_batch, c)) for c in capacities]
    best = (0.0, math.inf)
    for batch in candidates:
        iteration_s = _iteration_s(app, batch, shape)
        if not math.isfinite(iteration_s) or iteration_s <= 0:
            continue
        scale = batch / app.init_batch
        sqr, var = app.grad_stats(batch, epoch)
        gain = (var + sqr) / (var / scale + sqr) if var + sqr > 0 else 1.0
        goodput = gain / iteration_s / app.calibration
        if goodput > best[0]:
            best = (goodput, iteration_s)
    return best
