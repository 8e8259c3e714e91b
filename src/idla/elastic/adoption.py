"""Whose state a re-formed group adopts: the most advanced credible claim, never a newcomer's.

When a group forms every rank reports a `Claim` (its committed steps, whether its parameters
and optimizer state are finite), signed with the job secret, on the control plane.
`choose_source` takes the claim with the most committed steps among the *credible* ones:

- signed (with a job secret) by the member that holds that rank in the new group;
- from a member of the previous generation (`Membership.sources`): a newcomer brings no state;
- finite: a replica with a NaN or infinite parameter or optimizer entry is never copied;
- consistent: ``0 ≤ step ≤ started ≤ step + 1``;
- within the store's record (`Membership.step_limit`): every member writes its committed step
  to the store, signed, every `record_every_steps` steps; the leader of the re-form reads the
  previous generation's records, and a claim beyond the largest one plus `record_every_steps`
  is more than that generation can have committed, so it is refused.

Every rank computes the choice from the same all-gathered claims and the same published member
list, so all choose alike. No claimed cursor is used: the data cursor follows from the adopted
step (`idla.elastic.cursor`). Cost: O(world size); nothing depends on the number claimed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from idla.errors import IdlaError


class NoCredibleStateError(IdlaError, RuntimeError):
    """No rank of a re-formed group holds a state that may be adopted."""


@dataclass(frozen=True, slots=True)
class Claim:
    """What one rank says it holds when a group forms."""

    member: int
    """Its member id."""
    step: int
    """Committed optimizer steps."""
    started: int
    """The step it was computing (step + 1 while a batch was out, else step)."""
    finite: bool
    """Every parameter, buffer and optimizer-state entry is finite."""

    def as_json(self) -> dict[str, Any]:
        return {"member": self.member, "step": self.step, "started": self.started,
                "finite": self.finite}

    @classmethod
    def from_json(cls, value: Any) -> Claim | None:
        """The claim `value` describes, or None when a field is missing or of the wrong type."""
        if not isinstance(value, dict):
            return None
        member, step, started, finite = (value.get(k) for k in (
            "member", "step", "started", "finite"))
        if not (all(isinstance(n, int) and not isinstance(n, bool) for n in (member, step, started))
                and isinstance(finite, bool)):
            return None
        assert isinstance(member, int) and isinstance(step, int) and isinstance(started, int)
        return cls(member, step, started, finite)


@dataclass(frozen=True, slots=True)
class Adoption:
    """The outcome: the rank every other copies, and what was refused."""

    source: int
    """The rank (in the new group) whose state every rank takes."""
    step: int
    """Its committed steps."""
    lost_steps: int
    """Steps some credible rank had started and none committed (their work is redone)."""
    refused: tuple[str, ...]
    """One line per claim that was refused as a source, saying why."""


def refusal(
    claim: Claim | None, member: int, sources: Collection[int], step_limit: int | None,
) -> str | None:
    """Why the claim of the rank held by `member` may not be adopted, or None if it may."""
    if claim is None:
        return f"member {member}: its claim is not signed with the job secret, or malformed"
    if claim.member != member:
        return f"member {member}: its claim names member {claim.member}"
    if member not in sources:
        return (f"member {member}: a newcomer, which brings no state (it claims {claim.step} "
                "steps)" if claim.step else None)
    if not claim.finite:
        return f"member {member}: its parameters or optimizer state are not finite"
    if not 0 <= claim.step <= claim.started <= claim.step + 1:
        return f"member {member}: inconsistent claim (step {claim.step}, started {claim.started})"
    if step_limit is not None and claim.step > step_limit:
        return (f"member {member}: claims {claim.step} committed steps, more than the "
                f"{step_limit} the store's records allow")
    return None


def choose_source(
    claims: Sequence[Claim | None],
    members: Sequence[int],
    sources: Collection[int],
    step_limit: int | None,
) -> Adoption:
    """The credible claim with the most committed steps (the lowest rank among equals).

    `claims[r]` is rank r's checked claim (None where its signature or format failed),
    `members[r]` the member id that holds rank r, `sources` the members whose state may be
    adopted, `step_limit` the most steps a credible claim may have committed (None: no bound).

    Raises:
        NoCredibleStateError: No claim is credible (the message lists why each was refused).
    """
    refused: list[str] = []
    credible: list[tuple[int, Claim]] = []
    for rank, (claim, member) in enumerate(zip(claims, members, strict=True)):
        why = refusal(claim, member, sources, step_limit)
        if why is not None:
            refused.append(why)
        elif claim is not None and member in sources:
            credible.append((rank, claim))
    if not credible:
        raise NoCredibleStateError(
            "no member of the re-formed group holds a state that may be adopted: "
            + ("; ".join(refused) or f"none of members {list(members)} was in the last group"))
    best = max(claim.step for _, claim in credible)
    source = next(rank for rank, claim in credible if claim.step == best)
    lost = max(claim.started for _, claim in credible) - best
    return Adoption(source, best, max(0, lost), tuple(refused))
