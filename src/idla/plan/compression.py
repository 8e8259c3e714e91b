"""Which codec a run should use: predicted step time from measured bandwidth and compute.

Pure functions. The prediction for one codec on N ranks (ring collectives, each rank's link
the bottleneck):

    step_s = compute_s + sent_bytes / bandwidth_bytes_per_s
    sent_bytes = 2(N-1)/N × (payload of linear codecs + small tensors)   (all-reduce)
               + (N-1) × payload of gathered codecs                        (all-gather)

The candidates are ordered by fidelity (how much of the gradient survives one step); the
choice is the most faithful one whose predicted step is within `slack` of the fastest, so
communication never dominates while accuracy per step is kept where it costs little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from idla.compress import Transport, parse_codec
from idla.compress.codecs import PowerSGD

CANDIDATES: tuple[str, ...] = (
    "none", "fp16", "powersgd:4", "powersgd:2", "topk:0.01", "powersgd:1", "sign",
)
"""Most faithful first: fp16 loses only rounding; PowerSGD keeps the dominant subspace and
top-k the largest entries (both with error feedback); scaled sign keeps one bit per entry."""


@dataclass(frozen=True, slots=True)
class CodecChoice:
    """The chosen codec, why, and the prediction behind it."""

    spec: str  # e.g. "powersgd:2"
    predicted_step_s: dict[str, float]  # candidate -> predicted seconds per step
    sent_bytes: dict[str, float]  # candidate -> bytes this rank sends per step
    reason: str


def sent_bytes_per_step(
    spec: str, shapes: Sequence[torch.Size], world_size: int, min_compress_numel: int
) -> float:
    """Bytes one rank puts on its link per step with codec `spec` (ring collectives)."""
    if world_size < 2:
        return 0.0
    codec = parse_codec(spec)
    ring = 2 * (world_size - 1) / world_size
    dense_bytes, payload_bytes = 0, 0
    for shape in shapes:
        eligible = shape.numel() >= min_compress_numel and spec != "none"
        if isinstance(codec, PowerSGD):
            eligible = eligible and codec.eligible(shape)
        if eligible:
            payload_bytes += codec.wire_bytes(shape)
        else:
            dense_bytes += 4 * shape.numel()
    if codec.transport is Transport.ALLGATHER:
        return ring * dense_bytes + (world_size - 1) * payload_bytes
    return ring * (dense_bytes + payload_bytes)


def choose_codec(
    shapes: Sequence[torch.Size],
    world_size: int,
    compute_s: float,
    bandwidth_bytes_per_s: float | None,
    min_compress_numel: int = 1024,
    slack: float = 1.25,
    candidates: Sequence[str] = CANDIDATES,
) -> CodecChoice:
    """The most faithful candidate predicted within `slack` × the fastest step."""
    if world_size < 2 or not bandwidth_bytes_per_s:
        return CodecChoice("none", {}, {}, "one worker (or no measured link): nothing to send")
    sent = {c: sent_bytes_per_step(c, shapes, world_size, min_compress_numel)
            for c in candidates}
    step = {c: compute_s + b / bandwidth_bytes_per_s for c, b in sent.items()}
    fastest = min(step.values())
    spec = next(c for c in candidates if step[c] <= slack * fastest)
    comm_ms = 1e3 * sent[spec] / bandwidth_bytes_per_s
    reason = (
        f"link {8 * bandwidth_bytes_per_s / 1e6:.1f} Mbit/s, compute "
        f"{1e3 * compute_s:.1f} ms/step: {spec} sends {sent[spec] / 1e3:.1f} kB/step "
        f"({comm_ms:.1f} ms), predicted step "
        f"{1e3 * step[spec]:.1f} ms vs {1e3 * step['none']:.1f} ms uncompressed"
    ) if "none" in step else f"{spec}: predicted step {1e3 * step[spec]:.1f} ms"
    return CodecChoice(spec, step, sent, reason)


def link_changed(predicted_comm_s: float, measured_comm_s: float, factor: float = 2.0) -> bool:
    """True when measured communication time is off the prediction by more than `factor`
    either way (the link got slower or faster than when the codec was chosen)."""
    if predicted_comm_s <= 0 or measured_comm_s <= 0:
        return False
    ratio = measured_comm_s / predicted_comm_s
    return ratio > factor or ratio < 1 / factor
