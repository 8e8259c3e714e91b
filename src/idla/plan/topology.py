"""Who reduces and who only sends: the reduction topology of one synchronous step.

A gloo ring all-reduce advances only as fast as its slowest member in every one of its 2(N-1)
phases, so one CPU-starved worker stalls the whole collective. Workers whose communication is
much more expensive than the cheapest worker's become *leaves*: they send their weighted
gradient to a *hub* in the core ring and receive the reduced result back (two transfers, no
dependency chain), which is what "be told to send without reducing" means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Topology:
    """Ranks in the all-reduce ring and, for every other rank, the hub it sends to."""

    world_size: int  # number of ranks
    core: tuple[int, ...]  # ranks in the ring, ascending
    hub_of: dict[int, int] = field(default_factory=dict)  # leaf rank -> its hub (a core rank)

    def __post_init__(self) -> None:
        if not self.core:
            raise ValueError("a topology needs at least one core rank")
        members = set(self.core) | set(self.hub_of)
        if members != set(range(self.world_size)) or set(self.core) & set(self.hub_of):
            raise ValueError(f"topology does not partition ranks 0..{self.world_size - 1}")
        if any(hub not in self.core for hub in self.hub_of.values()):
            raise ValueError("every hub must be a core rank")

    @classmethod
    def ring(cls, world_size: int) -> Topology:
        return cls(world_size, tuple(range(world_size)))

    def leaves_of(self, hub: int) -> tuple[int, ...]:
        return tuple(sorted(leaf for leaf, h in self.hub_of.items() if h == hub))

    def describe(self) -> str:
        if not self.hub_of:
            return f"ring of {self.world_size}"
        leaves = ", ".join(f"{leaf}→{hub}" for leaf, hub in sorted(self.hub_of.items()))
        return f"ring {list(self.core)}; leaves {leaves}"


def choose_topology(
    comm_cost_s: Sequence[float], leaf_ratio: float = 2.0, previous: Topology | None = None
) -> Topology:
    """Make every rank whose cost is ≥ `leaf_ratio` × the cheapest rank's a leaf.

    The cost should be one that does not depend on the rank's role, e.g. the inverse of the CPU
    fraction a worker gets (a starved worker stalls every ring phase it takes part in).
    Hysteresis: a rank that is a leaf in `previous` returns to the ring only once its cost falls
    below 0.75 × `leaf_ratio` × the cheapest, so a cost near the threshold does not flap.

    Leaves are spread over the hubs, most expensive leaf first, each to the hub with the fewest
    leaves so far (ties: the lower rank), so the extra traffic is shared.
    Deterministic: every rank computes the same topology from the same measurements.
    """
    world_size = len(comm_cost_s)
    if world_size == 0:
        raise ValueError("no ranks")
    cheapest = min(comm_cost_s)
    was_leaf = set(previous.hub_of) if previous is not None else set()

    def threshold(rank: int) -> float:
        ratio = 0.75 * leaf_ratio if rank in was_leaf else leaf_ratio
        return ratio * max(cheapest, 1e-9)

    core = tuple(r for r in range(world_size) if comm_cost_s[r] < threshold(r))
    leaves = sorted(
        (r for r in range(world_size) if r not in core), key=lambda r: (-comm_cost_s[r], r)
    )
    load = {hub: 0 for hub in core}
    hub_of: dict[int, int] = {}
    for leaf in leaves:
        hub = min(core, key=lambda h: (load[h], h))
        hub_of[leaf] = hub
        load[hub] += 1
    return Topology(world_size, core, hub_of)
