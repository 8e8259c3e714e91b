"""Checkpoints a run resumes from exactly: tensors in safetensors, everything else in JSON.

One checkpoint is a directory ``<directory>/step-<step>/`` holding ``model.safetensors``,
``optimizer.safetensors`` (every tensor of the optimizer's state), ``rng.safetensors``,
``extra.safetensors`` (e.g. compression residuals), ``state.json`` (counters, shares, the
optimizer's non-tensor parts, Python and NumPy RNG states, the caller's extra state) and
``manifest.json`` (every file's size and sha256). ``<directory>/latest`` names the step
directory saved last (a re-save of a step gets a fresh name: `idla.runtime.checkpoint_dirs`).
Nothing is ever unpickled: a checkpoint from an untrusted source can at worst be refused,
never run code.

A save is atomic: the files are built in a temporary directory next to the target, renamed to
an unused name, and `latest` is swapped to it before anything superseded is removed, so a crash
at any point leaves `latest` naming a complete checkpoint. A load checks every file against the
manifest before parsing any of them, then every field of ``state.json``, and reports damage or
a crafted value as one `ConfigError` line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from idla.errors import ConfigError
from idla.runtime.checkpoint_dirs import (
    fsync_path,
    latest_name,
    point_latest,
    resolve,
    tidy,
    unused_step_dir,
)

FORMAT = "idla-checkpoint/1"
MANIFEST = "manifest.json"
_TENSOR_FILES = ("model", "optimizer", "rng", "extra")
_REQUIRED = (*(f"{name}.safetensors" for name in _TENSOR_FILES), "state.json")
# JSON cannot tell a tuple from a list or an int key from a str one, and holds no tensors:
# such values travel as one-key objects tagged with these names.
_TENSOR, _TUPLE, _INT_KEYS = "__idla_tensor__", "__idla_tuple__", "__idla_int_keys__"
_TAGS = (_TENSOR, _TUPLE, _INT_KEYS)


@dataclass(kw_only=True, slots=True)
class Checkpoint:
    """Everything `load_checkpoint` read, on the CPU."""

    path: Path
    """The step directory it came from."""
    model_state: dict[str, Tensor]
    """For ``model.load_state_dict``."""
    optimizer_state: dict[str, Any]
    """For ``optimizer.load_state_dict``: int keys under "state", tuples and tensors in place."""
    step: int
    """Optimizer steps taken when it was saved."""
    epoch: int
    """The epoch training continues in."""
    batch_in_epoch: int
    """The global batch of `epoch` training continues at (0: the epoch's start)."""
    shares: list[int]
    """Local batch per rank when it was saved."""
    rng: dict[str, Any]
    """The saving process's RNG states: "torch" (uint8 tensor), "cuda" (list of tensors),
    "python" (as ``random.getstate()``), "numpy" (list, or None)."""
    extra_tensors: dict[str, Tensor]
    extra_state: dict[str, Any]


def _cpu_copy(tensor: Tensor) -> Tensor:
    """A contiguous CPU copy that shares memory with nothing (safetensors refuses shared
    storage, and a copy cannot change under a running step)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """`value` as JSON; its tensors go to `tensors` under their dotted path."""

    def child(key: object) -> str:
        return f"{path}.{key}" if path else str(key)

    if isinstance(value, Tensor):
        tensors[path] = _cpu_copy(value)
        return {_TENSOR: path}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, child(i), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, child(i), tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            if len(value) == 1 and next(iter(value)) in _TAGS:
                raise ConfigError(f"cannot store {path or 'the root'}: its key is reserved")
            return {k: _encode(v, child(k), tensors) for k, v in value.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {_INT_KEYS: {str(k): _encode(v, child(k), tensors) for k, v in value.items()}}
        raise ConfigError(f"cannot store {path or 'the root'}: keys must all be str or all int")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(f"cannot store {path or 'the root'} ({type(value).__name__}) in a checkpoint")


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == _TENSOR:
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if tag == _INT_KEYS:
            return {int(k): _decode(v, tensors) for k, v in inner.items()}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _rng_states() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, JSON) for this process's torch, CUDA, Python and NumPy generators."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    numpy_state: list[Any] | None = None
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        numpy_state = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, {"python": _encode(random.getstate(), "", {}), "numpy": numpy_state}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    fsync_path(path)


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    shares: list[int],
    extra_tensors: Mapping[str, Tensor] | None = None,
    extra_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``directory/step-<step>/`` atomically, point ``directory/latest`` at it, return it.

    Call it on rank 0 only (replicas are identical; state that differs per rank, such as
    error-feedback residuals, must be gathered into `extra_tensors` first, as `save_agent`
    does). (`epoch`, `batch_in_epoch`) is where training continues. A re-save of a step goes
    to ``step-<step>.<8 hex>/`` and `latest` moves to it before the old one is removed; the
    save also removes what crashed saves left (``.tmp-*``). Cost: one CPU copy of the model
    and optimizer state in memory, writing it once, and reading it back once to hash it;
    files are fsynced.

    Raises:
        ConfigError: A counter is negative, a share is not a non-negative integer, or a value
            cannot be stored without pickling.
    """
    for name, value in (("step", step), ("epoch", epoch), ("batch_in_epoch", batch_in_epoch)):
        if not _is_count(value):
            raise ConfigError(f"{name} {value!r} must be an integer, 0 or more")
    if not shares or not all(_is_count(s) for s in shares):
        raise ConfigError(f"shares {list(shares)} must be non-negative integers, one per rank")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        previous = latest_name(directory)
    except ConfigError:  # a damaged pointer: this save replaces it
        previous = None
    temp = Path(tempfile.mkdtemp(dir=directory, prefix=f".tmp-step-{step}-"))
    started_s = temp.stat().st_mtime  # the file system's clock, as the leftovers' mtimes
    try:
        optimizer_tensors: dict[str, Tensor] = {}
        optimizer_json = (None if optimizer is None
                          else _encode(optimizer.state_dict(), "", optimizer_tensors))
        rng_tensors, rng_json = _rng_states()
        contents = {
            "model": {k: _cpu_copy(v) for k, v in model.state_dict().items()},
            "optimizer": optimizer_tensors,
            "rng": rng_tensors,
            "extra": {k: _cpu_copy(v) for k, v in (extra_tensors or {}).items()},
        }
        state = {
            "format": FORMAT, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "shares": list(shares), "optimizer": optimizer_json, "rng": rng_json,
            "extra_state": _encode(dict(extra_state or {}), "", {}),
        }
        for name, tensors in contents.items():
            safetensors.torch.save_file(tensors, str(temp / f"{name}.safetensors"))
            fsync_path(temp / f"{name}.safetensors")
        _write_text(temp / "state.json", json.dumps(state, indent=1) + "\n")
        files = {name: {"bytes": (temp / name).stat().st_size, "sha256": _sha256(temp / name)}
                 for name in _REQUIRED}
        _write_text(temp / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=1))
        fsync_path(temp)
        final = unused_step_dir(directory, step)
        os.replace(temp, final)  # onto a name nothing uses: `latest` still names the old one
        fsync_path(directory)
        point_latest(directory, final.name)
        tidy(directory, final.name, previous, started_s)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # gone already unless something failed
    return final


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _verify(path: Path) -> None:
    """Check every file against the manifest; read nothing else before this passes."""
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"checkpoint {path} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = {str(name): (int(entry["bytes"]), str(entry["sha256"]))
                 for name, entry in manifest["files"].items()}
        found = manifest["format"]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ConfigError(f"checkpoint {path} is damaged: {MANIFEST} is not a valid "
                          "manifest") from None
    if found != FORMAT:
        raise ConfigError(f"checkpoint {path} has format {found!r}, this version reads "
                          f"{FORMAT!r}")
    for name in _REQUIRED:
        if name not in files:
            raise ConfigError(f"checkpoint {path} is damaged: {MANIFEST} does not list {name}")
    for name, (size, sha256) in files.items():
        file = path / name
        if os.sep in name or not file.is_file():
            raise ConfigError(f"checkpoint {path} is damaged: {name} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise ConfigError(f"checkpoint {path} is damaged: {name} is {actual} bytes, "
                              f"the manifest says {size}")
        if _sha256(file) != sha256:
            raise ConfigError(f"checkpoint {path} is damaged: {name} does not match the "
                              "sha256 in the manifest")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint: a step directory, or a parent whose ``latest`` names one.

    Cost: reads every file twice (the hash check, then the parse; the second read usually
    comes from the page cache) and holds one CPU copy of the state.

    Raises:
        ConfigError: One line naming the file that is missing, truncated, corrupt, or holds a
            value of the wrong type (a crafted ``state.json``: a negative share, a missing key).
    """
    step_dir = resolve(Path(path))
    _verify(step_dir)
    where = f"checkpoint {step_dir} is damaged"
    name = "state.json"
    try:
        state = json.loads((step_dir / name).read_text(encoding="utf-8"))
        tensors: dict[str, dict[str, Tensor]] = {}
        for kind in _TENSOR_FILES:
            name = f"{kind}.safetensors"
            tensors[kind] = safetensors.torch.load_file(str(step_dir / name), device="cpu")
        name = "state.json"
        step, epoch, batch_in_epoch, shares = parse_state(state, f"{where}: {name}")
        optimizer_state = _decode(state["optimizer"], tensors["optimizer"])
        extra_state = _decode(state["extra_state"], {})
        rng = _parse_rng(_decode(state["rng"], {}), tensors["rng"], where)
    except ConfigError:
        raise
    except _READ_ERRORS as error:
        raise ConfigError(f"{where}: {name} cannot be read ({type(error).__name__})") from None
    if not (isinstance(optimizer_state, dict) or optimizer_state is None) or not isinstance(
            extra_state, dict):
        raise ConfigError(f"{where}: state.json: optimizer or extra_state is not an object")
    return Checkpoint(path=step_dir, model_state=tensors["model"],
                      optimizer_state=optimizer_state or {}, step=step, epoch=epoch,
                      batch_in_epoch=batch_in_epoch, shares=shares, rng=rng,
                      extra_tensors=tensors["extra"], extra_state=extra_state)


_READ_ERRORS = (SafetensorError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                RecursionError, OverflowError)
_STATE_KEYS = ("format", "step", "epoch", "batch_in_epoch", "shares", "optimizer", "rng",
               "extra_state")


def parse_state(state: Any, where: str) -> tuple[int, int, int, list[int]]:
    """(step, epoch, batch_in_epoch, shares) from a parsed ``state.json``, every field checked.

    Raises:
        ConfigError: One line starting with `where`: not an object, a key missing, another
            format, a counter that is not an integer ≥ 0, shares that are not a non-empty list
            of integers ≥ 0.
    """
    if not isinstance(state, dict):
        raise ConfigError(f"{where} is not a JSON object")
    for key in _STATE_KEYS:
        if key not in state:
            raise ConfigError(f"{where} has no {key!r}")
    if state["format"] != FORMAT:
        raise ConfigError(f"{where} has format {state['format']!r:.60}, this version reads "
                          f"{FORMAT!r}")
    counters = []
    for key in ("step", "epoch", "batch_in_epoch"):
        if not _is_count(state[key]):
            raise ConfigError(f"{where}: {key} {state[key]!r:.60} is not an integer ≥ 0")
        counters.append(int(state[key]))
    shares = state["shares"]
    if not (isinstance(shares, list) and shares and all(_is_count(s) for s in shares)):
        raise ConfigError(f"{where}: shares {shares!r:.80} are not a list of integers ≥ 0, "
                          "one per rank")
    step, epoch, batch_in_epoch = counters
    return step, epoch, batch_in_epoch, [int(s) for s in shares]


def _parse_rng(value: Any, tensors: dict[str, Tensor], where: str) -> dict[str, Any]:
    """The RNG states, each tried on a scratch generator, so that `restore_rng` cannot fail."""
    if not isinstance(value, dict) or "python" not in value:
        raise ConfigError(f"{where}: state.json: rng is not an object with a 'python' state")
    try:
        random.Random().setstate(value["python"])
    except (TypeError, ValueError, OverflowError, IndexError):
        raise ConfigError(f"{where}: state.json: rng.python is not a generator state") from None
    numpy_state = value.get("numpy")
    if numpy_state is not None:
        try:
            import numpy as np

            name, keys, pos, has_gauss, cached = numpy_state
            np.random.RandomState().set_state(
                (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        except ImportError:
            pass
        except (TypeError, ValueError, OverflowError, IndexError):
            raise ConfigError(f"{where}: state.json: rng.numpy is not a generator "
                              "state") from None
    cuda = [tensors.get(f"cuda.{i}") for i in range(sum(k.startswith("cuda.") for k in tensors))]
    try:
        torch.Generator().set_state(tensors["torch"])
    except (KeyError, RuntimeError, TypeError):
        raise ConfigError(f"{where}: rng.safetensors holds no torch generator state") from None
    if not all(t is not None and t.dtype == torch.uint8 and t.dim() == 1 for t in cuda):
        raise ConfigError(f"{where}: rng.safetensors: a CUDA generator state is not bytes")
    return {**value, "torch": tensors["torch"], "cuda": cuda}


def restore_rng(checkpoint: Checkpoint) -> None:
    """Put this process's torch, CUDA (same device count only), Python and NumPy generators
    back where the saving process had them."""
    rng = checkpoint.rng
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(rng["python"])
    if rng.get("numpy") is not None:
        try:
            import numpy as np
        except ImportError:
            return
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
