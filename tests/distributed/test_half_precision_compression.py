"""bf16 and fp16 models through the compressed exchanges, over real gloo processes: identical
replicas, gradients in the model's dtype, and training as close to the float32 run as bf16
lets the exact exchange come.

The bound: bf16 keeps 8 significant bits, so every optimizer step rounds each parameter by up
to 2^-9 of itself, and the exact exchange in bf16 ends some distance from its float32 run
(0.77 % relative L2 after 12 steps of the demo CNN here). The codecs compute in float32, so a
codec should not take a bf16 model further from the same codec's float32 run than bf16 takes
the exact exchange: we allow twice that distance, measured in the same launch (measured: 0.71
times it for top-k, 0.96 for fp16, 1.10 for PowerSGD; an fp16 model under PowerSGD, with 3
more bits, 0.25). The loss says the same from the other side: a half-precision run must make at
least 90 % of its float32 run's progress (measured: 99.5-100.8 %).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

from tests.distributed import compress_workers
from tests.distributed.shared_launch import launch_cases

STEPS = 12
CODECS = ["fp16", "topk:0.01", "powersgd:2"]
HALF_CASES = [(codec, "bfloat16") for codec in CODECS] + [("powersgd:2", "float16")]


@functools.cache
def _runs() -> dict[str, list[Any]]:
    """Every case in one launch of two ranks (uneven shares 40/24)."""
    steps = compress_workers.half_precision_steps
    names = {f"{codec}/{dtype}" for codec, dtype in HALF_CASES}
    names |= {f"{codec}/float32" for codec in [*CODECS, "none"]} | {"none/bfloat16"}
    return launch_cases({name: (steps, (*name.split("/"), STEPS)) for name in sorted(names)}, 2)


def _distance(name: str, other: str) -> float:
    a, b = _runs()[name][0]["params"], _runs()[other][0]["params"]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(("codec", "dtype"), HALF_CASES)
def test_replicas_are_identical_and_gradients_keep_the_dtype(codec: str, dtype: str) -> None:
    results = _runs()[f"{codec}/{dtype}"]

    assert len({r["digest"] for r in results}) == 1
    assert all(r["grad_dtypes"] == {f"torch.{dtype}"} for r in results)


@pytest.mark.parametrize(("codec", "dtype"), HALF_CASES)
def test_half_precision_trains_as_close_to_float32_as_the_exact_exchange(
    codec: str, dtype: str
) -> None:
    name, reference = f"{codec}/{dtype}", f"{codec}/float32"
    bf16_cost = _distance("none/bfloat16", "none/float32")

    assert 0 < _distance(name, reference) <= 2 * bf16_cost
    progress = _runs()[reference][0]["initial_loss"] - _runs()[reference][0]["loss"]
    assert progress > 0
    assert _runs()[name][0]["initial_loss"] - _runs()[name][0]["loss"] >= 0.9 * progress


def test_half_precision_sends_half_the_bytes_of_the_plain_part() -> None:
    # the codec payloads are the same; the tensors under min_compress_numel travel in bf16
    fp32 = _runs()["topk:0.01/float32"][0]["payload_bytes"]
    bf16 = _runs()["topk:0.01/bfloat16"][0]["payload_bytes"]

    assert fp32 - bf16 == 2 * (32 + 64 + 128 + 10)  # the four biases, 2 bytes less each
