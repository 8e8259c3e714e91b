"""The simulator and its baselines on hand-made workloads whose schedules are computed by hand.

Toy application: one iteration takes 1 s on kind "g" (0.25 s on "fast" for "skewed"), at any
batch; no gradient noise (gain 1), no calibration slowdown and no restart time, so a job runs at
exactly 1 progress unit per second of GPU kind "g" and its JCT is its target plus its wait.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from idla.cli.pool_sim import add_simulate
from idla.errors import ConfigError
from idla.pool.model import Device
from idla.pool.perf import TraceModels
from idla.pool.policy import PolicyConfig
from idla.pool.sim.baselines import Fifo, GavelMaxMin, Idla, PolluxLike, Tiresias
from idla.pool.sim.gavel import max_min_allocation
from idla.pool.sim.simulator import SimConfig, alone_jct_s, assign_priorities, simulate
from idla.pool.sim.traces import AppTrace, KindTrace, StepTable, TraceJob

_TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"


def _kind(step_s: float) -> KindTrace:
    table = StepTable(np.array([1.0, 1e6]), np.array([step_s, step_s]), np.zeros(2))
    return KindTrace({(1, n): table for n in (1, 2, 3, 4)}, 10**6)


def _app(name: str, target: float, kinds: dict[str, float]) -> AppTrace:
    return AppTrace(name=name, kinds={k: _kind(s) for k, s in kinds.items()}, init_batch=1,
                    max_batch=1, epoch_progress=np.array([target]), grad_batch=np.ones(1),
                    grad_sqr=np.ones((1, 1)), grad_var=np.zeros((1, 1)), target_progress=target,
                    restart_s=0.0, calibration=1.0)


def _gpus(kind: str, count: int) -> list[Device]:
    return [Device(f"{kind}{i}", kind, "node", 2**30) for i in range(count)]


def test_fifo_runs_in_arrival_order_without_backfill() -> None:
    apps = {"long": _app("long", 120, {"g": 1.0}), "short": _app("short", 60, {"g": 1.0})}
    workload = [TraceJob("a", 0, "long", 2, 1), TraceJob("b", 0, "short", 1, 1),
                TraceJob("c", 0, "short", 1, 1)]
    result = simulate(workload, apps, _gpus("g", 2), Fifo(), {})
    assert result.jct_s == {"a": 120.0, "b": 180.0, "c": 180.0}
    assert result.makespan_s == 180.0


def test_tiresias_preempts_a_job_past_its_service_threshold() -> None:
    apps = {"long": _app("long", 240, {"g": 1.0}), "short": _app("short", 60, {"g": 1.0})}
    workload = [TraceJob("a", 0, "long", 2, 1), TraceJob("b", 60, "short", 1, 1)]
    las = simulate(workload, apps, _gpus("g", 2), Tiresias(threshold_gpu_s=60.0), {})
    # a runs one round (120 GPU-s, queue 2), b (queue 1) takes a GPU for a round, a resumes.
    assert las.jct_s == {"a": 300.0, "b": 60.0}
    assert las.resizes["a"] == 1  # one change of a running job: its preemption
    fifo = simulate(workload, apps, _gpus("g", 2), Fifo(), {})
    assert fifo.jct_s == {"a": 240.0, "b": 240.0}


def test_gavel_puts_the_job_that_gains_most_on_the_fast_kind() -> None:
    apps = {"even": _app("even", 120, {"g": 1.0, "fast": 1.0}),
            "skewed": _app("skewed", 120, {"g": 1.0, "fast": 0.25})}
    workload = [TraceJob("e", 0, "even", 1, 1), TraceJob("s", 0, "skewed", 1, 1)]
    devices = _gpus("g", 1) + _gpus("fast", 1)
    result = simulate(workload, apps, devices, GavelMaxMin(), {})
    assert result.jct_s == {"e": 120.0, "s": 30.0}


def test_pollux_keeps_one_kind_per_job_and_idla_mixes() -> None:
    apps = {"mix": _app("mix", 600, {"g": 1.0, "fast": 1.0})}
    devices = _gpus("g", 2) + _gpus("fast", 2)
    workload = [TraceJob("m", 0, "mix", 1, 1)]
    pollux, idla = PolluxLike(), Idla()
    seen: dict[str, set[str]] = {"pollux": set(), "idla": set()}
    for name, policy in (("pollux", pollux), ("idla", idla)):
        plan = policy.plan
        def spy(*args: object, _plan=plan, _name=name) -> dict[str, tuple[str, ...]]:
            allocation = _plan(*args)  # type: ignore[arg-type]
            seen[_name] |= {d.rstrip("0123456789") for d in allocation.get("m", ())}
            return allocation
        policy.plan = spy  # type: ignore[method-assign]
        simulate(workload, apps, devices, policy, {})
    assert len(seen["pollux"]) == 1
    assert seen["idla"] == {"g", "fast"}


def test_idla_serves_the_high_priority_job_first() -> None:
    apps = {"long": _app("long", 600, {"g": 1.0})}
    workload = [TraceJob("low", 0, "long", 1, 1), TraceJob("high", 60, "long", 1, 1)]
    result = simulate(workload, apps, _gpus("g", 1), Idla(), {"low": 1.0, "high": 4.0})
    assert result.jct_s["high"] == pytest.approx(600.0, abs=1.0)
    assert result.jct_s["low"] > 1100.0


def test_urgent_long_job_is_guaranteed_over_a_short_one() -> None:
    # Smith's rule alone would run the short p=1 job first (1/300 > 4/3000 per second).
    apps = {"short": _app("short", 300, {"g": 1.0}), "long": _app("long", 3000, {"g": 1.0})}
    workload = [TraceJob("low", 0, "short", 1, 1), TraceJob("high", 60, "long", 1, 1)]
    priorities = {"low": 1.0, "high": 4.0}
    result = simulate(workload, apps, _gpus("g", 1), Idla(), priorities)
    alone = alone_jct_s(workload[1], apps, _gpus("g", 1), Idla())
    assert alone == pytest.approx(3000.0, abs=1.0)
    assert result.jct_s["high"] <= 1.01 * alone
    plain = Idla(config=PolicyConfig(guarantee_priority=math.inf, work_exponent=1.0))
    smith = simulate(workload, apps, _gpus("g", 1), plain, priorities)
    assert smith.jct_s["high"] > 1.05 * alone


def test_alone_keeps_the_arrival_phase_within_a_round() -> None:
    apps = {"job": _app("job", 120, {"g": 1.0})}
    row = TraceJob("j", 90, "job", 1, 1)
    # Arriving 30 s into a round, it waits 30 s for the boundary alone too.
    assert alone_jct_s(row, apps, _gpus("g", 1), Fifo()) == pytest.approx(150.0)
    assert simulate([row], apps, _gpus("g", 1), Fifo(), {}).jct_s["j"] == pytest.approx(150.0)


def test_priorities_follow_the_mix_and_the_seed() -> None:
    names = [f"j{i}" for i in range(100)]
    first = assign_priorities(names, SimConfig(seed=3))
    assert sorted(first.values()).count(4.0) == 20
    assert sorted(first.values()).count(2.0) == 30
    assert first == assign_priorities(names, SimConfig(seed=3))
    assert first != assign_priorities(names, SimConfig(seed=4))


def test_pool_simulate_command_on_a_real_workload(capsys: pytest.CaptureFixture[str]) -> None:
    if not (_TRACES / "workloads").is_dir():
        pytest.skip(f"no traces at {_TRACES}")
    parser = argparse.ArgumentParser()
    add_simulate(parser.add_subparsers(dest="pool"))
    args = parser.parse_args(["simulate", "--workload", "philly/workload-1", "--jobs-limit",
                              "8", "--policy", "fifo,idla", "--traces", str(_TRACES), "--json"])
    assert args.handler(args) == 0
    result = json.loads(capsys.readouterr().out)
    figures = result["simulate"]["philly/workload-1"]
    assert set(figures) == {"fifo", "idla"}
    assert figures["idla"]["avg_jct_s"] > 0
    assert "p4_alone_ratio_max" in figures["idla"]
    with pytest.raises(ConfigError, match="unknown policy"):
        parser.parse_args(["simulate", "--policy", "lottery", "--traces", str(_TRACES)]).handler(
            parser.parse_args(["simulate", "--policy", "lottery", "--traces", str(_TRACES)]))


def test_bench_pool_bad_workload_is_one_line_error() -> None:
    run = subprocess.run([sys.executable, "-m", "idla.cli", "bench", "pool", "--simulate-only",
                          "--workloads", "nope/workload-9", "--traces", str(_TRACES)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "idla: error:" in run.stderr


def test_gavel_max_min_allocation_equalises_normalised_throughput() -> None:
    # Job 0 runs equally fast on both kinds; job 1 is 4x faster on kind 1. One GPU of each.
    tput = np.array([[1.0, 1.0], [1.0, 4.0]])
    x = max_min_allocation(tput, np.ones(2), np.array([1.0, 1.0]))
    assert x.sum(axis=1).max() <= 1 + 1e-6
    assert x.sum(axis=0).max() <= 1 + 1e-6
    # Max-min: job 0 can reach at most 1 (its rate / its equal-share rate), so both reach it;
    # the spare capacity of kind 1 goes to job 1, where it gains most.
    equal = (tput * 0.5).sum(axis=1)
    normalised = (x * tput).sum(axis=1) / equal
    assert normalised.min() == pytest.approx(1.0, abs=1e-4)
    assert x[1, 1] == pytest.approx(1.0, abs=1e-4)
    # A job that fits nowhere (zero throughput everywhere) gets nothing; the other still runs.
    x = max_min_allocation(np.array([[0.0, 0.0], [1.0, 4.0]]), np.ones(2), np.ones(2))
    assert x[0].sum() == pytest.approx(0.0, abs=1e-6)
    assert x[1].sum() == pytest.approx(1.0, abs=1e-4)


def _linear_kind(alpha_s: float, beta_s: float, sync_s: float, max_local: int) -> KindTrace:
    local = np.array([1.0, 8.0, 16.0, 32.0, float(max_local)])
    table = StepTable(local, alpha_s + beta_s * local + sync_s, np.full(5, sync_s))
    return KindTrace({(m, n): table for m in (1, 2) for n in range(1, 9)}, max_local)


def _two_kind_models(fast: KindTrace, slow: KindTrace, batch: int) -> TraceModels:
    app = AppTrace(name="lin", kinds={"fast": fast, "slow": slow}, init_batch=batch,
                   max_batch=batch, epoch_progress=np.array([1e6]), grad_batch=np.ones(1),
                   grad_sqr=np.ones((1, 1)), grad_var=np.zeros((1, 1)), target_progress=1e6,
                   restart_s=0.0, calibration=1.0)
    models = TraceModels({"lin": app}, restart_resize=False)
    models.add_job("j", "lin", rigid_batch=batch)
    return models


def _on(count: int, kind: str, node: str) -> list[Device]:
    return [Device(f"{node}/{kind}{i}", kind, node, 2**30) for i in range(count)]


def test_mixed_kinds_split_so_every_device_finishes_together() -> None:
    # compute α + β·b: fast 0.1 + 0.01·b, slow 0.2 + 0.04·b; 0.05 s sync; 64 samples fit.
    fast, slow = _linear_kind(0.1, 0.01, 0.05, 64), _linear_kind(0.2, 0.04, 0.05, 64)
    devices = _on(2, "fast", "n0") + _on(2, "slow", "n1")
    # T = (B + Σ n·α/β) / Σ n/β = (120 + 20 + 10) / (200 + 50) = 0.6 s: 50 and 10 per device.
    assert _two_kind_models(fast, slow, 120).iteration_s("j", devices) == pytest.approx(0.65)
    # At B = 10 the slow kind would finish after the fast one alone: it idles, T = 30 / 200.
    assert _two_kind_models(fast, slow, 10).iteration_s("j", devices) == pytest.approx(0.2)
    # B = 384 > 256 that fit: two micro-steps of 192; fast devices are full at 64, the slow
    # ones carry 32 each, T = 0.2 + 0.04 * 32 = 1.48 s per micro-step.
    assert _two_kind_models(fast, slow, 384).iteration_s("j", devices) == pytest.approx(
        2 * 1.48 + 0.05)


def test_mixed_kinds_of_equal_speed_match_one_kind() -> None:
    same = _linear_kind(0.1, 0.01, 0.05, 64)
    models = _two_kind_models(same, same, 200)
    one_kind = _on(2, "fast", "n0") + _on(2, "fast", "n1")
    two_kinds = _on(2, "fast", "n0") + _on(2, "slow", "n1")
    assert models.iteration_s("j", two_kinds) == pytest.approx(models.iteration_s("j", one_kind))
