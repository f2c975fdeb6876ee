"""HTTP mode: regression tests for reported defects (docs/CONTRACT.md,
"HTTP mode"; PRODUCT.md, "Bars": nothing lost, nothing leaked).

- a retried connect (refused, or timed out) sends the whole request head
  and body to the next server, and a request body is never taken for a
  request there (#2, #16);
- requests pipelined behind a chunked request reach the server once (#3);
- a response after which proxyd closes the client connection reaches the
  client whole, ended by a FIN, not cut by a reset (lingering close), and
  says `Connection: close` (#5);
- an Upgrade request's body reaches the server whole before the tunnel
  bytes, and no pipe is leaked (#6);
- no server could be connected: 503, not 502; a server that fails before
  answering is still a 502 (#17).

Real proxyd processes, real sockets on 127.0.0.1, servers in threads of
the test process; every wait polls with a deadline, every loop is bounded.
"""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from tests.http_support import (HTTPClient, Reply, assert_own_error, build_request,
                                wait_http_access_lines)
from tests.support import IO_TIMEOUT, LOCALHOST, payload, run_parallel, sha256, ss, wait_for

MiB = 1 << 20
KiB = 1 << 10

SPLICE = pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])


# ------------------------------------------------------------------ fixtures

def tagged_reply(req) -> Reply:
    """200 whose body is the request as the server parsed it: `METHOD target\\n` + body."""
    return Reply(body=f"{req.method} {req.target}\n".encode() + req.body)


def read_or_fail(client: HTTPClient, what: str, method: str = "GET"):
    """client.read_response, with a reset or a short read reported as what
    the client got (a reset is the defect some of these tests are about)."""
    try:
        return client.read_response(method)
    except ConnectionResetError:
        raise AssertionError(f"{what}: connection reset after {client.received} bytes "
                             f"({len(client.buf)} of them in an unfinished response)") from None
    except socket.timeout:
        raise AssertionError(f"{what}: no complete response after {client.sock.gettimeout()}s; "
                             f"{client.received} bytes received") from None


def fds(proc) -> int:
    return proc.num_fds()


def quiet(*ports: int) -> bool:
    """No TCP socket from or to any of PORTS other than listeners and TIME-WAIT ones."""
    spec = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
    return all(line.split()[0] in ("LISTEN", "TIME-WAIT") for line in ss("-tan", f"( {spec} )"))


def common_prefix(a: bytes, b: bytes) -> int:
    """How many leading bytes A and B share."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --------------------------------------------- #2: a retried connect (refused)

ADMIN = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"


def _retry_request(i: int) -> tuple[str, str, bytes, str]:
    """Request number I: (method, target, body, how it is written)."""
    kind = i % 3
    if kind == 0:
        return "GET", f"/get/{i}", b"", "one-write"
    body = ADMIN + f"tag-{i}".encode()
    return "POST", f"/post/{i}", body, "one-write" if kind == 1 else "body-later"


@SPLICE
def test_retry_after_a_refused_connect_sends_the_whole_request(splice, reserve_port, http_backend,
                                                                http_proxy):
    """Servers [refusing, good], round robin, retries = 1: about every other
    request is refused by the first and retried on the second, which must get
    the request line, the headers (X-Forwarded-For among them) and the body —
    never nothing (a hang to a 504), never the body as if it were a request
    (a POST body `GET /admin ...` executed, bypassing X-Forwarded-For).
    GETs and POSTs; a POST in one write with its head, or its head first and
    its body once the server has been connected."""
    refused = reserve_port()
    app = http_backend(tagged_reply)
    proxy = http_proxy({"app": {"servers": [f"{LOCALHOST}:{refused}", app], "balance": "roundrobin",
                                "retries": 1, "timeout_server": "3s"}}, splice=splice)
    sent = []  # (method, target, body) in the order the server must see them

    def one(client: HTTPClient, i: int) -> None:
        method, target, body, how = _retry_request(i)
        raw = build_request(method, target, body=body)
        if how == "body-later":
            before = len(app.conns())
            client.send(raw[:len(raw) - len(body)])
            wait_for(lambda: len(app.conns()) > before, 10, f"{target}: proxyd connected to the good server")
            client.send(body)
        else:
            client.send(raw)
        resp = read_or_fail(client, target, method)
        expected = f"{method} {target}\n".encode() + body
        assert (resp.status, resp.body) == (200, expected), \
            f"{target} ({how}): got {resp.status} {resp.body[:200]!r}"

    count = 18  # every kind of request, refused first or not, several times
    with HTTPClient(proxy.port) as client:
        for i in range(count):
            sent.append(_retry_request(i)[:3])
            one(client, i)
    # and on parallel connections (these may be in any order on the server)
    parallel = list(range(count, count + 12))
    for i in parallel:
        sent.append(_retry_request(i)[:3])

    def fresh(j):
        with HTTPClient(proxy.port) as c:
            one(c, parallel[j])

    errors = run_parallel(len(parallel), 4, fresh)
    assert not errors, f"{len(errors)} of {len(parallel)} parallel requests failed, first: {errors[0]}"

    app.wait_done(len(sent))
    requests = app.requests()
    seen = [(r.method, r.target, r.body_sha256) for r in requests]
    expected = [(m, t, sha256(b)) for m, t, b in sent]
    assert seen[:count] == expected[:count], "the server did not get exactly the requests sent, in order"
    assert sorted(seen[count:]) == sorted(expected[count:])
    assert not any(r.target == "/admin" for r in requests), "a request body was executed as a request"
    for conn in app.conns():
        assert conn.request is not None, f"a server connection without a whole request: {bytes(conn.raw[:200])!r}"
        assert conn.request.header_all("x-forwarded-for") == ["127.0.0.1"], conn.request.head
    assert len(app.conns()) == len(sent), "one server connection per request"
    lines = wait_http_access_lines(proxy, len(sent))
    assert {(a.status, a.server) for a in lines} == {(200, "s2")}, [a.raw for a in lines if a.status != 200][:3]


# ------------------------------------ #16: a retried connect (connect timeout)

@SPLICE
def test_retry_after_a_connect_timeout_uses_the_new_connection(splice, full_backlog, http_backend, http_proxy):
    """Servers [black-holed (SYNs dropped), good], round robin, retries = 2,
    timeout_connect 200ms: a request whose first connect times out is sent
    whole on the retried connection, sequentially and concurrently."""
    app = http_backend(tagged_reply)
    proxy = http_proxy({"app": {"servers": [full_backlog, app], "balance": "roundrobin", "retries": 2,
                                "timeout_connect": "200ms", "timeout_server": "3s"}}, splice=splice)

    def one(i: int) -> None:
        method, target = ("POST", f"/timeout/{i}") if i % 2 else ("GET", f"/timeout/{i}")
        body = f"body of {i}".encode() if method == "POST" else b""
        with HTTPClient(proxy.port) as client:
            client.send(build_request(method, target, body=body))
            resp = read_or_fail(client, target, method)
        assert (resp.status, resp.body) == (200, f"{method} {target}\n".encode() + body), \
            f"{target}: got {resp.status} {resp.body[:200]!r}"

    sequential = 16
    for i in range(sequential):
        one(i)
    concurrent = 16
    errors = run_parallel(concurrent, concurrent, lambda i: one(sequential + i))
    assert not errors, f"{len(errors)} of {concurrent} concurrent requests failed, first: {errors[0]}"
    total = sequential + concurrent
    app.wait_done(total)
    assert len(app.requests()) == total == len(app.conns()), \
        [bytes(c.raw[:100]) for c in app.conns() if c.request is None][:3]
    lines = wait_http_access_lines(proxy, total)
    assert {(a.status, a.server) for a in lines} == {(200, "s2")}, [a.raw for a in lines if a.status != 200][:3]


# ------------------------------------- #3: requests pipelined after a chunked one

@SPLICE
def test_requests_pipelined_after_a_chunked_request_are_sent_once(splice, http_backend, http_proxy):
    """A complete chunked POST and three GETs in one write: each reaches the
    server exactly once, in order, and the client gets four responses in
    order; a fifth request afterwards on the same connection is answered as
    the fifth (not by a copy of an earlier one)."""
    app = http_backend(tagged_reply)
    proxy = http_proxy([app], splice=splice)
    body = payload(3000, seed=3)
    targets = ["/after/1", "/after/2", "/after/3"]
    batch = build_request("POST", "/chunked", body=body, framing="chunked", chunk_size=1000) + b"".join(
        build_request("GET", t) for t in targets)
    with HTTPClient(proxy.port) as client:
        client.send(batch)
        first = read_or_fail(client, "/chunked", "POST")
        assert (first.status, first.body) == (200, b"POST /chunked\n" + body), first.head
        got = [read_or_fail(client, t).body for t in targets]
        assert got == [f"GET {t}\n".encode() for t in targets]
        last = client.request(build_request("GET", "/barrier"))
        assert last.body == b"GET /barrier\n", f"the answer to /barrier was {last.body[:100]!r}"
        assert client.is_open()
    app.wait_done(5)
    assert [(r.method, r.target) for r in app.requests()] == \
        [("POST", "/chunked")] + [("GET", t) for t in targets] + [("GET", "/barrier")]
    assert len(app.conns()) == 5, [bytes(c.raw[:60]) for c in app.conns()]
    assert app.requests()[0].body == body


# ---------------------------- #5: a response after which proxyd closes, whole

BIG = 4 * MiB


def _upload(client: HTTPClient, stop: threading.Event, limit: int, result: dict) -> None:
    """Send body bytes until STOP, LIMIT bytes or an error (recorded in RESULT)."""
    chunk = payload(64 * KiB, seed=5)
    deadline = time.monotonic() + 30
    sent = 0
    try:
        while sent < limit and not stop.is_set() and time.monotonic() < deadline:
            n = min(len(chunk), limit - sent)
            client.sock.sendall(chunk[:n])
            sent += n
            stop.wait(0.002)  # pacing: a client uploading at a modest rate
    except OSError as e:
        result["error"] = errno.errorcode.get(e.errno, repr(e))
    result["sent"] = sent


@SPLICE
def test_early_response_during_an_upload_arrives_whole(splice, http_backend, http_proxy):
    """The server answers 4 MiB at once, without reading the request body,
    while the client is still uploading a large one: proxyd closes the
    connection after the response (it says `Connection: close`), but only
    once the client has it all: the client reads 4 MiB intact, then EOF,
    not a reset."""
    data = payload(BIG, seed=55)
    app = http_backend(Reply(body=data), early=True)
    proxy = http_proxy([app], splice=splice)
    declared = 1 << 30
    with HTTPClient(proxy.port, timeout=IO_TIMEOUT) as client:
        client.send(build_request("POST", "/upload", [("Content-Length", str(declared))], framing="none"))
        stop, result = threading.Event(), {}
        sender = threading.Thread(target=_upload, args=(client, stop, declared, result), daemon=True)
        sender.start()
        try:
            resp = read_or_fail(client, "/upload", "POST")
            assert resp.status == 200, resp.head
            assert len(resp.body) == BIG and sha256(resp.body) == sha256(data), \
                f"{len(resp.body)} bytes of {BIG}, or not the server's"
            assert "close" in resp.header_tokens("connection"), \
                f"proxyd closes after this response but did not say so: {resp.head!r}"
            rest, how = client.rest_and_close(20)
            assert (rest, how) == (b"", "eof"), f"after the response: {len(rest)} bytes, then {how}"
        finally:
            stop.set()
            sender.join(10)
    assert result.get("sent", 0) > 0


@pytest.mark.parametrize("second", ["large-same-write", "small-later-write"])
@SPLICE
def test_response_before_a_close_with_a_pipelined_request_arrives_whole(splice, second, http_backend,
                                                                        http_proxy):
    """`Connection: close`, then a second request: in the same write (a
    POST with a 1 MiB body: more than proxyd reads with the head), or a
    small GET written once the response has begun.  The response is 4 MiB
    and the client reads it slowly: proxyd, closing after it with the
    second request unread, must not reset the connection (which throws away
    what the client has not read yet): 4 MiB intact, then EOF; the second
    request never reaches a server."""
    data = payload(BIG, seed=56)
    app = http_backend(Reply(body=data))
    proxy = http_proxy([app], splice=splice)
    first = build_request("GET", "/big", [("Connection", "close")])
    with HTTPClient(proxy.port, timeout=IO_TIMEOUT) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)  # a slow reader's small window
        if second == "large-same-write":
            client.send(first + build_request("POST", "/second", body=payload(MiB, seed=57)))
        else:
            client.send(first)
            head = client.read_until(b"\r\n\r\n")
            assert head is not None and head.startswith(b"HTTP/1.1 200 "), head
            client.send(build_request("GET", "/second"))
            client.buf[:0] = head  # read_response below starts from the head
            client.received -= len(head)
        # The client reads only once the server has sent it all: proxyd
        # then holds much of the response in its socket buffers when it is
        # done with it and closes.
        app.wait_done(1, timeout=20)
        resp = read_or_fail(client, "/big")
        assert resp.status == 200, resp.head
        assert len(resp.body) == BIG and sha256(resp.body) == sha256(data), \
            f"{len(resp.body)} bytes of {BIG}, or not the server's"
        assert "close" in resp.header_tokens("connection"), resp.head
        rest, how = client.rest_and_close(20)
        assert (rest, how) == (b"", "eof"), f"after the response: {len(rest)} bytes, then {how}"
    assert not app.saw(b"/second") and len(app.conns()) == 1


# ------------------------------------------- #6: an Upgrade request with a body

END_OF_TUNNEL = b"--end-of-tunnel-7f3a9c--"


def queues(**filters) -> list[tuple[int, int]]:
    """(Recv-Q, Send-Q) of the established TCP sockets matching an ss filter
    built from FILTERS (sport=, dport=)."""
    spec = " and ".join(f"{k} = :{v}" for k, v in filters.items())
    return [(int(f[1]), int(f[2])) for f in (line.split() for line in ss("-tn", f"( {spec} )"))
            if f[0] == "ESTAB"]


def upgrade_summary(data: bytes) -> bytes:
    return b"got %d bytes, sha256 %s\n" % (len(data), sha256(data).encode())


class UpgradeServer:
    """A server in threads of the test process: per connection, read a
    request head, answer 101 at once (before reading any body), then read
    everything after the head until the stream ends with END_OF_TUNNEL (or
    EOF), answer with its size and hash (through the tunnel), and close.
    Records what followed each head.

    Between the 101 and its first read of the body it waits (bounded) until
    the proxy is stalled with body bytes in hand: its socket towards us full
    (Send-Q), the client's bytes waiting in its socket from the client
    (Recv-Q), both unchanged between two looks.  Whatever the proxy read
    and could not write yet is then inside it when the 101 reaches it."""

    def __init__(self):
        self.proxy_port = 0
        self.after_head: dict[str, bytes] = {}  # target -> what followed its head
        self.stalled = 0
        self.lock = threading.Lock()

    def _stalled(self, proxy_side_port: int, server_port: int):
        last = []

        def check() -> bool:
            now = (queues(sport=proxy_side_port, dport=server_port), queues(sport=self.proxy_port))
            towards_us, from_client = now
            stalled = (len(towards_us) == 1 and towards_us[0][1] > 0 and len(from_client) == 1
                       and from_client[0][0] > 0 and last == [now])
            last[:] = [now]
            return stalled
        return check

    def handler(self, conn: socket.socket, rec, backend) -> None:
        buf = bytearray()
        for _ in range(10_000):
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            data = conn.recv(65536)
            if not data:
                return
            rec.feed(data)
            buf += data
        else:
            return
        target = buf[:buf.find(b"\r\n")].split(b" ")[1].decode()
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x-test\r\n\r\n")
        try:
            wait_for(self._stalled(rec.peer[1], backend.port), 5, "the proxy stalled with body bytes",
                     interval=0.03)
            with self.lock:
                self.stalled += 1
        except AssertionError:
            pass  # read anyway
        rest = bytearray(buf[end + 4:])
        try:
            for _ in range(1_000_000):
                if rest.endswith(END_OF_TUNNEL):
                    break
                data = conn.recv(262144)
                if not data:
                    break
                rec.feed(data)
                rest += data
        finally:
            with self.lock:
                self.after_head[target] = bytes(rest)
        conn.sendall(upgrade_summary(rest))


@SPLICE
def test_upgrade_request_body_reaches_the_server_whole_and_no_pipe_leaks(splice, backend, http_proxy):
    """An Upgrade request with a Content-Length body far larger than one read
    (and than the socket buffers), then tunnel bytes, all written at once;
    the server answers 101 before reading the body.  It must get the body,
    then the tunnel bytes, whole and in order (and say so through the
    tunnel), 20 times over; and the worker's open fds come back to where
    they were (no pipe left behind with bytes in it)."""
    server = UpgradeServer()
    srv = backend(server.handler, name="upgrade")
    proxy = http_proxy({"app": {"servers": [srv.address], "timeout_server": "10s"}}, splice=splice)
    server.proxy_port = proxy.port
    worker = wait_for(lambda: proxy.workers(), 10, "the worker")[0]

    def session(i: int) -> None:
        body = payload(BODY_UP, seed=600 + i)
        tunnel = payload(128 * KiB, seed=700 + i) + END_OF_TUNNEL
        head = build_request("GET", f"/upgrade/{i}", [("Connection", "Upgrade"), ("Upgrade", "x-test"),
                                                       ("Content-Length", str(len(body)))], framing="none")
        with HTTPClient(proxy.port, timeout=IO_TIMEOUT) as client:
            sender = threading.Thread(target=client.sock.sendall, args=(head + body + tunnel,), daemon=True)
            sender.start()
            try:
                resp = read_or_fail(client, f"/upgrade/{i}")
                assert resp.status == 101, resp.head
                answer, how = client.rest_and_close(20)
            finally:
                sender.join(20)
        srv.wait_done(i + 1)
        with server.lock:
            got = server.after_head.get(f"/upgrade/{i}")
        assert got is not None, f"session {i}: the server got no request head: {srv.connections()[i:]}"
        assert got == body + tunnel, \
            (f"session {i}: the server got {len(got)} bytes after the head, expected {len(body)} of body "
             f"then {len(tunnel)} of tunnel; the same up to byte {common_prefix(got, body + tunnel)}; "
             f"the server's connection ended with {srv.connections()[i].end}")
        assert (answer, how) == (upgrade_summary(body + tunnel), "eof"), \
            f"session {i}: the server's answer through the tunnel: {answer!r}, then {how}"

    # Warm-up: afterwards the pipe pool holds the pipes a session uses at most.
    warm_up, sessions = 2, 20
    for i in range(warm_up):
        session(i)
    srv.wait_done(warm_up)
    wait_for(lambda: quiet(proxy.port, srv.port), 10, "the warm-up sessions' sockets to be closed")
    baseline = fds(worker)
    for i in range(warm_up, warm_up + sessions):
        session(i)
    srv.wait_done(warm_up + sessions)
    try:
        # +2: one more pipe pooled (a session that needed one more at once) is not a leak
        wait_for(lambda: quiet(proxy.port, srv.port) and fds(worker) <= baseline + 2, 10,
                 "the worker's fds to come back")
    except AssertionError:
        raise AssertionError(f"worker fds: {baseline} after {warm_up} sessions, "
                             f"{fds(worker)} after {sessions} more") from None
    assert server.stalled >= sessions // 2, f"the proxy was seen stalled in {server.stalled} sessions only"


BODY_UP = 6 * MiB


# --------------------------------------- #17: no server could be connected: 503

def test_503_when_no_server_can_be_connected_and_502_for_a_failed_reply(reserve_port, http_backend,
                                                                       http_proxy):
    """Every server refuses (one server, retries = 0; two, retries = 1): 503
    (no server available), proxyd's own answer, logged as 503.  A server
    that accepts and resets before answering is still a 502."""
    resets = http_backend(Reply(action="reset"), name="resets")
    one, two, three = reserve_port(), reserve_port(), reserve_port()
    proxy = http_proxy({
        "one": {"servers": [f"{LOCALHOST}:{one}"], "retries": 0},
        "two": {"servers": [f"{LOCALHOST}:{two}", f"{LOCALHOST}:{three}"], "retries": 1},
        "resets": {"servers": [resets], "retries": 1},
    }, default="one", routes=[{"path_prefix": "/two/", "backend": "two"},
                              {"path_prefix": "/resets/", "backend": "resets"}])
    cases = [("/one/a", 503), ("/two/a", 503), ("/one/b", 503), ("/two/b", 503), ("/resets/a", 502)]
    for target, status in cases:
        with HTTPClient(proxy.port) as client:
            client.send(build_request("GET", target))
            resp = read_or_fail(client, target)
            assert resp.status == status, f"{target}: {resp.status} {resp.reason}, expected {status}"
            assert_own_error(resp, status)
            rest, how = client.rest_and_close()
            assert rest == b""
    with HTTPClient(proxy.port) as client:  # a POST with its body: the same
        client.send(build_request("POST", "/two/post", body=b"x" * 1000))
        assert_own_error(read_or_fail(client, "/two/post", "POST"), 503)
    lines = wait_http_access_lines(proxy, len(cases) + 1)
    logged = {a.target: a for a in lines}
    for target, status in cases + [("/two/post", 503)]:
        assert logged[target].status == status, logged[target].raw
    assert resets.wait_request_for("/resets/a")
