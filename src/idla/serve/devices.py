"""Which device each serving or inference worker runs on, and how a worker runs a batch there.

Terms: a *device* is ``"cpu"`` or ``"cuda:N"`` (canonical form; ``cuda`` means ``cuda:0``). A
``--device`` value is one device for every worker, a comma-separated list with one device per
worker (``cuda:0,cpu,cpu``), or ``auto``: ``cuda:i`` for worker i while GPUs last, then ``cpu``.

Parsing (`parse_devices`) is a pure function of the text, the worker count and the number of
CUDA devices, so it is tested without a GPU; `resolve_devices` asks torch for that number only
when a value names CUDA or ``auto``. A batch (`run_on`) goes in from the CPU and comes back on
the CPU after the device has finished it, so the clock read after it times real completion.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idla.errors import ConfigError, IdlaError

CPU = "cpu"
AUTO = "auto"
DEVICE_HELP = ("where each worker runs: cpu, cuda, cuda:N, one per worker separated by commas "
               "(e.g. cuda:0,cpu,cpu), or auto (GPU i for worker i while GPUs last, then CPU); "
               "default: cpu")
_CUDA = re.compile(r"cuda(?::([0-9]+))?")
_FORMS = "cpu, cuda, cuda:N, auto, or one device per worker separated by commas"


def _gpus(count: int) -> str:
    if count == 1:
        return "1 CUDA device (cuda:0)"
    return f"{count} CUDA devices (cuda:0 to cuda:{count - 1})"


def parse_device(text: str, cuda_devices: int) -> str:
    """The canonical device ``text`` names (case and spaces ignored) on a machine with
    ``cuda_devices`` CUDA devices; a ConfigError names the value and what is wrong."""
    name = text.strip().lower()
    if name == CPU:
        return CPU
    match = _CUDA.fullmatch(name)
    if match is None:
        raise ConfigError(f"--device {text.strip()!r} is not a device: use {_FORMS}")
    index = int(match.group(1) or 0)
    if cuda_devices < 1:
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if index >= cuda_devices:
        raise ConfigError(f"--device {name}: this machine has {_gpus(cuda_devices)}")
    return f"cuda:{index}"


def parse_devices(spec: str | Sequence[str], workers: int, cuda_devices: int) -> list[str]:
    """One canonical device per worker from a ``--device`` value (or a list of devices).

    A single device applies to every worker; a list must have one device per worker; ``auto``
    gives ``cuda:i`` to worker i for i < ``cuda_devices`` and ``cpu`` to the rest. O(workers).
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    entries = spec.split(",") if isinstance(spec, str) else [str(entry) for entry in spec]
    automatic = [entry.strip().lower() == AUTO for entry in entries]
    if automatic == [True]:
        return [f"cuda:{i}" if i < cuda_devices else CPU for i in range(workers)]
    if any(automatic):
        raise ConfigError(f"--device {','.join(entries)!r}: auto stands alone, not in a list")
    devices = [parse_device(entry, cuda_devices) for entry in entries]
    if len(devices) == 1:
        return devices * workers
    if len(devices) != workers:
        raise ConfigError(f"--device lists {len(devices)} devices for {workers} workers")
    return devices


def cuda_device_count() -> int:
    """CUDA devices this process can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(spec: str | Sequence[str], workers: int) -> list[str]:
    """`parse_devices` on this machine; torch is imported only when ``spec`` is not all CPU."""
    entries = spec.split(",") if isinstance(spec, str) else [str(entry) for entry in spec]
    only_cpu = all(entry.strip().lower() == CPU for entry in entries)
    return parse_devices(spec, workers, 0 if only_cpu else cuda_device_count())


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device``: a CUDA call returns before its kernels finish."""
    if device != CPU:
        import torch

        torch.cuda.synchronize(device)


def run_on(model: Any, inputs: Any, device: str) -> Any:
    """``model(inputs)`` on ``device``, returned on the CPU once ``device`` has finished.

    ``inputs``: (rows, *input_shape) CPU tensor; returns (rows, outputs) CPU tensor. On the CPU
    both moves are no-ops, so the result is the plain ``model(inputs)``.
    """
    outputs = model(inputs.to(device)).to(CPU)
    synchronize(device)
    return outputs


def load_on(directory: str | Path, device: str) -> tuple[Any, Any]:
    """`idla.serve.model_io.load_model` onto ``device`` (safetensors, never unpickled); a device
    that cannot take the model (out of memory, gone) is an IdlaError that names it."""
    from idla.serve.model_io import load_model

    try:
        return load_model(directory, device)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise IdlaError(f"device {device}: cannot load the model ({first})") from None
