"""Error feedback matters: on a least-squares problem top-k 1 % without it is clearly worse."""

from __future__ import annotations

import torch

from idla.compress import ErrorFeedback, parse_codec


def _least_squares_loss(error_feedback: bool, steps: int = 400) -> float:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 2000, generator=generator) / 200**0.5  # (samples, features)
    b = a @ torch.randn(2000, generator=generator)  # (samples,)
    codec, feedback = parse_codec("topk:0.01"), ErrorFeedback()
    x = torch.zeros(2000)
    for _ in range(steps):
        gradient = a.T @ (a @ x - b)
        corrected = feedback.corrected("x", gradient) if error_feedback else gradient
        sent = codec.decompress(codec.compress(corrected), gradient.shape)
        if error_feedback:
            feedback.update("x", corrected, sent)
        x -= 0.05 * sent
    return float(0.5 * (a @ x - b).pow(2).sum())


def test_top_k_without_error_feedback_is_clearly_worse() -> None:
    with_feedback = _least_squares_loss(True)
    without = _least_squares_loss(False)

    assert with_feedback < without / 10
