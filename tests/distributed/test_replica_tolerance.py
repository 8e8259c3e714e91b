"""The replica check's two modes over real gloo processes: a rounding-sized difference (1e-7
of a tensor's largest entry, about one float32 ulp) fails the exact check and passes the
tolerance check (1e-5); a real one (1e-2) fails both, and the message names the mode and the
tensors."""

from __future__ import annotations

import functools
from typing import Any

from tests.distributed import replica_workers
from tests.distributed.shared_launch import launch_cases


@functools.cache
def _messages() -> dict[str, list[Any]]:
    """Every case in one launch of two ranks: (mode, relative perturbation, what)."""
    check = replica_workers.perturbed_check
    cases = [("exact", 0.0, "parameters"), ("tolerance", 0.0, "parameters"),
             ("exact", 1e-7, "parameters"), ("tolerance", 1e-7, "parameters"),
             ("exact", 1e-2, "parameters"), ("tolerance", 1e-2, "parameters"),
             ("tolerance", 1e-2, "running_var")]
    return launch_cases({f"{m}/{r:g}/{w}": (check, (m, r, w)) for m, r, w in cases}, 2)


def _message(name: str) -> str:
    messages = _messages()[name]
    assert messages[0] == messages[1]  # every rank reaches the same verdict
    return str(messages[0])


def test_identical_replicas_pass_both_modes() -> None:
    assert _message("exact/0/parameters") == ""
    assert _message("tolerance/0/parameters") == ""


def test_a_rounding_sized_difference_fails_only_the_exact_check() -> None:
    exact = _message("exact/1e-07/parameters")

    assert exact.startswith("replicas diverged by step 7: parameters on rank(s) 1 differ from "
                            "rank 0's (replica check 'exact': bit for bit); differing: "
                            "'0.weight' (rank 1), '0.bias' (rank 1)")
    assert _message("tolerance/1e-07/parameters") == ""


def test_a_real_difference_fails_both_and_names_the_mode_and_the_tensors() -> None:
    exact = _message("exact/0.01/parameters")
    tolerance = _message("tolerance/0.01/parameters")

    assert "(replica check 'exact': bit for bit)" in exact
    assert tolerance.startswith(
        "replicas diverged by step 7: parameters on rank(s) 1 differ from rank 0's (replica "
        "check 'tolerance': relative difference above 1e-05); differing: '0.weight' (rank 1; "
        "relative difference ")
    for name in ["0.bias", "1.weight", "2.weight", "2.bias"]:
        assert f"'{name}' (rank 1; relative difference " in tolerance
    assert "'1.bias'" not in tolerance  # BatchNorm's bias starts at zero: 1e-2 of 0 is no change
    assert "(buffer)" not in tolerance and "Likely causes:" in tolerance


def test_a_buffer_beyond_the_tolerance_is_named_as_one() -> None:
    message = _message("tolerance/0.01/running_var")

    assert message.startswith("replicas diverged by step 7: buffers on rank(s) 1 differ")
    assert "'1.running_var (buffer)' (rank 1; relative difference " in message
