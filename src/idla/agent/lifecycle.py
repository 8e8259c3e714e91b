"""A forgotten ``agent.close()`` is reported, not silent: `warn_unless_closed`.

`Agent.close` finishes pending sends, checks the replicas a last time and releases the process
group; a script that ends without it may lose the last sends and leaves torch.distributed to
complain about a group never destroyed. A `weakref.finalize` on the agent warns when the agent
is collected, or the interpreter exits, while it is still open; `Agent.close` detaches it
(`mark_closed`). The finalizer holds only the rank and the line that built the agent, so it
does not keep the agent alive.
"""

from __future__ import annotations

import sys
import warnings
import weakref


class AgentNotClosedWarning(UserWarning):
    """An `Agent` was collected, or the script ended, without ``agent.close()``."""


def _warn(rank: int, filename: str, lineno: int) -> None:
    warnings.warn_explicit(
        f"idla Agent on rank {rank} was never closed: call agent.close() when training ends "
        "(it finishes pending sends, checks the replicas a last time and releases the process "
        "group)",
        AgentNotClosedWarning,
        filename,
        lineno,
    )


_open: weakref.WeakKeyDictionary[object, weakref.finalize] = weakref.WeakKeyDictionary()
"""The finalizer of every agent not closed yet (weak: it does not keep an agent alive)."""


def warn_unless_closed(agent: object, rank: int, depth: int = 2) -> None:
    """Warn once when `agent` is collected or the interpreter exits, unless `mark_closed` is
    called first (by ``close``). The warning points at the line `depth` frames up, where the
    agent was built (2: the caller of ``Agent.__init__``)."""
    frame = sys._getframe(depth)
    _open[agent] = weakref.finalize(agent, _warn, rank, frame.f_code.co_filename,
                                    frame.f_lineno)


def mark_closed(agent: object) -> None:
    """No warning for `agent`: it was closed, or (an elastic generation lost to a peer's
    failure) it cannot be and a successor took over."""
    finalizer = _open.pop(agent, None)
    if finalizer is not None:
        finalizer.detach()
