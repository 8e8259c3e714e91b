"""Exact synchronous gradient sync for uneven shares: a weighted all-reduce.

Each rank scales its mean loss by local_batch / global_batch before backward, so its gradient
is its *weighted* contribution; their sum is exactly the gradient of the whole global batch,
whatever the shares. Gradients live in one flat buffer (each ``param.grad`` is a view into it,
as DDP's ``gradient_as_bucket_view``), cut into buckets in backward order. A bucket's
all-reduce starts as soon as its gradients are ready, overlapping communication with the rest
of backward. A small matrix of per-rank statistics (world_size × width, float64) is summed on
the control plane beside the last bucket (`idla.runtime.stats.StatsExchange`): each rank fills
its own row and the sum hands every rank everybody's timings, so all ranks plan identically.

Accumulation (`continue_step`, then `begin_backward(final=False)` for the micro-batches under
``no_sync``) adds each micro-batch's gradient into the buffer with no communication; buckets
start only during the final backward, and a leaf sends what it accumulated over the whole step.
What a script does to ``.grad`` is handled by `idla.sync.grad_views.GradViews`.

Ranks that are leaves of the `Topology` do not join the ring: they send their whole buffer to
their hub, which adds it in before reducing, and receive the reduced buffer back. The result is
bit-identical on every rank: the ring's output is identical on its members and hubs copy it.

Cost per step: one pass of all-reduce over the parameters (ring: 2(N-1)/N × size per core
rank), plus, per leaf with samples, one send and one receive of the buffer through its hub,
plus the statistics' all-reduce of world_size × width float64 on the control plane.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from idla.plan.topology import Topology
from idla.runtime.group import Group, Work
from idla.runtime.stats import StatsExchange
from idla.sync.grad_views import GradViews


class GradientSync:
    """Owns the flat gradient buffer, its buckets and the exchange of one step."""

    supports_leaves = True

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: Group,
        stats_width: int,
        bucket_cap_bytes: int = 4 * 1024 * 1024,
        late_column: int | None = None,
        early_launch: bool = True,
        reason: str = "compress='none': exact all-reduce in the parameters' dtype",
    ) -> None:
        """`late_column`: the statistics column where a hub records, in each of its leaves'
        rows, the seconds it sat waiting for that leaf's gradient (None: not recorded).
        `early_launch`: start a bucket's all-reduce during backward as soon as it is ready;
        False holds every bucket until `finish`, so a gradient can still be checked (and
        dropped) as a whole before any of it leaves this rank."""
        self.late_column = late_column
        self.early_launch = early_launch
        self.reason = reason  # why the exchange is exact, for the compression report
        self.group = group
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        dtype = self.params[0].dtype
        if any(p.dtype != dtype for p in self.params):
            raise ValueError("all trainable parameters must share one dtype")
        device = self.params[0].device
        self.buckets: list[list[nn.Parameter]] = [[]]
        size_bytes = 0
        for p in reversed(self.params):  # backward produces gradients roughly in reverse order
            if self.buckets[-1] and size_bytes >= bucket_cap_bytes:
                self.buckets.append([])
                size_bytes = 0
            self.buckets[-1].append(p)
            size_bytes += p.numel() * p.element_size()
        total = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(total, dtype=dtype, device=device)  # (params,)
        grad_views: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._bucket_slices: list[slice] = []
        self._bucket_index: dict[int, int] = {}
        offset = 0
        for index, bucket in enumerate(self.buckets):
            start = offset
            for p in bucket:
                grad_views.append((p, self.flat[offset : offset + p.numel()].view_as(p)))
                self._bucket_index[id(p)] = index
                offset += p.numel()
            end = total if index == len(self.buckets) - 1 else offset
            self._bucket_slices.append(slice(start, end))
        self.stats = StatsExchange(group, stats_width)
        self.grads = self.flat  # this rank's gradient, then the sum
        self._bucket_size = [len(b) for b in self.buckets]
        self._ready = [0] * len(self.buckets)
        self._next_launch = 0
        self._works: list[Work] = []
        self._leaf_bufs: dict[int, torch.Tensor] = {}  # a whole buffer per sending leaf
        self._leaf_recvs: list[tuple[int, Work]] = []
        self._window: list[int] = []  # every rank's samples so far in this step
        self._hold = False  # a backward under no_sync: gradients stay here
        self._sending_leaves: list[int] = []
        self._leaves_added = False
        self._send_buf: torch.Tensor | None = None
        self._pending_sends: list[Work] = []
        self.topology = Topology.ring(group.world_size)
        self.views = GradViews(grad_views, on_ready=self._on_grad_ready)

    @property
    def is_leaf(self) -> bool:
        return self.group.rank in self.topology.hub_of

    def set_topology(self, topology: Topology) -> None:
        """Switch topology at a step boundary; every rank must call this with the same value."""
        if topology.world_size != self.group.world_size:
            raise ValueError("topology world size differs from the group's")
        self.group.subgroup(topology.core)  # a collective: all ranks create the group together
        self.topology = topology
        for leaf in topology.leaves_of(self.group.rank):
            if leaf not in self._leaf_bufs:
                self._leaf_bufs[leaf] = torch.empty_like(self.flat)

    def start_step(self, shares: Sequence[int]) -> None:
        """Zero the buffer, point every ``.grad`` into it and post the receives from leaves.

        A leaf with no samples this step has no gradient to give and sends nothing: its row of
        statistics travels on the control plane like everybody's."""
        self.flat.zero_()
        self.stats.reset()
        self.views.point()
        self._ready = [0] * len(self.buckets)
        self._hold = False
        self._window = list(shares)
        self._next_launch = 0
        self._works = []
        self._leaves_added = False
        leaves = self.topology.leaves_of(self.group.rank)
        self._sending_leaves = [leaf for leaf in leaves if shares[leaf] > 0]
        self._leaf_recvs = [(leaf, self.group.irecv(self._leaf_bufs[leaf], leaf))
                            for leaf in self._sending_leaves]

    def continue_step(self, shares: Sequence[int]) -> None:
        """Another micro-batch of the same step: the buffer keeps what it holds. A leaf that
        had no samples in the first micro-batch and has some now sends its whole buffer, which
        is received here too."""
        self._window = [a + b for a, b in zip(self._window, shares, strict=True)]
        for leaf in self.topology.leaves_of(self.group.rank):
            if leaf not in self._sending_leaves and self._window[leaf] > 0:
                self._sending_leaves.append(leaf)
                self._leaf_recvs.append(
                    (leaf, self.group.irecv(self._leaf_bufs[leaf], leaf)))

    def begin_backward(self, final: bool) -> None:
        """Claim the ``.grad`` fields (`GradViews.claim`); `final`: this backward ends the
        step, so its buckets may start as they fill; otherwise (``no_sync``) nothing leaves."""
        self.views.claim()
        self._hold = not final
        if final:
            self._ready = [0] * len(self.buckets)

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if self._hold:
            return
        index = self._bucket_index[id(param)]
        self._ready[index] += 1
        if self.early_launch and not self.is_leaf:
            self._launch(final=False)

    def drop_local_gradient(self) -> None:
        """Contribute nothing this step (e.g. a non-finite gradient); only before any launch."""
        if self._next_launch:
            raise RuntimeError("part of this step's gradient has already been sent")
        self.grads.zero_()

    def _leaves_arrived(self, block: bool) -> bool:
        if self._leaves_added:
            return True
        if block:
            for leaf, work in self._leaf_recvs:
                start = time.perf_counter()
                self.group.wait(work)
                if self.late_column is not None:
                    self.stats.matrix[leaf, self.late_column] += time.perf_counter() - start
        elif not all(work.is_completed() for _, work in self._leaf_recvs):
            return False
        self._leaves_added = True
        return True

    def _launch(self, final: bool) -> None:
        """Start the all-reduce of every ready bucket, strictly in bucket order on all ranks.

        The last bucket starts only when `final` is set (the end of the step's backward)."""
        last = len(self.buckets) - 1
        while self._next_launch <= last:
            index = self._next_launch
            if not final and (index == last or self._ready[index] < self._bucket_size[index]):
                return
            if not self._leaves_arrived(block=final):
                return
            part = self.flat[self._bucket_slices[index]]
            for leaf in self._sending_leaves:
                part.add_(self._leaf_bufs[leaf][self._bucket_slices[index]])
            work = self.group.all_reduce(part, self.topology.core)
            if work is not None:
                self._works.append(work)
            self._next_launch += 1

    def finish(self, stats_row: torch.Tensor) -> torch.Tensor:
        """Write this rank's statistics, complete the exchange and return everybody's
        statistics (world_size × width, float64, CPU); afterwards every ``.grad`` holds the
        global gradient."""
        if self.is_leaf:
            self.stats.start(stats_row)
            hub = self.topology.hub_of[self.group.rank]
            if self._window[self.group.rank] > 0:
                self.group.wait(self.group.isend(self.flat, hub))
            self.group.wait(self.group.irecv(self.flat, hub))
            return self.stats.finish()
        self._launch(final=True)  # a hub notes its leaves' lateness in their rows first
        self.stats.start(stats_row)
        for work in self._works:
            self.group.wait(work)
        leaves = self.topology.leaves_of(self.group.rank)
        if leaves:
            for work in self._pending_sends:
                self.group.wait(work)
            if self._send_buf is None:
                self._send_buf = torch.empty_like(self.flat)
            self._send_buf.copy_(self.flat)
            self._pending_sends = [self.group.isend(self._send_buf, leaf) for leaf in leaves]
        return self.stats.finish()

    def after_step(self, step: int, stats: Sequence[Sequence[float]]) -> None:
        """Nothing to learn: the exchange is exact."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Empty: nothing carries over from one step to the next."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"the exact all-reduce holds no state, got {sorted(state)[:3]}")

    def report(self) -> dict[str, Any]:
        return {"codec": "none", "error_feedback": False,
                "payload_bytes_per_step": self.flat.element_size() * self.flat.numel(),
                "reason": self.reason, "decisions": []}

    def close(self) -> None:
        for work in self._pending_sends:
            self.group.wait(work)
        self._pending_sends = []
        self.views.release()
