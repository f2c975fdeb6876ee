"""Memory shared by the master and every process it forks: one anonymous
MAP_SHARED mmap, made by the master before its first fork.

How a process finds the layout, however long after the mmap was made:
every process is forked from the master, so it inherits the same mapping
and, as plain Python state, the master's index of it (`Shared.servers`:
"backend/server" -> record number) as it stood at the fork.  The master
is the only allocator: on a reload it assigns records for the new
configuration *before* forking that generation, so a new worker (or a new
control process) finds every server of its configuration in the index it
was born with.  Records never move; a removed server's record is freed
only once no process that knew it is alive.  Each record carries its
name, so a reader can tell a record from another.

The regions, in order (offsets in LAYOUT):

  HEADER     the master: high-water mark of process slots in use; FOLD_SEQ.
  PROCESS    the master: its pid, start time, reloads, generation, workers.
  PROCS      one per process slot (workers and the control process): its
             heartbeat, written by that process only; its pid, generation
             and worker number, written by the master once it has forked it.
  SERVERS    one per server record, written by the control process only once
             the record is live (the master writes it while no one else can
             see it: when it allocates or frees it): name, health state
             (up/down, consecutive results, last check status, duration and
             reason, last change), admin state (ready/drain/maint) and
             effective weight.  A sequence number, odd while a write is under
             way, lets a reader retry a torn read (a seqlock with one writer).
  SESSIONS   int32 per (server record, process slot): that process's sessions
             on that server.  Each slot has one writer, the process in it; the
             master zeroes a dead process's column before the slot is reused.
             Readers sum a server's row over the slots in use: no lock
             anywhere on the data path.

A server's `maxconn` is kept for all processes together by the kernel, not
by the mmap: the master makes a pipe holding one byte per free connection
slot (SlotPipe).  A worker takes a slot with a non-blocking one-byte read
and gives it back with a one-byte write: the kernel makes both atomic, so
the bound holds exactly with no lock and no compare-and-swap (which Python
has no way to do on shared memory), at two syscalls per session on a
limited server only.  A worker with sessions queued for a full server
watches the pipe's read end: a slot freed by any process wakes it.  Worst
case: a process killed between taking a slot and counting it loses that
one slot (the master gives back what a dead process's counts say it held),
so the bound errs on the safe side and is never exceeded.

  COUNTERS   int64 per (process slot, object, counter): traffic counters of
             every frontend, backend and server (COUNTER_FIELDS), each
             process adding to its own block only; one more block, TOTALS,
             holds what exited processes counted: the master folds a reaped
             process's block into it (under FOLD_SEQ, a seqlock readers
             retry on) and zeroes the block before the slot is given again.
             A server's object is its server record; a frontend's or a
             backend's is MAX_SERVERS + its proxy record (Shared.proxies,
             kept across reloads as server records are).  Totals never go
             back: a kept object keeps its row, and what a process counted
             outlives it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

PROC = struct.Struct("=qdII")          # pid, heartbeat (time.monotonic(): one clock for all processes),
                                       # generation, worker number (0: the control process)
BEAT = struct.Struct("=d")             # the heartbeat alone, at offset 8 of a PROC entry
# A server record: a sequence number, then what workers read on every
# choice (state, admin state, effective weight: HOT, one small read), then
# the rest.  Fields in FIELDS order after the sequence number.
SERVER = struct.Struct("=IBBH64sBHHhId96sdH")
HOT = struct.Struct("=IBBH")
SEQ = struct.Struct("=I")
FIELDS = ("state", "admin", "weight", "name", "checked", "rise", "fall", "code", "duration", "checked_at",
          "reason", "changed_at", "config_weight")
# state: UNCHECKED/UP/DOWN; admin: READY/DRAIN/MAINT; checked: 1 if the
# backend has a health_check; rise, fall: consecutive check results (capped);
# code: last HTTP status of a check; duration: of the last check, ms;
# checked_at, changed_at: time.time() of the last check, of the last state
# change; reason: the last check's status and info; config_weight: the
# configured weight the effective weight was last set from.
SERVER_STRIDE = (SERVER.size + 7) & ~7
# A reader retries a record its writer is in the middle of, this many times
# at most: a writer killed there (SIGKILL between two stores) leaves the
# sequence number odd until the next control process writes the record
# again, and no reader may spin on it meanwhile (a worker least of all).
READ_TRIES = 100
MAX_COUNT = 0xFFFF
HEADER = struct.Struct("=II")           # process slots in use: [0, high water); the fold sequence
FOLD_SEQ = 4                            # its offset: odd while the master folds a gone process's counters
PROCESS = struct.Struct("=qdIII")       # master pid, start time (time.time()), reloads, generation, workers
MAX_PROCS = 512                         # processes alive at once, all generations together (workers <= 256 each)
MAX_SERVERS = 4096                      # server records alive at once, all generations together
MAX_PROXIES = 512                       # frontend and backend records alive at once
OBJECTS = MAX_SERVERS + MAX_PROXIES     # rows of a counter block
TOTALS = MAX_PROCS                      # the counter block of processes gone

# The counters of one object, in one process's block.  Summed over the
# blocks by readers, except: GAUGES are a live process's current figure
# (dropped, not folded, when it exits) and MAXIMA are combined with max().
COUNTER_FIELDS = (
    "sessions", "bytes_in", "bytes_out", "connection_errors", "response_errors", "retries",
    "redispatches", "http_requests", "http_1xx", "http_2xx", "http_3xx", "http_4xx", "http_5xx",
    "http_other", "request_errors", "requests_denied", "internal_errors", "check_failures",
    "check_up_down", "downtime_ms", "current_sessions", "current_queue", "max_queue", "last_session")
C = type("CounterIndex", (), {name: i for i, name in enumerate(COUNTER_FIELDS)})  # C.sessions == 0 ...
NCOUNTERS = len(COUNTER_FIELDS)
GAUGES = frozenset(COUNTER_FIELDS.index(n) for n in ("current_sessions", "current_queue"))
MAXIMA = frozenset(COUNTER_FIELDS.index(n) for n in ("max_queue", "last_session"))

UNCHECKED, UP, DOWN = 0, 1, 2           # operational state (UNCHECKED: no health_check = up)
READY, DRAIN, MAINT = 0, 1, 2           # admin state
STATE_NAMES = {UNCHECKED: "UP", UP: "UP", DOWN: "DOWN"}
ADMIN_NAMES = {READY: "ready", DRAIN: "drain", MAINT: "maint"}


def _layout() -> dict[str, tuple[int, int]]:
    """region -> (offset, size): the one table every process reads the memory by."""
    sizes = {"header": HEADER.size, "process": PROCESS.size, "procs": PROC.size * MAX_PROCS,
             "servers": SERVER_STRIDE * MAX_SERVERS, "sessions": 4 * MAX_PROCS * MAX_SERVERS,
             "counters": 8 * (MAX_PROCS + 1) * OBJECTS * NCOUNTERS}
    layout, offset = {}, 0
    for name, size in sizes.items():
        layout[name] = (offset, size)
        offset += (size + 7) & ~7
    layout["end"] = (offset, 0)
    return layout


LAYOUT = _layout()
ZERO_ROW = memoryview(bytearray(4 * MAX_PROCS)).cast("i")
ZERO_COUNTERS = memoryview(bytearray(8 * NCOUNTERS)).cast("q")


class ServerState:
    """One read of a server record (a snapshot; never written back)."""

    __slots__ = FIELDS

    def __init__(self, fields):
        for name, value in zip(FIELDS, fields[1:]):
            setattr(self, name, value)
        self.name = self.name.rstrip(b"\0").decode()
        self.reason = self.reason.rstrip(b"\0").decode(errors="replace")

    @property
    def up(self) -> bool:
        return self.state != DOWN


class SharedFull(Exception):
    """No record or process slot left in the mmap."""


class SlotPipe:
    """A server's free connection slots, one byte each, in a pipe every process inherits."""

    def __init__(self, limit: int):
        self.r, self.w = os.pipe2(os.O_NONBLOCK)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, max(limit, 4096))
        except OSError:
            pass   # above fs.pipe-max-size: the slots beyond the pipe's size are not given
        self.limit = 0
        self.debt = 0      # slots to take back (the limit went down while they were in use)
        self.set_limit(limit)

    def set_limit(self, limit: int) -> None:
        """Master: a reload changed the server's maxconn."""
        if limit > self.limit:
            give = limit - self.limit
            paid = min(give, self.debt)
            self.debt -= paid
            self.give(give - paid)
        else:
            self.debt += self.limit - limit
            self.collect_debt()
        self.limit = limit

    def collect_debt(self) -> None:
        """Master: take back what a lowered limit owes, as slots come free."""
        while self.debt:
            try:
                self.debt -= len(os.read(self.r, min(self.debt, 65536)))
            except BlockingIOError:
                return

    def give(self, count: int) -> None:
        data = b"s" * count
        while data:
            try:
                data = data[os.write(self.w, data):]
            except BlockingIOError:
                return   # the pipe is full: it holds as many slots as it can

    def take(self) -> bool:
        """A worker: one slot, if one is free now."""
        try:
            return bool(os.read(self.r, 1))
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class Shared:
    def __init__(self):
        self.memory = mmap.mmap(-1, LAYOUT["end"][0])
        self.free_procs = list(range(MAX_PROCS - 1, -1, -1))
        self.free_servers = list(range(MAX_SERVERS - 1, -1, -1))
        self.servers: dict[str, int] = {}   # "backend/server" -> record (the master's index)
        self.retired: dict[str, tuple[int, int]] = {}   # removed by a reload: key -> (record, generation)
        self.slots: dict[int, SlotPipe] = {}   # record -> its maxconn slots (servers with a maxconn)
        self.sessions = memoryview(self.memory)[LAYOUT["sessions"][0]:][:LAYOUT["sessions"][1]].cast("i")
        self.counters = memoryview(self.memory)[LAYOUT["counters"][0]:][:LAYOUT["counters"][1]].cast("q")
        self.proxies: dict[str, int] = {}   # "frontend/NAME", "backend/NAME" -> proxy record
        self.retired_proxies: dict[str, tuple[int, int]] = {}
        self.free_proxy_records = list(range(MAX_PROXIES - 1, -1, -1))

    # ------------------------------------------------------------ processes
    def allocate(self, now: float) -> int:
        """Master: a process slot for a child about to be forked."""
        if not self.free_procs:
            raise SharedFull(f"more than {MAX_PROCS} processes, counting those of draining generations")
        index = self.free_procs.pop()
        PROC.pack_into(self.memory, LAYOUT["procs"][0] + index * PROC.size, 0, now, 0, 0)
        high = SEQ.unpack_from(self.memory, 0)[0]
        if index >= high:
            SEQ.pack_into(self.memory, 0, index + 1)
        return index

    def started(self, index: int, pid: int, generation: int, number: int) -> None:
        """Master, right after forking into INDEX: who is there (for the stats)."""
        offset = LAYOUT["procs"][0] + index * PROC.size
        PROC.pack_into(self.memory, offset, pid, BEAT.unpack_from(self.memory, offset + 8)[0], generation, number)

    def release(self, index: int) -> None:
        """Master: the process in INDEX is gone (reaped): its counters are
        folded into the totals, its sessions column goes back to zero, then
        the slot can be given again."""
        self._fold(index)
        for record in [*self.servers.values(), *(r for r, _ in self.retired.values())]:
            held = self.sessions[record * MAX_PROCS + index]
            self.sessions[record * MAX_PROCS + index] = 0
            if held > 0 and record in self.slots:
                self.slots[record].give(held)
        PROC.pack_into(self.memory, LAYOUT["procs"][0] + index * PROC.size, 0, 0.0, 0, 0)
        self.free_procs.append(index)

    def heartbeat(self, index: int) -> float:
        return BEAT.unpack_from(self.memory, LAYOUT["procs"][0] + index * PROC.size + 8)[0]

    def beat(self, index: int, now: float) -> None:
        BEAT.pack_into(self.memory, LAYOUT["procs"][0] + index * PROC.size + 8, now)

    def processes(self) -> list[tuple[int, int, int, int]]:
        """(slot, pid, generation, worker number or 0 for the control process)
        of every live process the master has recorded."""
        found = []
        for index in range(self.high_water()):
            pid, _, generation, number = PROC.unpack_from(self.memory, LAYOUT["procs"][0] + index * PROC.size)
            if pid:
                found.append((index, pid, generation, number))
        return found

    def write_process(self, pid: int, started: float, reloads: int, generation: int, workers: int) -> None:
        """Master: what show info and the process metrics say of it."""
        PROCESS.pack_into(self.memory, LAYOUT["process"][0], pid, started, reloads, generation, workers)

    def read_process(self) -> dict:
        pid, started, reloads, generation, workers = PROCESS.unpack_from(self.memory, LAYOUT["process"][0])
        return {"pid": pid, "started": started, "reloads": reloads, "generation": generation, "workers": workers}

    def high_water(self) -> int:
        return SEQ.unpack_from(self.memory, 0)[0]

    # ------------------------------------------------------------ counters
    def row(self, slot: int, obj: int) -> memoryview:
        """Process SLOT's counters of object OBJ (a server record, or
        proxy_object(...)), indexed by C: for that process to add to."""
        start = (slot * OBJECTS + obj) * NCOUNTERS
        return self.counters[start:start + NCOUNTERS]

    def proxy_object(self, kind: str, name: str) -> int:
        """The counter object of a frontend ("frontend") or backend ("backend")."""
        return MAX_SERVERS + self.proxies[f"{kind}/{name}"]

    def _objects_known(self) -> list[int]:
        return [*self.servers.values(), *(r for r, _ in self.retired.values()),
                *(MAX_SERVERS + r for r in self.proxies.values()),
                *(MAX_SERVERS + r for r, _ in self.retired_proxies.values())]

    def _fold(self, index: int) -> None:
        """Master: add a gone process's counters into TOTALS and zero them.
        Readers see FOLD_SEQ odd meanwhile and read again (see totals)."""
        seq = SEQ.unpack_from(self.memory, FOLD_SEQ)[0]
        SEQ.pack_into(self.memory, FOLD_SEQ, (seq + 1) & 0xFFFFFFFF)
        counters = self.counters
        for obj in self._objects_known():
            mine = (index * OBJECTS + obj) * NCOUNTERS
            total = (TOTALS * OBJECTS + obj) * NCOUNTERS
            for i in range(NCOUNTERS):
                value = counters[mine + i]
                if value:
                    if i in MAXIMA:
                        counters[total + i] = max(counters[total + i], value)
                    elif i not in GAUGES:
                        counters[total + i] += value
                    counters[mine + i] = 0
        SEQ.pack_into(self.memory, FOLD_SEQ, (seq + 2) & 0xFFFFFFFF)

    def _zero_object(self, obj: int) -> None:
        """Master: a freed object's counters, in every block (only TOTALS can
        still hold any: live processes never knew it, gone ones were folded)."""
        for block in range(MAX_PROCS + 1):
            start = (block * OBJECTS + obj) * NCOUNTERS
            if any(self.counters[start:start + NCOUNTERS]):
                self.counters[start:start + NCOUNTERS] = ZERO_COUNTERS

    def totals(self, objects: list[int]) -> list[list[int]]:
        """For each of OBJECTS, its counters summed over every process, live
        and gone (GAUGES over live ones, MAXIMA as max), in C order.  Retried
        while the master folds a gone process in, so no total is ever seen
        counted twice or not at all (a counter never seems to go back)."""
        for _ in range(READ_TRIES):
            seq = SEQ.unpack_from(self.memory, FOLD_SEQ)[0]
            if seq & 1:
                continue
            result = [self._sum(obj) for obj in objects]
            if SEQ.unpack_from(self.memory, FOLD_SEQ)[0] == seq:
                break
        return result

    def _sum(self, obj: int) -> list[int]:
        counters = self.counters
        blocks = [*range(self.high_water()), TOTALS]
        rows = [counters[(b * OBJECTS + obj) * NCOUNTERS:][:NCOUNTERS].tolist() for b in blocks]
        summed = [sum(column) for column in zip(*rows)]
        for i in MAXIMA:
            summed[i] = max(row[i] for row in rows)
        return summed

    # ------------------------------------------------------------ servers (master)
    def assign(self, limits: dict[str, int], generation: int, initial) -> None:
        """Master, before forking GENERATION: a record for each "backend/server"
        of LIMITS (key -> maxconn).  A kept server keeps its record (state,
        weight, counts, slots), even one removed by a reload and brought back
        before its record was freed; a new one gets a fresh record set by
        INITIAL(key) -> (admin, weight)."""
        for key, limit in limits.items():
            record = self.servers.get(key)
            if record is None:
                record, _ = self.retired.pop(key, (None, 0))
            if record is None:
                if not self.free_servers:
                    raise SharedFull(f"more than {MAX_SERVERS} servers, counting those of draining generations")
                record = self.free_servers.pop()
                admin, weight = initial(key)
                self._write_fresh(record, key, admin, weight)
            self.servers[key] = record
            slots = self.slots.get(record)
            if slots is not None:
                slots.set_limit(limit)   # 0: no limit from now on; the pipe stays for who still uses it
            elif limit:
                # A limit set by a reload counts the sessions opened from now on.
                self.slots[record] = SlotPipe(limit)
        for key in [k for k in self.servers if k not in limits]:
            self.retired[key] = (self.servers.pop(key), generation)

    def free_retired(self, oldest_alive: int) -> None:
        """Master: records retired when a generation newer than every live
        process came in are known to no one any more: zero them and free them."""
        for key, (record, generation) in list(self.retired.items()):
            if generation <= oldest_alive:
                del self.retired[key]
                self._write_fresh(record, "", READY, 0)
                slots = self.slots.pop(record, None)
                if slots is not None:
                    slots.close()
                start = record * MAX_PROCS
                self.sessions[start:start + MAX_PROCS] = ZERO_ROW
                self._zero_object(record)
                self.free_servers.append(record)
        for key, (record, generation) in list(self.retired_proxies.items()):
            if generation <= oldest_alive:
                del self.retired_proxies[key]
                self._zero_object(MAX_SERVERS + record)
                self.free_proxy_records.append(record)

    def assign_proxies(self, keys: list[str], generation: int) -> None:
        """Master, before forking GENERATION: a proxy record for each
        "frontend/NAME" and "backend/NAME" of KEYS (a kept one keeps its own,
        and with it its counters); the others retire as servers do."""
        for key in keys:
            record = self.proxies.get(key)
            if record is None:
                record, _ = self.retired_proxies.pop(key, (None, 0))
            if record is None:
                if not self.free_proxy_records:
                    raise SharedFull(f"more than {MAX_PROXIES} frontends and backends, counting those of "
                                     f"draining generations")
                record = self.free_proxy_records.pop()
            self.proxies[key] = record
        for key in [k for k in self.proxies if k not in keys]:
            self.retired_proxies[key] = (self.proxies.pop(key), generation)

    def collect_debts(self) -> None:
        for slots in self.slots.values():
            if slots.debt:
                slots.collect_debt()

    def _write_fresh(self, record: int, key: str, admin: int, weight: int) -> None:
        # A new server starts up, one failed check from down (HAProxy's
        # start-up state): traffic flows at once, and a dead server is
        # marked down by its first check.
        SERVER.pack_into(self.memory, self._server_offset(record), 0, UNCHECKED, admin, weight, key.encode()[:64],
                         0, 0, 0, 0, 0, 0.0, b"", time.time(), weight)

    # ------------------------------------------------------------ servers (everyone)
    def _server_offset(self, record: int) -> int:
        return LAYOUT["servers"][0] + record * SERVER_STRIDE

    def read_server(self, record: int) -> ServerState:
        """A consistent snapshot of RECORD (retried while its writer is in it)."""
        offset = self._server_offset(record)
        for _ in range(READ_TRIES):
            fields = SERVER.unpack_from(self.memory, offset)
            if fields[0] & 1 == 0 and SEQ.unpack_from(self.memory, offset)[0] == fields[0]:
                break
        return ServerState(fields)

    def write_server(self, record: int, **changes) -> None:
        """The control process (the record's one writer): change some fields."""
        offset = self._server_offset(record)
        seq, *values = SERVER.unpack_from(self.memory, offset)
        current = dict(zip(FIELDS, values))
        current.update(changes)
        if isinstance(current["reason"], str):
            current["reason"] = current["reason"].encode(errors="replace")[:96]
        seq &= ~1   # odd only if a writer was killed in the middle: this write ends it
        SEQ.pack_into(self.memory, offset, seq + 1)   # odd: a write is under way
        SERVER.pack_into(self.memory, offset, seq + 1, *(current[k] for k in FIELDS))
        SEQ.pack_into(self.memory, offset, (seq + 2) & 0xFFFFFFFF)

    def server_state(self, record: int) -> tuple[int, int, int]:
        """(operational state, admin state, weight): what a worker needs to
        choose, in one small read under the seqlock."""
        offset = self._server_offset(record)
        for _ in range(READ_TRIES):
            seq, state, admin, weight = HOT.unpack_from(self.memory, offset)
            if seq & 1 == 0 and SEQ.unpack_from(self.memory, offset)[0] == seq:
                break
        return state, admin, weight

    # ------------------------------------------------------------ sessions per server
    def add_session(self, record: int, slot: int, delta: int) -> None:
        """A process changes its own count on a server (its own cell only)."""
        self.sessions[record * MAX_PROCS + slot] += delta

    def server_sessions(self, record: int) -> int:
        """Sessions on RECORD from every process."""
        start = record * MAX_PROCS
        return sum(self.sessions[start:start + self.high_water()])
