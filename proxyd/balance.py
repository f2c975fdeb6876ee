"""Server selection: roundrobin (smooth weighted), leastconn, source, random, first.

Each worker chooses on its own, from what shared memory says now of every
server: its health (the control process's checks), its admin state and
weight (the runtime API), and for leastconn every worker's sessions on it.
Backup servers are used only when no active (non-backup) server is
usable.  A server with weight 0 gets nothing unless every usable server has
weight 0.  `tried` lets a retry go to a server not yet attempted for this
session when there is one.
"""

from __future__ import annotations

import random
import zlib

from proxyd.config import BackendConfig, ServerConfig
from proxyd.shared import DOWN, READY, C


class Server:
    """A server as one worker sees it: its config, its record in shared
    memory (health, admin state, weight, every worker's session count) and
    this worker's own count."""

    __slots__ = ("config", "name", "addresses", "weight", "current", "record", "shared", "slot", "slots",
                 "maxconn", "slot_freed", "counts", "backend_counts")

    def __init__(self, config: ServerConfig, backend: str, shared, slot: int, slot_freed, backend_counts):
        self.config = config
        self.name = config.name
        # Every address its name resolved to, in order: each new attempt on
        # this server (a retry) takes the next one.
        address = config.address
        self.addresses = address.resolved or ((address.family, address.sockaddr),)
        self.weight = config.weight   # the effective weight, as last read from shared memory
        self.current = 0    # smooth weighted round robin state
        self.shared = shared
        self.slot = slot
        self.record = shared.servers[f"{backend}/{config.name}"]
        self.maxconn = config.maxconn
        self.slots = shared.slots[self.record] if config.maxconn else None
        self.slot_freed = slot_freed   # called when this worker gives a slot back
        self.counts = shared.row(slot, self.record)   # this worker's counters for it (shared.C)
        self.backend_counts = backend_counts

    def usable(self) -> bool:
        """Up (or unchecked) and ready (not drain or maint), read from the
        record now, so a change is seen by the next choice."""
        state, admin, self.weight = self.shared.server_state(self.record)
        return state != DOWN and admin == READY

    def full(self) -> bool:
        """At its maxconn by every worker's count (taking a slot decides)."""
        return self.slots is not None and self.sessions() >= self.maxconn

    def take_slot(self) -> bool:
        """A connection slot under maxconn, from all workers' pool; then opened()."""
        return self.slots is None or self.slots.take()

    def opened(self) -> None:
        self.shared.add_session(self.record, self.slot, 1)
        self.backend_counts[C.current_sessions] += 1

    def closed(self) -> None:
        """The session let go of it: the count first, then the slot (see shared.py)."""
        self.shared.add_session(self.record, self.slot, -1)
        self.backend_counts[C.current_sessions] -= 1
        if self.slots is not None:
            self.slots.give(1)
            self.slot_freed()

    def sessions(self) -> int:
        """Its sessions from every worker."""
        return self.shared.server_sessions(self.record)


QUEUE = object()   # choose(): every usable server is at its maxconn: wait for a slot


class Balancer:
    def __init__(self, backend: BackendConfig, shared, slot: int, worker_number: int, slot_freed, counts):
        self.backend = backend
        self.servers = [Server(s, backend.name, shared, slot, slot_freed, counts)
                        for s in backend.servers]
        self.pick = getattr(self, "_" + backend.balance)
        # Each worker balances alone; starting each one's round robin further
        # along keeps workers from all sending their first connections to the
        # same server.
        if backend.balance == "roundrobin":
            for _ in range((worker_number - 1) % len(self.servers)):
                self.choose("")

    def candidates(self, tried, full=()):
        """The servers to choose from: the active ones that are up and ready
        or, if there are none, the backups; of those, the ones with a free
        slot (QUEUE if there is none: HAProxy queues rather than spill over
        to backups), preferring ones not yet tried, then weight > 0."""
        for backup in (False, True):
            pool = [s for s in self.servers if s.config.backup == backup and s.usable()]
            if not pool:
                continue
            pool = [s for s in pool if s not in full and not s.full()]
            if not pool:
                return QUEUE
            pool = [s for s in pool if s not in tried] or pool
            return [s for s in pool if s.weight > 0] or pool
        return []

    def choose(self, client_ip: str, tried=(), full=()):
        """A server, None when none is usable, or QUEUE."""
        pool = self.candidates(tried, full)
        if pool is QUEUE:
            return QUEUE
        return self.pick(pool, client_ip) if pool else None

    # --------------------------------------------------------- algorithms
    def _roundrobin(self, pool, client_ip):
        # nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a,
        # never long runs on one server.
        total = 0
        best = None
        for server in pool:
            weight = server.weight or 1
            server.current += weight
            total += weight
            if best is None or server.current > best.current:
                best = server
        best.current -= total
        return best

    def _leastconn(self, pool, client_ip):
        # Every worker's sessions count, read from shared memory.
        return min(pool, key=lambda s: (s.sessions() / (s.weight or 1), s.current)) if pool else None

    def _source(self, pool, client_ip):
        # Hash of the client address over the weighted pool: the same client
        # lands on the same server while the set of usable servers is unchanged.
        slots = [s for s in pool for _ in range(s.weight or 1)]
        return slots[zlib.crc32(client_ip.encode()) % len(slots)]

    def _random(self, pool, client_ip):
        return random.choices(pool, weights=[s.weight or 1 for s in pool])[0]

    def _first(self, pool, client_ip):
        # The first server (in config order) with a free slot: fills servers one
        # by one, so unused ones can be powered down (HAProxy's "first").
        return pool[0]
