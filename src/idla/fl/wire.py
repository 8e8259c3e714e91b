"""Model updates on the wire: safetensors bytes in, validated numpy arrays out; never pickle.

An update is a list of arrays stored under the keys "0", "1", ... in order. ``arrays_from_bytes``
parses only the safetensors header (JSON) and raw little-endian buffers, so a hostile peer can
at worst send a wrong or oversized update, which ``validate_update`` then rejects with a reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from idla.errors import IdlaError


class WireError(IdlaError, ValueError):
    """Bytes that are not a well-formed update."""


def arrays_to_bytes(arrays: Sequence[np.ndarray]) -> bytes:
    """Serialize arrays as safetensors under the keys "0", "1", ...; cost O(total bytes)."""
    tensors: dict[str, np.ndarray] = {}
    for index, array in enumerate(arrays):
        value = np.asarray(array)
        if value.dtype == object or value.dtype.kind not in "biufc":
            raise WireError(f"array {index}: dtype {value.dtype} cannot go on the wire")
        # ascontiguousarray would turn a 0-d array into shape (1,)
        tensors[str(index)] = value if value.flags.c_contiguous else value.copy(order="C")
    try:
        return bytes(save(tensors))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise WireError(f"cannot serialize update: {exc}") from exc


def arrays_from_bytes(data: bytes, max_bytes: int | None = None) -> list[np.ndarray]:
    """Parse bytes written by ``arrays_to_bytes``.

    Raises:
        WireError: If the bytes are too large, not safetensors, or the keys are not "0".."n-1".
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"update is {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise WireError(f"not a safetensors update: {exc}") from exc
    expected = [str(i) for i in range(len(tensors))]
    if sorted(tensors, key=_key_order) != expected:
        raise WireError(f"update keys must be '0'..'{len(tensors) - 1}', got {sorted(tensors)}")
    return [tensors[key] for key in expected]


def _key_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (-1, key)


def validate_update(arrays: Sequence[object], reference: Sequence[np.ndarray]) -> str | None:
    """Why ``arrays`` cannot be aggregated with ``reference`` (count, shape, dtype, non-finite
    values), or None when it can. Cost: one pass over the values."""
    if len(arrays) != len(reference):
        return f"expected {len(reference)} arrays, got {len(arrays)}"
    for index, (array, expected) in enumerate(zip(arrays, reference, strict=True)):
        if not isinstance(array, np.ndarray):
            return f"array {index}: expected a numpy array, got {type(array).__name__}"
        if array.shape != expected.shape:
            return f"array {index}: shape {array.shape} differs from the model's {expected.shape}"
        if array.dtype != expected.dtype:
            return f"array {index}: dtype {array.dtype} differs from the model's {expected.dtype}"
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            return f"array {index}: non-finite values (NaN or inf)"
    return None
