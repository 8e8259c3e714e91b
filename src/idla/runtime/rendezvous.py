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
    ) -> None:
        if not 0 < heartbeat_s < dead_after_s:
            raise ConfigError("heartbeat_s must be positive and shorter than dead_after_s")
        self.spec, self.member, self.prefix = spec, member, prefix
        self.heartbeat_s, self.dead_after_s, self.max_wait_s = (
            heartbeat_s, dead_after_s, max_wait_s)
        # Short enough that a worker cut off from the store gives up in seconds; the wait for
        # the member list has its own, longer timeout.
        self.store = open_store(spec, dead_after_s + 7.0)
        self.current = Membership(0, tuple(range(world_size)), member)
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

    def next(self, step: int) -> tuple[Membership, list[int]]:
        """Agree on generation current+1; return it and the members declared dead.

        `step` (this worker's committed step) is published with its arrival, for the report.
        """
        gen = self.current.generation + 1
        base = f"g{gen}"
        self.store.set(self.key(f"{base}/alive/{self.member}"), json.dumps({"step": step}))
        if self.store.add(self.key(f"{base}/arrivals"), 1) == 1:
            members = self._lead(base)
            self.store.set(self.key(f"{base}/members"), json.dumps(members))
        try:
            self.store.wait([self.key(f"{base}/members")],
                            timedelta(seconds=self.max_wait_s + self.dead_after_s))
        except Exception as error:
            raise ExcludedError(
                f"member {self.member}: no member list for generation {gen} "
                f"({type(error).__name__}: the store or the leader is unreachable)"
            ) from None
        members = json.loads(self.store.get(self.key(f"{base}/members")))
        if self.member not in members:
            raise ExcludedError(
                f"member {self.member} was left out of generation {gen} (members {members}): "
                "it arrived after the survivors had re-formed"
            )
        dead = [m for m in self.current.members if m not in members]
        self.current = Membership(gen, tuple(members), self.member)
        return self.current, dead

    def _lead(self, base: str) -> list[int]:
        """Wait until every previous member has arrived or stopped beating."""
        pending = {m for m in self.current.members if m != self.member}
        arrived = {self.member}
        deadline = time.monotonic() + self.max_wait_s
        while pending and time.monotonic() < deadline:
            for m in sorted(pending):
                if self.store.check([self.key(f"{base}/alive/{m}")]):
                    arrived.add(m)
                    pending.discard(m)
                elif time.time() - self._last_beat(m) > self.dead_after_s:
                    pending.discard(m)  # dead: it will not be waited for
            time.sleep(0.05)
        return sorted(arrived)

    def _last_beat(self, member: int) -> float:
        key = self.key(f"hb/{member}")
        if not self.store.check([key]):
            return 0.0
        return float(self.store.get(key).decode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.heartbeat_s)
