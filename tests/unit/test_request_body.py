"""The predict body checks: each malformed body is a 4xx with a reason, before numpy sees it."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from idla.serve.request_body import (
    BadRequest,
    count_leaves,
    json_inputs,
    load_json,
    non_numeric_bytes,
    structure_bytes,
)

SHAPE = (4,)


def _refusal(body: bytes, shape: tuple[int, ...] = SHAPE, max_rows: int = 8) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        json_inputs(body, shape, max_rows)
    return caught.value


@pytest.mark.parametrize(("body", "status", "reason"), [
    (b"[" * 100_000, 400, "brackets, strings or constants"),
    (b'{"inputs": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "deeper than 32"),
    (b'{"inputs": [[%s, 1, 1, 1]]}' % str(10**400).encode(), 400, "float32's range"),
    (b'{"inputs": [[' + b"7" * 5000 + b", 1, 1, 1]]}", 400, "float32's range"),
    (b'{"inputs": [[1e39, 1, 1, 1]]}', 400, "float32's range"),
    (b'{"inputs": [[NaN, 1, 1, 1]]}', 400, "NaN is not a JSON number"),
    (b'{"inputs": [[-Infinity, 1, 1, 1]]}', 400, "-Infinity is not a JSON number"),
    (b'{"inputs": [[1, 2, 3, 4]', 400, "not valid JSON"),
    (b"\xff\xfe\x00", 400, "not valid JSON"),
    (b'{"inputs": [' + b"[]," * 10_000 + b"[]]}", 400, "brackets, strings or constants"),
    (b'{"inputs": [' + b"[1, 2, 3, 4]," * 8 + b"[1, 2, 3, 4]]}", 413, "at most 8 rows"),
    (b'{"rows": [[1, 2, 3, 4]]}', 422, '{"inputs"'),
    (b"[[1, 2, 3, 4]]", 422, '{"inputs"'),
    (b'{"inputs": 5}', 422, "rectangular"),
    (b'{"inputs": [[true, 1, 1, 1]]}', 422, "found true"),
    (b'{"inputs": [["1", 1, 1, 1]]}', 422, 'found "1"'),
    (b'{"inputs": [[null, 1, 1, 1]]}', 422, "found null"),
    (b'{"inputs": [[{"a": 1}, 1, 1, 1]]}', 422, "found {"),
    (b'{"inputs": [[1, 2, 3, 4], [1, 2]]}', 422, "unequal length"),
    (b'{"inputs": [[1, 2, 3, 4], 1]}', 422, "unequal length"),
])
def test_a_malformed_body_is_a_4xx_naming_the_fault(body: bytes, status: int,
                                                     reason: str) -> None:
    refusal = _refusal(body)
    assert refusal.status == status
    assert reason in refusal.reason


def test_a_valid_body_is_float32_rows_and_huge_integers_cost_linear_time() -> None:
    rows = np.random.default_rng(0).random((3, 4))
    array = json_inputs(json.dumps({"inputs": rows.tolist()}).encode(), SHAPE, 8)
    assert array.dtype == np.float32 and array.shape == (3, 4)
    np.testing.assert_array_equal(array, rows.astype(np.float32))
    # Python's int() refuses 5,000 digits; floats parse any length.
    assert load_json(b"1" * 5000) == float("inf")
    assert json_inputs(b'{"inputs": [[1, -2, 3e2, 0]]}', SHAPE, 8).tolist() == [[1, -2, 300, 0]]


def test_nesting_and_leaves_are_counted_without_recursion() -> None:
    with pytest.raises(BadRequest, match="deeper than"):
        load_json(b"[" * 100_000)  # past the parser's recursion limit: 400, not RecursionError
    assert count_leaves({"a": [1.0, [2.0, 3.0]], "b": "x"}) == 4
    assert count_leaves(5.0) == 1
    deep: list[object] = []
    for _ in range(31):
        deep = [deep]
    assert count_leaves(deep) == 0  # 32 levels: the limit
    with pytest.raises(BadRequest, match="deeper than 32"):
        count_leaves([deep])


def test_structure_allowance_fits_nested_rows_of_the_input_shape() -> None:
    shape = (2, 3)
    rows = np.zeros((5, *shape)).tolist()
    body = json.dumps({"inputs": rows}).encode()
    assert non_numeric_bytes(body) <= structure_bytes(shape, 5)
    assert json_inputs(body, shape, 5).shape == (5, 2, 3)
    assert structure_bytes(shape, 5) - 4096 == 2 * (1 + 5 * (1 + 2))
    assert non_numeric_bytes(b"[1.5e-3, -2]\n") == 2


def test_a_big_body_leaves_the_interpreter_to_other_threads() -> None:
    """The parse runs Python between numbers, so another thread gets the GIL within a few
    switch intervals instead of waiting the whole parse."""
    rows = np.random.default_rng(0).random((512, 784)).tolist()
    body = json.dumps({"inputs": rows}).encode()  # ~8 MB
    gaps_s: list[float] = []
    done = threading.Event()

    def tick() -> None:
        last_s = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now_s = time.perf_counter()
            gaps_s.append(now_s - last_s)
            last_s = now_s

    ticker = threading.Thread(target=tick)
    ticker.start()
    start_s = time.perf_counter()
    assert json_inputs(body, (784,), 512).shape == (512, 784)
    parse_s = time.perf_counter() - start_s
    done.set()
    ticker.join()
    assert max(gaps_s) < parse_s / 2, (max(gaps_s), parse_s)  # unbounded: ≈ parse_s
