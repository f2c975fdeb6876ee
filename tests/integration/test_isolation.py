"""Session isolation (PRODUCT.md, "Bars": no byte of one session ever reaches
another session's peer, whatever the sessions before it did).

A session that ends abnormally while the proxy holds its bytes in a pipe (a
client reset mid-download, a server reset mid-upload) must not hand those
bytes to the sessions after it.  One worker, so the next sessions get the
pipes the aborted one gave back; every byte is tagged (tests/tagged.py) and
checked on both sides: what a client received must be a prefix of its own
server's answer, what a server received a prefix of its own client's
request.  Splice is where pipes are pooled; copy mode must keep the same
property.  The sessions after the aborted one run while a stalled download
holds the pipe on top of the pool (Holder), so they get the pipes beneath.

In HTTP mode the request and response pumps are the exposed ones (they must
not give back a pipe with bytes in it either), and an upgraded connection
relays as a TCP session does.
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests import tagged
from tests.http_support import HTTPClient, http_access_lines, http_config
from tests.support import free_port, ss, wait_for
from tests.tagged import DOWN, RECORD, UP, Plan, TaggedBackend, describe, http_head, http_request, stream

KiB, MiB = 1 << 10, 1 << 20
BIG = 64 * MiB       # more than every buffer on the path: the transfer stalls
FOLLOWING = 5        # sessions checked after the aborted one

SPLICE = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]


def logged_terms(proxy) -> set[str]:
    """The first characters of the termination states of every access line
    (HTTP requests and TCP sessions: an upgraded request's tunnel)."""
    return {a.term[0] for a in http_access_lines(proxy)} | {a.term[0] for a in proxy.access_lines()}


# ------------------------------------------------------------------ stalls

def _queues(filter_: str) -> list[tuple[int, int]]:
    """(Recv-Q, Send-Q) of the TCP sockets matching FILTER."""
    return [(int(f[1]), int(f[2])) for f in (line.split() for line in ss("-tn", filter_)) if len(f) >= 5]


def stalled(proxy_port: int, backend_port: int, direction: bytes) -> bool:
    """The proxy holds bytes of DIRECTION it cannot deliver: it has stopped
    reading from the source (bytes wait in its receive queue) while its
    socket towards the destination is full.  Between the two, its pump holds
    bytes."""
    towards_server = _queues(f"( dport = :{backend_port} )")
    from_client = _queues(f"( sport = :{proxy_port} )")
    if direction == DOWN:
        return any(r for r, _ in towards_server) and any(s for _, s in from_client)
    return any(s for _, s in towards_server) and any(r for r, _ in from_client)


class Sender(threading.Thread):
    """Sends HEAD, then bytes [0, SIZE) of SID's upload, until done or the
    connection fails."""

    def __init__(self, sock: socket.socket, sid: int, size: int, head: bytes = b""):
        super().__init__(daemon=True)
        self.sock, self.sid, self.size, self.head = sock, sid, size, head
        self.sent = [0]
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.head:
                self.sock.sendall(self.head)
            tagged.send_stream(self.sock, self.sid, UP, 0, self.size, self.sent)
        except OSError as e:
            self.error = e


# ---------------------------------------------------------------- TCP mode

def tcp_short_session(port: int, backend: TaggedBackend, sid: int, request: int, answer: int) -> list[str]:
    """One short tagged exchange; what is wrong on the client side."""
    backend.plan(sid, Plan(request=request, answer=answer))
    with tagged.connect(port) as client:
        client.sendall(stream(sid, UP, 0, request))
        data, end = tagged.recv_upto(client, answer + MiB)
    problems = [describe(data, sid, DOWN, "client side")]
    if len(data) != answer or end != "eof":
        problems.append(f"session {sid:08x}: client got {len(data)} of {answer} B, then {end}")
    return [p for p in problems if p]


class Holder:
    """A large download its client does not read yet: the proxy's pump for
    it stalls holding a pipe, the one on top of the pool, so the sessions
    run meanwhile get the pipes beneath it (where a dirty one would be)."""

    SIZE = 16 * MiB

    def __init__(self, proxy, backend: TaggedBackend, sid: int, http: bool = False):
        self.sid, self.http = sid, http
        if not http:
            backend.plan(sid, Plan(request=RECORD, answer=self.SIZE))
        self.client = tagged.connect(proxy.port, rcvbuf=64 * KiB)
        self.client.sendall(http_head(sid, down=self.SIZE, keep_alive=False) if http
                            else stream(sid, UP, 0, RECORD))
        wait_for(lambda: stalled(proxy.port, backend.port, DOWN) or backend.problems(), 10,
                 "the proxy to stall on a download")
        assert not backend.problems(), "bytes of another session arrived:\n" + "\n".join(backend.problems())

    def finish(self) -> list[str]:
        """Read the whole answer now; what is wrong with it."""
        with self.client:
            rest = b""
            if self.http:
                head, rest = read_head(self.client)
            data, end = tagged.recv_upto(self.client, self.SIZE + MiB - len(rest))
        data = rest + data
        problems = [describe(data, self.sid, DOWN, "client side (held download)")]
        if len(data) != self.SIZE or end != "eof":
            problems.append(f"held session {self.sid:08x}: client got {len(data)} of {self.SIZE} B, then {end}")
        return [p for p in problems if p]


def tcp_following_sessions(proxy, backend, first_sid: int) -> None:
    holder = Holder(proxy, backend, first_sid - 1)
    problems = []
    for i in range(FOLLOWING):
        problems += tcp_short_session(proxy.port, backend, first_sid + i,
                                      request=RECORD * (1 + 7 * i) + 5 * i, answer=RECORD * (3 + 11 * i) + 3 * i)
    problems += holder.finish()
    backend.wait_done(len(backend.connections()))
    problems += backend.problems()
    assert not problems, "bytes of another session arrived:\n" + "\n".join(problems)


@pytest.mark.parametrize("splice", SPLICE)
def test_tcp_client_reset_mid_download_leaks_nothing(splice, tagged_backend, tcp_proxy):
    """A client reads a little of a large answer and resets while the proxy
    holds answer bytes; the next sessions see only their own bytes."""
    server = tagged_backend()
    proxy = tcp_proxy([server], workers=1, global_={"splice": splice})
    sid = 0xA0000001
    server.plan(sid, Plan(request=RECORD, answer=BIG))

    client = tagged.connect(proxy.port, rcvbuf=64 * KiB)
    try:
        client.sendall(stream(sid, UP, 0, RECORD))
        got = tagged.recv_upto(client, 64 * KiB)[0]
        assert not describe(got, sid, DOWN), describe(got, sid, DOWN)
        wait_for(lambda: stalled(proxy.port, server.port, DOWN), 10, "the proxy to hold answer bytes")
    finally:
        tagged.reset(client)
    proxy.wait_access_lines(1)

    tcp_following_sessions(proxy, server, 0xA0000100)


@pytest.mark.parametrize("splice", SPLICE)
def test_tcp_server_reset_mid_upload_leaks_nothing(splice, tagged_backend, tcp_proxy):
    """A server reads a little of a large upload and resets while the proxy
    holds upload bytes; the next sessions see only their own bytes."""
    server = tagged_backend()
    proxy = tcp_proxy([server], workers=1, global_={"splice": splice})
    sid = 0xB0000001

    def hold(_sock):
        wait_for(lambda: stalled(proxy.port, server.port, UP), 10, "the proxy to hold upload bytes")

    server.plan(sid, Plan(reset_after=256 * KiB, hold=hold))
    with tagged.connect(proxy.port) as client:
        sender = Sender(client, sid, BIG)
        sender.start()
        sender.join(15)
        assert not sender.is_alive(), "the upload neither finished nor failed"
    assert sender.error is not None, "a 64 MiB upload to a server that reset went through"
    proxy.wait_access_lines(1)
    assert not server.problems(), server.problems()

    tcp_following_sessions(proxy, server, 0xB0000100)


# --------------------------------------------------------------- HTTP mode

def http_following_exchanges(proxy, backend: TaggedBackend, first_sid: int) -> None:
    """Keep-alive requests on one connection, then one per new connection,
    with bodies large enough both ways to go through the proxy's pumps."""
    holder = Holder(proxy, backend, first_sid - 1, http=True)
    problems = []
    sizes = [(200 * KiB, 300 * KiB), (RECORD, 150 * KiB), (130 * KiB, RECORD), (1 * MiB, 1 * MiB)]
    sid = first_sid

    def exchange(client, sid, up, down, keep_alive=True):
        client.send(http_request(sid, up, down, keep_alive=keep_alive))
        resp = client.read_response()
        p = describe(resp.body, sid, DOWN, "client side")
        if p or resp.status != 200 or len(resp.body) != down:
            problems.append(p or f"session {sid:08x}: {resp.status}, {len(resp.body)} of {down} B")

    with HTTPClient(proxy.port) as client:
        for up, down in sizes:
            exchange(client, sid, up, down)
            sid += 1
    for up, down in sizes:
        with HTTPClient(proxy.port) as client:
            exchange(client, sid, up, down, keep_alive=False)
            sid += 1
    problems += holder.finish()
    backend.wait_done(len(backend.connections()))
    problems += backend.problems()
    assert not problems, "bytes of another session arrived:\n" + "\n".join(problems)


def start_http(proxyd, server, splice):
    return proxyd(http_config(free_port(), {"app": [server]}, workers=1, global_={"splice": splice}))


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        assert data, f"EOF before a response head: {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


@pytest.mark.parametrize("splice", SPLICE)
def test_http_client_reset_mid_download_leaks_nothing(splice, tagged_backend, proxyd):
    """A client resets in the middle of a large Content-Length response."""
    server = tagged_backend(http=True)
    proxy = start_http(proxyd, server, splice)
    sid = 0xC0000001
    client = tagged.connect(proxy.port, rcvbuf=64 * KiB)
    try:
        client.sendall(http_head(sid, down=BIG))
        head, body = read_head(client)
        assert head.startswith(b"HTTP/1.1 200"), head
        body += tagged.recv_upto(client, 64 * KiB)[0]
        assert not describe(body, sid, DOWN), describe(body, sid, DOWN)
        wait_for(lambda: stalled(proxy.port, server.port, DOWN), 10, "the proxy to hold response bytes")
    finally:
        tagged.reset(client)
    wait_for(lambda: "C" in logged_terms(proxy), 10, "the aborted request's access line")

    http_following_exchanges(proxy, server, 0xC0000100)


@pytest.mark.parametrize("splice", SPLICE)
def test_http_server_reset_mid_upload_leaks_nothing(splice, tagged_backend, proxyd):
    """A server resets in the middle of a large request body."""
    server = tagged_backend(http=True)
    proxy = start_http(proxyd, server, splice)
    server.hold = lambda _sock: wait_for(lambda: stalled(proxy.port, server.port, UP), 10,
                                         "the proxy to hold request bytes")
    sid = 0xD0000001
    with tagged.connect(proxy.port) as client:
        sender = Sender(client, sid, BIG, head=http_head(sid, up=BIG, act="reset_upload", after=256 * KiB))
        sender.start()
        sender.join(15)
        assert not sender.is_alive(), "the upload neither finished nor failed"
    wait_for(lambda: "S" in logged_terms(proxy), 10, "the aborted request's access line")
    assert not server.problems(), server.problems()

    http_following_exchanges(proxy, server, 0xD0000100)


@pytest.mark.parametrize("splice", SPLICE)
def test_http_upgraded_client_reset_mid_download_leaks_nothing(splice, tagged_backend, proxyd):
    """An upgraded connection (101, then TCP relaying) whose client resets
    while the server streams; the next HTTP exchanges see only their own bytes."""
    server = tagged_backend(http=True)
    proxy = start_http(proxyd, server, splice)
    sid = 0xE0000001
    client = tagged.connect(proxy.port, rcvbuf=64 * KiB)
    try:
        client.sendall(http_head(sid, down=BIG, act="upgrade",
                                 headers=b"Connection: upgrade\r\nUpgrade: tagged\r\n"))
        head, body = read_head(client)
        assert head.startswith(b"HTTP/1.1 101"), head
        body += tagged.recv_upto(client, 64 * KiB)[0]
        assert not describe(body, sid, DOWN), describe(body, sid, DOWN)
        wait_for(lambda: stalled(proxy.port, server.port, DOWN), 10, "the proxy to hold tunnelled bytes")
    finally:
        tagged.reset(client)
    wait_for(lambda: "C" in logged_terms(proxy), 10, "the tunnel's access line")

    http_following_exchanges(proxy, server, 0xE0000100)
