"""`idla infer` (offline batch inference of a .npy file) and `idla bench infer`."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from idla.cli.args import optional_speeds
from idla.errors import ConfigError
from idla.serve.devices import DEVICE_HELP, resolve_devices

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
    infer.add_argument("--device", default="cpu", metavar="DEVICES", help=DEVICE_HELP)
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
    devices = resolve_devices(args.device, args.workers)
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
                               batch_size=args.batch_size, on_progress=on_progress,
                               devices=devices)
        with tmp.open("wb") as handle:
            np.save(handle, result.outputs)
    shares = ", ".join(f"{s:,}" for s in result.samples_per_worker)
    print(f"scored {len(inputs):,} samples with {args.workers} worker(s) "
          f"({', '.join(devices)}) in {result.wall_s:.2f} s "
          f"({result.samples_per_s:,.0f} samples/s; {result.startup_s:.1f} s start-up); "
          f"per worker: {shares}; model {info.architecture} version {result.version}")
    print(f"wrote {args.output} ({result.outputs.shape[0]} × {result.outputs.shape[1]} float32)")
    if args.json:
        from idla.report import write_json_atomic

        write_json_atomic(args.json, {**result.summary(), "model": args.model,
                                      "input": args.input, "output": args.output,
                                      "workers": args.workers, "devices": devices,
                                      "speeds": speeds,
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
    from idla.bench.infer import print_infer_bench, run_infer_bench

    result = run_infer_bench(speeds, args.base_cores, args.seconds, args.samples,
                             args.batch_size, args.repeats)
    print_infer_bench(result)
    return result
