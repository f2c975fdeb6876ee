"""A seeded chaos workload for proxyd: many clients at once against servers
that misbehave too, every byte tagged with its session, invariants checked
after every run.

One asyncio loop in this process drives every client and every server (raw
non-blocking sockets, full duplex: a session reads while it writes), and one
or two real proxyd processes (splice, copy, or one of each) sit between
them, each with a TCP and an HTTP frontend.

Determinism: every session's plan (its target, sizes, pacing, pipelining,
its ending, and what the server does with it) is a pure function of (seed,
session index), made by `Planner`.  Servers find the plan from the session
id in the bytes they receive (TCP: the first record; HTTP: the target), so
nothing is registered anywhere.  The OS scheduling is not deterministic,
but a failing session's plan is, and `--sessions` replays just that one.

Bytes are the records of tests/tagged.py: `<sid 8 hex><U|D><offset 12
hex>:...\\n`, 64 bytes each; a received stream is checked incrementally
against the one its peer sends (`StreamCheck`), so nothing is kept in memory.

Clients (TCP) choose an ending: half-close and read the whole answer, read
the answer then close, wait for EOF, a slow reader, close without reading,
reset mid-upload or mid-download, stall past timeout_client, or say
nothing at all.  TCP servers: answer after the request, answer at once
(early), slowly, then hold the connection open, reset mid-upload or
mid-answer, or stall.  HTTP clients: 1-8 requests, pipelined or not,
Content-Length or chunked bodies, Connection: close on the last one or not,
and an ending (clean, half-close, idle until the keep-alive timeout, slow
reader, reset or stall mid-upload or mid-download).  HTTP servers per
request: Content-Length or chunked answers, 1xx (up to 16, or too many),
close-delimited answers, early answers, slow answers, resets before the
head, in the head or mid-body, a bad head, bad chunked framing, stalls
before the head and mid-body.

Invariants (Result.violations, each with the session's index and plan):

* prefix: each side received a prefix of what its own peer sent, in order,
  nothing of another session (the first wrong byte and the foreign session
  ids found are reported); HTTP: each answer carries its request's X-Sid,
  nothing follows a request on a server connection, no request reaches a
  server after an answer that ended its client connection, none twice;
* whole: what both peers were there for arrived whole (see `TcpPlan.owed_*`
  and `HttpPlan`'s expectations), HTTP answers are the ones the server's
  behaviour calls for (200 whole, 502, 504, cut), with as many 1xx;
* liveness: every session and every server connection ends within a bound
  (stalls are ended by proxyd's timeouts); no connection refused;
* no TIME_WAIT towards the servers (sampled during the run and at the end);
* every worker alive (no death, kill or respawn in the log), their number
  back to what the master was asked for, one generation left;
* fds: once the load has stopped and every session ended, for every worker
  alive then (the last generation, after all the reloads and resizes): its
  only TCP sockets are LISTEN sockets on the frontends' ports (a worker may
  hold a retired slot's listeners: Listeners.for_slot), its other non-pipe
  fds are exactly a fresh worker's (measured at start), its pipes are all
  empty (FIONREAD through /proc) and no more than the pool can hold for the
  concurrency the run had: the pool only keeps pipes that were in use at
  once, 2 per session (copy mode: no pipe beyond a fresh worker's).  The
  workers checked must have served at least 20 sessions (from the access
  log), so that the check cannot pass by having seen nothing;
* no Traceback (nor any other sign of trouble: a death, a respawn, a kill,
  a failed reload, max_draining reached) in the log;
* counters: once every session has ended, each proxy's /stats (its
  stats_bind) agrees with what its clients and servers counted, per
  frontend: sessions, bytes each way, HTTP requests and responses by status
  class, exactly where the kernel makes it exact and otherwise within what
  resets can have destroyed (check_counters).

A session that overlapped a stall of this process itself (the loop late by
more than LAG_LIMIT, e.g. a starved CI box) is excused from the "whole"
claims only, and counted; prefix and foreign checks always apply.

With --server-chaos (Options.server_chaos, off by default: the sessions
of a seed are the same either way) each backend has CHAOS_SERVERS servers
with a health check (TCP connect; HTTP `GET CHECK_PATH`) and each proxy an
admin socket, and a seeded driver (ServerDriver, its own random stream
"SEED:servers") kills servers (their listening socket closed: connects are
refused; the connections already in its backlog are accepted and served
first), brings them back on the same port, makes HTTP checks answer 503 for
a while, blips TCP servers (closed for a moment: TCP checks flap), and
issues `disable server`, `enable server`, `set server ... state
drain|maint|ready` and `set weight` on the admin sockets, keeping one
server of each backend usable nearly all the time.  More invariants:

* unavailable: no server accepts a new session (identified by its tag)
  more than GRACE seconds after the proxy that sent it logged it `is DOWN`,
  or after an admin command that made it unavailable there (disable, maint,
  drain) was answered, until it is logged `is UP` or made ready again (all
  on the wall clock: proxyd's log lines are UTC times);
* weight0: no server accepts a new session more than GRACE seconds after
  `set weight ... 0` was answered (until a weight above 0 is sent) while
  another server of its backend surely had a weight above 0 and nothing
  kept it from use in the second before (proxyd gives weight-0 servers
  sessions only when every usable server has weight 0);
* no_server: every "no server" answer proxyd logs (HTTP 503, TCP closed,
  term SC/sC) came when each server of the backend was unusable within the
  second before: dead (our record), DOWN in that proxy's log, or not ready
  after an admin command.  Only the "whole" claims of sessions whose access
  line says so, and that are so justified, are excused (counted), and those
  of sessions a dying server lost in its backlog (lost_in_backlogs: the
  evidence is all there or nothing is excused); nothing else is.

Violations of a known proxyd defect (KNOWN) are recognised after the run
(classify_known: e.g. an answer the client lost to a reset though proxyd's
access line says it relayed it whole) and reported under their own kind, so
that a long run tells them from new ones.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import datetime
import errno
import fcntl
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import struct
import sys
import termios
import time
import traceback
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from proxyd.http.errors import REASONS, builtin_page
from tests import support
from tests.http_support import http_config
from tests.support import LOCALHOST
from tests.tagged import DOWN, HEADER, RECORD, UP, foreign_records, records_in, stream

KiB, MiB = 1 << 10, 1 << 20
LINGER_RST = struct.pack("ii", 1, 0)
READ = 256 * KiB
SLOW_BUDGET = 1.0        # seconds of pauses a slow sender or reader spends at most
LAG_LIMIT = 1.0          # this loop late by more than this: sessions then are excused from "whole"
MAX_DRAINING = 4         # max_draining in the config; reloads wait while 3 generations drain
MAX_INTERIM = 16         # proxyd relays at most this many 1xx per response
HEAD_PREFIX = re.compile(rb"[0-9a-f]{0,8}|[0-9a-f]{8}U0{0,12}")  # the start of any session's stream
# The most bytes proxyd can put before a client per request beyond what the server sent:
# one of its own answers (no answer carries both a relayed head and one of these), which
# is also more than a relayed head grows by (a Connection and a framing line at most).
PAGE_MOST = max(len(builtin_page(status)) for status in REASONS)

# --server-chaos
CHAOS_SERVERS = 3        # servers per backend
CHECK_PATH = "/chaos-check"
# The HTTP check's timeout leaves room for this process's own loop lag, and is
# longer than its interval (a check still running when the next is due: the
# control process once spun on it, tests/integration/test_chaos.py).
HEALTH_CHECKS = {
    "tcp": {"interval": "250ms", "timeout": "100ms", "rise": 2, "fall": 2},
    "http": {"interval": "300ms", "timeout": "400ms", "rise": 1, "fall": 2, "http_path": CHECK_PATH},
}
GRACE = 1.0              # a server marked down or made unavailable may get new sessions this long, no longer
UP_MARGIN = 0.05         # a session may reach a server this long before the `is UP` line's time (ms stamps)
NO_SERVER_WINDOW = 1.0   # a "no server" answer is justified by a server unusable this long before it
SERVER_ACTIONS = {"die": 22, "blip": 10, "flap": 16, "disable": 10, "maint": 6, "drain": 12, "weight": 14,
                  "outage": 1}   # outage: every server of a backend dead, or in maintenance in one proxy


# ------------------------------------------------------------------ options

@dataclass(frozen=True)
class Timeouts:
    client: float = 3.0
    server: float = 3.0
    fin: float = 2.0
    connect: float = 2.0

    @property
    def longest(self) -> float:
        return max(self.client, self.server, self.fin)


@dataclass(frozen=True)
class Options:
    seed: int
    duration: float = 60.0          # seconds during which new sessions start
    mode: str = "both"              # tcp | http | both
    workers: int = 2
    splice: str = "on"              # on | off | both (two proxies side by side)
    reloads: bool = False
    resize: bool = False
    concurrency: int = 32
    max_sessions: int = 10_000_000
    profile: str = "full"           # quick | full (sizes)
    timeouts: Timeouts = Timeouts()
    sessions: tuple = ()            # replay only these session indices
    progress: float = 10.0          # seconds between progress lines, 0 = none
    half_close: bool = False        # also a TCP frontend with half_close = true (and its own servers)
    server_chaos: bool = False      # health checks, an admin socket, servers dying, checks flapping, admin commands

    def replay_command(self, sessions=()) -> str:
        args = ["scripts/chaos", "--seed", str(self.seed), "--duration", f"{self.duration:g}",
                "--mode", self.mode, "--workers", str(self.workers), "--splice", self.splice,
                "--concurrency", str(self.concurrency), "--profile", self.profile]
        if self.max_sessions < Options.max_sessions:
            args += ["--max-sessions", str(self.max_sessions)]
        if self.timeouts != Timeouts():
            t = self.timeouts
            args += ["--timeouts", f"{t.client:g},{t.server:g},{t.fin:g},{t.connect:g}"]
        if self.reloads:
            args.append("--reloads")
        if self.resize:
            args.append("--resize")
        if self.half_close:
            args.append("--half-close")
        if self.server_chaos:
            args.append("--server-chaos")
        if sessions:
            args += ["--sessions", ",".join(map(str, sorted(sessions)))]
        return " ".join(shlex.quote(a) for a in args)


# --------------------------------------------------------------- the plans

SIZES = {
    "quick": [(10, 0, 0), (25, 1, 512), (35, 512, 32 * KiB), (22, 32 * KiB, 256 * KiB), (8, 256 * KiB, 1 * MiB)],
    "full": [(8, 0, 0), (20, 1, 512), (30, 512, 32 * KiB), (25, 32 * KiB, 512 * KiB),
             (13, 512 * KiB, 4 * MiB), (4, 4 * MiB, 16 * MiB)],
}

TCP_CLIENT = {"half_close": 20, "read_close": 14, "wait_eof": 14, "slow_reader": 9, "close_early": 8,
              "reset_up": 9, "reset_down": 9, "stall": 6, "silent": 3}
TCP_SERVER = {"reply": 34, "early": 14, "slow": 12, "hold": 8, "reset_up": 10, "reset_down": 11, "stall": 8}
# Clients that wait for the whole answer; servers that deliver one.
TCP_WAITERS = {"half_close", "read_close", "wait_eof", "slow_reader"}
TCP_ANSWERERS = {"reply", "early", "slow", "hold"}
TCP_READS_FIRST = {"reply", "slow", "stall", "hold", "reset_down", "eof_reply"}  # the whole request first
# half_close = true frontends only: a server that answers at the client's EOF (it needs the FIN passed on).
TCP_SERVER_HALF_CLOSE = {**TCP_SERVER, "eof_reply": 16}

HTTP_END = {"clean": 36, "half_close": 14, "idle": 5, "slow_reader": 10, "reset_up": 8, "reset_down": 9,
            "stall_up": 8, "stall_down": 7}
HTTP_SERVER = {"ok": 52, "close": 7, "early": 8, "many_interim": 2, "reset_head": 6, "partial_head": 3,
               "bad_head": 2, "reset_body": 8, "bad_chunk": 3, "stall_head": 4, "stall_body": 3}
# What the client must see when nothing of its own doing interferes.
HTTP_EXPECT = {"ok": {"full"}, "close": {"full"}, "early": {"full"}, "many_interim": {"502"},
               "reset_head": {"502"}, "partial_head": {"502"}, "bad_head": {"502"},
               "reset_body": {"cut", "502"}, "bad_chunk": {"cut", "502"}, "stall_head": {"504"},
               "stall_body": {"cut", "504"}}
HTTP_ENDS_CONN = {"close", "many_interim", "reset_head", "partial_head", "bad_head", "reset_body", "bad_chunk",
                  "stall_head", "stall_body"}


def weighted(rng: random.Random, table: dict) -> str:
    return rng.choices(list(table), weights=list(table.values()))[0]


def pick_size(rng: random.Random, profile: str, minimum: int = 0) -> int:
    table = SIZES[profile]
    _, lo, hi = rng.choices(table, weights=[c[0] for c in table])[0]
    n = 0 if hi == 0 else int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return max(n, minimum)


@dataclass(frozen=True)
class Pace:
    """How a side sends or reads: in bursts, in random pieces, or slowly
    (small pieces with pauses, SLOW_BUDGET seconds of pauses at most)."""

    kind: str   # burst | pieces | slow
    seed: int

    def steps(self):
        """An endless sequence of (size, pause)."""
        rng = random.Random(self.seed)
        budget = SLOW_BUDGET
        while True:
            if self.kind == "burst":
                yield READ, 0.0
            elif self.kind == "pieces":
                yield rng.randint(1, 32 * KiB), 0.0
            elif budget > 0:
                # Reads of 2 KiB at least: smaller ones with pauses, into a 4 KiB
                # receive buffer, never reopen the window enough for an update and
                # leave the sender on its persist timer (200 ms and more a step).
                pause = rng.uniform(0.002, 0.03)
                budget -= pause
                yield rng.randint(2 * KiB, 16 * KiB), pause
            else:
                yield READ, 0.0


PERSIST_GRACE = 30.0      # more time for a session whose answer waits in a zero window
PERSIST_EXTENSIONS = 10


def zero_window_queue(local_port: int, remote_port: int) -> int:
    """Bytes queued in the socket 127.0.0.1:LOCAL_PORT -> :REMOTE_PORT if the
    kernel is probing its peer's zero window (the persist timer, timer
    code 4 in /proc/net/tcp), else 0."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16) == local_port
                    and int(fields[2].rsplit(":", 1)[1], 16) == remote_port):
                tx_queue = int(fields[4].split(":")[0], 16)
                return tx_queue if fields[5].startswith("04:") else 0
    return 0


def pick_pace(rng: random.Random, slow_weight: int = 15) -> Pace:
    return Pace(rng.choices(["burst", "pieces", "slow"], weights=[50, 35, slow_weight])[0], rng.getrandbits(32))


@dataclass(frozen=True)
class TcpPlan:
    index: int
    sid: int
    target: int
    up: int
    down: int
    client: str
    client_at: int
    client_pace: Pace
    read_pace: Pace
    rcvbuf: int
    server: str
    server_at: int
    server_pace: Pace
    half_close: bool = False    # through a half_close = true frontend

    mode = "tcp"

    @property
    def owed_down(self) -> bool:
        """The client must get the whole answer (then EOF unless it closed first)."""
        if self.server == "eof_reply":
            return self.client == "half_close"     # the only waiter that sends a FIN
        return self.client in TCP_WAITERS and self.server in TCP_ANSWERERS

    @property
    def owed_eof(self) -> bool:
        """half_close = true: the server must see the client's FIN after the whole request."""
        return self.half_close and self.server == "eof_reply" and self.client in ("half_close", "close_early")

    @property
    def owed_up(self) -> bool:
        """The server must get the whole request."""
        if self.server == "reset_up" or self.up == 0:
            return False
        if self.client in TCP_WAITERS:
            return True
        # A client that resets throws away what is still in flight (a reset
        # discards the receiving socket's queue, and proxyd resets the server
        # on a client reset): only one that waited for a byte of the answer,
        # which such a server sends after the whole request, is owed it.
        waited = self.client == "close_early" or (self.client == "reset_down" and self.client_at > 0)
        return waited and self.server in TCP_READS_FIRST

    @property
    def volume(self) -> int:
        return self.up + self.down

    def describe(self) -> str:
        return (f"#{self.index} sid {self.sid:08x} tcp{' half_close' if self.half_close else ''} target "
                f"{self.target}: up {self.up} down {self.down}; "
                f"client {self.client}@{self.client_at} pace {self.client_pace.kind} read {self.read_pace.kind}"
                f"{f' rcvbuf {self.rcvbuf}' if self.rcvbuf else ''}; server {self.server}@{self.server_at} "
                f"pace {self.server_pace.kind}")


@dataclass(frozen=True)
class ServerAct:
    kind: str
    down: int
    framing: str        # length | chunked | close
    interim: int        # 1xx before the final answer
    interim_first: bool  # ... sent before reading the body
    at: int             # body bytes read (early, reset_head) or sent (reset_body, bad_chunk, stall_body)
    pace: Pace
    closes: bool        # close after the answer instead of waiting for the proxy's reset
    chunk_seed: int


@dataclass(frozen=True)
class Req:
    sid: int
    k: int
    method: str
    up: int
    framing: str        # none | length | chunked
    chunk_seed: int
    close: bool         # Connection: close
    pace: Pace
    act: ServerAct

    def head(self) -> bytes:
        lines = [f"{self.method} /chaos/{self.sid:08x} HTTP/1.1", "Host: chaos.test", f"X-Sid: {self.sid:08x}"]
        if self.framing == "length":
            lines.append(f"Content-Length: {self.up}")
        elif self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        if self.close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def wire_len(self) -> int:
        n = len(self.head())
        if self.framing == "length":
            return n + self.up
        if self.framing == "chunked":
            return n + sum(len(p) if isinstance(p, bytes) else p[2] for p in chunk_layout(self.up, self.chunk_seed))
        return n

    def wire(self):
        """The request's bytes in pieces (head, then the body in its framing)."""
        yield self.head()
        if self.framing == "length":
            yield from body_pieces(self.sid, UP, 0, self.up)
        elif self.framing == "chunked":
            yield from chunked_pieces(self.sid, UP, self.up, self.chunk_seed)


@dataclass(frozen=True)
class HttpPlan:
    index: int
    target: int
    pipeline: bool
    reqs: tuple
    end: str
    end_req: int
    end_at: int         # wire offset in request end_req (up), body offset in its answer (down)
    think: tuple        # pauses before each request (not pipelined)
    read_pace: Pace
    rcvbuf: int

    mode = "http"

    @property
    def volume(self) -> int:
        return sum(r.up + r.act.down for r in self.reqs)

    def describe(self) -> str:
        reqs = "; ".join(
            f"[{r.k}] sid {r.sid:08x} {r.method} up {r.up} {r.framing}{' close' if r.close else ''} "
            f"pace {r.pace.kind} -> {r.act.kind} down {r.act.down} {r.act.framing}"
            f"{f' 1xx {r.act.interim}' if r.act.interim else ''}{f' at {r.act.at}' if r.act.at else ''}"
            f"{' closes' if r.act.closes else ''} pace {r.act.pace.kind}" for r in self.reqs)
        return (f"#{self.index} http target {self.target} {'pipelined' if self.pipeline else 'sequential'}, "
                f"end {self.end}@{self.end_req}:{self.end_at}, read {self.read_pace.kind}"
                f"{f' rcvbuf {self.rcvbuf}' if self.rcvbuf else ''}: {reqs}")


def body_pieces(sid: int, direction: bytes, start: int, end: int, size: int = READ):
    for pos in range(start, end, size):
        yield stream(sid, direction, pos, min(pos + size, end))


def chunk_layout(total: int, seed: int):
    """Chunked framing of TOTAL bytes: framing bytes, and (start, end, size)
    triples for the data, in order (at most ~2,000 chunks)."""
    rng = random.Random(seed)
    scale = max(rng.choice([64, 4 * KiB, 64 * KiB]), total // 1000 + 1)
    pos = 0
    while pos < total:
        n = min(rng.randint(1, scale), total - pos)
        ext = b";x=1" if rng.random() < 0.05 else b""
        yield b"%x%s\r\n" % (n, ext)
        yield (pos, pos + n, n)
        yield b"\r\n"
        pos += n
    yield b"0\r\n" + (b"X-Trailer: t\r\n" if rng.random() < 0.1 else b"") + b"\r\n"


def chunked_pieces(sid: int, direction: bytes, total: int, seed: int):
    for piece in chunk_layout(total, seed):
        if isinstance(piece, bytes):
            yield piece
        else:
            yield from body_pieces(sid, direction, piece[0], piece[1])


class Planner:
    """Session plans from (seed, index): the same on every run."""

    def __init__(self, options: Options, targets: list):
        self.options = options
        self.targets = targets          # [(proxy index, mode, port)]; mode tcp, http or tcp_hc
        self.cache: dict = {}

    def plan(self, index: int):
        plan = self.cache.get(index)
        if plan is None:
            if len(self.cache) > 50_000:
                self.cache.clear()
            rng = random.Random(f"{self.options.seed}:{index}")
            target = rng.randrange(len(self.targets))
            mode = self.targets[target][1]
            plan = self._http(rng, index, target) if mode == "http" else self._tcp(rng, index, target,
                                                                                   mode == "tcp_hc")
            self.cache[index] = plan
        return plan

    def by_sid(self, sid: int):
        """(plan, request number) of a session id, or (None, 0) if none has it."""
        index, k = (sid >> 4) - 1, sid & 15
        if index < 0:
            return None, 0
        plan = self.plan(index)
        if plan.mode == "tcp":
            return (plan, 0) if k == 0 else (None, 0)
        return (plan, k) if k < len(plan.reqs) else (None, 0)

    def _tcp(self, rng, index, target, half_close: bool = False) -> TcpPlan:
        profile = self.options.profile
        client = weighted(rng, TCP_CLIENT)
        server = weighted(rng, TCP_SERVER_HALF_CLOSE if half_close else TCP_SERVER)
        up = 0 if client == "silent" else pick_size(rng, profile, RECORD)
        down = pick_size(rng, profile)
        if server == "reset_down" or client == "reset_down":
            down = max(down, RECORD)
        client_at = {"reset_up": rng.randrange(up) if up else 0, "stall": rng.randrange(up + 1),
                     "reset_down": rng.randrange(down) if down else 0}.get(client, 0)
        server_at = {"reset_up": rng.randrange(up) if up else 0, "reset_down": rng.randrange(down) if down else 0
                     }.get(server, 0)
        rcvbuf = rng.choice([4 * KiB, 16 * KiB, 64 * KiB]) if client in ("slow_reader", "stall") else (
            rng.choice([8 * KiB, 32 * KiB]) if rng.random() < 0.1 else 0)
        read_pace = Pace("slow", rng.getrandbits(32)) if client == "slow_reader" else pick_pace(rng, 5)
        return TcpPlan(index, (index + 1) << 4, target, up, down, client, client_at, pick_pace(rng), read_pace,
                       rcvbuf, server, server_at, pick_pace(rng), half_close)

    def _http(self, rng, index, target) -> HttpPlan:
        profile = self.options.profile
        n = min(1 + int(rng.expovariate(0.45)), 8)
        reqs = []
        for k in range(n):
            sid = ((index + 1) << 4) | k
            has_body = rng.random() < 0.45
            up = pick_size(rng, profile) if has_body else 0
            framing = rng.choice(["length", "length", "chunked"]) if has_body else "none"
            method = "POST" if has_body else rng.choice(["GET", "GET", "DELETE"])
            kind = weighted(rng, HTTP_SERVER)
            if kind == "early" and up == 0:
                kind = "ok"
            down = pick_size(rng, profile)
            if kind in ("reset_body", "bad_chunk", "stall_body"):
                down = max(down, RECORD)
            resp_framing = {"close": "close", "bad_chunk": "chunked", "early": "length"}.get(
                kind, rng.choice(["length", "length", "chunked"]))
            interim = 0
            if kind == "many_interim":
                interim = rng.randint(MAX_INTERIM + 1, MAX_INTERIM + 4)
            elif kind == "ok" and rng.random() < 0.12:
                interim = rng.randint(1, MAX_INTERIM)
            at = 0
            if kind == "early":
                at = rng.randrange(up)
            elif kind == "reset_head":
                at = rng.randint(0, up)
            elif kind in ("reset_body", "bad_chunk", "stall_body"):
                at = rng.randrange(down)
            act = ServerAct(kind, down, resp_framing, interim, rng.random() < 0.5, at, pick_pace(rng),
                            rng.random() < 0.3, rng.getrandbits(32))
            reqs.append(Req(sid, k, method, up, framing, rng.getrandbits(32), k == n - 1 and rng.random() < 0.2,
                            pick_pace(rng), act))
        end = weighted(rng, HTTP_END)
        end_req = rng.randrange(n)
        end_at = 0
        if end in ("reset_up", "stall_up"):
            end_at = rng.randrange(reqs[end_req].wire_len())
        elif end in ("reset_down", "stall_down"):
            end_at = rng.randrange(reqs[end_req].act.down + 1)
        think = tuple(rng.uniform(0, 0.1) if rng.random() < 0.3 else 0.0 for _ in range(n))
        read_pace = Pace("slow", rng.getrandbits(32)) if end == "slow_reader" else pick_pace(rng, 5)
        rcvbuf = rng.choice([4 * KiB, 16 * KiB, 64 * KiB]) if end in ("slow_reader", "stall_down") else 0
        return HttpPlan(index, target, rng.random() < 0.4, tuple(reqs), end, end_req, end_at, think, read_pace,
                        rcvbuf)


# ------------------------------------------------------------ stream checks

class StreamCheck:
    """Bytes received, checked as they come against SID's stream in DIRECTION."""

    __slots__ = ("bad", "direction", "offset", "sid")

    def __init__(self, sid: int, direction: bytes, offset: int = 0):
        self.sid = sid
        self.direction = direction
        self.offset = offset
        self.bad = ""

    def feed(self, data) -> None:
        if not data:
            return
        if not self.bad:
            expected = stream(self.sid, self.direction, self.offset, self.offset + len(data))
            if data != expected:
                i = next(i for i in range(len(data)) if data[i] != expected[i])
                data = bytes(data)
                foreign = ", ".join(f"{s:08x}: {n} B" for s, n in sorted(foreign_records(data, self.sid).items()))
                self.bad = (f"stream {self.sid:08x}/{self.direction.decode()} wrong from offset {self.offset + i}: "
                            f"{data[i:i + 40]!r}; foreign records: {foreign or 'none found'} "
                            f"(records: {records_in(data)[:200]})")
        self.offset += len(data)


# ------------------------------------------------------------------ sockets

class Wire:
    """One non-blocking socket on the asyncio loop, with a read buffer."""

    def __init__(self, sock: socket.socket, pace: Pace | None = None):
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.end = ""           # "eof" | "reset" | "error:NAME" once the peer is done
        self.steps = pace.steps() if pace is not None and pace.kind == "slow" else None
        self.closed = False
        self.send_error = ""    # a send that failed: a reset seen by a send is not seen by recv
        # For the comparison with proxyd's counters: bytes read from the socket, bytes of
        # sends that succeeded, and of the one that failed (some of it may have gone).
        self.received = self.sent = self.unsure = 0

    async def fill(self, size: int = READ) -> bool:
        """Read more into buf; False (and self.end) at EOF or an error."""
        if self.end:
            return False
        pause = 0.0
        if self.steps is not None:
            n, pause = next(self.steps)
            size = min(size, n)
        try:
            data = await self.loop.sock_recv(self.sock, size)
        except ConnectionResetError:
            self.end = "reset"
            return False
        except OSError as e:
            self.end = f"error:{errno.errorcode.get(e.errno, e.errno)}"
            return False
        if not data:
            self.end = "eof"
            return False
        self.received += len(data)
        self.buf += data
        if pause:
            await asyncio.sleep(pause)
        return True

    async def take(self, limit: int) -> bytes:
        """Up to LIMIT bytes (at least one unless at the end: then b'').
        Reads are always whole (what is left stays in buf): a reader that
        takes a few bytes at a time must still drain the socket."""
        if not self.buf and not await self.fill():
            return b""
        data = bytes(self.buf[:limit])
        del self.buf[:limit]
        return data

    async def until(self, sep: bytes, limit: int = 65536) -> bytes | None:
        """Bytes up to and with SEP; None if the connection ends first."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                data = bytes(self.buf[:i + len(sep)])
                del self.buf[:i + len(sep)]
                return data
            if len(self.buf) > limit:
                raise ProtocolViolation(f"no {sep!r} in {len(self.buf)} B: {bytes(self.buf[:80])!r}")
            start = max(len(self.buf) - len(sep) + 1, 0)
            if not await self.fill():
                return None

    async def send(self, data) -> bool:
        try:
            await self.loop.sock_sendall(self.sock, data)
            self.sent += len(data)
            return True
        except OSError as e:
            self.unsure += len(data)
            self.send_error = self.send_error or errno.errorcode.get(e.errno, str(e.errno))
            return False

    @property
    def sent_most(self) -> int:
        """The most this side can have put on the wire."""
        return self.sent + self.unsure

    @property
    def clean_end(self) -> bool:
        """The peer's FIN came and no send met a reset: everything the peer
        wrote before it arrived here, and was read (nothing a reset destroyed)."""
        return self.end == "eof" and not self.send_error

    @property
    def ending(self) -> str:
        """How the peer ended, for messages: the reset a send took shows as EOF to recv."""
        return (self.end or "nothing") + (f" (a send got {self.send_error})" if self.send_error else "")

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            except OSError:
                pass
        self.sock.close()


class ProtocolViolation(Exception):
    """Bytes no correct peer would send."""


async def cancel(*tasks) -> None:
    """Cancel TASKS and wait until they are done.  An exception one of them
    had ended with is raised here: a protocol violation or an engine error
    found by a helper task must not vanish with it."""
    tasks = [t for t in tasks if t is not None]
    for t in tasks:
        if not t.done():
            t.cancel()
    if tasks:
        await asyncio.wait(tasks)   # our own cancellation still propagates
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()


async def paced_send(wire: Wire, pieces, pace: Pace, limit: int = -1, counter=None) -> int:
    """Send PIECES (bytes) paced by PACE, stopping after LIMIT bytes (-1: all).
    Returns the bytes sent; stops early (quietly) if the peer is gone."""
    steps = pace.steps()
    sent = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            if limit >= 0 and sent >= limit:
                return sent
            n, pause = next(steps)
            if limit >= 0:
                n = min(n, limit - sent)
            part = view[:n]
            view = view[n:]
            if not await wire.send(part):
                return sent
            sent += len(part)
            if counter is not None:
                counter[0] += len(part)
            if pause:
                await asyncio.sleep(pause)
            elif pace.kind != "burst":
                await asyncio.sleep(0)
    return sent


def parse_head(head: bytes) -> tuple[list[bytes], dict]:
    """First line parts and headers (lower-case name -> list of values) of a
    head that ends with CRLFCRLF; ProtocolViolation if malformed."""
    lines = head[:-4].split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise ProtocolViolation(f"bare CR or LF in {line!r}")
    headers: dict = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or not re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ProtocolViolation(f"malformed header line {line!r}")
        headers.setdefault(name.lower().decode(), []).append(value.strip(b" \t").decode("latin-1"))
    return lines[0].split(b" ", 2), headers


def tokens(headers: dict, name: str) -> set:
    return {t.strip().lower() for v in headers.get(name, []) for t in v.split(",") if t.strip()}


# ------------------------------------------------------------------ results

@dataclass
class Violation:
    kind: str
    index: int
    text: str
    plan: str = ""
    sid: int = -1       # the request (HTTP) or session whose bytes it is about, when one is
    port: int = 0       # the client's port (to find a TCP session's access line)
    when: tuple = ()    # (wall-clock start of the session, when this was found), for the access line

    def __str__(self) -> str:
        return f"[{self.kind}] session {self.index}: {self.text}" + (f"\n      plan: {self.plan}" if self.plan else "")

    @property
    def signature(self) -> str:
        """The violation with its numbers and ids left out: one per kind of defect."""
        text = self.text.split(":", 1)[0] if self.kind == "engine" else self.text
        text = re.sub(r"\b(?=[0-9a-f]*[a-f])[0-9a-f]{8}\b", "SID", text)   # session ids (with a letter in them)
        text = re.sub(r"\d+", "N", text)
        return f"{self.kind}: {text[:110]}"


@dataclass
class Result:
    options: Options
    stats: collections.Counter = field(default_factory=collections.Counter)
    violations: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    wall: float = 0.0
    logs: list = field(default_factory=list)
    counters: list = field(default_factory=list)    # check_counters' figures, a line per frontend

    @property
    def failed_sessions(self) -> set:
        return {v.index for v in self.violations if v.index >= 0}

    def summary(self) -> str:
        s = self.stats
        o = self.options
        lines = [
            (f"chaos seed {o.seed}: mode {o.mode}, {o.workers} workers, splice {o.splice}"
             f"{', reloads' if o.reloads else ''}{', resize' if o.resize else ''}"
             f"{', server chaos' if o.server_chaos else ''}, concurrency {o.concurrency}, "
             f"profile {o.profile}, load {o.duration:g}s, wall {self.wall:.1f}s"),
            (f"  sessions {s['sessions']} (tcp {s['tcp']}, http connections {s['http']} with {s['requests']} "
             f"requests), peak concurrency {s['peak']}"),
            (f"  bytes: clients sent {fmt_bytes(s['bytes_client_sent'])}, servers received "
             f"{fmt_bytes(s['bytes_server_got'])}, servers sent {fmt_bytes(s['bytes_server_sent'])}, clients received "
             f"{fmt_bytes(s['bytes_client_got'])}"),
            (f"  claims checked: {s['claims']}, excused (this process stalled > {LAG_LIMIT:g}s): {s['excused']}, "
             f"max loop lag {s['max_lag_ms'] / 1000:.2f}s; sessions given {PERSIST_GRACE:g}s more while the "
             f"kernel probed their zero window: {s['persist_extensions']}"),
            (f"  reloads {s['reloads']} (deferred {s['reloads_deferred']}), TTIN {s['ttin']}, TTOU {s['ttou']}; "
             f"TIME_WAIT samples {s['tw_samples']}"),
            "  tcp endings: " + ", ".join(f"{k} {v}" for k, v in sorted(s.items()) if k.startswith("tcp_c_")),
            "  tcp servers: " + ", ".join(f"{k} {v}" for k, v in sorted(s.items()) if k.startswith("tcp_s_")),
            "  http endings: " + ", ".join(f"{k} {v}" for k, v in sorted(s.items()) if k.startswith("http_e_")),
            "  http servers: " + ", ".join(f"{k} {v}" for k, v in sorted(s.items()) if k.startswith("http_s_")),
            "  http outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(s.items()) if k.startswith("http_o_")),
        ]
        lines += [f"  counters: proxyd vs workload: {line}" for line in self.counters]
        if o.server_chaos:
            lines += [
                (f"  server chaos: deaths {s['sc_die']}, blips {s['sc_blip']}, check flaps {s['sc_flap']}, "
                 f"disable {s['sc_disable']}, maint {s['sc_maint']}, drain {s['sc_drain']}, set weight "
                 f"{s['sc_weight']} ({s['sc_admin_commands']} admin commands), outages {s['sc_outage']}, last server taken "
                 f"{s['sc_last_server']}, skipped {s['sc_skipped']}; backlog connections served by dying servers "
                 f"{s['sc_backlog_served']}; HTTP checks answered {s['checks_http']} ({s['checks_http_503']} 503)"),
                (f"  proxyd logged DOWN {s['sc_logged_down']}, UP {s['sc_logged_up']}; accepts checked "
                 f"{s['sc_accepts']} against {s['sc_windows']} unavailability windows (excused, our loop late: "
                 f"{s['sc_unavailable_lag_excused']}); no-server answers {s['sc_no_server']} (justified "
                 f"{s['sc_no_server_justified']}), whole claims excused {s['sc_claims_excused']} (of sessions lost in "
                 f"a dying server's backlog: {s['sc_backlog_lost']}); rebinds that "
                 f"failed {s['sc_rebind_failed']}; accepts at "
                 f"weight 0 {s['sc_weight0_accepts']}"),
            ]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  violations: {len(self.violations)}")
        signatures = collections.Counter(v.signature for v in self.violations)
        if len(signatures) > 1 or len(self.violations) > 3:
            lines.append("  by kind:")
            lines += [f"    {n:6d}  {sig}" for sig, n in signatures.most_common(30)]
        for v in self.violations[:40]:
            lines.append(f"    {v}")
        if len(self.violations) > 40:
            lines.append(f"    ... and {len(self.violations) - 40} more")
        if self.violations:
            lines.append(f"  FAILED: seed {o.seed}; replay: {o.replay_command()}")
            failed = self.failed_sessions
            if failed:
                lines.append(f"  the failing sessions alone: {o.replay_command(sorted(failed)[:20])}")
            for log in self.logs:
                lines.append(f"  proxyd log: {log}")
        return "\n".join(lines)


def status_class(status: int) -> str:
    """The class proxyd's http_responses_total counts STATUS under."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------ the engine

@dataclass
class HttpClientInfo:
    interrupted: bool = False       # the client reset or stalled
    whole: set = field(default_factory=set)     # requests whose answer came whole
    closed_after: int | None = None  # the answer that said the connection ends after it (Connection: close,
                                     # close-delimited, an error page): no later request may reach a server


@dataclass
class HttpServerReq:
    index: int
    k: int
    body: int
    complete: bool
    excused: bool


class Engine:
    def __init__(self, options: Options, targets: list, say=print):
        self.options = options
        self.targets = targets
        self.planner = Planner(options, targets)
        self.say = say
        self.t = options.timeouts
        self.stats = collections.Counter()
        self.violations: list[Violation] = []
        self.lags: list[tuple[float, float]] = []
        self.server_tasks: set = set()
        self.server_sids: dict = {}            # sid -> times seen by a server (pruned with the sessions)
        self.http_clients: dict = {}           # index -> HttpClientInfo, once that client is done
        self.http_pending: dict = {}           # index -> [HttpServerReq] waiting for their client's info
        self.running = 0
        self.server_open = 0
        self.peak_pool = 0                     # peak of sessions + server connections in flight
        self._started: dict = {}               # index -> start time, of the sessions running
        self._ports: dict = {}                 # index -> client port, of the sessions running
        self._wall: dict = {}                  # index -> wall-clock start, of the sessions running
        self.stopping = False
        # --server-chaos: accepts of tagged sessions, (proxy index, server key) -> (wall times, sids);
        # the loop's late ticks (wall time, seconds late); TCP sessions (index, client port, wall start, end)
        self.accepts: dict = {}
        self.late_ticks: list = []
        self.tcp_sessions = (array("q"), array("q"), array("d"), array("d"))
        # What clients and servers counted, for proxyd's counters (check_counters): per
        # target (index in targets), and what no session can be told of, per listener mode.
        self.counted: dict = collections.defaultdict(collections.Counter)
        self.unattributed = collections.Counter()
        self.flows: dict = {}                  # ("tcp", sid) | ("http", index) -> the sides reported so far
        self.head_growth = 0                   # the most proxyd added to a request head on its way

    # ------------------------------------------------------------ bookkeeping
    def violation(self, kind: str, index: int, text: str, plan=None, sid: int = -1) -> None:
        if plan is None and index >= 0:
            try:
                plan = self.planner.plan(index)
            except Exception:  # noqa: BLE001 -- a plan that cannot be made: the violation still counts
                plan = None
        self.violations.append(Violation(kind, index, text, plan.describe() if plan is not None else "", sid,
                                         self._ports.get(index, 0), (self._wall.get(index, 0.0), time.time())))
        # With --server-chaos a failed "whole" claim is judged after the run, against the access log.
        if len(self.violations) <= 5 and not (self.options.server_chaos and kind == "whole"):
            self.say(f"  VIOLATION {self.violations[-1]}")

    def excused(self, since: float) -> bool:
        return any(end > since for _, end in self.lags)

    def claim(self, ok: bool, since: float, kind: str, index: int, text: str, sid: int = -1) -> None:
        """A "whole" claim: a violation unless this process stalled meanwhile."""
        self.stats["claims"] += 1
        if ok:
            return
        if self.excused(since):
            self.stats["excused"] += 1
            return
        self.violation(kind, index, text, sid=sid)

    def bound(self, plan) -> float:
        """The longest a session of PLAN may take, whatever happens."""
        extra = len(plan.reqs) * 2 * self.t.longest if plan.mode == "http" else 0
        return 30 + 4 * self.t.longest + extra + plan.volume / (256 * KiB)

    def server_bound(self) -> float:
        return 30 + 4 * self.t.longest + 16 * MiB / (256 * KiB)

    def _track_peak(self) -> None:
        self.peak_pool = max(self.peak_pool, self.running + self.server_open)
        self.stats["peak"] = max(self.stats["peak"], self.running)

    # ------------------------------------------------------------ what proxyd's counters must say
    def flow_side(self, key: tuple, plan, side: str, figures: tuple) -> None:
        """One side of a TCP session (KEY ("tcp", sid)) or of an HTTP client
        connection (("http", index)) is done.  The client: (at most sent,
        received, ended clean[, final answers seen, interrupted]); a server
        connection: tcp (received, at most sent, ended clean), http (request
        k, received, the whole request read, at most sent).  A TCP session is
        settled once both sides are in; an HTTP connection once its client is
        done and its servers surely are (prune), or at the end."""
        flow = self.flows.get(key)
        if flow is None:
            flow = self.flows[key] = {"plan": plan, "servers": [], "client": None, "done": 0.0}
        if side == "client":
            flow["client"], flow["done"] = figures, time.monotonic()
        else:
            flow["servers"].append(figures)
        if key[0] == "tcp" and flow["client"] is not None and flow["servers"]:
            self._settle(key)

    def _settle(self, key: tuple) -> None:
        """Add a finished session's figures to counted[its target]:
        client_got and server_got (bytes the clients and servers read),
        and the slack, in each direction, of what a reset may have destroyed
        after proxyd delivered it (see check_counters)."""
        flow = self.flows.pop(key)
        plan, servers = flow["plan"], flow["servers"]
        c = self.counted[plan.target]
        client = flow["client"] or (0, 0, False, 0, True)
        c_sent, c_got, c_clean = client[:3]
        s_got = sum(s[1 if key[0] == "http" else 0] for s in servers)
        c["client_got"] += c_got
        c["server_got"] += s_got
        if key[0] == "tcp":
            s_sent = sum(s[1] for s in servers)
            if not (servers and all(s[2] for s in servers)):
                c["slack_in"] += max(0, c_sent - s_got)
            if not c_clean:
                c["slack_out"] += max(0, s_sent - c_got)
            return
        offset = started = 0
        for k, req in enumerate(plan.reqs):
            n = req.wire_len()
            mine = min(max(c_sent - offset, 0), n)     # the client's bytes of request k, at most
            offset += n
            if not mine:
                break
            started += 1
            got = [s for s in servers if s[0] == k]
            if not any(s[2] for s in got):
                c["slack_in"] += max(0, mine + self.head_growth - sum(s[1] for s in got))
        if not c_clean:
            c["slack_out"] += max(0, sum(s[3] for s in servers) + PAGE_MOST * started - c_got)
        if client[4]:
            c["unseen"] += max(0, started - client[3])

    def settle_flows(self, older_than: float = 0.0) -> None:
        """Settle what is left whose client was done more than OLDER_THAN
        seconds ago (longer than any server connection lasts: HTTP
        connections, TCP sessions no server saw); 0: everything."""
        now = time.monotonic()
        for key in [k for k, f in self.flows.items()
                    if not older_than or (f["client"] is not None and now - f["done"] > older_than)]:
            self._settle(key)

    # ------------------------------------------------------------ servers
    async def serve(self, lsock: socket.socket, mode: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self.violation("engine", -1, f"server accept: {e}")
                    await asyncio.sleep(0.1)
                    continue
                return
            self.server_conn(sock, mode)

    def server_conn(self, sock: socket.socket, mode: str, server=None) -> None:
        """Serve an accepted connection (a task of its own); SERVER (a
        ChaosServer, with --server-chaos) is told each session it accepts."""
        at = time.time()
        sock.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._server_conn(sock, mode, server, at))
        self.server_tasks.add(task)
        task.add_done_callback(self.server_tasks.discard)

    async def _server_conn(self, sock: socket.socket, mode: str, server=None, at: float = 0.0) -> None:
        wire = Wire(sock)
        self.server_open += 1
        self._track_peak()
        started = time.monotonic()
        try:
            handler = self._tcp_server if mode == "tcp" else self._http_server
            await asyncio.wait_for(handler(wire, started, server, at), self.server_bound())
        except TimeoutError:
            self.violation("liveness", -1, f"a {mode} server connection still open after {self.server_bound():.0f}s: "
                                           f"the proxy never closed it ({len(wire.buf)} B buffered)")
        except ProtocolViolation as e:
            self.violation("protocol", -1, f"{mode} server: {e}")
        except Exception:  # noqa: BLE001 -- an engine error is reported as a violation, the run goes on
            self.violation("engine", -1, f"{mode} server: {traceback.format_exc()}")
        else:
            wire.close()
        finally:
            self.server_open -= 1
            wire.close(reset=True)   # only if still open: after a timeout or an error

    def _accepted(self, server, plan, sid: int, at: float) -> None:
        """--server-chaos: SERVER accepted session SID (of PLAN) at AT (wall clock)."""
        if server is None:
            return
        times, sids = self.accepts.setdefault((self.targets[plan.target][0], server.key), (array("d"), array("q")))
        times.append(at)
        sids.append(sid)

    async def _check_answer(self, wire: Wire, server) -> None:
        """An HTTP health check: 200, or 503 while the server's check flaps;
        then wait for the proxy to close (it resets: no TIME_WAIT either side)."""
        self.stats["checks_http"] += 1
        if server.flapping:
            self.stats["checks_http_503"] += 1
        status = b"503 Service Unavailable" if server.flapping else b"200 OK"
        if await wire.send(b"HTTP/1.1 %s\r\nContent-Length: 0\r\n\r\n" % status):
            await self._drain_until_closed(wire, None, f"health check of {server.key} (after its answer)")

    def _seen_sid(self, sid: int, index: int) -> None:
        n = self.server_sids.get(sid, 0) + 1
        self.server_sids[sid] = n
        if n > 1:
            self.violation("duplicate", index, f"session id {sid:08x} reached a server {n} times")

    async def _drain_until_closed(self, wire: Wire, check: StreamCheck | None = None, what: str = "",
                                  index: int = -1) -> int:
        """Read until the proxy closes (EOF or reset); what comes is checked
        against CHECK, or must be nothing at all. Returns the bytes read."""
        got = 0
        while True:
            data = await wire.take(READ)
            if not data:
                return got
            got += len(data)
            if check is not None:
                check.feed(data)
            elif got == len(data):
                self.violation("prefix", index, f"{what}: {len(data)} unexpected bytes {data[:60]!r}; "
                                                f"records: {records_in(data)}")

    async def _tcp_server(self, wire: Wire, started: float, server=None, at: float = 0.0) -> None:
        # Learn the session id from the first record.
        while len(wire.buf) < 22:
            if not await wire.fill():
                data = bytes(wire.buf)
                if not HEAD_PREFIX.fullmatch(data):
                    self.violation("prefix", -1, f"tcp server: {len(data)} B that start no session's stream: "
                                                 f"{data!r}")
                self.stats["tcp_server_anonymous"] += 1
                self.unattributed["tcp"] += wire.received
                return
        m = HEADER.match(wire.buf)
        sid = int(m[1], 16) if m else -1
        plan, _ = self.planner.by_sid(sid) if m else (None, 0)
        if not m or m[2] != b"U" or int(m[3], 16) != 0 or plan is None or plan.mode != "tcp":
            data = bytes(wire.buf[:200])
            self.violation("prefix", plan.index if plan is not None else -1,
                           f"tcp server: the first bytes are not the start of a tcp session's stream: {data[:64]!r}; "
                           f"records: {records_in(data)}")
            self.unattributed["tcp"] += wire.received
            return
        self._seen_sid(sid, plan.index)
        self._accepted(server, plan, sid, at)
        check = StreamCheck(sid, UP)
        check.feed(bytes(wire.buf))
        wire.buf.clear()
        sent = [0]
        index = plan.index

        async def read_up(limit: int) -> None:
            while check.offset < limit:
                data = await wire.take(limit - check.offset)
                if not data:
                    return
                check.feed(data)

        async def answer(limit: int) -> None:
            await paced_send(wire, body_pieces(sid, DOWN, 0, plan.down), plan.server_pace, limit, sent)

        try:
            kind = plan.server
            if kind == "early":
                tx = asyncio.get_running_loop().create_task(answer(-1))
                try:
                    await read_up(plan.up)
                    await tx
                finally:
                    await cancel(tx)
            elif kind == "reset_up":
                await read_up(plan.server_at)
            elif kind == "eof_reply":
                await read_up(plan.up)
                await self._drain_until_closed(wire, check)   # until the client's FIN, passed on
                if plan.owed_eof:
                    self.claim(wire.end == "eof" and check.offset == plan.up, started, "whole", index,
                               f"tcp server (half_close = true) got {check.offset} of {plan.up} B, then "
                               f"{wire.ending}: the client's FIN should have followed them")
                if wire.end == "eof":
                    await answer(-1)
            else:
                await read_up(plan.up)
                if check.offset >= plan.up:
                    if kind in ("reply", "slow", "hold"):
                        await answer(-1)
                    elif kind == "reset_down":
                        await answer(plan.server_at)
            if kind in ("stall", "hold") or (check.offset < plan.up and kind != "reset_up"):
                # Wait for the proxy to end it (timeouts, the client gone); what
                # still comes is checked.  Otherwise we close first, plainly.
                await self._drain_until_closed(wire, check)
        finally:
            reset = plan.server in ("reset_up", "reset_down")
            check.feed(bytes(wire.buf))   # read past a limit: still checked (and counted)
            wire.buf.clear()
            self.stats["bytes_server_got"] += check.offset
            self.stats["bytes_server_sent"] += sent[0]
            self.flow_side(("tcp", sid), plan, "server", (wire.received, wire.sent_most, wire.clean_end))
            if check.bad:
                self.violation("prefix", index, f"tcp server side: {check.bad}")
            if check.offset > plan.up:
                self.violation("prefix", index, f"tcp server got {check.offset} B, more than the {plan.up} sent")
            if plan.owed_up:
                self.claim(check.offset == plan.up, started, "whole", index,
                           f"tcp server got {check.offset} of {plan.up} B (ended: {wire.ending})")
            wire.close(reset=reset)

    async def _http_server(self, wire: Wire, started: float, server=None, at: float = 0.0) -> None:
        head = await wire.until(b"\r\n\r\n")
        if head is None:
            if wire.buf:
                self.violation("protocol", -1, f"http server: connection ended inside a request head: "
                                               f"{bytes(wire.buf[:100])!r}")
            self.stats["http_server_no_request"] += 1
            self.unattributed["http"] += wire.received
            return
        (first, headers) = parse_head(head)
        if len(first) != 3 or first[2] != b"HTTP/1.1":
            raise ProtocolViolation(f"request line {head[:100]!r}")
        if server is not None and first[1] == CHECK_PATH.encode() and first[0] == b"GET":
            return await self._check_answer(wire, server)
        m = re.fullmatch(rb"/chaos/([0-9a-f]{8})", first[1])
        plan, k = self.planner.by_sid(int(m[1], 16)) if m else (None, 0)
        if plan is None or plan.mode != "http":
            self.violation("prefix", -1, f"http server: a request of no http session: {head[:200]!r}")
            self.unattributed["http"] += wire.received
            return
        req = plan.reqs[k]
        index, sid = plan.index, req.sid
        self._seen_sid(sid, index)
        self._accepted(server, plan, sid, at)
        act = req.act
        problems = []
        if first[0].decode() != req.method:
            problems.append(f"method {first[0]!r}, sent {req.method}")
        if headers.get("x-sid") != [f"{sid:08x}"]:
            problems.append(f"X-Sid {headers.get('x-sid')}")
        if "close" not in tokens(headers, "connection"):
            problems.append("no Connection: close towards the server")
        if not headers.get("x-forwarded-for"):
            problems.append("no X-Forwarded-For")
        chunked = "chunked" in tokens(headers, "transfer-encoding")
        length = headers.get("content-length")
        if req.framing == "chunked" and not chunked:
            problems.append(f"chunked body sent, framing {length} arrived")
        if req.framing == "length" and length != [str(req.up)]:
            problems.append(f"Content-Length {length}, sent {req.up}")
        if req.framing == "none" and (chunked or (length and length != ["0"])):
            problems.append(f"framing without a body: {length} chunked={chunked}")
        if problems:
            self.violation("protocol", index, f"request {k} head at the server: {'; '.join(problems)}: {head!r}")
        check = StreamCheck(sid, UP)
        body = BodyReader(wire, check, chunked, req.up if not chunked else -1)
        sent = [0]
        record = HttpServerReq(index, k, 0, False, False)
        try:
            await self._http_act(wire, req, act, body, sent)
        finally:
            self.stats["bytes_server_got"] += check.offset
            self.stats["bytes_server_sent"] += sent[0]
            if check.bad:
                self.violation("prefix", index, f"request {k} body at the server: {check.bad}")
            if check.offset > req.up:
                self.violation("prefix", index, f"request {k}: server got {check.offset} body bytes of {req.up}")
            record.body, record.complete = check.offset, body.done
            record.excused = self.excused(started)
            self.head_growth = max(self.head_growth, len(head) - len(req.head()))
            self.flow_side(("http", index), plan, "server",
                           (k, wire.received, body.done and check.offset == req.up, wire.sent_most))
            self._http_server_done(record)

    async def _http_act(self, wire: Wire, req: Req, act: ServerAct, body: BodyReader, sent: list) -> None:
        kind = act.kind
        sid = req.sid

        async def send(data) -> bool:
            ok = await wire.send(data)
            if ok:
                sent[0] += len(data)
            return ok

        async def interims(n: int) -> bool:
            for i in range(n):
                line = (b"HTTP/1.1 100 Continue\r\n\r\n" if i % 3 == 0 else
                        b"HTTP/1.1 103 Early Hints\r\nLink: </c%d.css>; rel=preload\r\n\r\n" % i)
                if not await send(line):
                    return False
            return True

        if act.interim and act.interim_first and not await interims(act.interim):
            return
        if kind == "early":
            await body.read(act.at)
        elif kind == "reset_head":
            await body.read(act.at if act.at < req.up else -1)   # at == up: the whole body, framing included
            return wire.close(reset=True)
        else:
            await body.read()
            if not body.done:
                return   # the proxy ended it (what is left in the buffer is framing cut short)
        if act.interim and not act.interim_first and not await interims(act.interim):
            return
        if kind == "many_interim":
            return await self._drain_until_closed(wire, None, f"request {req.k} (too many 1xx)", (sid >> 4) - 1)
        if kind == "stall_head":
            return await self._drain_until_closed(wire, None, f"request {req.k} (stalled)", (sid >> 4) - 1)
        if kind == "partial_head":
            await send(b"HTTP/1.1 200 OK\r\nX-Sid: %08x\r\nContent-Le" % sid)
            return wire.close(reset=True)
        if kind == "bad_head":
            await send(b"HTTP/1.1 200 OK\r\nX-Sid: %08x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello" % sid)
            return await self._drain_until_closed(wire, None, f"request {req.k} (bad head)", (sid >> 4) - 1)
        head = [b"HTTP/1.1 200 OK", b"X-Sid: %08x" % sid]
        if act.framing == "length":
            head.append(b"Content-Length: %d" % act.down)
            pieces = body_pieces(sid, DOWN, 0, act.down)
        elif act.framing == "chunked":
            head.append(b"Transfer-Encoding: chunked")
            pieces = chunked_pieces(sid, DOWN, act.down, act.chunk_seed)
        else:
            head.append(b"Connection: close")
            pieces = body_pieces(sid, DOWN, 0, act.down)
        if not await send(b"\r\n".join(head) + b"\r\n\r\n"):
            return
        counted = [0]
        if kind in ("reset_body", "stall_body", "bad_chunk"):
            # Cut after `at` body bytes (framing bytes aside for chunked).
            limit = act.at
            if act.framing == "chunked":
                limit = chunked_wire_offset(act.down, act.chunk_seed, act.at, kind == "bad_chunk")
            await paced_send(wire, pieces, act.pace, limit, counted)
            sent[0] += counted[0]
            if kind == "reset_body":
                return wire.close(reset=True)
            if kind == "bad_chunk":
                await send(b"zz\r\n")   # where a chunk size line must be
            return await self._drain_until_closed(wire, None, f"request {req.k} (cut answer)", (sid >> 4) - 1)
        await paced_send(wire, pieces, act.pace, -1, counted)
        sent[0] += counted[0]
        if kind == "early":
            # The rest of the body may come or not: whatever comes is checked.
            await body.read()
            if body.done:
                await self._drain_until_closed(wire, None, f"request {req.k} (after the body)", (sid >> 4) - 1)
            return
        if act.framing == "close" or act.closes:
            return  # we close first (a plain close: the TIME_WAIT is ours)
        await self._drain_until_closed(wire, None, f"request {req.k} (after the answer)", (sid >> 4) - 1)

    def _http_server_done(self, record: HttpServerReq) -> None:
        info = self.http_clients.get(record.index)
        if info is None:
            self.http_pending.setdefault(record.index, []).append(record)
        else:
            self._judge_server_req(record, info)

    def _judge_server_req(self, record: HttpServerReq, info: HttpClientInfo) -> None:
        plan = self.planner.plan(record.index)
        req = plan.reqs[record.k]
        if info.closed_after is not None and record.k > info.closed_after:
            self.violation("order", record.index, f"request {record.k} reached a server after answer "
                                                  f"{info.closed_after} ended the client connection")
            return
        act = req.act
        # Servers that answer (or fail) before the body is in: nothing owed.
        # Too many 1xx before reading it: proxyd's 502 rightly ends the exchange first.
        reads_all = not (act.kind == "early" or (act.kind == "reset_head" and act.at < req.up)
                         or (act.kind == "many_interim" and act.interim_first))
        if reads_all and (not info.interrupted or record.k in info.whole):
            self.stats["claims"] += 1
            if not (record.complete and record.body == req.up):
                if record.excused:
                    self.stats["excused"] += 1
                else:
                    self.violation("whole", record.index, f"request {record.k}: the server got {record.body} of "
                                                          f"{req.up} body bytes (complete: {record.complete})")

    # ------------------------------------------------------------ TCP clients
    async def tcp_client(self, plan: TcpPlan, wire: Wire, started: float) -> None:
        sid = plan.sid
        check = StreamCheck(sid, DOWN)
        sent = [0]
        loop = asyncio.get_running_loop()
        read_steps = plan.read_pace.steps()

        async def receive(limit: int = -1) -> None:
            while limit < 0 or check.offset < limit:
                size, pause = next(read_steps)
                if limit >= 0:
                    size = min(size, limit - check.offset)
                data = await wire.take(size)
                if not data:
                    return
                check.feed(data)
                if pause:
                    await asyncio.sleep(pause)

        async def send_up(limit: int = -1) -> None:
            await paced_send(wire, body_pieces(sid, UP, 0, plan.up), plan.client_pace, limit, sent)

        client = plan.client
        rx = None
        try:
            if client in ("half_close", "wait_eof", "slow_reader", "read_close", "reset_up", "reset_down"):
                limit = {"read_close": plan.down, "reset_down": plan.client_at}.get(client, -1)
                rx = loop.create_task(receive(limit))
            if client == "silent":
                if plan.index % 2:
                    wire.shutdown()
                await receive()
            elif client == "stall":
                await send_up(plan.client_at)
                # Neither read nor write for longer than timeout_client: proxyd ends it.
                await asyncio.sleep(self.t.client + 1.0)
                await receive()
            elif client == "reset_up":
                await send_up(plan.client_at)
                await cancel(rx)
                wire.close(reset=True)
            elif client == "close_early":
                await send_up()
                wire.close()
            else:
                await send_up()
                if client == "half_close":
                    wire.shutdown()
                await rx
                if client == "reset_down":
                    wire.close(reset=True)
        finally:
            await cancel(rx)
            check.feed(bytes(wire.buf))   # read past a limit: still checked (and counted)
            wire.buf.clear()
            self.stats["bytes_client_sent"] += sent[0]
            self.stats["bytes_client_got"] += check.offset
            self.flow_side(("tcp", sid), plan, "client", (wire.sent_most, wire.received, wire.clean_end))
            self.stats[f"tcp_c_{client}"] += 1
            self.stats[f"tcp_s_{plan.server}"] += 1
        index = plan.index
        if check.bad:
            self.violation("prefix", index, f"tcp client side: {check.bad}")
        if check.offset > plan.down:
            self.violation("prefix", index, f"tcp client got {check.offset} B, more than the {plan.down} sent")
        if plan.owed_down:
            self.claim(check.offset == plan.down, started, "whole", index,
                       f"tcp client got {check.offset} of {plan.down} B, then {wire.ending}", sid=plan.sid)
            if client in ("half_close", "wait_eof", "slow_reader") and check.offset == plan.down:
                self.claim(wire.end == "eof", started, "whole", index,
                           f"tcp client got the whole answer, then {wire.ending} instead of EOF", sid=plan.sid)
        if client in ("stall", "silent") and wire.end not in ("eof", "reset"):
            self.violation("liveness", index, f"tcp client ({client}): connection not ended by the proxy "
                                              f"({wire.end or 'open'})")

    # ------------------------------------------------------------ HTTP clients
    async def http_client(self, plan: HttpPlan, wire: Wire, started: float) -> None:
        info = HttpClientInfo()
        loop = asyncio.get_running_loop()
        done = [asyncio.Event() for _ in plan.reqs]
        state = {"up_stall": None, "over": False, "answers": 0, "all_read": False}
        sent = [0]
        got = [0]
        reset_now = asyncio.Event()

        async def writer() -> None:
            for j, req in enumerate(plan.reqs):
                if not plan.pipeline and j > 0:
                    await done[j - 1].wait()
                if state["over"]:
                    return
                if plan.think[j]:
                    await asyncio.sleep(plan.think[j])
                limit = plan.end_at if plan.end in ("reset_up", "stall_up") and j == plan.end_req else -1
                n = await paced_send(wire, req.wire(), req.pace, limit, sent)
                if limit >= 0 and n == limit:
                    info.interrupted = True
                    if plan.end == "reset_up":
                        reset_now.set()
                        return
                    state["up_stall"] = j
                    return      # stalled: nothing more is sent; the reader sees how it ends
                if limit >= 0 or n < req.wire_len():
                    return      # the proxy is gone
            if plan.end == "half_close":
                wire.shutdown()

        async def reader() -> None:
            for j, req in enumerate(plan.reqs):
                outcome = await self._http_response(plan, j, req, wire, info, state, got, reset_now, started)
                done[j].set()
                if outcome == "reset" or outcome == "closed":
                    return
            state["all_read"] = True
            # Every answer came and the connection is open.
            if plan.end in ("half_close", "idle"):
                data = await wire.take(READ)
                if data:
                    self.violation("prefix", plan.index, f"{len(data)} B after the last answer: {data[:80]!r}")
                elif wire.end != "eof":
                    self.claim(False, started, "whole", plan.index,
                               f"{plan.end}: after the last answer the connection ended with {wire.ending}, not EOF")

        wt = loop.create_task(writer())
        rt = loop.create_task(reader())
        rs = loop.create_task(reset_now.wait())
        try:
            await asyncio.wait([rt, rs], return_when=asyncio.FIRST_COMPLETED)
            if rt.done() and not rt.cancelled() and rt.exception() is not None:
                raise rt.exception()    # a protocol violation, say: reported by session()
            if reset_now.is_set():
                info.interrupted = True
                state["over"] = True
                await cancel(rt, wt)
                wire.close(reset=True)
            else:
                state["over"] = True
                if not wt.done():
                    if wire.end:
                        await cancel(wt)
                    else:
                        # Pipelined bytes the proxy will not read (it closes after an
                        # early answer, say) must not keep us: give the writer a moment.
                        try:
                            await asyncio.wait_for(asyncio.shield(wt), 2 * self.t.longest)
                        except TimeoutError:
                            pass
                        await cancel(wt)
            for ev in done:
                ev.set()
        finally:
            await cancel(rt, wt, rs)
            self.stats["bytes_client_sent"] += sent[0]
            self.stats["bytes_client_got"] += got[0]
            # Every answer read whole, nothing of ours in the way: proxyd had nothing more to send.
            clean = wire.clean_end or (state["all_read"] and not info.interrupted)
            self.flow_side(("http", plan.index), plan, "client",
                           (wire.sent_most, wire.received, clean, state["answers"], info.interrupted))
            self.stats["requests"] += len(plan.reqs)
            self.stats[f"http_e_{plan.end}"] += 1
            for req in plan.reqs:
                self.stats[f"http_s_{req.act.kind}"] += 1
            self.http_clients[plan.index] = info
            for record in self.http_pending.pop(plan.index, []):
                self._judge_server_req(record, info)

    async def _http_response(self, plan: HttpPlan, j: int, req: Req, wire: Wire, info: HttpClientInfo,
                             state: dict, got: list, reset_now: asyncio.Event, started: float) -> str:
        """Read and judge answer J: "ok" (the connection goes on), "closed"
        (it ended, as it should or not), or "reset" (we reset it)."""
        index = plan.index
        act = req.act
        interims = 0
        head = None
        while True:
            head = await wire.until(b"\r\n\r\n")
            if head is None:
                break
            first, headers = parse_head(head)
            if len(first) < 2 or first[0] != b"HTTP/1.1" or not first[1].isdigit():
                raise ProtocolViolation(f"status line {head[:100]!r}")
            status = int(first[1])
            if 100 <= status < 200:
                interims += 1
                if interims > MAX_INTERIM:
                    self.violation("protocol", index, f"answer {j}: more than {MAX_INTERIM} 1xx relayed")
                continue
            state["answers"] += 1
            self.counted[plan.target][status_class(status)] += 1
            break
        down_action = plan.end in ("reset_down", "stall_down") and plan.end_req == j

        def claims() -> bool:
            """Nothing of the client's own doing (so far) stands in the way of answer J."""
            stalled_up = state["up_stall"] is not None and state["up_stall"] <= j
            return not stalled_up and not info.interrupted

        def outcome_claim(outcome: str, detail: str) -> None:
            self.stats[f"http_o_{outcome}"] += 1
            if claims():
                self.claim(outcome in HTTP_EXPECT[act.kind], started, "whole", index,
                           f"answer {j} ({act.kind}): {outcome}, expected {'/'.join(sorted(HTTP_EXPECT[act.kind]))}"
                           f"{': ' + detail if detail else ''}", sid=req.sid)

        if head is None:
            outcome_claim("none", f"the connection ended ({wire.ending}) before a complete head"
                                  f"{f' ({len(wire.buf)} B of one)' if wire.buf else ''}")
            return "closed"   # (pipelined requests may have been served before whatever ended it)
        closing = "close" in tokens(headers, "connection")
        if status >= 300:
            # One of proxyd's own answers.
            page = await self._read_length_body(wire, headers)
            own = ("text/html" in ";".join(headers.get("content-type", [])) and closing and page is not None)
            if not own:
                self.violation("protocol", index, f"answer {j}: {status} that is not a proxyd page: {head!r}")
            outcome = str(status)
            outcome_claim(outcome if outcome in ("502", "504", "408") else f"status {status}", "")
            await self._expect_end(plan, j, wire, "after an error page")
            info.closed_after = j
            return "closed"
        if status != 200:
            raise ProtocolViolation(f"answer {j}: status {status}: {head!r}")
        if headers.get("x-sid") != [f"{req.sid:08x}"]:
            self.violation("prefix", index, f"answer {j} carries X-Sid {headers.get('x-sid')}, expected "
                                            f"{req.sid:08x}: {head[:300]!r}")
        check = StreamCheck(req.sid, DOWN)
        reader = BodyReader(wire, check, "chunked" in tokens(headers, "transfer-encoding"),
                            int(headers["content-length"][0]) if "content-length" in headers else -1,
                            counter=got)
        limit = plan.end_at if down_action else -1
        await reader.read(limit)
        if down_action and not reader.done and check.offset >= limit:
            info.interrupted = True
            if plan.end == "reset_down":
                reset_now.set()
                await asyncio.Event().wait()   # cancelled by the session
            # stall_down: read nothing for longer than timeout_client, then go on.
            await asyncio.sleep(self.t.client + 1.0)
            await reader.read()
        if check.bad:
            self.violation("prefix", index, f"answer {j} body: {check.bad}")
        if check.offset > act.down:
            self.violation("prefix", index, f"answer {j}: {check.offset} body bytes, more than the {act.down} sent")
        whole = reader.done and check.offset == act.down
        if claims() and act.kind in ("ok", "close", "early") and whole and act.interim != interims:
            self.violation("protocol", index, f"answer {j}: {interims} 1xx relayed of {act.interim}")
        if whole:
            info.whole.add(j)
        outcome_claim("full" if whole else "cut", "" if whole else
                      f"{check.offset} of {act.down} body bytes, then {wire.ending}")
        if not reader.done:
            return "closed"
        expected_close = req.close or act.framing == "close" or act.kind == "early"
        if closing or reader.to_eof:
            if not expected_close and not (self.options.reloads or self.options.resize):
                self.violation("protocol", index, f"answer {j} ({act.kind}) says Connection: close, "
                                                  f"unasked: {head[:300]!r}")
            if not reader.to_eof:
                await self._expect_end(plan, j, wire, "after a closing answer")
            info.closed_after = j
            return "closed"
        if req.close:
            self.violation("protocol", index, f"answer {j} to a Connection: close request without "
                                              f"Connection: close: {head[:300]!r}")
        return "ok"

    async def _read_length_body(self, wire: Wire, headers: dict) -> bytes | None:
        length = headers.get("content-length")
        if not length or not length[0].isdigit() or int(length[0]) > 64 * KiB:
            return None
        want = int(length[0])
        data = bytearray()
        while len(data) < want:
            part = await wire.take(want - len(data))
            if not part:
                return None
            data += part
        return bytes(data)

    async def _expect_end(self, plan: HttpPlan, j: int, wire: Wire, what: str) -> None:
        data = await wire.take(READ)
        if data:
            self.violation("protocol", plan.index, f"answer {j}: {len(data)} B {what}: {data[:80]!r}")

    # ------------------------------------------------------------ sessions
    async def session(self, index: int) -> None:
        plan = self.planner.plan(index)
        _, label, port = self.targets[plan.target]
        mode = plan.mode
        started = time.monotonic()
        self._started[index] = started
        self._wall[index] = time.time()
        self.running += 1
        self._track_peak()
        self.stats["sessions"] += 1
        self.stats[mode] += 1
        if label == "tcp_hc":
            self.stats["tcp_half_close"] += 1
        sock = socket.socket()
        sock.setblocking(False)
        if plan.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, plan.rcvbuf)
        wire = None
        clean = False
        try:
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (LOCALHOST, port)),
                                       self.t.longest * 4 + 10)
            except (TimeoutError, OSError) as e:
                self.violation("refused", index, f"connect to :{port} failed: {e!r}")
                sock.close()
                return
            wire = Wire(sock, plan.read_pace if mode == "http" else None)
            self._ports[index] = sock.getsockname()[1]
            self.counted[plan.target]["connections"] += 1
            run = self.tcp_client if mode == "tcp" else self.http_client
            await self._bounded(run(plan, wire, started), plan, port, sock.getsockname()[1])
            clean = True
        except TimeoutError:
            self.violation("liveness", index, f"session still running after {self.bound(plan):.0f}s")
        except ProtocolViolation as e:
            self.violation("protocol", index, str(e))
        except Exception:  # noqa: BLE001 -- an engine error is reported as a violation, the run goes on
            self.violation("engine", index, traceback.format_exc())
        finally:
            if wire is not None:
                wire.close(reset=not clean)
            self.running -= 1
            self._started.pop(index, None)
            port = self._ports.pop(index, None)
            wall = self._wall.pop(index, 0.0)
            if self.options.server_chaos and mode == "tcp" and port:
                for column, value in zip(self.tcp_sessions, (index, port, wall, time.time())):
                    column.append(value)

    async def _bounded(self, coro, plan, proxy_port: int, client_port: int) -> None:
        """Run a session's client within bound(plan), or TimeoutError.

        Past the bound, the kernel is asked first: a slow reader with a small
        receive buffer can leave proxyd's socket in zero-window probing (the
        persist timer: one segment per probe, ~10 KB/s with a 4 KiB buffer)
        with everything proxyd had to send already queued in the kernel.
        That is TCP between this client and the kernel, which no proxy can
        hurry; such a session gets PERSIST_GRACE more, PERSIST_EXTENSIONS
        times at most, each counted."""
        task = asyncio.ensure_future(coro)
        timeout, extensions = self.bound(plan), 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=timeout)
                if done:
                    return task.result()
                if extensions < PERSIST_EXTENSIONS and zero_window_queue(proxy_port, client_port):
                    extensions += 1
                    self.stats["persist_extensions"] += 1
                    timeout = PERSIST_GRACE
                    continue
                raise TimeoutError
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def lag_ticker(self) -> None:
        tick = 0.05
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(tick)
            late = time.monotonic() - t0 - tick
            self.stats["max_lag_ms"] = max(self.stats["max_lag_ms"], int(late * 1000))
            if late > LAG_LIMIT:
                self.lags.append((t0, time.monotonic()))
            if late > 0.02 and self.options.server_chaos:
                self.late_ticks.append((time.time(), late))

    async def load(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        running: set = set()
        indices = iter(self.options.sessions) if self.options.sessions else iter(range(self.options.max_sessions))
        for index in indices:
            if time.monotonic() >= deadline and not self.options.sessions:
                break
            while len(running) >= self.options.concurrency:
                _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            running.add(loop.create_task(self.session(index)))
            if len(running) % 8 == 0:
                await asyncio.sleep(0)
        if running:
            await asyncio.wait(running)

    def prune(self, keep: int = 20_000) -> None:
        """Forget the oldest finished clients (and the sids seen) beyond KEEP;
        settle the HTTP connections no server connection can be left of."""
        self.settle_flows(self.server_bound() + 10)
        if len(self.http_clients) > 2 * keep:
            for index in sorted(self.http_clients)[:-keep]:
                del self.http_clients[index]
        if len(self.server_sids) > 8 * keep:
            for sid in sorted(self.server_sids)[:-4 * keep]:
                del self.server_sids[sid]


def chunked_wire_offset(total: int, seed: int, at: int, boundary: bool = False) -> int:
    """Wire offset (framing included) in the chunked encoding of TOTAL bytes
    just after body byte AT; with BOUNDARY, after the end (CRLF included) of
    the chunk that holds it: where the next chunk-size line starts."""
    wire = 0
    cut = False
    for piece in chunk_layout(total, seed):
        if isinstance(piece, bytes):
            wire += len(piece)
            if cut:
                return wire
        else:
            start, end, n = piece
            if at < end:
                if not boundary:
                    return wire + (at - start)
                cut = True
            wire += n
    return wire


class BodyReader:
    """Reads a message body (Content-Length, chunked, or to EOF) into a StreamCheck."""

    def __init__(self, wire: Wire, check: StreamCheck, chunked: bool, length: int, counter=None):
        self.wire = wire
        self.check = check
        self.chunked = chunked
        self.length = length          # -1 without Content-Length (chunked, or to EOF)
        self.to_eof = not chunked and length < 0
        self.done = (not chunked and length == 0)
        self.counter = counter
        self.chunk_left = 0           # chunked: data bytes left in the current chunk
        self.state = "size"           # chunked: size | data | crlf | trailer

    def _feed(self, data: bytes) -> None:
        self.check.feed(data)
        if self.counter is not None:
            self.counter[0] += len(data)

    async def read(self, limit: int = -1) -> None:
        """Read until the body ends (self.done), the connection ends, or LIMIT body bytes."""
        while not self.done and (limit < 0 or self.check.offset < limit):
            room = READ if limit < 0 else limit - self.check.offset
            if self.chunked:
                if not await self._chunked_step(room):
                    return
                continue
            if self.length >= 0:
                room = min(room, self.length - self.check.offset)
            data = await self.wire.take(room)
            if not data:
                if self.to_eof and self.wire.end == "eof":
                    self.done = True
                return
            self._feed(data)
            if self.length >= 0 and self.check.offset >= self.length:
                self.done = True

    async def _chunked_step(self, room: int) -> bool:
        wire = self.wire
        if self.state == "size":
            line = await wire.until(b"\r\n", 4096)
            if line is None:
                return False
            m = re.fullmatch(rb"([0-9A-Fa-f]{1,15})(;[^\r\n]*)?\r\n", line)
            if not m:
                raise ProtocolViolation(f"bad chunk line {line[:60]!r}")
            self.chunk_left = int(m[1], 16)
            self.state = "data" if self.chunk_left else "trailer"
        elif self.state == "data":
            data = await wire.take(min(self.chunk_left, room))
            if not data:
                return False
            self._feed(data)
            self.chunk_left -= len(data)
            if not self.chunk_left:
                self.state = "crlf"
        elif self.state == "crlf":
            line = await wire.until(b"\r\n", 16)
            if line is None:
                return False
            if line != b"\r\n":
                raise ProtocolViolation(f"chunk data not followed by CRLF: {line!r}")
            self.state = "size"
        else:
            line = await wire.until(b"\r\n", 4096)
            if line is None:
                return False
            if line == b"\r\n":
                self.done = True
        return True


# ------------------------------------------------------------------ proxyd side

class LogWatch:
    """Reads a proxyd log as it grows: lines that must not be there, the
    worker count and generation the master was asked for, access lines per pid."""

    FORBIDDEN = re.compile(r"Traceback|unexpected error|\bdied\b|has not answered|overran its stop|"
                           r"generations draining|grace expired|reload failed|reload aborted|failed:|"
                           r"TTIN: (?!now)|accept: |master is gone|respawning|killing it")
    EVENTS = re.compile(r"master started \(pid \d+\), (?P<start>\d+) workers|"
                        r"reloading .*: generation (?P<gen>\d+), (?P<reload>\d+) workers|"
                        r"generation (?P<serving>\d+) serving|"
                        r"TT(?:IN|OU): now (?P<resize>\d+) workers")
    ACCESS = re.compile(r"^\S+ proxyd\[(\d+)\]: \S+ \[[^]]+\] fe_(?:tcp|http|tcp_hc) ")

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.problems: list[str] = []
        self.workers = 0
        self.generation = 1
        self.access = collections.Counter()

    def scan(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            m = self.ACCESS.match(line)
            if m:
                self.access[int(m[1])] += 1
                continue
            if self.FORBIDDEN.search(line):
                self.problems.append(line)
            e = self.EVENTS.search(line)
            if e:
                if e["start"]:
                    self.workers = int(e["start"])
                elif e["reload"]:
                    self.workers = int(e["reload"])
                elif e["serving"]:
                    self.generation = int(e["serving"])
                elif e["resize"]:
                    self.workers = int(e["resize"])


def proxy_config(tcp_port, http_port, tcp_servers, http_servers, options: Options, splice: bool,
                 hc_port=0, hc_servers=(), admin_socket: str = "", stats_port: int = 0) -> dict:
    t = options.timeouts
    glob = {"splice": splice, "grace": "60s", "max_draining": MAX_DRAINING}
    if admin_socket:
        glob["admin_socket"] = admin_socket
    if stats_port:
        glob["stats_bind"] = f"{LOCALHOST}:{stats_port}"
    # --server-chaos: every backend's servers are checked.
    checks = {m: {"health_check": dict(c)} if options.server_chaos else {} for m, c in HEALTH_CHECKS.items()}
    defaults = {"timeout_client": t.client, "timeout_server": t.server, "timeout_fin": t.fin,
                "timeout_connect": t.connect}
    config = {"global": {"workers": options.workers, **glob}, "defaults": defaults, "frontends": {},
              "backends": {}}
    if tcp_port:
        tc = support.tcp_config(tcp_port, tcp_servers, workers=options.workers, global_=glob,
                                backend=checks["tcp"], frontend_name="fe_tcp", backend_name="be_tcp")
        config["frontends"].update(tc["frontends"])
        config["backends"].update(tc["backends"])
    if http_port:
        hc = http_config(http_port, {"be_http": {"servers": http_servers, **checks["http"]}},
                         workers=options.workers, global_=glob, frontend_name="fe_http")
        config["frontends"].update(hc["frontends"])
        config["backends"].update(hc["backends"])
    if hc_port:
        tc = support.tcp_config(hc_port, hc_servers, workers=options.workers, global_=glob,
                                frontend={"half_close": True}, backend=checks["tcp"], frontend_name="fe_tcp_hc",
                                backend_name="be_tcp_hc")
        config["frontends"].update(tc["frontends"])
        config["backends"].update(tc["backends"])
    return config


TCP_STATES = {"01": "ESTABLISHED", "02": "SYN-SENT", "03": "SYN-RECV", "04": "FIN-WAIT-1", "05": "FIN-WAIT-2",
              "06": "TIME-WAIT", "07": "CLOSE", "08": "CLOSE-WAIT", "09": "LAST-ACK", "0A": "LISTEN",
              "0B": "CLOSING"}


def tcp_socket_states() -> dict:
    """Socket inode -> (TCP state, local port), from /proc/net/tcp{,6}."""
    states = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[9] != "0":
                        states[parts[9]] = (TCP_STATES.get(parts[3], parts[3]), int(parts[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            pass
    return states


def split_fds(fds: dict, states: dict) -> tuple[list, int]:
    """(listening ports, count of the other non-pipe fds) of a worker's fds."""
    listening = []
    for inode in fds["sockets"].values():
        state = states.get(inode)
        if state is not None and state[0] == "LISTEN":
            listening.append(state[1])
    return listening, nonpipe(fds) - len(listening)


def worker_fds(pid: int) -> dict:
    """A worker's fds: {"pipes": {fd: inode}, "sockets": {fd: inode}, "other": [link]}."""
    out = {"pipes": {}, "sockets": {}, "other": []}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if link.startswith("pipe:["):
            out["pipes"][int(name)] = link[6:-1]
        elif link.startswith("socket:["):
            out["sockets"][int(name)] = link[8:-1]
        else:
            out["other"].append(link)
    return out


def pipe_bytes(pid: int, fd: int) -> int:
    """Bytes waiting in a worker's pipe (opened anew through /proc; -1 if gone)."""
    try:
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return -1
    try:
        return int.from_bytes(fcntl.ioctl(mine, termios.FIONREAD, bytes(4)), "little", signed=True)
    finally:
        os.close(mine)


def nonpipe(fds: dict) -> int:
    return len(fds["sockets"]) + len(fds["other"])


class ProxySet:
    """The proxyd processes of a run, with their logs."""

    def __init__(self, options: Options, workdir: Path, tcp_servers, http_servers, say=print, hc_servers=()):
        self.options = options
        self.workdir = Path(workdir)
        self.say = say
        self.proxies: list[support.Proxyd] = []
        self.watches: list[LogWatch] = []
        self.splices = {"on": [True], "off": [False], "both": [True, False]}[options.splice]
        self.targets = []        # (proxy index, mode, port)
        self.ports = []
        self.ports_of = []       # per proxy: its frontend ports
        self.baseline = []       # per proxy: (non-pipe fds but listeners, pipe fds) of a fresh worker
        self.admin_paths = []    # per proxy: its admin socket (--server-chaos)
        self.stats_ports = []    # per proxy: its stats listener's port
        self.tcp_servers, self.http_servers, self.hc_servers = tcp_servers, http_servers, hc_servers

    def _admin_path(self, i: int) -> str:
        """Proxy I's admin socket: in the workdir unless that path is too long for a unix socket."""
        path = str(self.workdir / f"admin{i}.sock")
        if len(path) > 100:
            import tempfile
            path = os.path.join(tempfile.mkdtemp(prefix="chaos-admin-"), f"admin{i}.sock")
        return path

    def start(self) -> None:
        modes = ["tcp", "http"] if self.options.mode == "both" else [self.options.mode]
        for i, splice in enumerate(self.splices):
            tcp_port = support.free_port() if "tcp" in modes else 0
            http_port = support.free_port() if "http" in modes else 0
            hc_port = support.free_port() if "tcp" in modes and self.options.half_close else 0
            admin = self._admin_path(i) if self.options.server_chaos else ""
            self.admin_paths.append(admin)
            self.stats_ports.append(support.free_port())
            config = proxy_config(tcp_port, http_port, self.tcp_servers, self.http_servers, self.options, splice,
                                  hc_port, self.hc_servers, admin, self.stats_ports[-1])
            path = support.write_config(self.workdir, config, f"chaos{i}.toml")
            proxy = support.Proxyd(path, self.workdir / f"chaos{i}.log")
            self.proxies.append(proxy)
            proxy.start()
            ports = [p for p in (tcp_port, http_port, hc_port) if p]
            self.ports += ports
            self.ports_of.append(ports)
            proxy.wait_ready(ports, self.options.workers)
            self.watches.append(LogWatch(proxy.log_path))
            for mode, port in (("tcp", tcp_port), ("http", http_port), ("tcp_hc", hc_port)):
                if port:
                    self.targets.append((i, mode, port))
        for proxy in self.proxies:
            self.baseline.append(self._fresh_counts(proxy))

    def _fresh_counts(self, proxy) -> tuple[int, int]:
        """Non-pipe fds but listening sockets, and pipe fds, of a fresh
        worker, once they stop changing."""
        last, samples = None, []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = tcp_socket_states()
            counts = sorted((split_fds(f, states)[1], len(f["pipes"]))
                            for f in (worker_fds(w.pid) for w in proxy.workers()))
            if counts and counts == last and len(set(counts)) == 1:
                return counts[0]
            samples.append(counts)
            last = counts
            time.sleep(0.2)
        raise AssertionError(f"fresh workers' fd counts never settled: {samples[-5:]}")

    def stop(self) -> None:
        for proxy in self.proxies:
            try:
                proxy.stop()
            except Exception as e:  # noqa: BLE001 -- the others are still to be stopped
                self.say(f"stopping proxyd {proxy.pid}: {e!r}")

    # ------------------------------------------------------------ checks
    def settle(self, server_ports, timeout: float = 40.0) -> list[str]:
        """Wait until no connection is left on the proxies' ports nor towards
        the servers (TIME-WAIT and LISTEN aside); the leftovers if any."""
        ours = set(self.ports)
        servers = set(server_ports)
        left: list[str] = []

        def quiet():
            nonlocal left
            left = []
            for line in support.ss("-tan"):
                parts = line.split()
                if len(parts) < 5 or parts[0] in ("LISTEN", "TIME-WAIT"):
                    continue
                local, peer = parts[3].rsplit(":", 1)[-1], parts[4].rsplit(":", 1)[-1]
                if int(local) in ours or int(peer) in ours or int(peer) in servers or int(local) in servers:
                    left.append(line)
            return not left

        try:
            support.wait_for(quiet, timeout, "no connection left")
        except AssertionError:
            pass
        return left

    def check_workers(self, result: Result, peak_pool: int) -> None:
        for i, (proxy, watch) in enumerate(zip(self.proxies, self.watches)):
            name = f"proxyd {i} ({'splice' if self.splices[i] else 'copy'})"
            watch.scan()
            want = watch.workers

            def settled(proxy=proxy, watch=watch):
                watch.scan()
                gens = proxy.worker_generations()
                return (len(gens) == watch.workers and set(gens.values()) == {watch.generation}) and gens

            try:
                gens = support.wait_for(settled, 60, "the workers to settle")
            except AssertionError:
                result.violations.append(Violation(
                    "workers", -1, f"{name}: workers never settled to {want} of generation {watch.generation}: "
                                   f"{proxy.worker_generations()}; {proxy.children_description()}"))
                continue
            base_nonpipe, base_pipes = self.baseline[i]
            bound = base_pipes + 2 * min(256, 2 * max(peak_pool, 1)) if self.splices[i] else base_pipes
            handled = 0
            for pid in gens:
                handled += watch.access[pid]
                self._check_fds(result, name, pid, base_nonpipe, bound, set(self.ports_of[i]))
            result.notes.append(f"{name}: {len(gens)} workers of generation {watch.generation} checked, "
                                f"{handled} access lines from them; fresh worker: {base_nonpipe} fds besides "
                                f"listeners and pipes, {base_pipes} pipe fds; pipe bound {bound}")
            if handled < 20 and not self.options.sessions:
                result.violations.append(Violation(
                    "fds", -1, f"{name}: the workers checked handled only {handled} sessions: "
                               f"the fd check would prove nothing"))

    def _check_fds(self, result, name, pid, base_nonpipe, bound, frontend_ports) -> None:
        problems: list[str] = []

        def judge():
            nonlocal problems
            problems = []
            fds = worker_fds(pid)
            states = tcp_socket_states()
            for fd, inode in sorted(fds["sockets"].items()):
                state = states.get(inode)
                if state is not None and state[0] != "LISTEN":
                    problems.append(f"fd {fd}: a TCP socket in {state[0]} (local port {state[1]})")
            listening, others = split_fds(fds, states)
            strays = [p for p in listening if p not in frontend_ports]
            if strays:
                problems.append(f"listening sockets on ports no frontend binds: {strays}")
            if others != base_nonpipe:
                problems.append(f"{others} fds besides listeners and pipes, a fresh worker has {base_nonpipe} "
                                f"({len(fds['sockets'])} sockets, {len(listening)} of them listening; "
                                f"other: {sorted(set(fds['other']))})")
            pipes = len(fds["pipes"])
            if pipes > bound:
                problems.append(f"{pipes} pipe fds, more than the pool can hold ({bound})")
            dirty = [(fd, n) for fd in fds["pipes"] if (n := pipe_bytes(pid, fd)) > 0]
            if dirty:
                problems.append(f"{len(dirty)} pipes with bytes in them: {dirty[:5]}")
            return not problems

        try:
            support.wait_for(judge, 10, "the worker's fds to come back")
        except AssertionError:
            result.violations.append(Violation("fds", -1, f"{name} worker {pid}: " + "; ".join(problems)))

    def check_logs(self, result: Result) -> None:
        for i, watch in enumerate(self.watches):
            watch.scan()
            for line in watch.problems[:20]:
                result.violations.append(Violation("log", -1, f"proxyd {i} log: {line}"))
            if len(watch.problems) > 20:
                result.violations.append(Violation("log", -1, f"proxyd {i} log: {len(watch.problems) - 20} more"))


# ------------------------------------------------------------------ counters

FRONTENDS = {"tcp": "fe_tcp", "http": "fe_http", "tcp_hc": "fe_tcp_hc"}   # listeners' mode -> frontend name
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


def fetch_stats(port: int) -> dict:
    import http.client
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=10)
    try:
        conn.request("GET", "/stats")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"GET /stats: {response.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def check_counters(result: Result, proxies: ProxySet, engine: Engine) -> None:
    """Once every session has ended: each proxy's counters (GET /stats,
    once) against what its clients and servers counted, per frontend.

    * sessions_total == the client connections that connected, exactly: a
      handshake the kernel completed is accepted by a worker (the master
      keeps a retired slot's listeners, so nothing queued is reset), also
      when the client reset at once (Linux's accept() returns it); tcp: the
      backend's sessions_total is the same number.
    * bytes: proxyd counts what it delivered, into a socket's send queue.
      What a peer read, it delivered: received <= counted, exactly.  What a
      peer did not read was destroyed by a reset (or the peer stopped
      reading and reset it); only where its connection did not end clean (a
      FIN, every byte before it read, no send that met a reset) can that
      be, and then at most what the other side sent and this one did not
      read (http: per request not read whole, the client's bytes of it plus
      the most proxyd adds to a request head; per client connection, the
      servers' bytes and PAGE_MOST per request).  counted - received <=
      that slack.  Across proxies, per mode, the bytes servers read of no
      known session (under 22 B of a tcp stream, part of a request head)
      count too.
    * http: requests by the class of the status sent, against the final
      answers clients read: never fewer; more only by the answers that
      clients which reset or stalled sent for and never read (per such
      client: requests it sent a byte of, minus final answers it read);
      http_requests_total is the sum of the classes."""
    engine.settle_flows()
    by_mode = collections.defaultdict(lambda: [0, 0])     # tcp | http -> [proxyd's bytes_in, servers' bytes]

    def disagree(text: str) -> None:
        result.violations.append(Violation("counters", -1, text))

    for i, port in enumerate(proxies.stats_ports):
        try:
            stats = fetch_stats(port)
        except (OSError, ValueError) as e:
            disagree(f"proxyd {i}: GET /stats on :{port} failed: {e!r}")
            continue
        frontends = {f["name"]: f for f in stats.get("frontends", [])}
        backends = {b["name"]: b for b in stats.get("backends", [])}
        for t, (p, mode, _) in enumerate(proxies.targets):
            if p != i:
                continue
            name, c = FRONTENDS[mode], engine.counted[t]
            f, b = frontends.get(name), backends.get(BACKENDS[mode])
            if f is None or b is None:
                disagree(f"proxyd {i}: /stats has no {name} or {BACKENDS[mode]}")
                continue
            where = f"proxyd {i} {name}"
            sessions, bytes_in, bytes_out = f["sessions_total"], f["bytes_in_total"], f["bytes_out_total"]
            if sessions != c["connections"]:
                disagree(f"{where}: sessions_total {sessions}, the clients connected {c['connections']} times")
            if mode != "http" and b["sessions_total"] != sessions:
                disagree(f"proxyd {i} {b['name']}: sessions_total {b['sessions_total']}, its frontend's {sessions}")
            if not c["server_got"] <= bytes_in <= c["server_got"] + c["slack_in"]:
                disagree(f"{where}: bytes_in_total {bytes_in}, the servers read {c['server_got']} of its sessions "
                         f"(a reset may have destroyed {c['slack_in']} more after delivery)")
            if not c["client_got"] <= bytes_out <= c["client_got"] + c["slack_out"]:
                disagree(f"{where}: bytes_out_total {bytes_out}, its clients read {c['client_got']} "
                         f"(a reset may have destroyed {c['slack_out']} more after delivery)")
            by_mode["http" if mode == "http" else "tcp"][0] += bytes_in
            line = (f"{where}: sessions {sessions} vs {c['connections']}; bytes in {bytes_in} vs {c['server_got']} "
                    f"read by servers (+{c['slack_in']} slack), out {bytes_out} vs {c['client_got']} read by "
                    f"clients (+{c['slack_out']} slack)")
            if mode == "http":
                counted = f["http_responses_total"]
                excess = 0
                for k in CLASSES:
                    if counted.get(k, 0) < c[k]:
                        disagree(f"{where}: http_responses_total {k} {counted.get(k, 0)}, clients read {c[k]}")
                    excess += counted.get(k, 0) - c[k]
                if excess > c["unseen"]:
                    disagree(f"{where}: {excess} more responses counted than clients read "
                             f"({', '.join(f'{k} {counted.get(k, 0)}/{c[k]}' for k in CLASSES)}), "
                             f"only {c['unseen']} went unread by clients that reset or stalled")
                if f["http_requests_total"] != sum(counted.values()):
                    disagree(f"{where}: http_requests_total {f['http_requests_total']}, its responses by class "
                             f"add up to {sum(counted.values())}")
                line += (f"; requests {f['http_requests_total']} vs {sum(c[k] for k in CLASSES)} answers read "
                         f"(+{c['unseen']} unread by clients that reset or stalled): "
                         + ", ".join(f"{k} {counted.get(k, 0)}/{c[k]}" for k in CLASSES if counted.get(k, 0) or c[k]))
            result.counters.append(line)
    for t, (_, mode, _) in enumerate(proxies.targets):
        by_mode["http" if mode == "http" else "tcp"][1] += engine.counted[t]["server_got"]
    for mode, (counted, read) in sorted(by_mode.items()):
        read += engine.unattributed[mode]
        if counted < read:
            disagree(f"{mode}: the proxies' bytes_in_total add up to {counted}, their servers read {read} "
                     f"({engine.unattributed[mode]} of them of no known session)")


# ------------------------------------------------------------------ a run

def below_ephemeral_port() -> int:
    """A random port number below the kernel's ephemeral range (0 if that
    range leaves no room): no connect() takes such a port as its own, so a
    server that dies can bind its port again."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return random.SystemRandom().randrange(10_000, low) if low > 12_000 else 0


def server_listener(attempts: int = 20, reuse: bool = False) -> socket.socket:
    """A listening socket on a port no TIME_WAIT socket points to yet (one
    left by an earlier user of the port number would be counted as ours).
    REUSE: SO_REUSEADDR, so that the port can be bound again while the
    connections accepted on it live on (a server that dies and comes back),
    on a port below the ephemeral range."""
    held = []
    try:
        for _ in range(attempts):
            s = socket.socket()
            if reuse:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                port = below_ephemeral_port()
                try:
                    # Without SO_REUSEADDR a bind fails on a port anyone holds,
                    # even by a socket only bound: a dead server's of another run.
                    with socket.socket() as probe:
                        probe.bind((LOCALHOST, port))
                    s.bind((LOCALHOST, port))
                except OSError:
                    s.close()
                    continue
            else:
                s.bind((LOCALHOST, 0))
            if not support.timewait_towards(s.getsockname()[1]):
                try:
                    s.listen(4096)
                except OSError:
                    held.append(s)
                    continue
                s.setblocking(False)
                return s
            held.append(s)   # keep it bound, so the next bind gets another port
        raise AssertionError(f"no port without TIME_WAIT towards it in {attempts} tries")
    finally:
        for s in held:
            s.close()


# ------------------------------------------------------------------ server chaos

BACKENDS = {"tcp": "be_tcp", "http": "be_http", "tcp_hc": "be_tcp_hc"}   # listeners' mode -> backend name


@dataclass(eq=False)
class ChaosServer:
    """One server of a backend (--server-chaos): its port, its socket
    (listening while it is alive; bound only, so that the port stays ours
    and connects are refused, while it is dead), and what is done to it."""

    key: str                # "be_http/s2", as proxyd names it
    backend: str
    mode: str               # tcp | http: what serves its connections
    port: int
    sock: socket.socket | None
    proxies: int            # how many proxies send to it (one admin state and weight in each)
    alive: bool = True
    flapping: bool = False  # its HTTP check endpoint answers 503
    accepting: bool = False  # its socket is watched for connections to accept
    good_since: float = 0.0  # monotonic: usable in every way since (proxyd's rise takes a moment)
    admin: list = field(default_factory=list)    # per proxy: ready | drain | maint
    weight: list = field(default_factory=list)   # per proxy

    def __post_init__(self):
        self.admin = ["ready"] * self.proxies
        self.weight = [1] * self.proxies


@dataclass(frozen=True)
class StateEvent:
    """What happened to one server in one proxy's view, on the wall clock:
    a `Server ... is DOWN|UP` log line (kind down|up, t its time), or an
    admin command (kind admin: t when it was sent, answered when its answer
    came, state ready|drain|maint)."""

    t: float
    kind: str
    state: str = ""
    answered: float = 0.0
    text: str = ""


def iso(t: float) -> str:
    """Wall-clock T as proxyd's log lines write it (UTC, ms); "never" for inf."""
    if t == math.inf:
        return "never"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%H:%M:%S.%f")[:-3]


def log_time(stamp: str) -> float:
    """proxyd's log-line time (2026-01-02T03:04:05.678Z) as a wall-clock number."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.UTC).timestamp()


def server_windows(events, grace: float = GRACE) -> tuple[list, list]:
    """From one server's StateEvents in one proxy: (forbidden, unusable).

    forbidden: (start, end, why) windows in which it must accept no new
    session: from GRACE after its `is DOWN` line until its `is UP` line (less
    UP_MARGIN) or, if it was in maintenance meanwhile, until the command that
    took it out was sent (that resets its health: proxyd's set_admin); and
    from GRACE after an answered disable/maint/drain until the command that
    made it ready again was sent.

    unusable: (start, end) intervals in which proxyd may rightly not have
    used it, as wide as the record allows (from the DOWN line or the sending
    of the command, to the UP line or the answer to the ready one)."""
    forbidden, unusable = [], []
    down = None                                 # time of the DOWN line while down
    admin, since, sent, what = "ready", 0.0, 0.0, ""
    for ev in sorted(events, key=lambda e: e.t):
        if ev.kind == "down":
            if down is None:
                down = ev.t
        elif ev.kind == "up":
            if down is not None:
                forbidden.append((down + grace, ev.t - UP_MARGIN, f"marked DOWN at {iso(down)}, UP at {iso(ev.t)}"))
                unusable.append((down, ev.t))
                down = None
        else:
            if admin == "maint" and ev.state != "maint" and down is not None:
                why = f"marked DOWN at {iso(down)}, out of maintenance ({ev.text!r} sent at {iso(ev.t)})"
                forbidden.append((down + grace, ev.t, why))
                unusable.append((down, ev.answered))
                down = None
            if ev.state == "ready":
                if admin != "ready":
                    why = f"{what!r} answered at {iso(since)}, {ev.text!r} sent at {iso(ev.t)}"
                    forbidden.append((since + grace, ev.t, why))
                    unusable.append((sent, ev.answered))
            elif admin == "ready":
                since, sent, what = ev.answered, ev.t, ev.text
            admin = ev.state
    if down is not None:
        forbidden.append((down + grace, math.inf, f"marked DOWN at {iso(down)}, never UP again"))
        unusable.append((down, math.inf))
    if admin != "ready":
        forbidden.append((since + grace, math.inf, f"{what!r} answered at {iso(since)}, never ready again"))
        unusable.append((sent, math.inf))
    return [w for w in forbidden if w[0] < w[1]], unusable


def weight_windows(changes, grace: float = GRACE) -> tuple[list, list]:
    """From one server's `set weight` commands in one proxy ((weight, wall
    sent, wall answered)): (zero, positive).  zero: (start, end, why) windows
    from GRACE after a weight 0 was answered until a positive one was sent;
    positive: (start, end) intervals in which its weight was surely above 0
    (the configured 1 from the start)."""
    zero, positive = [], []
    weight, since = 1, -math.inf
    for w, sent, answered in sorted(changes, key=lambda c: c[1]):
        if (w == 0) != (weight == 0):
            if weight == 0:
                zero.append((since + grace, sent, f"weight 0 answered at {iso(since)}, weight {w} sent at {iso(sent)}"))
            else:
                positive.append((since, sent))
            since = answered
        weight = w
    if weight == 0:
        zero.append((since + grace, math.inf, f"weight 0 answered at {iso(since)}, never above 0 again"))
    else:
        positive.append((since, math.inf))
    return [z for z in zero if z[0] < z[1]], positive


def in_windows(windows: list, t: float) -> list:
    """The windows of WINDOWS (start, end, ...) that hold T."""
    return [w for w in windows if w[0] <= t < w[1]]


class ServerDriver:
    """Servers that die and come back, checks that flap, runtime API
    commands: at moments drawn from the seed's own stream ("SEED:servers",
    the same draws every run, applied or not as the state allows); all of it
    recorded on the wall clock (proxyd's log lines are UTC times) for the
    checks after the run (check_server_chaos)."""

    def __init__(self, options: Options, engine: Engine, servers: list, admin_paths: list, say=print):
        self.options = options
        self.engine = engine
        self.servers = servers
        self.admin_paths = admin_paths
        self.say = say
        self.stats = engine.stats
        self.rng = random.Random(f"{options.seed}:servers")
        self.backends: dict = {}
        for srv in servers:
            self.backends.setdefault(srv.backend, []).append(srv)
        self.dead: dict = {srv.key: [] for srv in servers}       # key -> [[wall dead, wall alive again]]
        self.admin_log: list = []     # (proxy, key, StateEvent)
        self.weight_log: list = []    # (proxy, key, weight, wall sent, wall answered)
        self.restores: list = []      # (monotonic due, seq, kind, server, proxy, words)
        self.seq = 0
        self.stop = asyncio.Event()
        self.notes: list = []

    # ------------------------------------------------------------ the servers
    def start(self) -> None:
        for srv in self.servers:
            self._serve(srv)

    async def wait_all_up(self, timeout: float = 15.0) -> None:
        """Until every proxy's checks have passed for every server (before
        the load: their first checks ran before this process served them)."""
        deadline = time.monotonic() + timeout
        names = {srv.key for srv in self.servers}
        while True:
            pending = []
            for p in range(len(self.admin_paths)):
                answer = await self.ask(p, "show servers state")
                if answer is None:
                    return
                up = set()
                for line in answer.decode(errors="replace").splitlines()[2:]:
                    f = line.split()
                    if len(f) > 11 and f[5] == "2" and f[10] in ("L4OK", "L7OK"):
                        up.add(f"{f[1]}/{f[3]}")
                pending += [f"proxyd {p}: {key}" for key in sorted(names - up)]
            if not pending:
                return
            if time.monotonic() >= deadline:
                self.engine.violation("health", -1, f"servers not UP {timeout:g}s after the start: {pending}")
                return
            await asyncio.sleep(0.1)

    def _serve(self, srv: ChaosServer) -> None:
        """Accept from a reader callback, each connection handed to its task
        in the same call: a task cancelled between an accept and its
        resumption would drop a connection (and reset it) when its server dies."""
        asyncio.get_running_loop().add_reader(srv.sock.fileno(), self._acceptable, srv)
        srv.accepting = True

    def _acceptable(self, srv: ChaosServer) -> None:
        for _ in range(64):
            try:
                sock, _ = srv.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self.engine.violation("engine", -1, f"server accept: {e}")
                    loop = asyncio.get_running_loop()
                    loop.remove_reader(srv.sock.fileno())
                    srv.accepting = False
                    loop.call_later(0.1, lambda: srv.alive and not srv.accepting and self._serve(srv))
                return
            self.engine.server_conn(sock, srv.mode, srv)

    def kill(self, srv: ChaosServer) -> None:
        """Stop accepting: what is in the backlog is accepted and served (a
        dying server that closes its listening socket resets them: those
        sessions would be lost by our doing), then the listening socket is
        closed and the port bound again without listen(): connects are
        refused, and the port stays ours."""
        if not srv.alive or srv.sock is None:
            return
        t = time.time()
        if srv.accepting:
            asyncio.get_running_loop().remove_reader(srv.sock.fileno())
            srv.accepting = False
        while True:
            try:
                sock, _ = srv.sock.accept()
            except OSError:   # BlockingIOError: the backlog is empty
                break
            self.engine.server_conn(sock, srv.mode, srv)
            self.stats["sc_backlog_served"] += 1
        srv.sock.close()
        srv.alive = False
        self.dead[srv.key].append([t, math.inf])
        srv.sock = self._bind(srv)

    def _bind(self, srv: ChaosServer) -> socket.socket | None:
        """SRV's port bound again, not listening (connects are refused); None
        if something else holds it now (then a revival tries again)."""
        placeholder = socket.socket()
        try:
            placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            placeholder.bind((LOCALHOST, srv.port))
        except OSError as e:
            placeholder.close()
            self.stats["sc_rebind_failed"] += 1
            if self.stats["sc_rebind_failed"] == 1:
                holders = support.ss("-tanpo", "state", "all", f"( sport = :{srv.port} )")
                self.notes.append(f"server {srv.key} could not bind :{srv.port} again at {iso(time.time())} ({e}; this "
                                  f"process is pid {os.getpid()}); held by: {holders[:5]}")
            return None
        placeholder.setblocking(False)
        return placeholder

    def revive(self, srv: ChaosServer) -> None:
        if srv.alive:
            return
        if srv.sock is None:
            srv.sock = self._bind(srv)
            if srv.sock is None:
                return self._later(0.5, "revive", srv)
        srv.sock.listen(4096)
        srv.alive = True
        self.dead[srv.key][-1][1] = time.time()
        self._serve(srv)

    def close(self) -> None:
        for srv in self.servers:
            if srv.sock is not None:
                srv.sock.close()
                srv.sock = None

    # ------------------------------------------------------------ the runtime API
    async def ask(self, proxy: int, words: str) -> bytes | None:
        """One command on proxy PROXY's admin socket (one per connection, as
        proxyd's runtime API without `prompt`): its answer, None (and a
        violation) if there is none within 5s."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.admin_paths[proxy]), 5)
            try:
                writer.write(words.encode() + b"\n")
                return await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
        except (TimeoutError, OSError) as e:
            self.engine.violation("admin", -1, f"proxyd {proxy}: {words!r}: {e!r}")
            return None

    async def admin(self, proxy: int, srv: ChaosServer, words: str, state: str = "", weight: int = -1) -> None:
        """A command changing SRV, its sending and its answer timed, for the
        checks; STATE: the admin state it sets (ready, drain, maint); WEIGHT:
        the weight it sets."""
        sent = time.time()
        answer = await self.ask(proxy, words)
        answered = time.time()
        if answer is None:
            return
        if answer.strip():
            self.engine.violation("admin", -1, f"proxyd {proxy}: {words!r} answered {answer[:200]!r}")
            return
        self.stats["sc_admin_commands"] += 1
        if state:
            srv.admin[proxy] = state
            self.admin_log.append((proxy, srv.key, StateEvent(sent, "admin", state, answered, words)))
        if weight >= 0:
            srv.weight[proxy] = weight
            self.weight_log.append((proxy, srv.key, weight, sent, answered))

    # ------------------------------------------------------------ the schedule
    def good(self, srv: ChaosServer) -> bool:
        """Usable by every proxy (as far as we know: proxyd's checks confirm it a moment later)."""
        return (srv.alive and not srv.flapping and all(a == "ready" for a in srv.admin)
                and time.monotonic() >= srv.good_since)

    def _later(self, delay: float, kind: str, srv: ChaosServer, proxy: int = 0, words: str = "") -> None:
        self.seq += 1
        self.restores.append((time.monotonic() + delay, self.seq, kind, srv, proxy, words))
        self.restores.sort(key=lambda r: r[:2])

    async def _restore(self, kind: str, srv: ChaosServer, proxy: int, words: str) -> None:
        if kind == "revive":
            self.revive(srv)
        elif kind == "unflap":
            srv.flapping = False
        else:
            await self.admin(proxy, srv, words, "ready")
        srv.good_since = time.monotonic() + 1.0   # proxyd's checks: rise successes

    async def run(self, until: float) -> None:
        try:
            await self._run(until)
        except Exception:  # noqa: BLE001 -- an engine error is reported as a violation, the run goes on
            self.engine.violation("engine", -1, f"server driver: {traceback.format_exc()}")
        finally:
            await self.restore_all()

    async def _run(self, until: float) -> None:
        rng = self.rng
        # One outage at least, half way (a short run might draw none).
        halfway = time.monotonic() + (until - time.monotonic()) / 2
        outage_done = False
        while True:
            # The same draws every step, whatever is applied.
            pause = rng.uniform(0.05, 0.35)
            action = weighted(rng, SERVER_ACTIONS)
            srv = rng.choice(self.servers)
            proxy = rng.randrange(len(self.admin_paths))
            duration = rng.uniform(0.5, 4.0)
            blip = rng.uniform(0.05, 0.5)
            lonely = rng.random() < 0.12         # may take a backend's last good server
            alt = rng.random() < 0.5
            weight = rng.choice([0, 0, 1, 2, 3, 5])
            step_at = time.monotonic() + pause
            while self.restores and self.restores[0][0] <= step_at:
                due, _, kind, r_srv, r_proxy, words = self.restores[0]
                if await self._sleep_until(due):
                    return
                self.restores.pop(0)
                await self._restore(kind, r_srv, r_proxy, words)
            if await self._sleep_until(step_at) or time.monotonic() >= until:
                return
            if action == "outage" or (not outage_done and time.monotonic() >= halfway):
                outage_done = True
                await self._outage(srv.backend, proxy, alt, min(duration, 1.2))
            else:
                await self._act(action, srv, proxy, duration, blip, lonely, alt, weight)

    async def _sleep_until(self, when: float) -> bool:
        """Sleep until WHEN (monotonic); True if told to stop meanwhile."""
        try:
            await asyncio.wait_for(self.stop.wait(), max(0.0, when - time.monotonic()))
            return True
        except TimeoutError:
            return False

    async def _act(self, action, srv, proxy, duration, blip, lonely, alt, weight) -> None:
        key = srv.key
        if action == "weight":
            await self.admin(proxy, srv, f"set weight {key} {weight}", weight=weight)
            self.stats["sc_weight"] += 1
            return
        if action == "flap" and srv.mode != "http":
            action = "blip"   # a TCP check flaps when its server blips
        applicable = {"die": srv.alive, "blip": srv.alive, "flap": srv.alive and not srv.flapping}.get(
            action, srv.admin[proxy] == "ready")
        if not applicable or srv.sock is None:
            self.stats["sc_skipped"] += 1
            return
        others = sum(self.good(s) for s in self.backends[srv.backend] if s is not srv)
        if not others and self.good(srv):
            if not lonely:
                self.stats["sc_skipped"] += 1
                return
            self.stats["sc_last_server"] += 1   # a moment with no usable server: "no server" answers
            duration = min(duration, 0.8)
        self.stats[f"sc_{action}"] += 1
        if action == "die":
            self.kill(srv)
            self._later(duration, "revive", srv)
        elif action == "blip":
            self.kill(srv)
            self._later(blip, "revive", srv)
        elif action == "flap":
            srv.flapping = True
            self._later(duration, "unflap", srv)
        else:
            words = {"disable": f"disable server {key}", "maint": f"set server {key} state maint",
                     "drain": f"set server {key} state drain"}[action]
            await self.admin(proxy, srv, words, "maint" if action in ("disable", "maint") else action)
            back = f"enable server {key}" if alt and action != "drain" else f"set server {key} state ready"
            self._later(duration, "ready", srv, proxy, back)

    async def _outage(self, backend: str, proxy: int, by_admin: bool, duration: float) -> None:
        """No server of BACKEND usable for DURATION: all dead (every proxy
        finds its connects refused, then marks them DOWN), or all in
        maintenance in PROXY (it answers "no server" at once)."""
        self.stats["sc_outage"] += 1
        for srv in self.backends[backend]:
            if by_admin:
                if srv.admin[proxy] == "ready":
                    await self.admin(proxy, srv, f"disable server {srv.key}", "maint")
                    self._later(duration, "ready", srv, proxy, f"enable server {srv.key}")
            elif srv.alive and srv.sock is not None:
                self.kill(srv)
                self._later(duration, "revive", srv)

    async def restore_all(self) -> None:
        """Everything back: servers alive, checks passing, ready, weight 1."""
        for _ in range(10):   # a port held by someone else for a moment: a revival tries again
            restores, self.restores = self.restores, []
            for _, _, kind, srv, proxy, words in restores:
                await self._restore(kind, srv, proxy, words)
            if not self.restores:
                break
            await asyncio.sleep(0.5)
        for srv in self.servers:
            for proxy in range(srv.proxies):
                if srv.weight[proxy] != 1:
                    await self.admin(proxy, srv, f"set weight {srv.key} 1", weight=1)

    def shutdown(self) -> None:
        """The end of the run: every server gone (checks refused, none left in a backlog)."""
        self.stop.set()
        for srv in self.servers:
            self.kill(srv)


SERVER_LINE = re.compile(r"^(\S+) proxyd\[\d+\]: Server (\S+) is (DOWN|UP), reason: ")
# Access lines in HAProxy's httplog and tcplog layouts (man/proxyd.8).
NOSRV_HTTP = re.compile(r'^(?P<time>\S+) proxyd\[\d+\]: \S+ \[[^]]+\] fe_http (?P<backend>\S+)/\S+ \S+ 503 \d+ - - '
                        r'(?P<term>[sS]C)-- \S+ \S+ "[A-Z]+ /chaos/(?P<sid>[0-9a-f]{8}) HTTP/1\.1" up=\d+'
                        r'(?: err=(?P<err>.*))?$')
NOSRV_TCP = re.compile(r"^(?P<time>\S+) proxyd\[\d+\]: 127\.0\.0\.1:(?P<port>\d+) \[[^]]+\] fe_tcp(?:_hc)? "
                       r"(?P<backend>\S+)/\S+ \S+ \d+ (?P<term>[sS]C) \S+ \S+ up=\d+(?: err=(?P<err>.*))?$")


# A session's server connection reset before the server said anything (term S.).
RESET_HTTP = re.compile(r'^(?P<time>\S+) proxyd\[\d+\]: \S+ \[[^]]+\] fe_http (?P<backend>\S+)/(?P<server>\S+) '
                        r'-?\d+/-?\d+/(?P<Tc>-?\d+)/-?\d+/(?P<Tt>\d+) -?\d+ \d+ - - (?P<term>S\S)-- \S+ \S+ '
                        r'"[A-Z]+ /chaos/(?P<sid>[0-9a-f]{8}) HTTP/1\.1" up=\d+(?: err=(?P<err>\S+))?')
RESET_TCP = re.compile(r"^(?P<time>\S+) proxyd\[\d+\]: 127\.0\.0\.1:(?P<port>\d+) \[[^]]+\] fe_tcp(?:_hc)? "
                       r"(?P<backend>\S+)/(?P<server>\S+) -?\d+/(?P<Tc>-?\d+)/(?P<Tt>\d+) \d+ (?P<term>S\S) \S+ \S+ "
                       r"up=\d+(?: fin=\S+)?(?: err=(?P<err>\S+))?")


@dataclass(frozen=True)
class NoServer:
    """A "no server" access line: HTTP 503 or TCP closed, term SC or sC."""

    proxy: int
    t: float
    backend: str
    mode: str           # http | tcp
    ident: int          # http: the request's sid; tcp: the client's port
    line: str


def read_server_log(p: int, path, events: dict, no_server: list) -> None:
    """Proxy P's `Server B/S is DOWN|UP` lines (into EVENTS, (p, key) ->
    [StateEvent]) and its "no server" access lines (into NO_SERVER)."""
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if " Server " in line:
                    m = SERVER_LINE.match(line)
                    if m:
                        events.setdefault((p, m[2]), []).append(StateEvent(log_time(m[1]), m[3].lower(),
                                                                           text=line.strip()))
                    continue
                if " SC" not in line and " sC" not in line:
                    continue
                m = NOSRV_HTTP.match(line)
                if m:
                    no_server.append(NoServer(p, log_time(m["time"]), m["backend"], "http", int(m["sid"], 16),
                                              line.strip()))
                    continue
                m = NOSRV_TCP.match(line)
                if m:
                    no_server.append(NoServer(p, log_time(m["time"]), m["backend"], "tcp", int(m["port"]),
                                              line.strip()))
    except FileNotFoundError:
        pass


def usable_servers(entry: NoServer, keys: list, unusable: dict) -> list:
    """The servers of KEYS (its backend's) that nothing kept from use in the
    NO_SERVER_WINDOW before ENTRY (unusable: (proxy, key) -> [(start, end)])."""
    lo, hi = entry.t - NO_SERVER_WINDOW, entry.t + UP_MARGIN
    return [key for key in keys if not any(a < hi and b > lo for a, b in unusable.get((entry.proxy, key), []))]


def check_accepts(accepts: dict, forbidden: dict, late_ticks: list, stats) -> list:
    """(t, sid, proxy, key, window) for each accept (accepts: (proxy, key) ->
    (times, sids)) in one of its forbidden windows, unless this process's
    loop was late enough then to have accepted it after the window opened
    though the proxy connected before (counted in STATS)."""
    slack = LoopSlack(late_ticks)
    found = []
    for (p, key), (times, sids) in accepts.items():
        windows = forbidden.get((p, key), [])
        stats["sc_accepts"] += len(times)
        if not windows:
            continue
        for t, sid in zip(times, sids):
            hit = in_windows(windows, t)
            if not hit:
                continue
            if t - slack(t) < hit[0][0]:
                stats["sc_unavailable_lag_excused"] += 1
                continue
            found.append((t, sid, p, key, hit[0]))
    return found


class LoopSlack:
    """How much earlier than this process's accept a connection may have
    been made, from the loop's late ticks ((wall time, seconds late))
    around it."""

    def __init__(self, late_ticks: list):
        self.late = sorted(late_ticks)
        self.times = [t for t, _ in self.late]

    def __call__(self, t: float) -> float:
        lo, hi = bisect.bisect_left(self.times, t - 1.0), bisect.bisect_right(self.times, t + 0.5)
        return 2 * max((d for _, d in self.late[lo:hi]), default=0.0) + 0.05


def check_weight_zero(accepts: dict, zero: dict, positive: dict, unusable: dict, backends: dict,
                      late_ticks: list, stats) -> list:
    """(t, sid, proxy, key, window, better) for each accept on a server in
    one of its weight-0 windows while another server of its backend, BETTER,
    surely had a weight above 0 and nothing kept it from use in the
    NO_SERVER_WINDOW before (proxyd's candidates: weight 0 only when every
    usable server has weight 0)."""
    slack = LoopSlack(late_ticks)
    found = []
    for (p, key), (times, sids) in accepts.items():
        windows = zero.get((p, key), [])
        if not windows:
            continue
        others = [k for k in backends.get(key.split("/")[0], []) if k != key]
        for t, sid in zip(times, sids):
            hit = in_windows(windows, t)
            if not hit:
                continue
            stats["sc_weight0_accepts"] += 1
            lo, hi = t - NO_SERVER_WINDOW, t + UP_MARGIN
            better = [k for k in others
                      if any(a <= lo and b >= hi for a, b in positive.get((p, k), [(-math.inf, math.inf)]))
                      and not any(a < hi and b > lo for a, b in unusable.get((p, k), []))]
            if not better:
                continue
            if t - slack(t) < hit[0][0]:
                stats["sc_unavailable_lag_excused"] += 1
                continue
            found.append((t, sid, p, key, hit[0], better))
    return found


def check_server_chaos(result: Result, proxies: ProxySet, engine: Engine, driver: ServerDriver) -> None:
    """The --server-chaos invariants (unavailable, no_server), and the
    "whole" claims of the sessions proxyd rightly had no server for taken
    out (counted): see the module's docstring."""
    stats = result.stats
    events: dict = {}
    no_server: list = []
    for p, proxy in enumerate(proxies.proxies):
        read_server_log(p, proxy.log_path, events, no_server)
    for evs in events.values():
        for ev in evs:
            stats[f"sc_logged_{ev.kind}"] += 1
    for p, key, event in driver.admin_log:
        events.setdefault((p, key), []).append(event)
    forbidden, unusable = {}, {}
    for p in range(len(proxies.proxies)):
        for srv in driver.servers:
            forbidden[(p, srv.key)], unusable[(p, srv.key)] = server_windows(events.get((p, srv.key), []), GRACE)
            unusable[(p, srv.key)] += [tuple(d) for d in driver.dead[srv.key]]
            stats["sc_windows"] += len(forbidden[(p, srv.key)])

    # unavailable: no new session on a server GRACE after it was marked down or made unavailable.
    for t, sid, p, key, window in check_accepts(engine.accepts, forbidden, engine.late_ticks, stats):
        plan, _ = engine.planner.by_sid(sid)
        result.violations.append(Violation(
            "unavailable", plan.index if plan is not None else -1,
            f"server {key} accepted session {sid:08x} from proxyd {p} at {iso(t)}, "
            f"{t - window[0] + GRACE:.3f}s after it became unavailable: {window[2]}",
            plan.describe() if plan is not None else "", sid))

    # weight0: no new session on a server at weight 0 while another of its backend was there to take it.
    changes: dict = {}
    for p, key, weight, sent, answered in driver.weight_log:
        changes.setdefault((p, key), []).append((weight, sent, answered))
    zero, positive = {}, {}
    for pk, cs in changes.items():
        zero[pk], positive[pk] = weight_windows(cs, GRACE)
    keys_of = {b: [srv.key for srv in servers] for b, servers in driver.backends.items()}
    for t, sid, p, key, window, better in check_weight_zero(engine.accepts, zero, positive, unusable, keys_of,
                                                           engine.late_ticks, stats):
        plan, _ = engine.planner.by_sid(sid)
        result.violations.append(Violation(
            "weight0", plan.index if plan is not None else -1,
            f"server {key} accepted session {sid:08x} from proxyd {p} at {iso(t)} at weight 0 ({window[2]}) "
            f"though {', '.join(better)} had a weight above 0 and were usable",
            plan.describe() if plan is not None else "", sid))

    # no_server: each "no server" answer came when no server of its backend was usable.
    tcp_index: dict = {}
    for index, port, start, end in zip(*engine.tcp_sessions):
        tcp_index.setdefault(port, []).append((start, end, index))
    justified_http, justified_tcp = set(), []
    for entry in no_server:
        stats["sc_no_server"] += 1
        keys = [srv.key for srv in driver.backends.get(entry.backend, [])]
        usable = usable_servers(entry, keys, unusable)
        if not usable:
            stats["sc_no_server_justified"] += 1
            if entry.mode == "http":
                justified_http.add(entry.ident)
            else:
                justified_tcp.append(entry)
            continue
        if entry.mode == "http":
            plan, _ = engine.planner.by_sid(entry.ident)
            index = plan.index if plan is not None else -1
        else:
            index = next((i for a, b, i in tcp_index.get(entry.ident, []) if a - 0.5 <= entry.t <= b + 0.5), -1)
        result.violations.append(Violation(
            "no_server", index, f"proxyd {entry.proxy} found no server at {iso(entry.t)} though "
                                f"{', '.join(usable)} had been listening, not DOWN in its log and ready for the "
                                f"{NO_SERVER_WINDOW:g}s before: {entry.line}"))

    lost = lost_in_backlogs(result, proxies, engine, driver)

    def excused(v: Violation) -> bool:
        """A "whole" claim of a session proxyd rightly found no server for
        (its access line says so), or lost in the backlog of a dying server."""
        if v.kind != "whole" or v.sid < 0:
            return False
        if v.sid in lost:
            stats["sc_backlog_lost"] += 1
            return True
        plan, _ = engine.planner.by_sid(v.sid)
        if plan is None:
            return False
        if plan.mode == "http":
            return v.sid in justified_http
        p = proxies.targets[plan.target][0]
        start, end = v.when or (0.0, 0.0)
        return any(e.proxy == p and e.ident == v.port and start - 0.5 <= e.t <= end + 0.5 for e in justified_tcp)

    kept = []
    for v in result.violations:
        if excused(v):
            stats["sc_claims_excused"] += 1
        else:
            kept.append(v)
    result.violations[:] = kept


def lost_in_backlogs(result: Result, proxies: ProxySet, engine: Engine, driver: ServerDriver) -> set:
    """The sids of "whole" violations whose session a dying server lost: the
    connection was in its listening socket's queue when it closed (the kernel
    resets those; ServerDriver.kill accepts what is queued first, but one
    that completes its handshake in the microseconds before the close is
    lost, as it would be with any server that dies).  All of it must hold:
    proxyd's access line names the server, says it connected and that the
    server side ended it with a reset; the server never accepted that
    session; and it died while the session was under way."""
    wanted = {v.sid: v for v in result.violations if v.kind == "whole" and v.sid >= 0}
    if not wanted:
        return set()
    ports = {v.port for v in wanted.values() if v.port}
    lines = []     # (proxy, wall, key, sid or -1, port, Tc, Tt, err)
    for p, proxy in enumerate(proxies.proxies):
        try:
            with open(proxy.log_path, errors="replace") as f:
                for line in f:
                    if " S" not in line:
                        continue
                    m = RESET_HTTP.match(line)
                    if m and int(m["sid"], 16) in wanted:
                        lines.append((p, log_time(m["time"]), f"{m['backend']}/{m['server']}", int(m["sid"], 16), 0,
                                      int(m["Tc"]), int(m["Tt"]), m["err"] or ""))
                        continue
                    m = RESET_TCP.match(line)
                    if m and int(m["port"]) in ports:
                        lines.append((p, log_time(m["time"]), f"{m['backend']}/{m['server']}", -1, int(m["port"]),
                                      int(m["Tc"]), int(m["Tt"]), m["err"] or ""))
        except FileNotFoundError:
            pass
    lost = set()
    for p, t, key, sid, port, tc, tt, err in lines:
        if tc < 0 or key.endswith("/<NOSRV>") or not ("ECONNRESET" in err or "EPIPE" in err):
            continue
        if sid < 0:   # tcp: the violation of the session from that port then
            v = next((v for v in wanted.values() if v.port == port and v.when
                      and v.when[0] - 0.5 <= t <= v.when[1] + 0.5), None)
            if v is None:
                continue
            sid = v.sid
        plan, _ = engine.planner.by_sid(sid)
        if plan is None or proxies.targets[plan.target][0] != p:
            continue
        if sid in engine.accepts.get((p, key), ((), ()))[1]:
            continue   # its server had it: not lost in a backlog
        if any(t - tt / 1000 - 0.2 <= dead <= t + UP_MARGIN for dead, _ in driver.dead.get(key, [])):
            lost.add(sid)
    return lost


class Chaos:
    def __init__(self, options: Options, workdir: Path, say=print):
        self.options = options
        self.workdir = Path(workdir)
        self.say = say
        self.result = Result(options)
        self.driver: ServerDriver | None = None

    def run(self) -> Result:
        t0 = time.monotonic()
        o = self.options
        self.say(f"chaos: seed {o.seed}, mode {o.mode}, {o.workers} workers, splice {o.splice}"
                 f"{', reloads' if o.reloads else ''}{', resize' if o.resize else ''}"
                 f"{', server chaos' if o.server_chaos else ''}, {o.duration:g}s, "
                 f"concurrency {o.concurrency}, profile {o.profile}; replay: {o.replay_command()}")
        listeners = {"tcp": [], "http": [], "tcp_hc": []}
        for socks in listeners.values():
            for _ in range(CHAOS_SERVERS if o.server_chaos else 2):
                socks.append(server_listener(reuse=o.server_chaos))
        addr = {m: [f"{LOCALHOST}:{s.getsockname()[1]}" for s in ls] for m, ls in listeners.items()}
        # TIME_WAIT is watched towards the servers of default frontends only: with
        # half_close = true, a client closing first leaves one (PRODUCT.md, "TCP mode").
        server_ports = [s.getsockname()[1] for m, ls in listeners.items() for s in ls if m != "tcp_hc"]
        hc_ports = [s.getsockname()[1] for s in listeners["tcp_hc"]]
        proxies = ProxySet(o, self.workdir, addr["tcp"], addr["http"], self.say, addr["tcp_hc"])
        try:
            proxies.start()
            self.result.logs = [str(p.log_path) for p in proxies.proxies]
            engine = Engine(o, proxies.targets, self.say)
            asyncio.run(self._main(engine, proxies, listeners, server_ports))
            self.result.stats.update(engine.stats)
            self.result.violations += engine.violations
            left = proxies.settle(server_ports + hc_ports)
            if left:
                self.result.violations.append(Violation("liveness", -1, f"{len(left)} connections left after the run: "
                                                                        f"{left[:5]}"))
            for port in server_ports:
                tw = support.timewait_towards(port)
                if tw:
                    self.result.violations.append(Violation("timewait", -1, f"{tw} TIME_WAIT towards :{port}"))
            if o.half_close:
                tw = sum(support.timewait_towards(port) for port in hc_ports)
                self.result.notes.append(f"half_close = true frontend: {self.result.stats['tcp_half_close']} "
                                         f"sessions, {tw} TIME_WAIT towards its servers (allowed there)")
            proxies.check_workers(self.result, engine.peak_pool)
            proxies.check_logs(self.result)
            check_counters(self.result, proxies, engine)
            if self.driver is not None:
                self.result.notes += self.driver.notes
                check_server_chaos(self.result, proxies, engine, self.driver)
            classify_known(self.result, proxies, engine.planner)
        finally:
            proxies.stop()
            if self.driver is not None:
                self.driver.close()
            for ls in listeners.values():
                for s in ls:
                    s.close()
            self.result.wall = time.monotonic() - t0
        return self.result

    async def _main(self, engine: Engine, proxies: ProxySet, listeners: dict, server_ports: list) -> None:
        loop = asyncio.get_running_loop()
        o = self.options
        driven = set()
        driver = None
        if o.server_chaos:
            # The servers of the backends the proxies have; the others' listeners get no traffic.
            driven = {mode for _, mode, _ in proxies.targets}
            driver = self.driver = ServerDriver(o, engine, [
                ChaosServer(f"{BACKENDS[mode]}/s{i}", BACKENDS[mode], "http" if mode == "http" else "tcp",
                            s.getsockname()[1], s, len(proxies.proxies))
                for mode, ls in listeners.items() if mode in driven for i, s in enumerate(ls, 1)],
                proxies.admin_paths, self.say)
            driver.start()
            await driver.wait_all_up()
        servers = [loop.create_task(engine.serve(s, "http" if mode == "http" else "tcp"))
                   for mode, ls in listeners.items() if mode not in driven for s in ls]
        ticker = loop.create_task(engine.lag_ticker())
        start = time.monotonic()
        deadline = start + o.duration
        chaos_until = deadline - max(3.0, 0.2 * o.duration)
        chaos = loop.create_task(self._signals(engine, proxies, chaos_until)) if (o.reloads or o.resize) else None
        servers_chaos = loop.create_task(driver.run(chaos_until)) if driver is not None else None
        monitor = loop.create_task(self._monitor(engine, proxies, server_ports, start))
        try:
            await engine.load(deadline)
            if chaos is not None:
                await cancel(chaos)
            if driver is not None:
                driver.stop.set()      # (a replay of a few sessions ends before chaos_until)
                await servers_chaos    # everything restored
                # Every server gone: proxyd's checks are refused from now on and
                # leave nothing behind; what they still have open ends.
                driver.shutdown()
            # Server connections the proxy has yet to close (timeouts): each is bounded.
            wait_until = time.monotonic() + engine.server_bound() + 5
            while engine.server_tasks and time.monotonic() < wait_until:
                await asyncio.wait(set(engine.server_tasks), timeout=1)
            for record_list in engine.http_pending.values():
                for record in record_list:
                    self.say(f"  note: server record of session {record.index} without its client's outcome")
        finally:
            if driver is not None:
                driver.stop.set()
            await cancel(chaos, servers_chaos, monitor, ticker, *servers, *engine.server_tasks)
            if driver is not None:
                driver.shutdown()
        await loop.run_in_executor(None, self._tw_sample, engine, server_ports)

    def _tw_sample(self, engine: Engine, server_ports: list) -> None:
        engine.stats["tw_samples"] += 1
        for port in server_ports:
            tw = support.timewait_towards(port)
            if tw:
                engine.violation("timewait", -1, f"{tw} TIME_WAIT towards :{port} during the run")

    async def _monitor(self, engine: Engine, proxies: ProxySet, server_ports: list, start: float) -> None:
        loop = asyncio.get_running_loop()
        last_progress = start
        reported = [0] * len(proxies.watches)
        while True:
            await asyncio.sleep(2.0)
            try:
                await loop.run_in_executor(None, self._tw_sample, engine, server_ports)
                for i, watch in enumerate(proxies.watches):
                    await loop.run_in_executor(None, watch.scan)
                    for line in watch.problems[reported[i]:reported[i] + 3]:
                        self.say(f"  LOG proxyd {i}: {line}")
                    reported[i] = len(watch.problems)
            except Exception as e:  # noqa: BLE001 -- a failed look (ss, say) is reported, the run goes on
                engine.violation("engine", -1, f"monitor: {e!r}")
            engine.prune()
            now = time.monotonic()
            if self.options.progress and now - last_progress >= self.options.progress:
                last_progress = now
                s = engine.stats
                pending = ""
                if self.options.server_chaos:
                    n = sum(v.kind == "whole" for v in engine.violations)
                    pending = f" ({n} whole claims among them, to be judged against the access log)" if n else ""
                self.say(f"  [{now - start:6.0f}s] sessions {s['sessions']} (tcp {s['tcp']}, http {s['http']}, "
                         f"{s['requests']} requests), running {engine.running}, server conns {engine.server_open}, "
                         f"client got {fmt_bytes(s['bytes_client_got'])}, server got "
                         f"{fmt_bytes(s['bytes_server_got'])}, violations {len(engine.violations)}{pending}, reloads "
                         f"{s['reloads']}, TTIN {s['ttin']}, TTOU {s['ttou']}, max lag {s['max_lag_ms']} ms"
                         + (f"; servers: deaths {s['sc_die']}, blips {s['sc_blip']}, flaps {s['sc_flap']}, "
                            f"admin commands {s['sc_admin_commands']}" if self.options.server_chaos else ""))

    async def _signals(self, engine: Engine, proxies: ProxySet, until: float) -> None:
        """SIGHUP reloads and TTIN/TTOU at seeded intervals, never more than
        the config's max_draining can take."""
        loop = asyncio.get_running_loop()
        o = self.options
        rng = random.Random(f"{o.seed}:signals")
        actions = (["reload"] if o.reloads else []) + (["resize"] if o.resize else [])
        while True:
            await asyncio.sleep(rng.uniform(0.8, 3.0))
            if time.monotonic() >= until:
                return
            action = rng.choice(actions)
            i = rng.randrange(len(proxies.proxies))
            proxy, watch = proxies.proxies[i], proxies.watches[i]
            gens = await loop.run_in_executor(None, proxy.worker_generations)
            await loop.run_in_executor(None, watch.scan)
            if action == "reload":
                if len(set(gens.values())) >= MAX_DRAINING - 1:
                    engine.stats["reloads_deferred"] += 1
                    continue
                proxy.signal(signal.SIGHUP)
                engine.stats["reloads"] += 1
            else:
                n = watch.workers
                grow = n <= 1 or (n < o.workers + 1 and rng.random() < 0.5)
                proxy.signal(signal.SIGTTIN if grow else signal.SIGTTOU)
                engine.stats["ttin" if grow else "ttou"] += 1


KNOWN = {
    "linger": "an HTTP answer proxyd logged as relayed whole (200, term=--) reached the client cut by a reset: "
              "proxyd closed the keep-alive connection without a lingering close and a request pipelined "
              "after that close made the kernel reset the answers in flight (RFC 9112 9.6; fixed in e76ea83)",
    "client_timeout": "a client that was reading got a truncated answer, the session ended by timeout_client "
                      "(term cD, err=timeout): proxyd counts only its own writes as client activity, and a "
                      "client draining the MiBs of the autotuned send buffer gives it no EPOLLOUT for that long "
                      "(fixed in e76ea83)",
    "keepalive": "a request sent the moment the previous answer (logged whole) was in met EOF, no access line: "
                 "timeout_http_keep_alive ran while the client was still reading that answer out of the send "
                 "buffer, and proxyd closed the connection under it (fixed in ba02d65)",
    "server_timeout": "a client that was reading got a truncated answer, the session ended by timeout_server "
                      "(term sD, err=timeout) though the server had sent everything: its silence is proxyd's own "
                      "back-pressure while the answer is still on its way to the client (fixed in fa539ae)",
}
HTTP_ACCESS = re.compile(r'\] fe_http \S+ \S+ (?P<status>-1|\d+) (?P<down>\d+) - - (?P<term>\S\S)-- \S+ \S+ '
                         r'"[A-Z]+ /chaos/(?P<sid>[0-9a-f]{8}) HTTP/1\.1" up=\d+(?: err=(?P<err>\S+))?')
TCP_ACCESS = re.compile(r"proxyd\[\d+\]: 127\.0\.0\.1:(?P<port>\d+) \[[^]]+\] fe_tcp(?:_hc)? \S+ \S+ (?P<down>\d+) "
                        r"(?P<term>\S\S) \S+ \S+ up=(?P<up>\d+)(?: fin=\S+)?(?: err=(?P<err>\S+))?")


def classify_known(result: Result, proxies: ProxySet, planner: Planner) -> None:
    """Tell the violations of a known proxyd defect from the rest (KNOWN),
    from what proxyd's access lines say of the same session: they keep being
    reported, under their own kind."""
    wanted = {v.sid: v for v in result.violations if v.kind == "whole" and v.sid >= 0}
    if not wanted:
        return
    before = {sid - 1 for sid in wanted if sid & 15}   # the requests just before, for "keepalive"
    http_logged, tcp_logged = {}, {}
    tcp_ports = {v.port for v in wanted.values() if v.port}
    for proxy in proxies.proxies:
        try:
            with open(proxy.log_path, errors="replace") as f:
                for line in f:
                    m = HTTP_ACCESS.search(line)
                    if m:
                        sid = int(m["sid"], 16)
                        if sid in wanted or sid in before:
                            http_logged[sid] = (int(m["status"]), int(m["down"]), m["term"], m["err"] or "")
                        continue
                    m = TCP_ACCESS.search(line)
                    if m and int(m["port"]) in tcp_ports:
                        tcp_logged.setdefault((int(m["port"]), int(m["up"])), []).append(
                            (int(m["down"]), m["term"], m["err"] or ""))
        except FileNotFoundError:
            pass
    for sid, v in wanted.items():
        plan, k = planner.by_sid(sid)
        if plan is None:
            continue
        if plan.mode == "http":
            entry = http_logged.get(sid)
            if entry is None:
                previous = http_logged.get(sid - 1) if k else None
                if (previous is not None and previous[0] == 200 and previous[2] == "--" and "none" in v.text
                        and "(eof" in v.text):
                    v.kind = "keepalive"
                    v.text += " [no access line; proxyd logged the answer before it whole]"
                continue
            status, down, term, err = entry
            if status == 200 and term == "--" and down >= plan.reqs[k].act.down and (
                    "reset" in v.text or "ECONNRESET" in v.text):
                v.kind = "linger"
                v.text += f" [proxyd logged it whole: {status}, down={down}, term={term}]"
            elif term in ("cD", "sD") and err == "timeout":
                v.kind = "client_timeout" if term == "cD" else "server_timeout"
                v.text += f" [proxyd: term={term} err={err}, down={down}]"
        else:
            for down, term, err in tcp_logged.get((v.port, plan.up), []):
                if term in ("cD", "sD") and err == "timeout" and plan.server in TCP_ANSWERERS:
                    v.kind = "client_timeout" if term == "cD" else "server_timeout"
                    v.text += f" [proxyd: term={term} err={err}, down={down}]"
    result.notes.append("known defects: " + (", ".join(
        f"{kind} ({n})" for kind, n in collections.Counter(v.kind for v in result.violations
                                                           if v.kind in KNOWN).items()) or "none seen"))


def run(options: Options, workdir, say=print) -> Result:
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return Chaos(options, Path(workdir), say).run()


# ------------------------------------------------------------------ CLI

def parse_args(argv):
    import argparse
    p = argparse.ArgumentParser(prog="scripts/chaos", description="A seeded chaos workload against proxyd.")
    p.add_argument("--seed", type=int, default=None, help="the seed (default: random, printed)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which sessions start")
    p.add_argument("--mode", choices=["tcp", "http", "both"], default="both")
    p.add_argument("--workers", type=int, choices=[1, 2], default=2)
    p.add_argument("--splice", choices=["on", "off", "both"], default="on")
    p.add_argument("--reloads", action="store_true", help="SIGHUP the master at random moments")
    p.add_argument("--resize", action="store_true", help="TTIN/TTOU at random moments")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-sessions", type=int, default=Options.max_sessions)
    p.add_argument("--profile", choices=sorted(SIZES), default="full")
    p.add_argument("--timeouts", default="", help="client,server,fin,connect seconds (default 3,3,2,2)")
    p.add_argument("--sessions", default="", help="replay only these session indices (comma-separated)")
    p.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--half-close", action="store_true",
                   help="also a TCP frontend with half_close = true (FINs passed on; its servers may see TIME_WAIT)")
    p.add_argument("--server-chaos", action="store_true",
                   help="health checks and an admin socket; servers die and come back, checks flap, disable/"
                        "drain/maint/set weight at random moments (new invariants: unavailable, no_server)")
    p.add_argument("--workdir", default="", help="where configs and logs go (default: a new temporary directory)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import tempfile
    args = parse_args(sys.argv[1:] if argv is None else argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    timeouts = Timeouts(*map(float, args.timeouts.split(","))) if args.timeouts else Timeouts()
    options = Options(seed=seed, duration=args.duration, mode=args.mode, workers=args.workers, splice=args.splice,
                      reloads=args.reloads, resize=args.resize, concurrency=args.concurrency,
                      max_sessions=args.max_sessions, profile=args.profile, timeouts=timeouts,
                      sessions=tuple(int(s) for s in args.sessions.split(",") if s.strip()),
                      progress=args.progress, half_close=args.half_close, server_chaos=args.server_chaos)
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"chaos-{seed}-")
    Path(workdir).mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        print(line, flush=True)

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # TERM like ^C: the finally blocks stop our proxyd processes

    signal.signal(signal.SIGTERM, interrupted)

    result = run(options, workdir, say)
    say(result.summary())
    say(f"workdir: {workdir}")
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
