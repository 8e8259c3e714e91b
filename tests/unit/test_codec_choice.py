"""The auto codec choice: bytes per step, the choice at fast and slow links, link changes."""

from __future__ import annotations

import pytest
import torch

from idla.plan.compression import choose_codec, link_changed, sent_bytes_per_step

# The demo CNN's parameter shapes.
SHAPES = [torch.Size(s) for s in [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 1024),
                                  (128,), (10, 128), (10,)]]
NUMEL = sum(s.numel() for s in SHAPES)


def test_uncompressed_ring_sends_two_n_minus_one_over_n_of_the_model() -> None:
    assert sent_bytes_per_step("none", SHAPES, 4, 1024) == pytest.approx(1.5 * 4 * NUMEL)


def test_gathered_codec_sends_its_payload_to_every_peer() -> None:
    # top-k 1 %: 6 bytes per kept entry (fp16 value, int32 position), gathered by 3 peers
    big = [s for s in SHAPES if s.numel() >= 1024]
    small = NUMEL - sum(s.numel() for s in big)
    kept = sum(-(-s.numel() // 100) for s in big)

    sent = sent_bytes_per_step("topk:0.01", SHAPES, 4, 1024)

    assert sent == pytest.approx(3 * 6 * kept + 1.5 * 4 * small)


def test_fast_link_keeps_gradients_exact_and_slow_link_compresses() -> None:
    fast = choose_codec(SHAPES, 4, compute_s=0.015, bandwidth_bytes_per_s=10e9)
    slow = choose_codec(SHAPES, 4, compute_s=0.015, bandwidth_bytes_per_s=1.25e6)

    assert fast.spec == "none"
    assert slow.spec not in ("none", "fp16")
    assert slow.predicted_step_s[slow.spec] < slow.predicted_step_s["none"] / 10
    assert "Mbit/s" in slow.reason


def test_one_worker_sends_nothing() -> None:
    assert choose_codec(SHAPES, 1, 0.01, 1e6).spec == "none"
    assert choose_codec(SHAPES, 4, 0.01, None).spec == "none"


@pytest.mark.parametrize(("predicted", "measured", "changed"),
                         [(0.01, 0.011, False), (0.01, 0.03, True), (0.01, 0.004, True),
                          (0.0, 0.5, False)])
def test_link_change_detection(predicted: float, measured: float, changed: bool) -> None:
    assert link_changed(predicted, measured) is changed
