"""Step timings that mean the same on every device.

On a GPU, a kernel launch and a collective's ``Work.wait()`` return before the work is done
(NCCL's wait only orders streams), so host clocks read around them measure launch times: the
wait for a straggler would land in the time after the sync, and the planner would see equal
speeds where they differ. `StepClock` takes the host time at the step's one synchronization
(after backward, where the NaN guard reads the gradient's finiteness), and measures the
exchange between two CUDA events on the compute stream, which the collectives' completion
orders: the GPU's own record of when the gradients were ready and when the summed ones were.
The exchange's seconds are read one step later, when the events are long complete, so no
extra synchronization is added. On the CPU every reading is the host clock.
"""

from __future__ import annotations

import time

import torch


class StepClock:
    """The compute end and the exchange's duration of the last step, on the host's clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._ready: torch.cuda.Event | None = None  # gradients ready (after backward)
        self._summed: torch.cuda.Event | None = None  # the exchange complete

    def synchronize(self) -> None:
        """Wait for the device's queued work (nothing on the CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def compute_end(self) -> float:
        """Host seconds now, with the device's queued work complete (the caller has just
        synchronized, e.g. by reading a value computed from the gradients)."""
        if self.cuda:
            self._ready = torch.cuda.Event(enable_timing=True)
            self._ready.record()
        return time.perf_counter()

    def exchange_end(self) -> float:
        """Host seconds now; on CUDA also marks the stream where the exchange completes."""
        if self.cuda:
            self._summed = torch.cuda.Event(enable_timing=True)
            self._summed.record()
        return time.perf_counter()

    def exchange_s(self, host_s: float) -> float:
        """The last exchange's seconds: between the two events on CUDA (`host_s`, the host's
        reading, is only its launch time there), else `host_s`."""
        if self._ready is None or self._summed is None:
            return host_s
        self._summed.synchronize()  # complete by now: a later step's synchronization passed it
        seconds = self._ready.elapsed_time(self._summed) / 1000.0
        self._ready = self._summed = None
        return max(seconds, 0.0)
