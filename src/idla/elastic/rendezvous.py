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
A worker that finds itself left out (it arrived after the list was published) stops with
`ExcludedError`. If the leader dies during step 2 the others time out of step 3 with a clear
error: a second failure inside a re-form is not survived.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from idla.errors import ConfigError, IdlaError


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

    @property
    def rank(self) -> int:
        return self.members.index(self.member)

    @property
    def world_size(self) -> int:
        return len(self.members)


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
    ) -> None:
        """A founding member (`member` < `world_size`), or with `joining` a newcomer that gets
        the next free member id and waits in `join()` for the group to take it in."""
        if not 0 < heartbeat_s < dead_after_s:
            raise ConfigError("heartbeat_s must be positive and shorter than dead_after_s")
        self.spec, self.prefix = spec, prefix
        self.heartbeat_s, self.dead_after_s, self.max_wait_s = (
            heartbeat_s, dead_after_s, max_wait_s)
        # Short enough that a worker cut off from the store gives up in seconds; the wait for
        # the member list has its own, longer timeout.
        self.store = open_store(spec, dead_after_s + 7.0)
        self.joiners_seen = 0  # join requests some generation has already answered
        if joining:
            self.store.wait([self.key("world0")], timedelta(seconds=max_wait_s))
            self.world0 = int(self.store.get(self.key("world0")).decode())
            member = self.world0 + int(self.store.add(self.key("join/count"), 1)) - 1
            self.store.set(self.key(f"join/{member}"), "1")
        else:
            self.world0 = world_size
            if member == 0:
                self.store.set(self.key("world0"), str(world_size))
        self.member = member
        self.current = Membership(0, tuple(range(self.world0)), member)
        self._stop = threading.Event()
        self._beat_error: str | None = None
        self._thread = threading.Thread(target=self._beat, name="idla-heartbeat", daemon=True)
        self._thread.start()

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _beat(self) -> None:
        # A second client: the main thread's client may be blocked in a wait.
        try:
            store = open_store(self.spec, self.dead_after_s)
            while True:
                store.set(self.key(f"hb/{self.member}"), repr(time.time()))
                if self._stop.wait(self.heartbeat_s):
                    return
        except Exception as error:  # the store is gone or unreachable: stop beating
            self._beat_error = f"{type(error).__name__}: {error}"

    def pg_store(self, membership: Membership) -> dist.Store:
        """The store the new generation's process group meets in (a fresh key space)."""
        return dist.PrefixStore(self.key(f"g{membership.generation}/pg"), self.store)

    def join_pending(self) -> bool:
        """True when a newcomer has asked to join since the current generation formed."""
        return int(self.store.add(self.key("join/count"), 0)) > self.joiners_seen

    def join(self) -> Membership:
        """A newcomer's wait: until a re-formed generation lists it as a member."""
        deadline = time.monotonic() + 10 * self.max_wait_s
        while time.monotonic() < deadline:
            if self.store.check([self.key("latest")]):
                gen = int(self.store.get(self.key("latest")).decode())
                published = json.loads(self.store.get(self.key(f"g{gen}/members")))
                if self.member in published["members"]:
                    self.joiners_seen = int(published["joiners_seen"])
                    self.current = Membership(gen, tuple(published["members"]), self.member)
                    return self.current
            time.sleep(0.2)
        raise ExcludedError(f"member {self.member}: no generation took it in within "
                            f"{10 * self.max_wait_s:.0f} s")

    def next(self, step: int) -> tuple[Membership, list[int]]:
        """Agree on generation current+1; return it and the members declared dead.

        `step` (this worker's committed step) is published with its arrival, for the report.
        """
        gen = self.current.generation + 1
        base = f"g{gen}"
        self.store.set(self.key(f"{base}/alive/{self.member}"), json.dumps({"step": step}))
        if self.store.add(self.key(f"{base}/arrivals"), 1) == 1:
            joiners_seen = int(self.store.add(self.key("join/count"), 0))
            members = self._lead(base, joiners_seen)
            self.store.set(self.key(f"{base}/members"),
                           json.dumps({"members": members, "joiners_seen": joiners_seen}))
            self.store.set(self.key("latest"), str(gen))
        try:
            self.store.wait([self.key(f"{base}/members")],
                            timedelta(seconds=self.max_wait_s + self.dead_after_s))
        except Exception as error:
            raise ExcludedError(
                f"member {self.member}: no member list for generation {gen} "
                f"({type(error).__name__}: the store or the leader is unreachable)"
            ) from None
        published = json.loads(self.store.get(self.key(f"{base}/members")))
        members, self.joiners_seen = published["members"], int(published["joiners_seen"])
        if self.member not in members:
            raise ExcludedError(
                f"member {self.member} was left out of generation {gen} (members {members}): "
                "it arrived after the survivors had re-formed"
            )
        dead = [m for m in self.current.members if m not in members]
        self.current = Membership(gen, tuple(members), self.member)
        return self.current, dead

    def _lead(self, base: str, joiners_seen: int) -> list[int]:
        """Wait until every previous member has arrived or stopped beating; newcomers that
        asked to join (and still beat) are taken in."""
        newcomers = range(self.world0 + self.joiners_seen, self.world0 + joiners_seen)
        pending = {m for m in (*self.current.members, *newcomers) if m != self.member}
        arrived = {self.member}
        started = time.time()  # a member with no heartbeat yet is given dead_after_s from now
        deadline = time.monotonic() + self.max_wait_s
        while pending and time.monotonic() < deadline:
            for m in sorted(pending):
                waiting = m in newcomers and self.store.check([self.key(f"join/{m}")])
                fresh = time.time() - self._last_beat(m, started) <= self.dead_after_s
                if self.store.check([self.key(f"{base}/alive/{m}")]) or (waiting and fresh):
                    arrived.add(m)
                    pending.discard(m)
                elif not fresh:
                    pending.discard(m)  # dead: it will not be waited for
            time.sleep(0.05)
        return sorted(arrived)

    def _last_beat(self, member: int, default: float) -> float:
        key = self.key(f"hb/{member}")
        if not self.store.check([key]):
            return default
        return float(self.store.get(key).decode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.heartbeat_s)
