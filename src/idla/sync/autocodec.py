"""`compress="auto"`: pick the codec from measured bandwidth and compute, and re-check it.

`AutoCodecExchange` is a gradient exchange that runs the concrete compressed exchange its
current codec needs (`compressed_exchange`: a stateless codec's, or PowerSGD's) and swaps it
for another between steps. The first `probe_steps` steps run with the leanest candidate (cheap
on any link) while the agent measures compute time. Then every rank measures its link (a timed
ring exchange); the slowest link sets the pace of a ring, so all ranks agree on the minimum,
and the same pure `choose_codec` on the same numbers gives every rank the same choice. Every
`recheck_every_steps` the measured communication time is compared with the prediction; when it
is off by more than 2× (the link changed), the link is measured again and the choice redone.

The prediction counts uncompressed tensors at the gradient buffer's element size, so a bf16
or fp16 model (whose buffer is in its own dtype) is not told that "fp16" halves its traffic.

A swap carries the error-feedback residuals (residuals of tensors that stay compressed go on
being used) and the step count over; PowerSGD restarts from a fresh Q.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from idla.compress import Codec, parse_codec
from idla.plan.compression import CANDIDATES, CodecChoice, choose_codec, link_changed
from idla.plan.topology import Topology
from idla.profile.probe import measure_link_bandwidth
from idla.runtime.stats import Stat
from idla.sync.compressed import CompressedExchange, compressed_exchange
from idla.sync.grad_views import GradViews
from idla.sync.size_rule import CompressedSetup


class AutoCodecExchange:
    """Owns the codec choice of one run; every rank calls `after_step` with the same stats."""

    supports_leaves = False

    def __init__(
        self,
        setup: CompressedSetup,
        *,
        probe_steps: int = 3,
        recheck_every_steps: int = 20,
        probe_bytes: int = 128 * 1024,
    ) -> None:
        self.setup = setup
        self.group = setup.group
        self.probe_steps = probe_steps
        self.recheck_every_steps = recheck_every_steps
        self.probe_bytes = probe_bytes
        self.exchange: CompressedExchange = compressed_exchange(setup, parse_codec(CANDIDATES[-1]))
        self.shapes = [p.shape for p in self.exchange.params]
        self.choice: CodecChoice | None = None
        self.bandwidth_bytes_per_s: float | None = None
        self.decisions: list[dict[str, Any]] = []
        self._compute_s: list[float] = []  # the slowest rank's compute, per step
        self._comm_s: list[float] = []  # the least-waiting rank's sync time, per step
        self._since_step = 0

    @property
    def params(self) -> list[nn.Parameter]:
        return self.exchange.params

    @property
    def grads(self) -> torch.Tensor:
        return self.exchange.grads

    @property
    def codec(self) -> Codec:
        return self.exchange.codec

    @property
    def views(self) -> GradViews:
        return self.exchange.views

    def start_step(self, shares: Sequence[int]) -> None:
        self.exchange.start_step(shares)

    def continue_step(self, shares: Sequence[int]) -> None:
        self.exchange.continue_step(shares)

    def begin_backward(self, final: bool) -> None:
        self.exchange.begin_backward(final)

    def drop_local_gradient(self) -> None:
        self.exchange.drop_local_gradient()

    def finish(self, stats_row: torch.Tensor) -> torch.Tensor:
        return self.exchange.finish(stats_row)

    def set_topology(self, topology: Topology) -> None:
        self.exchange.set_topology(topology)

    def _swap(self, codec: Codec) -> None:
        """Run `codec` from the next step on (all ranks, between steps)."""
        self.exchange.views.release()
        self.exchange = compressed_exchange(self.setup, codec, self.exchange.steps_done)

    def _measure_link(self) -> float | None:
        mine = measure_link_bandwidth(self.probe_bytes, repeats=2, group=self.group.control)
        if mine is None:
            return None
        value = torch.tensor([mine], dtype=torch.float64)
        return min(float(t.item()) for t in self.group.control_all_gather(value))

    def after_step(self, step: int, stats: Sequence[Sequence[float]]) -> None:
        """Record this step; choose at the end of the probe, re-check at the interval."""
        self._compute_s.append(max(r[Stat.COMPUTE_S] for r in stats))
        self._comm_s.append(min(r[Stat.PREV_SYNC_S] for r in stats))
        done = step + 1
        if done == self.probe_steps:
            self._choose(done, "start")
        elif (self.choice is not None and done - self._since_step >= self.recheck_every_steps
              and self.bandwidth_bytes_per_s):
            window = self._comm_s[self._since_step + 1 :]  # PREV_SYNC_S lags one step
            predicted = self.choice.sent_bytes[self.choice.spec] / self.bandwidth_bytes_per_s
            if window and link_changed(predicted, statistics.median(window)):
                self._choose(done, "link changed")
            else:
                self._since_step = done

    def _choose(self, step: int, why: str) -> None:
        self.bandwidth_bytes_per_s = self._measure_link()
        compute_s = statistics.median(self._compute_s[-self.probe_steps :])
        choice = choose_codec(self.shapes, self.group.world_size, compute_s,
                              self.bandwidth_bytes_per_s, self.setup.min_compress_numel,
                              element_bytes=self.grads.element_size())
        codec = parse_codec(choice.spec)
        if codec.name != self.codec.name:
            self._swap(codec)
        self.choice = choice
        self._since_step = step
        self.decisions.append({"step": step, "trigger": why, "codec": choice.spec,
                               "reason": choice.reason})

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current exchange's state. The choice is not part of it: an agent resumed after
        the probe steps keeps the leanest candidate."""
        return self.exchange.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.exchange.load_state_dict(state)

    def report(self) -> dict[str, Any]:
        """The current exchange's report, with why this codec and every decision so far."""
        reason = self.choice.reason if self.choice else "probing the link and compute"
        return {**self.exchange.report(), "reason": reason, "decisions": list(self.decisions)}

    def close(self) -> None:
        self.exchange.close()
