"""A predict request's body → a float32 array, or a `BadRequest` naming what is wrong.

Pure functions, no I/O. Every way a JSON body can be malformed ends in a 4xx, never in an
exception the server turns into a 500:

- not JSON, not UTF-8, ``NaN``/``Infinity`` (not JSON, RFC 8259 §6), nested past the parser's
  recursion limit or past `MAX_DEPTH`, a number outside float32's range (``1e39``, ``10**400``,
  an integer of 5,000 digits, which Python's ``int`` refuses to parse), more brackets, strings or
  ``true``/``false``/``null`` than rows of the model's input shape hold: 400;
- more numbers than `max_rows` full rows hold: 413;
- no ``inputs``, leaves that are not numbers (strings, ``true``, ``null``), ragged rows, and
  (`shape_inputs`) a shape the model does not take: 422.

Numbers are parsed as floats, so an integer's length costs linear time and never trips Python's
int-digits limit; nesting and the count of numbers are checked on the parsed document before
numpy builds an array from it.

**Sharing the interpreter.** The HTTP layer runs `json_inputs` for a big body on a thread, but a
thread only yields the GIL between Python bytecodes, and ``json.loads`` is one C call: a 16 MiB
body would hold every other client for its whole parse (~0.3 s; 4 M empty arrays, 2.5 s). So each
number is parsed by a Python function (`_number`: a switch point every few microseconds, 1.5×
the parse time), and the work C does between numbers is bounded before the parse: the body may
hold only as many bytes that are not digits, signs, dots, exponents, commas or white space as
`max_rows` rows of the input shape need (`structure_bytes`), counted in 1 MiB slices. numpy
converts the rows in slices too. The event loop then waits at most a few switch intervals
(5 ms each) for the GIL while a big body is parsed.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

import numpy as np

from idla.serve import wire

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects a body may have (the document itself is depth 1)."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
_CONTAINERS: frozenset[type] = frozenset({list, dict})
_NUMBER_OR_ARRAY: frozenset[type] = frozenset({float, list})
_NUMERIC = b"0123456789.eE+-, \t\r\n"
SCAN_SLICE_BYTES = 1 << 20
CONVERT_ROWS = 64
_PREDICT_FORM = 'body must be a JSON object {"inputs": [[...], ...]}'


class BadRequest(Exception):
    """A request the server refuses with ``status`` and ``{"error": reason}``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _refuse_constant(name: str) -> NoReturn:
    raise BadRequest(400, f"body is not valid JSON ({name} is not a JSON number)")


def _number(text: str) -> float:
    return float(text)


def load_json(body: bytes) -> Any:
    """The JSON document in ``body``, every number a float; 400 unless it is strict JSON."""
    try:
        return json.loads(body, parse_int=_number, parse_float=_number,
                          parse_constant=_refuse_constant)
    except RecursionError:
        raise BadRequest(400, f"body nests arrays or objects deeper than {MAX_DEPTH}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(400, f"body is not valid JSON ({error})") from None
    except ValueError as error:  # what the decoder raises beyond the two above
        raise BadRequest(400, f"body is not valid JSON ({error})") from None


def structure_bytes(input_shape: tuple[int, ...], max_rows: int) -> int:
    """Bytes besides numbers that a body of ``max_rows`` rows of ``input_shape`` needs: two
    brackets per array at every level, and room for the keys."""
    arrays_per_row = sum(math.prod(input_shape[:level]) for level in range(len(input_shape)))
    return 2 * (1 + max_rows * arrays_per_row) + 4096


def non_numeric_bytes(body: bytes) -> int:
    """Bytes of ``body`` that are not digits, ``.eE+-``, commas or white space."""
    return sum(len(body[start:start + SCAN_SLICE_BYTES].translate(None, _NUMERIC))
               for start in range(0, len(body), SCAN_SLICE_BYTES))


def count_leaves(document: Any, max_depth: int = MAX_DEPTH) -> int:
    """How many values that are not arrays or objects ``document`` holds; 400 past
    ``max_depth`` levels of arrays and objects. (Types are tallied per array, in C: a walk of a
    million numbers takes milliseconds.)"""
    if not isinstance(document, list | dict):
        return 1
    leaves, stack = 0, [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise BadRequest(400, f"body nests arrays or objects deeper than {max_depth}")
        values: list[Any] = list(node.values()) if isinstance(node, dict) else node
        if _CONTAINERS.isdisjoint(set(map(type, values))):
            leaves += len(values)
            continue
        for child in values:
            if type(child) in _CONTAINERS:
                stack.append((child, depth + 1))
            else:
                leaves += 1
    return leaves


def _check_leaves(inputs: list[Any]) -> None:
    """422 unless every leaf under ``inputs`` is a number (ints were parsed as floats)."""
    stack = [inputs]
    while stack:
        node = stack.pop()
        kinds = set(map(type, node))
        if not kinds <= _NUMBER_OR_ARRAY:
            found = next(child for child in node if type(child) not in _NUMBER_OR_ARRAY)
            raise BadRequest(422, "inputs must be a rectangular array of numbers, found "
                                  f"{json.dumps(found)[:40]}")
        if list in kinds:
            stack.extend(child for child in node if type(child) is list)


def _to_array(inputs: list[Any]) -> np.ndarray:
    """``inputs`` as float64, `CONVERT_ROWS` rows per numpy call; 422 when ragged."""
    if not inputs:
        return np.zeros((0,), dtype=np.float64)
    try:
        parts = [np.asarray(inputs[start:start + CONVERT_ROWS], dtype=np.float64)
                 for start in range(0, len(inputs), CONVERT_ROWS)]
    except ValueError:
        parts = []
    if not parts or len({part.shape[1:] for part in parts}) > 1:
        raise BadRequest(422, "inputs must be a rectangular array of numbers (rows of unequal "
                              "length)")
    return np.concatenate(parts)


def json_inputs(body: bytes, input_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    """The ``inputs`` of a predict body as float32, before any shape check; at most
    ``max_rows`` rows' worth of numbers (``max_rows × prod(input_shape)``)."""
    structure, allowed = non_numeric_bytes(body), structure_bytes(input_shape, max_rows)
    if structure > allowed:
        raise BadRequest(400, f"body holds {structure} bytes of brackets, strings or constants; "
                              f"{max_rows} rows of {list(input_shape)} need at most {allowed}")
    document = load_json(body)
    numbers = count_leaves(document)
    if not isinstance(document, dict) or "inputs" not in document:
        raise BadRequest(422, _PREDICT_FORM)
    inputs = document["inputs"]
    if not isinstance(inputs, list):
        raise BadRequest(422, "inputs must be a rectangular array of numbers")
    limit = max_rows * math.prod(input_shape)
    if numbers > limit:
        raise BadRequest(413, f"{numbers} numbers in one request; at most {max_rows} rows "
                              f"of {math.prod(input_shape)}")
    _check_leaves(inputs)
    array = _to_array(inputs)
    if not (np.abs(array) <= FLOAT32_MAX).all():
        raise BadRequest(400, "inputs hold a number outside float32's range "
                              f"(±{FLOAT32_MAX:.4g})")
    return array.astype(np.float32)


def shape_inputs(array: np.ndarray, input_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    """``array`` as (rows, *input_shape) float32; accepts (rows, prod(input_shape)) too."""
    want = ", ".join(map(str, input_shape))
    flat = math.prod(input_shape)
    if array.ndim == 2 and array.shape[1] == flat and len(input_shape) > 1:
        array = array.reshape((array.shape[0], *input_shape))
    if array.ndim != 1 + len(input_shape) or tuple(array.shape[1:]) != input_shape:
        raise BadRequest(422, f"inputs have shape {list(array.shape)}; the model takes "
                              f"(rows, {want}) or (rows, {flat})")
    if array.shape[0] < 1:
        raise BadRequest(422, "inputs hold no rows")
    if array.shape[0] > max_rows:
        raise BadRequest(413, f"{array.shape[0]} rows in one request; at most {max_rows}")
    if not np.isfinite(array).all():
        raise BadRequest(422, "inputs hold NaN or infinite values")
    return array


def parse_binary_inputs(body: bytes, shape_header: str | None) -> np.ndarray:
    """A little-endian float32 body of the shape ``X-Shape`` names; 400 when they disagree."""
    if not shape_header:
        raise BadRequest(400, "a binary body needs an X-Shape header, e.g. 'X-Shape: 4,64'")
    try:
        shape = [int(part) for part in shape_header.split(",")]
    except ValueError:
        raise BadRequest(400, f"X-Shape {shape_header!r} is not a comma-separated list of "
                              "integers") from None
    try:
        return wire.from_payload(shape, body)
    except wire.WireError as error:
        raise BadRequest(400, f"binary body does not match X-Shape: {error}") from None
