"""Tagged streams: every byte says which session, direction and offset it
belongs to, so a test can check that what one side received is a prefix of
what its own peer sent, in order, with nothing foreign in it.

A stream is a sequence of RECORD-byte records::

    <sid: 8 hex><dir: U|D><offset: 12 hex>:.........................\\n

`U` is client -> server, `D` server -> client; the offset is the record's
position in its stream.  The filler has no hex digit, so every header can be
found wherever it lands; any RECORD consecutive bytes of a stream hold one.

Servers (threads of the test process, built on support.Backend):

* TaggedBackend, for TCP mode: learns the session id from the first record
  it receives and does what the Plan registered for that id says (read the
  request, answer N bytes, reset mid-upload or mid-answer).
* http_handler, for HTTP mode (`TaggedBackend(http=True)`): the session id
  and what to do are in the request target (http_target()).
* tagged_reply, the same answer for tests.http_support.HTTPBackend.

Every server connection keeps what it received in `rec.tag` (a TagConn).
For the proxy side: the `tagged_backend` fixture (conftest.py offers it to
every module), fd_kinds() (a worker's open fds by kind) and settle() (no session
left).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, NamedTuple
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support import LOCALHOST, Backend, ConnRecord, settle_towards, ss, wait_for

RECORD = 64
UP, DOWN = b"U", b"D"
_TAIL = b":" + b"." * (RECORD - 23) + b"\n"
HEADER = re.compile(rb"([0-9a-f]{8})([UD])([0-9a-f]{12}):")
LINGER_RST = struct.pack("ii", 1, 0)
CHUNK = 256 * 1024


# ------------------------------------------------------------------ streams

def stream(sid: int, direction: bytes, start: int, end: int) -> bytes:
    """Bytes [START, END) of session SID's stream in DIRECTION."""
    if end <= start:
        return b""
    first, last = start // RECORD, (end + RECORD - 1) // RECORD
    fmt = (b"%08x" % sid + direction + b"%012x" + _TAIL) * (last - first)
    data = fmt % tuple(range(first * RECORD, last * RECORD, RECORD))
    return data[start - first * RECORD:end - first * RECORD]


def chunks(sid: int, direction: bytes, start: int, end: int, size: int = CHUNK):
    """The same bytes, made lazily SIZE at a time (a big answer costs only
    what is sent)."""
    for pos in range(start, end, size):
        yield stream(sid, direction, pos, min(pos + size, end))


class StreamCheck(NamedTuple):
    ok: bool                  # RECEIVED is a prefix of the stream
    first_bad: int            # offset of the first wrong byte, -1 if ok
    foreign_sids: dict        # other session id -> bytes of its records found in RECEIVED

    @property
    def foreign_bytes(self) -> int:
        return sum(self.foreign_sids.values())


def foreign_records(received: bytes, sid: int) -> dict:
    """Session id -> bytes of its records (any direction) in RECEIVED, for
    every id other than SID (a record cut by the end counts what is there)."""
    found: dict = {}
    for m in HEADER.finditer(received):
        other = int(m[1], 16)
        if other != sid:
            found[other] = found.get(other, 0) + min(RECORD, len(received) - m.start())
    return found


def records_in(data: bytes) -> str:
    """Which sessions' records DATA holds: "sid/dir: bytes, ..."."""
    found: dict = {}
    for m in HEADER.finditer(data):
        key = f"{m[1].decode()}/{m[2].decode()}"
        found[key] = found.get(key, 0) + min(RECORD, len(data) - m.start())
    return ", ".join(f"{k}: {n} B" for k, n in sorted(found.items())) or "none"


def check_stream(received: bytes, sid: int, direction: bytes) -> StreamCheck:
    """Is RECEIVED a prefix of SID's stream in DIRECTION?"""
    received = bytes(received)
    expected = stream(sid, direction, 0, len(received))
    if received == expected:
        return StreamCheck(True, -1, {})
    lo, hi = 0, len(received)   # first differing offset: halve the range
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if received[lo:mid] == expected[lo:mid]:
            lo = mid
        else:
            hi = mid
    first_bad = lo if received[lo:lo + 1] != expected[lo:lo + 1] else hi
    return StreamCheck(False, first_bad, foreign_records(received, sid))


def describe(received: bytes, sid: int, direction: bytes, what: str = "stream") -> str:
    """'' if RECEIVED is clean, else one line saying what is wrong with it."""
    c = check_stream(received, sid, direction)
    if c.ok:
        return ""
    at = bytes(received[c.first_bad:c.first_bad + RECORD])
    foreign = ", ".join(f"{s:08x}: {n} B" for s, n in sorted(c.foreign_sids.items()))
    return (f"{what} of session {sid:08x}/{direction.decode()}: {len(received)} B received, wrong from "
            f"offset {c.first_bad} ({at[:40]!r}); foreign: {foreign or 'none found'}")


def learn_sid(data: bytes) -> int | None:
    """The session id of the first record header in DATA."""
    m = HEADER.search(data)
    return int(m[1], 16) if m else None


# ------------------------------------------------------------------ sockets

def reset(sock: socket.socket) -> None:
    """Close SOCK with an RST (SO_LINGER {1, 0})."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass
    sock.close()


def connect(port: int, timeout: float = 10.0, rcvbuf: int = 0) -> socket.socket:
    """A client socket to 127.0.0.1:PORT; RCVBUF set before connecting (a
    small one stops autotuning, so a client that stops reading stalls the
    proxy soon)."""
    s = socket.socket()
    s.settimeout(timeout)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((LOCALHOST, port))
    return s


def recv_upto(sock: socket.socket, limit: int) -> tuple[bytes, str]:
    """Read until EOF, a reset or LIMIT bytes: (data, "eof" | "reset" | "limit")."""
    buf = bytearray()
    try:
        while len(buf) < limit:
            data = sock.recv(min(CHUNK, limit - len(buf)))
            if not data:
                return bytes(buf), "eof"
            buf += data
    except ConnectionResetError:
        return bytes(buf), "reset"
    return bytes(buf), "limit"


def send_stream(sock: socket.socket, sid: int, direction: bytes, start: int, end: int, sent=None) -> int:
    """Send bytes [START, END) of the stream; SENT, a one-item list, counts
    as it goes.  Returns the bytes sent."""
    total = 0
    for data in chunks(sid, direction, start, end):
        sock.sendall(data)
        total += len(data)
        if sent is not None:
            sent[0] += len(data)
    return total


# ------------------------------------------------------------------ servers

@dataclass
class Plan:
    """What a TaggedBackend does with one session (TCP mode).

    Read REQUEST bytes; with RESET_AFTER, stop reading after that many bytes,
    call HOLD(sock) if given (e.g. to wait until the proxy is stalled), and
    reset.  Otherwise send ANSWER bytes (with RESET_MID_ANSWER, reset after
    that many instead), then close: the server closes first."""

    request: int = RECORD
    answer: int = RECORD
    reset_after: int | None = None
    reset_mid_answer: int | None = None
    hold: Callable | None = None


@dataclass
class TagConn:
    """What a tagged server received on one connection."""

    sid: int | None = None
    received: bytearray = field(default_factory=bytearray)   # TCP: everything; HTTP: the body
    head: bytes = b""
    target: str = ""
    sent: int = 0
    answered: bool = False

    def problem(self) -> str:
        """'' if what came in is clean, else what is wrong (the learned sid is
        the one checked: a foreign first record shows as foreign bytes)."""
        if self.sid is None:
            return (f"no session id in {len(self.received)} B received: {bytes(self.received[:64])!r}, "
                    f"records in it: {records_in(self.received)}") if self.received else ""
        problem = describe(self.received, self.sid, UP, "server side")
        if problem and not self.received.startswith(stream(self.sid, UP, 0, min(RECORD, len(self.received)))):
            problem += "; it does not start with a session's first record; records in it: " + records_in(self.received)
        return problem


class TaggedBackend(Backend):
    """A tagged server: TCP (plans by session id) or, with HTTP=True, HTTP/1.1
    (behaviour in the target).  SNDBUF caps the socket's send buffer so a
    stalled answer costs little."""

    def __init__(self, name: str = "tagged", http: bool = False, default: Plan | None = None,
                 sndbuf: int = 256 * 1024):
        self.plans: dict[int, Plan] = {}
        self.default = default or Plan()
        self.sndbuf = sndbuf
        self.hold: Callable | None = None  # HTTP reset_upload: called before the reset
        self.plan_lock = threading.Lock()
        super().__init__(http_handler if http else tcp_handler, name=name)

    def plan(self, sid: int, plan: Plan) -> None:
        with self.plan_lock:
            self.plans[sid] = plan

    def plan_for(self, sid) -> Plan:
        with self.plan_lock:
            return self.plans.pop(sid, None) or self.default

    def tags(self) -> list[TagConn]:
        return [t for t in (getattr(r, "tag", None) for r in self.connections()) if t is not None]

    def problems(self) -> list[str]:
        return [p for p in (t.problem() for t in self.tags()) if p]


def _start(conn: socket.socket, rec: ConnRecord, backend) -> TagConn:
    tag = rec.tag = TagConn()
    if getattr(backend, "sndbuf", 0):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, backend.sndbuf)
    return tag


def _recv_into_tag(conn, rec, tag, limit: int) -> bool:
    """Read until TAG holds LIMIT bytes; False at EOF."""
    while len(tag.received) < limit:
        data = conn.recv(min(CHUNK, limit - len(tag.received)))
        if not data:
            rec.end = "eof"
            return False
        rec.feed(data)
        tag.received += data
    return True


def _send(conn, rec, tag, sid, start, end) -> None:
    for data in chunks(sid, DOWN, start, end):
        conn.sendall(data)
        rec.sent += len(data)
        tag.sent += len(data)


def _reset(conn, rec) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    rec.end = "we reset"


def tcp_handler(conn: socket.socket, rec: ConnRecord, backend: TaggedBackend) -> None:
    tag = _start(conn, rec, backend)
    while len(tag.received) < 22:
        data = conn.recv(CHUNK)
        if not data:
            rec.end = "eof"
            return
        rec.feed(data)
        tag.received += data
    first = HEADER.match(tag.received)
    if not first or int(first[3], 16) != 0:
        # Not the start of a session's stream: say so at once (a reset), so
        # that the client fails now rather than wait for an answer.
        tag.sid = learn_sid(bytes(tag.received))
        return _reset(conn, rec)
    tag.sid = int(first[1], 16)
    plan = backend.plan_for(tag.sid)
    if plan.reset_after is not None:
        _recv_into_tag(conn, rec, tag, plan.reset_after)
        if plan.hold:
            plan.hold(conn)
        return _reset(conn, rec)
    if not _recv_into_tag(conn, rec, tag, plan.request):
        return
    tag.answered = True
    if plan.reset_mid_answer is not None:
        _send(conn, rec, tag, tag.sid, 0, plan.reset_mid_answer)
        return _reset(conn, rec)
    _send(conn, rec, tag, tag.sid, 0, plan.answer)


# -------------------------------------------------------------------- HTTP

def http_target(sid: int, down: int = RECORD, act: str = "respond", after: int = 0) -> str:
    """The target that tells http_handler what to do for session SID:
    respond (read the body, answer DOWN bytes), reset_upload (reset after
    AFTER body bytes), reset_download (answer with Content-Length DOWN, reset
    after AFTER of them), upgrade (101, then DOWN bytes, then read to EOF)."""
    return f"/tag/{sid:08x}?down={down}&act={act}&after={after}"


def parse_target(target: str) -> tuple[int, int, str, int]:
    parts = urlsplit(target)
    sid = int(parts.path.rsplit("/", 1)[1], 16)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return sid, int(q.get("down", RECORD)), q.get("act", "respond"), int(q.get("after", 0))


def _read_head(conn, rec, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        if len(buf) > 65536:
            return None
        data = conn.recv(65536)
        if not data:
            return None
        rec.feed(data)
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    return head


def http_handler(conn: socket.socket, rec: ConnRecord, backend) -> None:
    """One request per connection (proxyd sends `Connection: close`)."""
    tag = _start(conn, rec, backend)
    buf = bytearray()
    head = _read_head(conn, rec, buf)
    if head is None:
        rec.end = "no head"
        tag.received += buf
        return
    tag.head = head
    tag.target = head.split(b" ", 2)[1].decode("latin-1")
    tag.sid, down, act, after = parse_target(tag.target)
    m = re.search(rb"\r\ncontent-length:[ \t]*(\d+)", head, re.I)
    length = int(m[1]) if m else 0
    tag.received += buf[:length]
    if act == "reset_upload":
        _recv_into_tag(conn, rec, tag, min(after, length))
        if getattr(backend, "hold", None):
            backend.hold(conn)
        return _reset(conn, rec)
    if not _recv_into_tag(conn, rec, tag, length):
        return
    tag.answered = True
    if act == "upgrade":
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: tagged\r\n\r\n")
        _send(conn, rec, tag, tag.sid, 0, down)
        while conn.recv(CHUNK):
            pass
        return
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % down)
    if act == "reset_download":
        _send(conn, rec, tag, tag.sid, 0, min(after, down))
        return _reset(conn, rec)
    _send(conn, rec, tag, tag.sid, 0, down)


def tagged_reply(req):
    """For tests.http_support.HTTPBackend: the tagged answer REQ's target asks for
    (act=respond only); check req.body with check_stream(req.body, sid, UP)."""
    from tests.http_support import Reply
    sid, down, _act, _after = parse_target(req.target)
    return Reply(body=stream(sid, DOWN, 0, down))


def http_request(sid: int, up: int = 0, down: int = RECORD, act: str = "respond", after: int = 0,
                 keep_alive: bool = True, headers: bytes = b"") -> bytes:
    """A tagged request: head, then (whole) its body of UP bytes."""
    return http_head(sid, up, down, act, after, keep_alive, headers) + stream(sid, UP, 0, up)


def http_head(sid: int, up: int = 0, down: int = RECORD, act: str = "respond", after: int = 0,
              keep_alive: bool = True, headers: bytes = b"") -> bytes:
    method = b"POST" if up else b"GET"
    length = b"Content-Length: %d\r\n" % up if up else b""
    conn = b"" if keep_alive else b"Connection: close\r\n"
    return (b"%s %s HTTP/1.1\r\nHost: tagged.test\r\n%s%s%s\r\n"
            % (method, http_target(sid, down, act, after).encode(), length, conn, headers))


# ------------------------------------------------------------ the proxy side

@pytest.fixture
def tagged_backend():
    """tagged_backend(**kw) -> a running TaggedBackend, closed at teardown
    (import it into a test module to use it)."""
    started: list[TaggedBackend] = []

    def make(**kw) -> TaggedBackend:
        b = TaggedBackend(**kw)
        started.append(b)
        return b

    yield make
    for b in reversed(started):
        b.close()


def fd_kinds(proxy) -> dict:
    """Open fds of all PROXY's workers by kind: "pipe", "socket", "anon_inode", "file"."""
    kinds: dict = {}
    for w in proxy.workers():
        try:
            names = os.listdir(f"/proc/{w.pid}/fd")
        except FileNotFoundError:
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{w.pid}/fd/{name}")
            except FileNotFoundError:
                continue
            kind = link.split(":", 1)[0] if ":" in link else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def settle(proxy, backend) -> None:
    """Wait until no session is left: nothing but LISTEN / TIME-WAIT on the
    proxy's port, nothing but TIME-WAIT towards BACKEND."""
    def quiet():
        return all(line.split()[0] in ("LISTEN", "TIME-WAIT") for line in ss("-tan", f"( sport = :{proxy.port} )"))
    wait_for(quiet, 15, f"no session left on :{proxy.port}")
    settle_towards(backend.port)
