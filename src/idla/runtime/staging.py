"""Data-plane tensors that must cross the host: a GPU rank's tensors on a gloo data plane.

In a mixed fleet (GPU ranks beside CPU ranks) the data plane is gloo, which reads and writes
host memory. A GPU rank's tensor is copied into a pinned host buffer, the collective runs on
that buffer, and the result is copied back to the GPU when the operation is waited for (or
found completed). The copy in waits for the tensor's producer on the GPU (one event per
operation), so a bucket leaves as soon as its gradients exist; the copy back is queued on
the current stream without blocking the host.

Cost per staged operation: one device-to-host and (for results) one host-to-device copy of
the tensor over PCIe, one event wait; pinned buffers come from torch's caching host
allocator, so steady state allocates nothing. ``IDLA_STAGE_HOST=1`` stages CPU tensors too
(through a plain host copy), which runs this path on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import torch

STAGE_ENV = "IDLA_STAGE_HOST"
"""Set to 1 to stage every data-plane tensor through a host copy (tests of this path on CPU)."""


class Work(Protocol):
    """An operation in flight: torch.distributed's ``Work``, or a `StagedWork`."""

    def wait(self, timeout: timedelta = ...) -> bool: ...

    def is_completed(self) -> bool: ...


class StagedWork:
    """A data-plane operation on a host copy; its result goes back to the device tensor once,
    when it is waited for or found completed."""

    def __init__(self, work: Work, host: torch.Tensor, target: torch.Tensor | None) -> None:
        self._work = work
        self._host = host
        self._target = target  # None: nothing comes back (a send)
        self._done = False

    def is_completed(self) -> bool:
        if not self._done and self._work.is_completed():
            self._finish(None)
        return self._done

    def wait(self, timeout: timedelta | None = None) -> bool:
        if not self._done:
            self._finish(timeout)
        return True

    def _finish(self, timeout: timedelta | None) -> None:
        if timeout is None:
            self._work.wait()
        else:
            self._work.wait(timeout)
        if self._target is not None:
            self._target.copy_(self._host.view_as(self._target), non_blocking=True)
        self._done = True


class HostStaging:
    """Runs data-plane operations either on the tensor itself or on a host copy."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.staged_ops = 0  # operations run on a host copy so far

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` itself when nothing is staged, else a contiguous host copy of it, complete
        when this returns."""
        if not self.enabled:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype,
                           pin_memory=tensor.device.type == "cuda")
        host.copy_(tensor, non_blocking=True)
        if tensor.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensor.device))
            event.synchronize()  # the copy is complete before gloo reads the buffer
        return host

    def run(
        self,
        tensor: torch.Tensor,
        start: Callable[[torch.Tensor], Work | None],
        *,
        back: bool,
        copy_in: bool = True,
    ) -> Work:
        """Start `start(t)` on `tensor` or (staged) on its host copy `t`; `back`: the result is
        copied into `tensor` on completion; `copy_in`: the host copy starts from `tensor`'s
        values (False for a receive, which overwrites them)."""
        if not self.enabled:
            return _started(start(tensor))
        self.staged_ops += 1
        host = (self.to_host(tensor) if copy_in else
                torch.empty(tensor.shape, dtype=tensor.dtype,
                            pin_memory=tensor.device.type == "cuda"))
        return StagedWork(_started(start(host)), host, tensor if back else None)


def _started(work: Work | None) -> Work:
    assert work is not None  # torch returns None only for ranks outside the group, never here
    return work
