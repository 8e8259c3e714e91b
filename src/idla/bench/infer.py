"""`idla bench infer`: offline inference with dynamic chunking against an equal split and the
ideal (each throttled worker's standalone rate, summed)."""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch

from idla.bench.machine import machine_info
from idla.demo import DigitsCNN
from idla.emulate.cgroup import CpuThrottle
from idla.serve.model_io import save_model
from idla.serve.offline import infer_offline


def _bench_data(samples: int) -> Any:
    """``samples`` digit images (scikit-learn's 1,797, tiled), float32 (samples, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    images = (load_digits().data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return np.resize(images, (samples, 1, 8, 8))


def _one_core_rate_per_s(model: Any, data: Any, batch_size: int, budget_s: float = 0.5) -> float:
    """Samples/s of ``model`` on one unthrottled thread of this process (the calibration)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            batch = torch.tensor(data[:batch_size])
            model(batch)
            done, began = 0, time.perf_counter()
            while time.perf_counter() - began < budget_s:
                model(batch)
                done += len(batch)
            return done / (time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)


def run_infer_bench(
    speeds: list[float], base_cores: float, seconds: float, samples: int | None,
    batch_size: int, repeats: int,
) -> dict[str, Any]:
    """Ideal (sum of each worker's standalone samples/s) vs an equal split vs idla's dynamic
    chunking, on the same inputs, workers throttled to ``base_cores × speed`` CPUs each.
    Repeats are interleaved (standalone, equal, idla, standalone, ...) and medians reported;
    per-run rows are kept under ``policies.<name>.runs``."""
    CpuThrottle(speeds, base_cores)  # validates the quotas before any work
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    one_core_per_s = _one_core_rate_per_s(model, _bench_data(batch_size), batch_size)
    expected_per_s = one_core_per_s * base_cores * sum(speeds)
    n = samples or max(batch_size * len(speeds), round(seconds * expected_per_s))
    data = _bench_data(n)
    runs: dict[str, list[dict[str, Any]]] = {"equal": [], "idla": []}
    standalone: list[list[float]] = [[] for _ in speeds]
    identical = True
    with tempfile.TemporaryDirectory(prefix="idla-bench-infer-") as tmp:
        info = save_model(tmp, model, "digits_cnn", {}, (1, 8, 8))
        for _ in range(repeats):
            for index, speed in enumerate(speeds):
                part = max(batch_size, round(n * speed / sum(speeds)))
                alone = infer_offline(tmp, data[:part], workers=1, speeds=[speed],
                                      base_cores=base_cores, batch_size=batch_size)
                standalone[index].append(alone.samples_per_s)
            outputs = []
            for name, chunking in (("equal", "equal"), ("idla", "dynamic")):
                result = infer_offline(tmp, data, workers=len(speeds), speeds=speeds,
                                       base_cores=base_cores, chunking=chunking,
                                       batch_size=batch_size)
                runs[name].append(result.summary())
                outputs.append(result.outputs)
            identical = identical and bool(np.array_equal(outputs[0], outputs[1]))
    standalone_per_s = [statistics.median(values) for values in standalone]
    ideal_per_s = sum(standalone_per_s)
    policies: dict[str, Any] = {}
    for name, rows in runs.items():
        middle = sorted(rows, key=lambda row: row["samples_per_s"])[(len(rows) - 1) // 2]
        rate_per_s = statistics.median(row["samples_per_s"] for row in rows)
        policies[name] = {
            "samples_per_s": rate_per_s, "efficiency": rate_per_s / ideal_per_s,
            "wall_s": statistics.median(row["wall_s"] for row in rows),
            "utilization": statistics.median(row["utilization"] for row in rows),
            "finish_s_per_worker": middle["finish_s_per_worker"],
            "samples_per_worker": middle["samples_per_worker"], "runs": rows,
        }
    return {
        "settings": {"speeds": speeds, "base_cores": base_cores, "samples": n,
                     "batch_size": batch_size, "repeats": repeats, "seconds_target": seconds,
                     "model": f"digits_cnn (random init, seed 0), version {info.version}",
                     "data": f"scikit-learn digits (1,797 images) tiled to {n:,}"},
        "machine": machine_info(),
        "one_core_samples_per_s": one_core_per_s,
        "standalone_samples_per_s": standalone_per_s,
        "ideal_samples_per_s": ideal_per_s,
        "policies": policies,
        "idla_vs_equal": policies["idla"]["samples_per_s"] / policies["equal"]["samples_per_s"],
        "outputs_identical": identical,
        "target_efficiency": 0.9,
        "target_met": policies["idla"]["efficiency"] >= 0.9,
    }


def print_infer_bench(result: dict[str, Any]) -> None:
    settings, machine = result["settings"], result["machine"]
    speeds = settings["speeds"]
    print(f"idla bench infer: {len(speeds)} workers at speeds {', '.join(f'{s:g}' for s in speeds)}"
          f" × {settings['base_cores']:g} cores (cgroup quotas), batch {settings['batch_size']}")
    print(f"model: {settings['model']}; data: {settings['data']}")
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, torch {machine['torch']}")
    print(f"{'worker':<8}{'speed':>7}{'standalone samples/s':>24}")
    for index, (speed, rate) in enumerate(
            zip(speeds, result["standalone_samples_per_s"], strict=True)):
        print(f"{index:<8}{speed:>7g}{rate:>24,.0f}")
    print(f"{'ideal (sum)':<15}{result['ideal_samples_per_s']:>24,.0f}")
    print(f"{'policy':<8}{'samples/s':>12}{'wall s':>9}{'efficiency':>12}{'busy':>7}"
          "  worker done at (s)")
    for name, row in result["policies"].items():
        finish = ", ".join(f"{t:.2f}" for t in row["finish_s_per_worker"])
        print(f"{name:<8}{row['samples_per_s']:>12,.0f}{row['wall_s']:>9.2f}"
              f"{100 * row['efficiency']:>11.1f}%{100 * row['utilization']:>6.0f}%  {finish}")
    verdict = "met" if result["target_met"] else "NOT met"
    print(f"idla / equal: {result['idla_vs_equal']:.2f}×; target idla ≥ 90% of ideal: {verdict}; "
          f"outputs identical: {result['outputs_identical']}")
    print("efficiency = samples/s ÷ ideal (sum of standalone samples/s); busy = Σ worker compute "
          "time ÷ (workers × wall), insensitive to other load on the machine")
