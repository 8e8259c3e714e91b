"""Which codec a run should use: predicted time to a given accuracy from measured bandwidth,
compute, and a prior on how many more steps each codec needs.

Pure functions. The prediction for one codec on N ranks (ring collectives, each rank's link
the bottleneck):

    step_s = compute_s + sent_bytes / bandwidth_bytes_per_s
    sent_bytes = 2(N-1)/N × (payload of linear codecs + small tensors)   (all-reduce)
               + (N-1) × payload of gathered codecs                        (all-gather)

where tensors that travel uncompressed cost the parameters' element bytes each (4 for fp32, 2
for a bf16 or fp16 model, whose gradients the exact exchange sums in their own dtype; codec
payloads do not depend on it). For a half-precision model "fp16" thus sends what "none" does.
    cost = step_s × STEPS_FACTOR[codec]    (relative time to reach the same accuracy)

`STEPS_FACTOR` is a prior: steps to a target accuracy relative to uncompressed training, with
error feedback, as measured by `idla bench comm` on the demo CNN (Adam). It is not universal;
a codec is only picked over a more faithful one when its step is predicted enough faster to
pay for the extra steps. Ties go to the more faithful codec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from idla.compress import Transport, compresses, parse_codec

STEPS_FACTOR: dict[str, float] = {
    "none": 1.0,  # exact
    "fp16": 1.0,  # rounding only: same steps to target
    "powersgd:4": 1.2,
    "powersgd:2": 1.35,  # 65-70 steps to 95 % vs 45-55 uncompressed
    "powersgd:1": 2.2,  # 115 steps
    "topk:0.01": 2.8,  # 145 steps
    "sign": 2.8,  # 145 steps with feedback
}
"""Prior: steps to the same accuracy relative to uncompressed training (see module doc)."""

CANDIDATES: tuple[str, ...] = tuple(STEPS_FACTOR)
"""Most faithful first."""


@dataclass(frozen=True, slots=True)
class CodecChoice:
    """The chosen codec, why, and the prediction behind it."""

    spec: str  # e.g. "powersgd:2"
    predicted_step_s: dict[str, float]  # candidate -> predicted seconds per step
    sent_bytes: dict[str, float]  # candidate -> bytes this rank sends per step
    reason: str


def sent_bytes_per_step(
    spec: str, shapes: Sequence[torch.Size], world_size: int, min_compress_numel: int,
    element_bytes: int = 4,
) -> float:
    """Bytes one rank puts on its link per step with codec `spec` (ring collectives);
    `element_bytes`: bytes of one uncompressed gradient element (the parameters' dtype)."""
    if world_size < 2:
        return 0.0
    codec = parse_codec(spec)
    ring = 2 * (world_size - 1) / world_size
    dense_bytes, payload_bytes = 0, 0
    for shape in shapes:
        if compresses(codec, shape, min_compress_numel):
            payload_bytes += codec.wire_bytes(shape)
        else:
            dense_bytes += element_bytes * shape.numel()
    if codec.transport is Transport.ALLGATHER:
        return ring * dense_bytes + (world_size - 1) * payload_bytes
    return ring * (dense_bytes + payload_bytes)


def choose_codec(
    shapes: Sequence[torch.Size],
    world_size: int,
    compute_s: float,
    bandwidth_bytes_per_s: float | None,
    min_compress_numel: int = 1024,
    candidates: Sequence[str] = CANDIDATES,
    tie: float = 1.05,
    element_bytes: int = 4,
) -> CodecChoice:
    """The candidate with the least predicted time to accuracy (step × steps factor); the
    more faithful one when another is within `tie` of it (the model ignores codec CPU time).
    `element_bytes`: bytes of one uncompressed gradient element (2 for a bf16 model)."""
    if world_size < 2 or not bandwidth_bytes_per_s:
        return CodecChoice("none", {}, {}, "one worker (or no measured link): nothing to send")
    sent = {c: sent_bytes_per_step(c, shapes, world_size, min_compress_numel, element_bytes)
            for c in candidates}
    step = {c: compute_s + b / bandwidth_bytes_per_s for c, b in sent.items()}
    cost = {c: step[c] * STEPS_FACTOR.get(c, 1.0) for c in candidates}
    best = min(cost.values())
    spec = next(c for c in candidates if cost[c] <= tie * best)
    comm_ms = 1e3 * sent[spec] / bandwidth_bytes_per_s
    reason = (
        f"link {8 * bandwidth_bytes_per_s / 1e6:.1f} Mbit/s, compute "
        f"{1e3 * compute_s:.1f} ms/step: {spec} sends {sent[spec] / 1e3:.1f} kB/step "
        f"({comm_ms:.1f} ms), predicted step {1e3 * step[spec]:.1f} ms × "
        f"{STEPS_FACTOR.get(spec, 1.0)} steps vs {1e3 * step['none']:.1f} ms uncompressed"
    ) if "none" in step else f"{spec}: predicted step {1e3 * step[spec]:.1f} ms"
    return CodecChoice(spec, step, sent, reason)


def link_changed(predicted_comm_s: float, measured_comm_s: float, factor: float = 2.0) -> bool:
    """True when measured communication time is off the prediction by more than `factor`
    either way (the link got slower or faster than when the codec was chosen)."""
    if predicted_comm_s <= 0 or measured_comm_s <= 0:
        return False
    ratio = measured_comm_s / predicted_comm_s
    return ratio > factor or ratio < 1 / factor
