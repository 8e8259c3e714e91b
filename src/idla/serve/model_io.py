"""The model format idla serves: ``model.safetensors`` plus a small ``model.json``; never pickle.

A model directory holds exactly two files:

- ``model.safetensors``: the ``state_dict`` tensors (safetensors cannot carry code);
- ``model.json``: ``{"format", "architecture", "kwargs", "input_shape", "version", "sha256"}``,
  where ``architecture`` names an entry of `ARCHITECTURES`, ``kwargs`` are the JSON arguments
  of its constructor, ``input_shape`` is one sample's shape (no batch dimension) and
  ``sha256`` is the hash of ``model.safetensors``.

Each file is written to a temporary file beside it and renamed into place, the weights first:
a reader that races a writer sees a sha256 mismatch (a clear error), never wrong weights.
A checkpoint from an untrusted source can at worst be refused: loading parses JSON and the
safetensors header, hashes the file and checks every tensor name and shape against the
architecture before any weight reaches the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idla.demo import MLP, DigitsCNN
from idla.errors import ConfigError
from idla.report import atomic_target

FORMAT = "idla-model/1"
WEIGHTS = "model.safetensors"
META = "model.json"
_KEYS = frozenset({"format", "architecture", "kwargs", "input_shape", "version", "sha256"})
_PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"})
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class ModelFormatError(ConfigError):
    """A model directory is missing, damaged, or not in idla's format (e.g. a pickle file)."""


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,  # input (1, 8, 8); kwargs: hidden, classes
    "mlp": MLP,  # in_features values per sample; kwargs: in_features, hidden, layers, classes
}


@dataclass(frozen=True)
class ModelInfo:
    """What ``model.json`` says about a saved model."""

    architecture: str
    """A key of `ARCHITECTURES`."""
    kwargs: dict[str, Any]
    """JSON arguments of the architecture's constructor."""
    input_shape: tuple[int, ...]
    """One sample's shape, without the batch dimension."""
    version: str
    """A label every response and output carries (default: the first 12 hex of `sha256`)."""
    sha256: str
    """Hex sha256 of ``model.safetensors``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "architecture": self.architecture, "kwargs": dict(self.kwargs),
            "input_shape": list(self.input_shape), "version": self.version, "sha256": self.sha256,
        }


def _build(architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    if architecture not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelFormatError(f"unknown model architecture {architecture!r} (known: {known})")
    try:
        return ARCHITECTURES[architecture](**kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as error:
        # torch raises RuntimeError for a negative size, and fails to allocate a huge one
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelFormatError(
            f"architecture {architecture!r} does not accept kwargs {kwargs}: {first[:200]}"
        ) from None


def _check_matches(
    state: dict[str, torch.Tensor], model: nn.Module, where: str
) -> None:
    """Every tensor name, shape and dtype of ``state`` equals ``model``'s own state_dict."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelFormatError(
            f"{where}: tensors do not match the architecture (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for name, tensor in expected.items():
        got = state[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise ModelFormatError(
                f"{where}: tensor {name!r} is {got.dtype} {tuple(got.shape)}, the architecture "
                f"wants {tensor.dtype} {tuple(tensor.shape)}"
            )


def _check_input_shape(model: nn.Module, input_shape: tuple[int, ...], where: str) -> None:
    """One forward pass on a zero sample: the architecture must accept ``input_shape``."""
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, *input_shape)))
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelFormatError(
            f"{where}: input_shape {list(input_shape)} does not fit the architecture ({first})"
        ) from None
    if out.dim() != 2 or out.shape[0] != 1:
        raise ModelFormatError(f"{where}: the model maps one sample to {tuple(out.shape)}, "
                               "expected (1, classes)")


def save_model(
    directory: str | Path,
    model: nn.Module,
    architecture: str,
    kwargs: dict[str, Any],
    input_shape: Sequence[int],
    version: str | None = None,
) -> ModelInfo:
    """Write ``directory/model.safetensors`` and ``directory/model.json``, each atomically.

    The model must be an instance of ``ARCHITECTURES[architecture](**kwargs)`` (checked by
    tensor names and shapes), accept a batch of ``input_shape`` samples (one forward pass) and
    hold finite weights only (`load_model` refuses others). Cost: one CPU copy of the weights,
    written and hashed once.
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise ModelFormatError(f"input_shape {list(input_shape)} must be positive dimensions")
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError):
        raise ModelFormatError(f"kwargs {kwargs!r} must be plain JSON values") from None
    if version is not None and not _VERSION.match(version):
        raise ModelFormatError(
            f"version {version!r} must be 1-64 letters, digits or ._+- (starting alphanumeric)"
        )
    import safetensors.torch

    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    nonfinite = [k for k, v in state.items()
                 if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ModelFormatError(f"model for {architecture!r} holds NaN or infinite weights (in "
                               f"{nonfinite[:3]}); load_model would refuse them, so none is saved")
    reference = _build(architecture, dict(kwargs))
    _check_matches(state, reference, f"model for {architecture!r}")
    reference.load_state_dict(state)
    reference.eval()
    _check_input_shape(reference, shape, f"model for {architecture!r}")
    blob = safetensors.torch.save(state)
    sha256 = hashlib.sha256(blob).hexdigest()
    info = ModelInfo(architecture, dict(kwargs), shape, version or sha256[:12], sha256)
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    with atomic_target(target / WEIGHTS) as tmp:
        tmp.write_bytes(blob)
    with atomic_target(target / META) as tmp:
        tmp.write_text(json.dumps(info.to_json(), indent=1) + "\n", encoding="utf-8")
    return info


def looks_like_pickle(path: Path) -> bool:
    """True for a pickle stream (protocol 2+ starts with 0x80 and the protocol number) or a
    ``torch.save`` zip archive (it holds a pickle); idla loads neither."""
    try:
        with path.open("rb") as file:
            head = file.read(4)
    except OSError:
        return False
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head == b"PK\x03\x04"


def _refuse_pickle(path: Path) -> None:
    if path.is_file() and (path.suffix.lower() in _PICKLE_SUFFIXES or looks_like_pickle(path)):
        raise ModelFormatError(
            f"{path} is a pickle file (torch.save / pickle format); idla never unpickles a model "
            f"because that can run arbitrary code. Save it with idla.serve.model_io.save_model "
            f"(safetensors + model.json) and pass that directory"
        )


def _positive_ints(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in value
    )


def read_info(directory: str | Path) -> ModelInfo:
    """Parse and check ``directory/model.json`` (not the weights); refuses pickle files."""
    path = Path(directory)
    _refuse_pickle(path)
    if not path.exists():
        raise ModelFormatError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelFormatError(f"{path} is not a model directory ({WEIGHTS} + {META})")
    meta_path = path / META
    if not meta_path.is_file():
        for stray in sorted(path.iterdir()):
            _refuse_pickle(stray)  # a directory of torch.save files: say why it is refused
        raise ModelFormatError(f"{path} has no {META}; save models with save_model")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFormatError(f"{meta_path} is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or set(meta) != _KEYS:
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ModelFormatError(f"{meta_path} must hold exactly the keys {sorted(_KEYS)}, got {got}")
    if meta["format"] != FORMAT:
        raise ModelFormatError(f"{meta_path}: format {meta['format']!r}, expected {FORMAT!r}")
    checks = {
        "architecture": isinstance(meta["architecture"], str),
        "kwargs": isinstance(meta["kwargs"], dict),
        "input_shape": _positive_ints(meta["input_shape"]),
        "version": isinstance(meta["version"], str) and bool(_VERSION.match(meta["version"])),
        "sha256": isinstance(meta["sha256"], str) and bool(re.fullmatch(r"[0-9a-f]{64}",
                                                                          meta["sha256"])),
    }
    for key, ok in checks.items():
        if not ok:
            raise ModelFormatError(f"{meta_path}: {key} {meta[key]!r} is not valid")
    if meta["architecture"] not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelFormatError(
            f"{meta_path}: unknown model architecture {meta['architecture']!r} (known: {known})"
        )
    return ModelInfo(meta["architecture"], meta["kwargs"], tuple(meta["input_shape"]),
                     meta["version"], meta["sha256"])


def load_model(directory: str | Path, device: str = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Load a model saved by `save_model`, in eval mode on ``device``; never unpickles.

    Raises:
        ModelFormatError: the directory is missing, a pickle file, or damaged (JSON keys, unknown
            architecture, sha256 mismatch, truncated safetensors, tensors that do not match).
    """
    info = read_info(directory)
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise ModelFormatError(f"{Path(directory)} has no {WEIGHTS}")
    _refuse_pickle_content(weights)
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != info.sha256:
        raise ModelFormatError(
            f"{weights}: sha256 does not match {META} (damaged, or replaced while being written)"
        )
    import safetensors.torch
    from safetensors import SafetensorError

    try:
        state = safetensors.torch.load(blob)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ModelFormatError(f"{weights} is not a valid safetensors file ({error})") from None
    model = _build(info.architecture, dict(info.kwargs))
    _check_matches(state, model, str(weights))
    model.load_state_dict(state)
    model.eval()
    _check_input_shape(model, info.input_shape, str(Path(directory) / META))
    if not all(math.isfinite(float(t.float().abs().max())) for t in state.values() if t.numel()):
        raise ModelFormatError(f"{weights} holds NaN or infinite weights")
    return model.to(device), info


def _refuse_pickle_content(weights: Path) -> None:
    if looks_like_pickle(weights):
        raise ModelFormatError(
            f"{weights} is a pickle file renamed to {WEIGHTS}; idla never unpickles a model"
        )
