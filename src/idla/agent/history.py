"""What the agent keeps of a run: a bounded per-step history, and the JSON report built from it
and from the planner's state."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from idla.plan.job_planner import JobPlanner
from idla.report import diagnose_stragglers
from idla.sync.modes import advise_from_history

SERIES = ("step", "shares", "samples_per_s", "loss", "compute_s", "topology")
"""The history's series, one entry per step each (``samples_per_s`` is written a step late:
a step's throughput is known when the next one starts, or at close)."""


class StepHistory:
    """The last `max_steps` steps' shares, loss, per-rank compute seconds, topology and
    samples/s, in ring buffers: memory stays bounded however long the run.

    Args:
        max_steps: Steps kept; older ones are forgotten, oldest first.
    """

    def __init__(self, max_steps: int) -> None:
        self._series: dict[str, deque[Any]] = {key: deque(maxlen=max_steps) for key in SERIES}
        self._steps_recorded = 0  # ever, including those forgotten
        self._rates_recorded = 0

    @property
    def series(self) -> Mapping[str, deque[Any]]:
        """A read-only view of the ring buffers (``view["loss"][-1]`` is the latest loss)."""
        return MappingProxyType(self._series)

    @property
    def first_step(self) -> int | None:
        """The step of the oldest entry kept (None before the first step)."""
        steps = self._series["step"]
        return steps[0] if steps else None

    def record_step(
        self, step: int, shares: Sequence[int], loss: float, compute_s: list[float],
        topology: str,
    ) -> None:
        """One step's entry (its samples/s follows with `record_rate`)."""
        for key, value in (("step", step), ("shares", list(shares)), ("loss", loss),
                           ("compute_s", compute_s), ("topology", topology)):
            self._series[key].append(value)
        self._steps_recorded += 1

    def record_rate(self, samples_per_s: float) -> None:
        """The global samples/s of the oldest step that has none yet."""
        self._series["samples_per_s"].append(samples_per_s)
        self._rates_recorded += 1

    def as_dict(self) -> dict[str, list[Any]]:
        """Every series as a JSON-ready list, aligned by step: entry i of each belongs to
        ``step[i]``."""
        result = {key: list(values) for key, values in self._series.items()}
        first_step_index = self._steps_recorded - len(self._series["step"])
        first_rate_index = self._rates_recorded - len(self._series["samples_per_s"])
        # a rate is appended a step late, so its buffer can still hold the step before the
        # oldest one kept
        result["samples_per_s"] = result["samples_per_s"][
            max(0, first_step_index - first_rate_index):
        ]
        return result


def agent_report(
    planner: JobPlanner, history: StepHistory, *, backend: str, steps: int,
    compression: dict[str, Any], replica_check: Mapping[str, Any] | None = None,
    devices: Sequence[str] = (),
) -> dict[str, Any]:
    """The agent's JSON-ready summary of the run so far (identical on every rank);
    `replica_check`: how the replicas are checked (`idla.agent.replicas.replica_report`);
    `devices`: each rank's compute device, in rank order."""
    observer = planner.observer
    snaps = [m.snapshot() for m in observer.meters]
    series = history.as_dict()
    return {
        "world_size": planner.world_size,
        "backend": backend,
        "devices": list(devices),
        "global_batch_size": planner.global_batch_size,
        "steps": steps,
        "shares": list(planner.shares),
        "topology": planner.topology.describe(),
        "replan_steps": planner.replan_steps,
        "workers": [
            {"rank": rank, "share": planner.shares[rank], **snap,
             "own_comm_s": observer.own_comm[rank].value,
             "cpu_fraction": observer.cpu_fraction[rank].value}
            for rank, snap in enumerate(snaps)
        ],
        "stragglers": stragglers(snaps),
        "nonfinite_steps": list(planner.nonfinite_steps),
        "dropped_ranks": sorted(planner.dropped),
        "compression": compression,
        **({"replica_check": dict(replica_check)} if replica_check is not None else {}),
        "sync_advice": advise_from_history(
            series["compute_s"], [s["comm_s"] for s in snaps]).as_dict(),
        "history": series,
        "history_first_step": history.first_step,
    }


def stragglers(snaps: list[dict[str, float]]) -> list[str]:
    """Straggler diagnosis from the workers' meter snapshots."""
    return diagnose_stragglers(
        [s["compute_s"] for s in snaps], [s["comm_s"] for s in snaps],
        [s["wait_s"] for s in snaps],
    )
