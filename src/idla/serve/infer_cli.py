"""`idla infer` (offline batch inference of a .npy file) and `idla bench infer`."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from idla.cli_args import optional_speeds
from idla.errors import ConfigError

_SPEEDS_HELP = "relative CPU speed per worker, e.g. 1,0.5,0.25 (cgroup quota base-cores × speed)"


def add_commands(commands: Any, benches: Any) -> None:
    """Add `idla infer` to `commands` and `idla bench infer` to `benches`."""
    infer = commands.add_parser(
        "infer", help="score a .npy data set with a saved model on N local workers",
        description="Offline batch inference: workers take ranges of the inputs sized to their "
        "measured speed (dynamic chunking), outputs keep the input order, and the output file "
        "is written atomically.",
    )
    infer.add_argument("--model", required=True, metavar="DIR",
                       help="model directory (model.safetensors + model.json, from idla train)")
    infer.add_argument("--input", required=True, metavar="FILE",
                       help=".npy array of shape (N, *input_shape), numeric (never pickle)")
    infer.add_argument("--output", required=True, metavar="FILE",
                       help="where to write the (N, classes) float32 outputs as .npy")
    infer.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    infer.add_argument("--emulate-speeds", default="none", metavar="LIST",
                       help=f"{_SPEEDS_HELP}; default: none (no throttling)")
    infer.add_argument("--base-cores", type=float, default=0.5, metavar="CORES",
                       help="CPU cores of a speed-1 worker when emulating (default: 0.5)")
    infer.add_argument("--chunking", default="dynamic", choices=("dynamic", "equal"),
                       help="dynamic: ranges sized to each worker's rate (default); "
                       "equal: N/workers each")
    infer.add_argument("--batch-size", type=int, default=256, help="samples per forward pass")
    infer.add_argument("--json", metavar="PATH", help="write a JSON summary of the run here")
    infer.set_defaults(handler=_infer)

    bench = benches.add_parser(
        "infer", help="offline inference: idla's dynamic chunking vs an equal split",
        description="Measure each worker alone (ideal = sum of standalone throughputs), then "
        "score the same inputs with an equal split and with idla's dynamic chunking.",
    )
    bench.add_argument("--speeds", default="1,0.5,0.25", metavar="LIST", help=_SPEEDS_HELP)
    bench.add_argument("--base-cores", type=float, default=0.5, metavar="CORES",
                       help="CPU cores of a speed-1 worker (default: 0.5)")
    bench.add_argument("--seconds", type=float, default=3.0,
                       help="how long the ideal run should take; sets the data size (default: 3)")
    bench.add_argument("--samples", type=int, default=None,
                       help="number of inputs (default: from --seconds and a calibration)")
    bench.add_argument("--batch-size", type=int, default=256, help="samples per forward pass")
    bench.add_argument("--repeats", type=int, default=2,
                       help="runs of each kind, interleaved; medians are kept (default: 2)")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    bench.set_defaults(bench_handler=_bench_infer)


def _speeds(text: str, workers: int | None = None) -> list[float] | None:
    speeds = optional_speeds(text, "--emulate-speeds" if workers is not None else "--speeds")
    if speeds is not None and workers is not None and len(speeds) != workers:
        raise ConfigError(f"--emulate-speeds lists {len(speeds)} speeds for {workers} workers")
    return speeds


def load_inputs(path: str) -> Any:
    """A numeric array from a .npy file, read without pickle; anything else is a ConfigError."""
    import numpy as np

    if not Path(path).is_file():
        raise ConfigError(f"--input {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise ConfigError(f"--input {path} holds pickled Python objects; idla reads only "
                              "numeric .npy arrays and never unpickles") from None
        raise ConfigError(f"--input {path} is not a .npy array ({error})") from None
    except OSError as error:
        raise ConfigError(f"--input {path} cannot be read ({error})") from None
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise ConfigError(f"--input {path} is a .npz archive; save one array with numpy.save")
    if loaded.dtype.kind not in "fiub":
        raise ConfigError(f"--input {path} has dtype {loaded.dtype}; it must be numeric")
    return loaded


@contextlib.contextmanager
def _atomic_npy(path: str) -> Iterator[Path]:
    """Reserve a temporary file beside ``path`` now (so a bad path fails before the work);
    on success fsync it and rename it over ``path``; on failure remove it."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--output {path} is a directory")
    if not target.parent.is_dir():
        raise ConfigError(f"--output: directory {target.parent} does not exist")
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as error:
        raise ConfigError(f"--output {path} cannot be written ({error.strerror})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _infer(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    speeds = _speeds(args.emulate_speeds, args.workers)
    import numpy as np
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from idla.serve.model_io import read_info
    from idla.serve.offline import infer_offline

    info = read_info(args.model)  # a missing or pickle model fails before the data is read
    inputs = load_inputs(args.input)
    if tuple(inputs.shape[1:]) != info.input_shape or inputs.ndim < 2 or len(inputs) < 1:
        raise ConfigError(f"--input {args.input} has shape {list(inputs.shape)}; the model wants "
                          f"(N, {', '.join(map(str, info.input_shape))}) with N >= 1")
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with _atomic_npy(args.output) as tmp, Progress(*columns, transient=True) as progress:
        task = progress.add_task("scoring", total=len(inputs), rate="")
        began = time.perf_counter()

        def on_progress(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - began, 1e-9)
            progress.update(task, completed=done, rate=f"{rate:,.0f} samples/s")

        result = infer_offline(args.model, inputs, workers=args.workers, speeds=speeds,
                               base_cores=args.base_cores, chunking=args.chunking,
                               batch_size=args.batch_size, on_progress=on_progress)
        with tmp.open("wb") as handle:
            np.save(handle, result.outputs)
    shares = ", ".join(f"{s:,}" for s in result.samples_per_worker)
    print(f"scored {len(inputs):,} samples with {args.workers} worker(s) in {result.wall_s:.2f} s "
          f"({result.samples_per_s:,.0f} samples/s; {result.startup_s:.1f} s start-up); "
          f"per worker: {shares}; model {info.architecture} version {result.version}")
    print(f"wrote {args.output} ({result.outputs.shape[0]} × {result.outputs.shape[1]} float32)")
    if args.json:
        from idla.report import write_json_atomic

        write_json_atomic(args.json, {**result.summary(), "model": args.model,
                                      "input": args.input, "output": args.output,
                                      "workers": args.workers, "speeds": speeds,
                                      "base_cores": args.base_cores})
    return 0


def _bench_infer(args: argparse.Namespace) -> dict[str, Any]:
    if args.repeats < 1 or args.batch_size < 1 or args.seconds <= 0:
        raise ConfigError("--repeats and --batch-size must be at least 1, --seconds positive")
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    speeds = _speeds(args.speeds)
    if speeds is None:
        raise ConfigError("--speeds: idla bench infer needs emulated speeds, e.g. 1,0.5,0.25")
    result = run_infer_bench(speeds, args.base_cores, args.seconds, args.samples,
                             args.batch_size, args.repeats)
    print_infer_bench(result)
    return result


def _bench_data(samples: int) -> Any:
    """``samples`` digit images (scikit-learn's 1,797, tiled), float32 (samples, 1, 8, 8)."""
    import numpy as np
    from sklearn.datasets import load_digits

    images = (load_digits().data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return np.resize(images, (samples, 1, 8, 8))


def _one_core_rate_per_s(model: Any, data: Any, batch_size: int, budget_s: float = 0.5) -> float:
    """Samples/s of ``model`` on one unthrottled thread of this process (the calibration)."""
    import torch

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
    import numpy as np
    import torch

    from idla.bench.machine import machine_info
    from idla.emulate.cgroup import CpuThrottle
    from idla.runtime.demo import DigitsCNN
    from idla.serve.model_io import save_model
    from idla.serve.offline import infer_offline

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
