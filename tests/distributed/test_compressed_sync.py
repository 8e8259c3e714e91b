"""Compressed sync over real gloo processes: identical replicas, exactness where promised."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from idla.emulate.netns import NetnsRig, parse_rate, rig_unavailable_reason
from idla.runtime.launch import launch_local
from tests.distributed import compress_workers
from tests.distributed.shared_launch import launch_cases

CODECS = ["none", "fp16", "topk:0.01", "randk:0.05", "sign", "powersgd:2"]


@functools.cache
def _three_ranks() -> dict[str, list[Any]]:
    """Every three-rank case of this module, in one launch. The codecs run on uneven shares,
    with a tiny threshold that compresses every tensor the codec can take."""
    steps = compress_workers.compressed_steps
    cases = {codec: (steps, (codec, [60, 30, 10], 4, True, 16)) for codec in CODECS}
    cases["exact"] = (steps, ("none", [70, 20, 10], 1, True, 16))
    cases["fp16-first"] = (steps, ("fp16", [70, 20, 10], 1, False, 16))
    return launch_cases(cases, 3)


@pytest.mark.parametrize("codec", CODECS)
def test_replicas_stay_bit_identical_with_every_codec(codec: str) -> None:
    results = _three_ranks()[codec]

    assert len({r["hash"] for r in results}) == 1
    assert results[0]["report"]["codec"] == codec


def test_no_codec_is_the_exact_weighted_gradient() -> None:
    results = _three_ranks()["exact"]

    assert results[0]["first_step_max_diff"] < 1e-6


def test_fp16_first_step_is_close_to_the_exact_gradient() -> None:
    results = _three_ranks()["fp16-first"]

    assert results[0]["first_step_max_diff"] < 1e-3 * results[0]["grad_scale"]


def test_auto_chooses_the_same_codec_everywhere_and_says_why() -> None:
    results = launch_local(compress_workers.auto_choice, (6,), 2)

    assert len({r["hash"] for r in results}) == 1
    report = results[0]["report"]
    assert report["decisions"] and report["decisions"][0]["step"] == 3
    assert report["codec"] == report["decisions"][0]["codec"]
    assert "Mbit/s" in report["reason"]
    assert all(r["report"] == report for r in results)


def test_training_across_shaped_namespace_hosts() -> None:
    # Prepare: 3 hosts on 50 Mbit/s links; the workers' collectives go over their eth0
    reason = rig_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetnsRig(3, parse_rate("50mbit")) as rig:
        before = rig.counters()

        # Execute
        results = launch_local(compress_workers.compressed_steps,
                               ("topk:0.01", [60, 30, 10], 3, True, 1024), 3,
                               netns=[host.namespace for host in rig.hosts])
        after = rig.counters()

    # Assert: identical replicas, and the gradient bytes really crossed the links
    assert len({r["hash"] for r in results}) == 1
    payload = results[0]["report"]["payload_bytes_per_step"]
    for old, new in zip(before, after, strict=True):
        assert new.tx_bytes - old.tx_bytes > 3 * payload
