"""Model updates on the wire: bytes in, validated numpy arrays out; never pickle.

Two encodings. idla's own workers send safetensors, the arrays under the keys "0", "1", ... in
order: ``arrays_from_bytes`` parses only the safetensors header (JSON) and raw little-endian
buffers, so a hostile peer can at worst send a wrong or oversized update, which
``validate_update`` then rejects with a reason. Flower sends one ``.npy`` file per array
(``np.save``); ``arrays_from_npy`` reads each header alone (``numpy.lib.format.read_magic`` and
``read_array_header_1_0`` / ``_2_0``) and checks dtype, shape and byte count against the model
before it allocates anything, so a ~130-byte header declaring 10¹² elements costs nothing (numpy's
``np.load`` would try to allocate the 4 TB first and raise ``MemoryError``).
"""

from __future__ import annotations

import io
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


NPY_MAX_HEADER_BYTES = 10_000
"""Longest ``.npy`` header accepted (numpy's own default); a model's headers are ~120 bytes."""
_NPY_MAGIC_BYTES = 8  # "\x93NUMPY", then the major and minor version bytes
_NPY_LENGTH_BYTES = 4  # the header-length field: 2 bytes in format 1.0, 4 in 2.0
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def array_from_npy(data: object, expected: np.ndarray) -> np.ndarray:
    """Parse one ``.npy`` file that must hold an array of ``expected``'s dtype and shape.

    Refused with a reason (``WireError``): anything but bytes; more bytes than the expected
    array and a header can take; a bad magic string or header; a format other than 1.0 / 2.0
    (3.0 exists only for structured dtypes with non-Latin-1 field names); an object dtype
    (its data would be a pickle); another dtype or shape than the model's; data shorter or
    longer than the shape says. Only then is one array of ``expected.nbytes`` allocated.

    Cost: O(header) before the checks, one copy of the data after.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    limit = _NPY_MAGIC_BYTES + _NPY_LENGTH_BYTES + NPY_MAX_HEADER_BYTES + expected.nbytes
    if len(data) > limit:
        raise WireError(f"{len(data)} bytes, more than the {limit} that a {expected.dtype} "
                        f"array of shape {expected.shape} can take")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
    except ValueError as exc:
        raise WireError(f"not a .npy array: {_first_line(exc)}") from None
    read_header = _NPY_HEADER_READERS.get(version)
    if read_header is None:
        raise WireError(f".npy format {version[0]}.{version[1]} is not accepted (1.0, 2.0)")
    try:
        shape, fortran_order, dtype = read_header(stream, NPY_MAX_HEADER_BYTES)
    except (ValueError, TypeError, SyntaxError, RecursionError, OverflowError) as exc:
        raise WireError(f"not a .npy header: {_first_line(exc)}") from None
    if dtype.hasobject:
        raise WireError(f"dtype {dtype} holds Python objects (a pickle); refused")
    if dtype != expected.dtype:
        raise WireError(f"dtype {dtype} differs from the model's {expected.dtype}")
    if tuple(shape) != expected.shape:
        raise WireError(f"shape {tuple(shape)} differs from the model's {expected.shape}")
    offset = stream.tell()
    if len(data) - offset != expected.nbytes:
        raise WireError(f"{len(data) - offset} data bytes where shape {expected.shape} of "
                        f"{dtype} needs {expected.nbytes}")
    flat = np.frombuffer(data, dtype=dtype, count=expected.size, offset=offset)
    if fortran_order:
        return flat.reshape(expected.shape[::-1]).transpose().copy()
    return flat.reshape(expected.shape).copy()


def arrays_from_npy(tensors: object, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One array per ``.npy`` file in ``tensors`` (Flower's ``Parameters.tensors``), each
    checked against the model ``like`` by ``array_from_npy`` before it is allocated.

    Raises:
        WireError: naming the first array that is refused and why.
    """
    if not isinstance(tensors, (list, tuple)):
        raise WireError(f"expected a list of .npy files, got {type(tensors).__name__}")
    if len(tensors) != len(like):
        raise WireError(f"expected {len(like)} arrays, got {len(tensors)}")
    arrays = []
    for index, (data, expected) in enumerate(zip(tensors, like, strict=True)):
        try:
            arrays.append(array_from_npy(data, np.asarray(expected)))
        except WireError as exc:
            raise WireError(f"array {index}: {exc}") from None
    return arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


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
