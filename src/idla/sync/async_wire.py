"""The asynchronous parameter server's wire: message layouts and the server's per-worker link.

Both messages are one flat float32 tensor (tensors only on the wire, never pickle):

* push, worker → server, 4 + n values: [base_version, samples, loss_sum, flag] + gradient (n,).
  Flag GRADIENT: the gradient is the worker's mean gradient over `samples` samples, taken at the
  parameters of version `base_version`; loss_sum = mean loss × samples. Flag DONE: the worker
  has no more data; the gradient slots are ignored.
* reply, server → worker, 2 + n values: [version, flag] + parameters (n,). Flag PARAMS: train on
  these parameters of version `version`. Flag STOP: training is over; they are the final ones.

Integers travel as float32, exact up to 2**24, so versions are capped there (MAX_VERSION).
Sizes are fixed (gloo needs the receive buffer to match the message): n = the model's numel,
every parameter in `model.parameters()` order (flat_params, load_flat, flat_grad_into).

Why a thread per worker: gloo's irecv never reports is_completed() until wait() is called
(pytorch/pytorch#30723); wait(timeout) closes the whole pair when it expires ("Application
timeout caused pair closure"); get_future() is not implemented for gloo send/recv. So each
worker gets a link thread that blocks in wait() (which releases the GIL) and hands what arrives
to the server's loop through a queue; the loop waits on that queue with a short timeout, which
is its polling. A peer that dies fails only its own pair: its link thread sees "Connection
closed by peer" and reports it, the server's other pairs carry on (tests/distributed).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import nn

from idla.runtime.group import Group

PUSH_HEADER = 4  # base_version, samples, loss_sum, flag
REPLY_HEADER = 2  # version, flag
MAX_VERSION = 2**24  # float32 holds every integer up to here exactly


class PushFlag(IntEnum):
    """What a push carries."""

    GRADIENT = 0
    DONE = 1


class ReplyFlag(IntEnum):
    """What a reply tells the worker."""

    PARAMS = 0
    STOP = -1


@dataclass(frozen=True, slots=True)
class PushHeader:
    """The header of a push, decoded."""

    base_version: int
    """Version of the parameters the gradient was taken at."""
    samples: int
    """Samples the gradient averages over."""
    loss_sum: float
    """Mean loss × samples."""
    flag: PushFlag


def write_push_header(
    push: torch.Tensor,  # (4 + n,)
    base_version: int,
    samples: int,
    loss_sum: float,
    flag: PushFlag,
) -> None:
    """Fill the header slots of a push buffer in place."""
    push[:PUSH_HEADER] = torch.tensor(
        [base_version, samples, loss_sum, int(flag)], dtype=push.dtype
    )


def read_push_header(push: torch.Tensor) -> PushHeader:  # push: (4 + n,)
    base_version, samples, loss_sum, flag = push[:PUSH_HEADER].tolist()
    return PushHeader(int(base_version), int(samples), float(loss_sum), PushFlag(int(flag)))


def make_reply(version: int, flag: ReplyFlag, params: torch.Tensor) -> torch.Tensor:
    """A fresh reply (2 + n,) holding a copy of `params` (n,); the server keeps it as the copy
    of the parameters that worker was sent (DC-ASGD's w_stale). Cost: one copy of n values."""
    header = torch.tensor([version, int(flag)], dtype=params.dtype)
    return torch.cat([header, params.detach().reshape(-1)])


def read_reply_header(reply: torch.Tensor) -> tuple[int, ReplyFlag]:  # reply: (2 + n,)
    version, flag = reply[:REPLY_HEADER].tolist()
    return int(version), ReplyFlag(int(flag))


def flat_params(model: nn.Module) -> torch.Tensor:
    """All of the model's parameters as one flat float32 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float()


@torch.no_grad()
def load_flat(model: nn.Module, flat: torch.Tensor) -> None:  # flat: (n,)
    """Copy a flat vector into the model's parameters (no aliasing of `flat`)."""
    offset = 0
    for p in model.parameters():
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


@torch.no_grad()
def flat_grad_into(model: nn.Module, out: torch.Tensor) -> None:  # out: (n,)
    """Copy the model's gradients into `out`; a parameter without one contributes zeros."""
    offset = 0
    for p in model.parameters():
        part = out[offset : offset + p.numel()]
        if p.grad is None:
            part.zero_()
        else:
            part.copy_(p.grad.reshape(-1))
        offset += p.numel()


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """What a link thread hands the server: a push, or the failure of its pair."""

    rank: int
    """The worker."""
    at_s: float
    """time.monotonic() when it happened."""
    push: torch.Tensor | None
    """(4 + n,) the push; None when the link failed."""
    error: str = ""
    """Why the link failed."""


class ServerLink:
    """The server's side of one worker: a daemon thread that sends each reply it is given and,
    unless it was a stop, then receives that worker's next push into a fresh buffer.

    The thread makes every gloo call for its pair, so the server's loop never blocks on one
    worker. It ends after sending a stop, or at the first error of its pair (reported as a
    LinkEvent with push None). A silent but connected peer leaves it blocked in wait() until
    the process group's timeout; the server does not wait for it.
    """

    def __init__(self, group: Group, rank: int, numel: int, inbox: queue.Queue[LinkEvent]) -> None:
        self.rank = rank
        self._group = group
        self._numel = numel
        self._inbox = inbox
        self._outbox: queue.Queue[torch.Tensor] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"idla-link-{rank}", daemon=True)
        self._thread.start()

    def send(self, reply: torch.Tensor) -> None:
        """Queue a reply (2 + n,) for the worker; the caller must not modify it afterwards."""
        self._outbox.put(reply)

    def join(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the thread to end; True when it has."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                reply = self._outbox.get()
                self._group.control_isend(reply, self.rank).wait()
                if read_reply_header(reply)[1] is ReplyFlag.STOP:
                    return
                push = torch.empty(PUSH_HEADER + self._numel, dtype=reply.dtype)
                self._group.control_irecv(push, self.rank).wait()
                self._inbox.put(LinkEvent(self.rank, time.monotonic(), push))
        except RuntimeError as error:
            self._inbox.put(LinkEvent(self.rank, time.monotonic(), None, str(error)))
