"""Who is still in the job: heartbeats and the membership protocol that re-forms the group.

When a collective fails (a peer was killed, its link went down, it stopped answering), the
survivors do not restart: they meet in a c10d store, agree on the new member list and open a
fresh gloo group over it (`Rendezvous.next`). The store is the one torchrun already runs
(`MASTER_ADDR:MASTER_PORT`, the elastic agent's store), a file store for local workers, or a
TCP store on a "lighthouse" host in the multi-host rig. Nothing travels pickled: keys hold
JSON and counters.

Protocol for generation g+1 (all survivors come from generation g):
1. every survivor writes `g{g+1}/alive/{member}` and increments `g{g+1}/arrivals`; the first
   arrival is the leader;
2. the leader waits until each member of generation g has either arrived or is dead: its
   heartbeat (the wall-clock time a thread writes every `heartbeat_s`, even while the main
   thread is blocked in a collective) is older than `dead_after_s` (hosts' clocks must agree
   to well under that, which NTP gives);
3. the leader publishes `g{g+1}/members`; each survivor takes its index there as its new rank.
A newcomer takes the next member id, writes `join/{id}` and waits; rank 0 looks for such requests
every few steps and, when there is one, all members re-form at that step boundary (nothing in
flight) and the leader takes the newcomer in.
A member asked to leave (SIGTERM) says so in the same periodic check; all members learn it at the
same step boundary, the leaver goes, and the others re-form without waiting for it (they name
it to `next`), so a graceful leave costs no step and no heartbeat timeout.
A worker that finds itself left out (it arrived after the list was published) stops with
`ExcludedError`. If the leader dies during step 2 the others time out of step 3 with a clear
error: a second failure inside a re-form is not survived.

Every member also records its committed step (`g{g}/commit/{member}`) every `record_every_steps`
steps; with the member list the leader publishes which members held generation g's state (the
adopted state comes from one of them, `idla.elastic.adoption`) and the most steps g can have
committed: its largest record plus `record_every_steps`. Every entry is signed with the job
secret and checked on read (`idla.elastic.auth`); an entry that fails is ignored. Without a
secret, member 0 warns once that the job is open to whoever reaches the store.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from idla.elastic.auth import SECRET_ENV, SECRET_FILE_ENV, Entry, StoreAuth
from idla.errors import ConfigError, IdlaError

MAX_JOINS_PER_REFORM = 16
"""Member ids past the ones already answered that a re-form looks at: a forged jump of the
join counter costs a bounded scan (and can delay joining, never admit anyone)."""


class OpenJobWarning(UserWarning):
    """The elastic job has no secret: whoever reaches its store can join it or forge entries."""


class ExcludedError(IdlaError, RuntimeError):
    """This worker was not admitted to the re-formed group (it was late or unreachable)."""


@dataclass(frozen=True)
class Membership:
    """One generation of the group: its members (original ranks) and this worker's place."""

    generation: int
    members: tuple[int, ...]
    """Original ranks ("member ids") in the group, sorted; the new rank is the index here."""
    member: int
    """This worker's member id (its rank in generation 0)."""
    sources: tuple[int, ...] = ()
    """Members of the previous generation that are in this one (every founder in generation
    0): the only ones whose state may be adopted."""
    step_limit: int | None = None
    """The most committed steps a source may claim (0 in generation 0; None: no bound)."""

    @property
    def rank(self) -> int:
        return self.members.index(self.member)

    @property
    def world_size(self) -> int:
        return len(self.members)


def parse_member_list(value: Any) -> tuple[list[int], int, list[int], int | None] | None:
    """(members, joiners_seen, sources, step_limit) from a published member list, or None when
    it is malformed."""
    if not isinstance(value, dict):
        return None
    members, seen, sources, limit = (value.get(k) for k in (
        "members", "joiners_seen", "sources", "step_limit"))

    def count(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and item >= 0

    if not (isinstance(members, list) and isinstance(sources, list)
            and all(count(m) for m in [*members, *sources]) and count(seen)
            and (limit is None or count(limit)) and set(sources) <= set(members)):
        return None
    assert isinstance(seen, int)
    return [int(m) for m in members], seen, [int(m) for m in sources], limit


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def open_store(spec: str, timeout_s: float) -> dist.Store:
    """A client of the store named by `spec`: "file:PATH" or "tcp:HOST:PORT"."""
    kind, _, where = spec.partition(":")
    timeout = timedelta(seconds=timeout_s)
    if kind == "file" and where:
        store: dist.Store = dist.FileStore(where, -1)
        store.set_timeout(timeout)
        return store
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        if host and port.isdigit():
            return dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    raise ConfigError(f"IDLA_RENDEZVOUS={spec!r}: expected file:PATH or tcp:HOST:PORT")


def rendezvous_spec_from_env() -> str:
    """IDLA_RENDEZVOUS when set (the local launcher sets it), else torchrun's store."""
    spec = os.environ.get("IDLA_RENDEZVOUS")
    if spec:
        return spec
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        return f"tcp:{addr}:{port}"
    raise ConfigError(
        "elastic training needs a store: run under torchrun, under idla's launcher, or set "
        "IDLA_RENDEZVOUS=file:PATH | tcp:HOST:PORT"
    )


class Rendezvous:
    """Heartbeats for one worker and the membership protocol over a shared store."""

    def __init__(
        self,
        spec: str,
        member: int,
        world_size: int,
        *,
        prefix: str = "idla",
        heartbeat_s: float = 0.5,
        dead_after_s: float = 3.0,
        max_wait_s: float = 30.0,
        joining: bool = False,
        secret: bytes | None = None,
        record_every_steps: int = 5,
    ) -> None:
        """A founding member (`member` < `world_size`), or with `joining` a newcomer that gets
        the next free member id and waits in `join()` for the group to take it in. Every entry
        is signed with `secret` (the job secret) and checked against it on read."""
        if not 0 < heartbeat_s < dead_after_s:
            raise ConfigError("heartbeat_s must be positive and shorter than dead_after_s")
        if record_every_steps < 1:
            raise ConfigError("record_every_steps must be at least 1")
        self.spec, self.prefix = spec, prefix
        self.heartbeat_s, self.dead_after_s, self.max_wait_s = (
            heartbeat_s, dead_after_s, max_wait_s)
        self.record_every_steps = record_every_steps
        self.auth = StoreAuth(secret)
        if secret is None and member == 0 and not joining:
            warnings.warn(
                f"idla: this elastic job has no secret ({SECRET_ENV} or {SECRET_FILE_ENV}): "
                "anyone who can reach its store can join it and forge its membership",
                OpenJobWarning, stacklevel=3)
        # Short enough that a worker cut off from the store gives up in seconds; the wait for
        # the member list has its own, longer timeout.
        self.store = open_store(spec, dead_after_s + 7.0)
        self.joiners_seen = 0  # join requests some generation has already answered
        self.member = member
        if joining:
            world0 = self._await("world0", max_wait_s, writer=0).value
            if not isinstance(world0, int) or isinstance(world0, bool) or world0 < 1:
                raise ExcludedError(f"the store's world size {world0!r} is not valid")
            self.world0 = world0
            self.member = world0 + int(self.store.add(self.key("join/count"), 1)) - 1
            self.write_entry(f"join/{self.member}", 0, {"join": self.member})
        else:
            self.world0 = world_size
            if member == 0:
                self.write_entry("world0", 0, world_size)
        founders = tuple(range(self.world0))
        self.current = Membership(0, founders, self.member, founders, 0)
        self._stop = threading.Event()
        self._beat_error: str | None = None
        self._thread = threading.Thread(target=self._beat, name="idla-heartbeat", daemon=True)
        self._thread.start()

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def write_entry(self, name: str, counter: int, value: Any) -> None:
        """Store `value` under `name`, signed as this member's."""
        key = self.key(name)
        self.store.set(key, self.auth.seal(key, self.member, counter, value))

    def read_entry(self, name: str, writer: int | None = None) -> Entry | None:
        """The checked entry under `name` (written by `writer`, when given), or None when it is
        absent or fails the check."""
        key = self.key(name)
        if not self.store.check([key]):
            return None
        return self.auth.unseal(key, self.store.get(key), writer)

    def _await(self, name: str, timeout_s: float, writer: int | None = None) -> Entry:
        """Wait for a checked entry under `name`; an entry that fails the check is waited past.

        Raises:
            ExcludedError: None came within `timeout_s` (or the store is unreachable).
        """
        deadline = time.monotonic() + timeout_s
        try:
            self.store.wait([self.key(name)], timedelta(seconds=timeout_s))
            while True:
                entry = self.read_entry(name, writer)
                if entry is not None:
                    return entry
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        except Exception as error:
            raise ExcludedError(
                f"member {self.member}: no {name} in the store within {timeout_s:.0f} s "
                f"({type(error).__name__}: the store or the leader is unreachable)") from None
        hint = f" (is {SECRET_ENV} the job's?)" if self.auth.authenticated else ""
        raise ExcludedError(f"member {self.member}: the store's {name} is not signed with this "
                            f"job's secret{hint}")

    def _beat(self) -> None:
        # A second client: the main thread's client may be blocked in a wait.
        try:
            store = open_store(self.spec, self.dead_after_s)
            key = self.key(f"hb/{self.member}")
            beat = 0
            while True:
                store.set(key, self.auth.seal(key, self.member, beat, time.time()))
                beat += 1
                if self._stop.wait(self.heartbeat_s):
                    return
        except Exception as error:  # the store is gone or unreachable: stop beating
            self._beat_error = f"{type(error).__name__}: {error}"

    def pg_store(self, membership: Membership) -> dist.Store:
        """The store the new generation's process group meets in (a fresh key space)."""
        return dist.PrefixStore(self.key(f"g{membership.generation}/pg"), self.store)

    def _joiners_to_answer(self) -> int:
        """The join counter, at most `MAX_JOINS_PER_REFORM` past the requests answered."""
        count = int(self.store.add(self.key("join/count"), 0))
        return min(count, self.joiners_seen + MAX_JOINS_PER_REFORM)

    def join_pending(self) -> bool:
        """True when a newcomer has asked to join, with a signed request, since the current
        generation formed."""
        newcomers = range(self.world0 + self.joiners_seen,
                          self.world0 + self._joiners_to_answer())
        signed = [self.read_entry(f"join/{m}", writer=m) is not None for m in newcomers]
        return any(signed)  # every request read: each forged one is counted

    def record_commit(self, step: int) -> None:
        """Record (signed) that this member has committed `step` steps in this generation."""
        self.write_entry(f"g{self.current.generation}/commit/{self.member}",
                         self.current.generation, {"step": step})

    def _step_limit(self) -> int | None:
        """The most steps the current generation can have committed: its largest signed commit
        record plus `record_every_steps`; with no record (no step ran), the bound it started
        with."""
        gen = self.current.generation
        steps = []
        for m in self.current.members:
            entry = self.read_entry(f"g{gen}/commit/{m}", writer=m)
            value = entry.value if entry is not None else None
            if isinstance(value, dict) and isinstance(value.get("step"), int):
                steps.append(int(value["step"]))
        if not steps:
            return self.current.step_limit
        return max(steps) + self.record_every_steps

    def _published(self, gen: int) -> tuple[list[int], int, list[int], int | None] | None:
        entry = self.read_entry(f"g{gen}/members")
        return parse_member_list(entry.value) if entry is not None else None

    def join(self) -> Membership:
        """A newcomer's wait: until a re-formed generation lists it as a member."""
        deadline = time.monotonic() + 10 * self.max_wait_s
        while time.monotonic() < deadline:
            latest = self.read_entry("latest")
            gen = latest.value if latest is not None else None
            published = self._published(gen) if isinstance(gen, int) else None
            if isinstance(gen, int) and published is not None and self.member in published[0]:
                members, self.joiners_seen, sources, limit = published
                self.current = Membership(gen, tuple(members), self.member, tuple(sources),
                                          limit)
                return self.current
            time.sleep(0.2)
        raise ExcludedError(f"member {self.member}: no generation took it in within "
                            f"{10 * self.max_wait_s:.0f} s (a job with a secret admits only "
                            f"newcomers with the same {SECRET_ENV})")

    def next(self, step: int, leaving: tuple[int, ...] = ()) -> tuple[Membership, list[int]]:
        """Agree on generation current+1; return it and the members declared dead.

        `step` (this worker's committed step) is published with its arrival, for the report.
        `leaving`: members every survivor knows have left (the leader does not wait for them;
        they are not counted dead).
        """
        gen = self.current.generation + 1
        base = f"g{gen}"
        self.write_entry(f"{base}/alive/{self.member}", gen, {"step": step})
        if self.store.add(self.key(f"{base}/arrivals"), 1) == 1:
            joiners_seen = self._joiners_to_answer()
            members = self._lead(base, joiners_seen, set(leaving))
            sources = [m for m in members if m in self.current.members]
            self.write_entry(f"{base}/members", gen, {
                "members": members, "joiners_seen": joiners_seen, "sources": sources,
                "step_limit": self._step_limit()})
            self.write_entry("latest", gen, gen)
        entry = self._await(f"{base}/members", self.max_wait_s + self.dead_after_s)
        published = parse_member_list(entry.value)
        if published is None or entry.member not in self.current.members:
            raise ExcludedError(f"member {self.member}: the member list of generation {gen} "
                                f"was not written by a member of generation {gen - 1}")
        members, self.joiners_seen, sources, step_limit = published
        if self.member not in members:
            raise ExcludedError(
                f"member {self.member} was left out of generation {gen} (members {members}): "
                "it arrived after the survivors had re-formed"
            )
        dead = [m for m in self.current.members if m not in members and m not in leaving]
        self.current = Membership(gen, tuple(members), self.member, tuple(sources), step_limit)
        return self.current, dead

    def _lead(self, base: str, joiners_seen: int, leaving: set[int]) -> list[int]:
        """Wait until every previous member (but those `leaving`) has arrived or stopped
        beating; newcomers that asked to join (and still beat) are taken in."""
        newcomers = range(self.world0 + self.joiners_seen, self.world0 + joiners_seen)
        pending = {m for m in (*self.current.members, *newcomers)
                   if m != self.member and m not in leaving}
        arrived = {self.member}
        started = time.time()  # a member with no heartbeat yet is given dead_after_s from now
        deadline = time.monotonic() + self.max_wait_s
        while pending and time.monotonic() < deadline:
            for m in sorted(pending):
                waiting = m in newcomers and self.read_entry(f"join/{m}", writer=m) is not None
                fresh = time.time() - self._last_beat(m, started) <= self.dead_after_s
                if self.read_entry(f"{base}/alive/{m}", writer=m) is not None or (
                        waiting and fresh):
                    arrived.add(m)
                    pending.discard(m)
                elif not fresh:
                    pending.discard(m)  # dead: it will not be waited for
            time.sleep(0.05)
        return sorted(arrived)

    def _last_beat(self, member: int, default: float) -> float:
        entry = self.read_entry(f"hb/{member}", writer=member)
        return float(entry.value) if entry is not None and _is_number(entry.value) else default

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.heartbeat_s)
