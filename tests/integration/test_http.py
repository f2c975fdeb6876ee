"""HTTP mode (docs/CONTRACT.md, "HTTP mode"): keep-alive with one server
connection per request, no TIME_WAIT towards servers, forwarding headers,
routing, bodies intact both ways, HTTP/1.0, pipelining, request smuggling
vectors rejected and never forwarded, limits and timeouts, proxyd's own
error answers and error files, upgrades, 100-continue, access lines, and a
worker that survives 10,000 random and truncated requests.

Real proxyd processes, real sockets on 127.0.0.1; the HTTP servers are
tests.http_support.HTTPBackend threads that record every byte they receive.
"""

from __future__ import annotations

import errno
import random
import re
import socket
import threading

import pytest

from tests.http_support import (HTTPBackend, HTTPClient, Reply, assert_own_error, build_request,
                                echo_reply, fill_backlog, get, http_config, wait_http_access_lines)
from tests.support import (LOCALHOST, LOG_LINE, Proxyd, free_port, payload, run_parallel, settle_towards, sha256,
                           states_towards, timewait_towards, wait_for, write_config)

MiB = 1 << 20


# ------------------------------------------------------------------ fixtures

# ------------------------------------------------------- keep-alive, TIME_WAIT

def test_keepalive_requests_each_get_a_new_server_connection(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app])
    targets = [f"/req/{i}" for i in range(5)]

    with HTTPClient(proxy.port) as client:
        for target in targets:
            resp = client.request(build_request("GET", target))
            assert resp.status == 200, resp.head
            assert resp.json()["target"] == target
            assert "close" not in resp.header_tokens("connection"), resp.head
        client_address = client.address

    conns = app.wait_done(len(targets))
    assert len(app.conns()) == len(targets), "one server connection per request"
    assert len({c.peer for c in conns}) == len(targets)
    for conn, target in zip(app.conns(), targets):
        assert conn.request is not None and conn.request.target == target, bytes(conn.raw[:300])
        assert conn.raw.count(b" HTTP/1.1\r\n") == 1, f"more than one request on a connection: {bytes(conn.raw)!r}"
        assert conn.request.header_tokens("connection") == ["close"], conn.request.head
    lines = wait_http_access_lines(proxy, len(targets))
    assert [(a.target, a.status, a.client) for a in lines] == [(t, 200, client_address) for t in targets]


@pytest.mark.parametrize("server_closes", [True, False], ids=["server-closes", "server-keeps-open"])
def test_no_timewait_towards_server_after_2000_keepalive_requests(server_closes, http_backend, http_proxy):
    """20 client connections x 100 requests.  Whether the server closes
    after its response or keeps its side open (ignoring Connection: close),
    no socket towards it is left in TIME_WAIT; in the second case proxyd
    must be the one to close, with a reset."""
    clients, per_client = 20, 100
    reply = Reply(body=b"ok\n") if server_closes else Reply(body=b"ok\n", keep_open=True, connection_close=False)
    app = http_backend(reply)
    proxy = http_proxy([app], workers=2)

    def client(i):
        with HTTPClient(proxy.port, timeout=30) as c:
            for j in range(per_client):
                resp = c.request(build_request("GET", f"/c{i}/r{j}"))
                assert (resp.status, resp.body) == (200, b"ok\n"), resp.head

    errors = run_parallel(clients, 4, client)
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
    total = clients * per_client
    app.wait_done(total, timeout=60)
    assert len(app.conns()) == total
    states = settle_towards(app.port)
    assert timewait_towards(app.port) == 0, f"{len(states)} sockets towards the server in TIME-WAIT"
    # control: a socket that does close first towards the server is counted
    # (a full kernel TIME-WAIT table, tcp_max_tw_buckets, would hide them all)
    with socket.create_connection((LOCALHOST, app.port)) as direct:
        direct.sendall(b"GET /control HTTP/1.1\r\n")  # no end of head: the server waits
        app.wait_connections(total + 1)
    wait_for(lambda: timewait_towards(app.port) == 1, 10, "the control socket in TIME-WAIT")
    if not server_closes:
        ends = {}
        for c in app.conns():
            ends[c.end] = ends.get(c.end, 0) + 1
        assert ends == {"reset": total, "eof": 1}, f"how the server connections ended: {ends}"


# ----------------------------------------------------------------- headers

HOP_BY_HOP_REQUEST = [
    ("Connection", "keep-alive, X-Custom-Hop"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Upgrade", "h2c"),  # no "upgrade" in Connection: not an upgrade request
    ("X-Custom-Hop", "named in Connection"),
]


def test_forwarding_headers_and_hop_by_hop_removed(http_backend, http_proxy):
    app = http_backend(Reply(body=b"fine", connection_close=False, headers=[
        ("Connection", "close, X-Resp-Hop"), ("Keep-Alive", "timeout=1"), ("Proxy-Connection", "close"),
        ("X-Resp-Hop", "named in Connection"), ("X-Resp-Keep", "end-to-end")]))
    proxy = http_proxy([app])

    with HTTPClient(proxy.port) as client:
        resp = client.request(build_request("GET", "/h", [
            ("X-Forwarded-For", "203.0.113.7"), ("X-Keep-Me", "yes"), ("User-Agent", "proxyd-tests/1")]
            + HOP_BY_HOP_REQUEST, host="Example.TEST:8080"))
        assert (resp.status, resp.body) == (200, b"fine"), resp.head
        for name in ("keep-alive", "proxy-connection", "x-resp-hop"):
            assert resp.header(name) is None, f"{name} not removed from the response: {resp.head!r}"
        assert resp.header("x-resp-keep") == "end-to-end", resp.head
        assert "close" not in resp.header_tokens("connection"), resp.head
        # the server's Connection: close is not the client's: still kept alive
        again = client.request(build_request("GET", "/again"))
        assert again.status == 200, again.head

    req = app.wait_request_for("/h")
    assert req.header_tokens("x-forwarded-for") == ["203.0.113.7", "127.0.0.1"], req.head
    assert req.header_all("x-forwarded-proto") == ["http"], req.head
    assert req.header_all("host") == ["Example.TEST:8080"], req.head
    assert req.header_tokens("connection") == ["close"], req.head
    for name in ("keep-alive", "proxy-connection", "te", "trailer", "upgrade", "x-custom-hop"):
        assert req.header(name) is None, f"{name} not removed from the request: {req.head!r}"
    assert req.header_all("x-keep-me") == ["yes"], req.head
    assert req.header_all("user-agent") == ["proxyd-tests/1"], req.head


def test_forwarded_for_added_and_proto_set(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app])
    resp = get(proxy.port, "/xff", headers=[("X-Forwarded-Proto", "https")])
    assert resp.status == 200, resp.head
    req = app.wait_request_for("/xff")
    assert req.header_all("x-forwarded-for") == ["127.0.0.1"], req.head
    assert req.header_all("x-forwarded-proto") == ["http"], req.head


def test_forwardfor_false_adds_nothing(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy({"app": {"servers": [app], "forwardfor": False}})
    assert get(proxy.port, "/noxff").status == 200
    req = app.wait_request_for("/noxff")
    assert req.header("x-forwarded-for") is None, req.head
    assert req.header("x-forwarded-proto") is None, req.head


# ----------------------------------------------------------------- routing

ROUTE_CASES = [  # (Host, target, expected backend)
    ("api.example.com", "/x", "api"),
    ("API.Example.COM:8080", "/v1/users", "api"),  # first match wins over the /v1/ route below
    ("api.example.com", "/static/a.css", "api"),  # first match wins over the path route
    ("www.example.com", "/static/a.css", "static"),
    ("WWW.example.com:81", "/static/", "static"),
    ("admin.example.com", "/admin/users", "admin"),
    ("admin.example.com:9000", "/admin/", "admin"),
    ("admin.example.com", "/admin", "app"),  # "/admin" does not start with "/admin/"
    ("admin.example.com", "/other", "app"),
    ("other.example.com", "/admin/users", "app"),
    ("api.example.com.evil.test", "/x", "app"),
    ("www.example.com", "/", "app"),
    ("www.example.com", "/Static/a.css", "app"),  # paths are case-sensitive
]


def test_routes_by_host_and_path_prefix_first_match_wins(http_backend, http_proxy):
    names = ["app", "api", "static", "admin"]
    servers = {n: http_backend(Reply(body=n.encode()), name=n) for n in names}
    proxy = http_proxy({n: [servers[n]] for n in names}, default="app", routes=[
        {"host": "api.example.com", "backend": "api"},
        {"host": "api.example.com", "path_prefix": "/v1/", "backend": "static"},
        {"path_prefix": "/static/", "backend": "static"},
        {"host": "admin.example.com", "path_prefix": "/admin/", "backend": "admin"},
    ])

    wrong = []
    for host, target, expected in ROUTE_CASES:
        before = {n: len(servers[n].connections()) for n in names}
        resp = get(proxy.port, target, host=host)
        reached = resp.body.decode(errors="replace") if resp.status == 200 else f"status {resp.status}"
        if reached != expected:
            wrong.append(f"Host {host!r} {target}: expected {expected}, got {reached}")
            continue
        servers[expected].wait_connections(before[expected] + 1)
        req = servers[expected].requests()[-1]
        if (req.target, req.header("host")) != (target, host):
            wrong.append(f"Host {host!r} {target}: the server saw {req.header('host')!r} {req.target}")
    assert not wrong, "\n".join(wrong)
    lines = wait_http_access_lines(proxy, len(ROUTE_CASES))
    assert [a.backend for a in lines] == [expected for _, _, expected in ROUTE_CASES]


# ------------------------------------------------------------------ bodies

SIZES = [0, 1000, 10 * MiB]
SIZE_IDS = ["0B", "1000B", "10MiB"]


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_bodies_intact_both_ways(size, framing, http_backend, http_proxy):
    """A request body to the server and a response body to the client, both
    of SIZE bytes with the same framing; sha256 of the decoded bodies."""
    up = payload(size, seed=size + 11)
    down = payload(size, seed=size + 12)
    app = http_backend(lambda req: Reply(
        body=down if req.target == "/upload" else b"second", framing=framing, chunk_size=65536 + 3,
        headers=[("X-Got-Sha256", req.body_sha256), ("X-Got-Length", str(len(req.body)))]))
    proxy = http_proxy([app])

    with HTTPClient(proxy.port, timeout=60) as client:
        client.send(build_request("POST", "/upload", body=up, framing=framing, chunk_size=100_000 + 7))
        resp = client.read_response("POST")
        assert resp.status == 200, resp.head
        assert (resp.header("x-got-length"), resp.header("x-got-sha256")) == (str(size), sha256(up))
        assert (len(resp.body), resp.body_sha256) == (size, sha256(down))
        # the connection is still in step: the next request is answered
        second = client.request(build_request("GET", "/second"))
        assert (second.status, second.body) == (200, b"second"), second.head

    req = app.wait_request_for("/upload")
    assert (len(req.body), req.body_sha256) == (size, sha256(up))


@pytest.mark.parametrize("size", [1000, 10 * MiB], ids=["1000B", "10MiB"])
def test_close_delimited_response_intact(size, http_backend, http_proxy):
    """A response with neither Content-Length nor chunked ends at the
    server's close; the client gets it whole (chunked by proxyd, or
    close-delimited and then the client connection closed)."""
    down = payload(size, seed=size + 13)
    app = http_backend(Reply(body=down, framing="close"))
    proxy = http_proxy([app])

    with HTTPClient(proxy.port, timeout=60) as client:
        resp = client.request(build_request("GET", "/close-delimited"))
        assert resp.status == 200, resp.head
        assert (len(resp.body), resp.body_sha256) == (size, sha256(down)), resp.head
        if resp.framing == "close":
            assert client.eof


def test_chunked_request_with_extensions_and_trailer(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app])
    raw = (b"POST /ext HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6;flag\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n")
    with HTTPClient(proxy.port) as client:
        resp = client.request(raw, "POST")
        assert resp.status == 200, resp.head
        assert resp.json()["body_sha256"] == sha256(b"hello world")
        assert client.request(build_request("GET", "/after")).status == 200
    assert app.wait_request_for("/ext").body == b"hello world"


def test_responses_without_a_body_keep_the_connection_in_step(http_backend, http_proxy):
    """HEAD (a Content-Length but no body follows), 204 and 304 end at their
    head; the next request on the connection is answered."""
    def reply(req):
        if req.method == "HEAD":
            return Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nConnection: close\r\n\r\n")
        if req.target == "/204":
            return Reply(status=204, reason="No Content", framing="none")
        if req.target == "/304":
            return Reply(status=304, reason="Not Modified", framing="none", headers=[("ETag", '"v1"')])
        return echo_reply(req)

    app = http_backend(reply)
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        head = client.request(build_request("HEAD", "/head"), "HEAD")
        assert (head.status, head.header("content-length"), head.body) == (200, "1234", b""), head.head
        assert client.request(build_request("GET", "/204")).status == 204
        assert client.request(build_request("GET", "/304")).status == 304
        last = client.request(build_request("GET", "/last"))
        assert last.status == 200 and last.json()["target"] == "/last", last.head
        assert client.is_open()
    assert len(app.wait_requests(4)) == 4


def test_bad_chunked_response_is_cut_not_completed(http_backend, http_proxy):
    """A chunked response whose framing breaks mid-body: the bad framing and
    what follows never reach the client, the response is never completed,
    and the connection ends (it could not be in step any more).  Whatever
    proxyd sent (a 502, part of the response, or nothing), its access line
    says so: the status sent (-1 if none) and the bytes delivered."""
    app = http_backend(Reply(raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"5\r\nhello\r\nzz\r\nHTTP/1.1 200 OK\r\nX-Smuggled: 1\r\n\r\n"))
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/bad-chunked-response"))
        data, how = client.rest_and_close()
    assert b"zz" not in data and b"X-Smuggled" not in data, data
    sent = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    if sent and sent[1] == b"200":
        assert not data.endswith(b"0\r\n\r\n"), f"the response was completed: {data!r}"
    line = wait_http_access_lines(proxy, 1)[0]
    assert (line.status, line.down) == (int(sent[1]) if sent else -1, len(data)), \
        f"the client got {len(data)} bytes ({data[:60]!r}), the log says: {line.raw}"


def test_short_response_body_closes_the_client_connection(http_backend, http_proxy):
    """The server closes before its Content-Length is complete: the client
    sees the truncation as a close, not a keep-alive connection out of step."""
    app = http_backend(Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"))
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/short"))
        head = client.read_until(b"\r\n\r\n")
        assert head is not None and head.startswith(b"HTTP/1.1 200 "), head
        rest, how = client.rest_and_close()
        assert rest == b"only this"
    line = wait_http_access_lines(proxy, 1)[0]
    assert (line.status, line.term) == (200, "SD"), line.raw


def test_requests_after_connection_close_are_not_forwarded(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/last-one", [("Connection", "close")])
                    + build_request("GET", "/smuggled"))
        resp = client.read_response()
        assert resp.json()["target"] == "/last-one"
        rest, how = client.rest_and_close()
        assert rest == b"", rest[:300]
    app.wait_done(1)
    assert not app.saw(b"/smuggled") and len(app.conns()) == 1


def test_body_after_an_early_final_response_is_not_a_request(http_backend, http_proxy):
    """Expect: 100-continue, and the server answers 401 at once without a 100;
    the client sends its body anyway (RFC 9110 lets it), then another
    request: the body is never taken for a request, whatever bytes it holds.
    proxyd may close the connection, or skip the body and answer the next."""
    app = http_backend(lambda req: Reply(status=401, reason="Unauthorized", body=req.target.encode()), early=True)
    proxy = http_proxy([app])
    body = build_request("GET", "/smuggled")
    head = build_request("POST", "/upload", [("Expect", "100-continue")], body)[:-len(body)]
    with HTTPClient(proxy.port) as client:
        client.send(head)
        resp = client.read_response("POST")
        assert (resp.status, resp.body) == (401, b"/upload"), resp.head
        try:
            client.send(body + build_request("GET", "/follow-up"))
            following = client.read_response()
        except (AssertionError, OSError):
            following = None  # closed: fine
        if following is not None:
            assert following.body == b"/follow-up", f"a response to the body: {following.head + following.body!r}"
    assert not app.saw(b"GET /smuggled"), [bytes(c.raw) for c in app.conns()]


# ---------------------------------------------------------------- HTTP/1.0

def test_http10_without_keepalive_is_closed_after_the_response(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        resp = client.request(b"GET /ten HTTP/1.0\r\nHost: example.test\r\n\r\n")
        assert resp.status == 200, resp.head
        assert resp.json()["target"] == "/ten"
        rest, how = client.rest_and_close()
        assert rest == b"", rest[:300]
    assert len(app.conns()) == 1


def test_http11_connection_close_is_closed_after_the_response(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        resp = client.request(build_request("GET", "/bye", [("Connection", "close")]))
        assert resp.status == 200 and resp.json()["target"] == "/bye", resp.head
        rest, how = client.rest_and_close()
        assert rest == b"", rest[:300]


def test_http10_without_host_is_accepted(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        resp = client.request(b"GET /nohost HTTP/1.0\r\n\r\n")
        assert resp.status == 200, resp.head
        assert resp.json()["target"] == "/nohost"


def test_http10_with_keepalive_stays_open(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        for target in ("/ka1", "/ka2", "/ka3"):
            resp = client.request(
                b"GET %s HTTP/1.0\r\nHost: example.test\r\nConnection: keep-alive\r\n\r\n" % target.encode())
            assert resp.status == 200, resp.head
            assert resp.json()["target"] == target
            # a 1.0 client knows only Content-Length (or the close) as framing
            assert resp.framing == "length", resp.head
    assert [r.target for r in app.wait_requests(3)] == ["/ka1", "/ka2", "/ka3"]
    assert len(app.conns()) == 3


# -------------------------------------------------------------- pipelining

def test_pipelined_requests_answered_in_order(http_backend, http_proxy):
    """Three requests in one write; the first one's server is the slowest;
    the responses come back in request order."""
    app = http_backend(lambda req: Reply(body=req.target.encode() + b":" + req.body,
                                         delay=0.3 if req.target == "/one" else 0))
    proxy = http_proxy([app])
    batch = (build_request("GET", "/one") + build_request("POST", "/two", body=b"payload-two")
             + build_request("GET", "/three"))
    with HTTPClient(proxy.port) as client:
        client.send(batch)
        bodies = [client.read_response().body for _ in range(3)]
        assert bodies == [b"/one:", b"/two:payload-two", b"/three:"]
        assert client.is_open()
    assert [r.target for r in app.wait_requests(3)] == ["/one", "/two", "/three"]
    assert len(app.conns()) == 3


# ---------------------------------------------------------------- smuggling

HOST = b"Host: example.test\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"


def _post(headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /vector " + version + b"\r\n" + HOST + headers + b"\r\n" + body


def _get(extra: bytes) -> bytes:
    return b"GET /vector HTTP/1.1\r\n" + extra + b"\r\n"


# Rejected while reading the head: the server must see no connection at all.
HEAD_VECTORS = [
    ("cl-te", 400, _post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nX")),
    ("te-cl", 400, _post(b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n", b"0\r\n\r\nX")),
    ("cl-duplicate-equal", 400, _post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello")),
    ("cl-duplicate-different", 400, _post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!")),
    ("cl-list", 400, _post(b"Content-Length: 5, 5\r\n", b"hello")),
    ("cl-plus", 400, _post(b"Content-Length: +5\r\n", b"hello")),
    ("cl-hex", 400, _post(b"Content-Length: 0x5\r\n", b"hello")),
    ("cl-inner-space", 400, _post(b"Content-Length: 5 5\r\n", b"hello")),
    ("cl-negative", 400, _post(b"Content-Length: -5\r\n", b"hello")),
    ("te-chunked-gzip", 400, _post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n")),
    ("te-chunked-chunked", 400, _post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n")),
    ("te-chunked-two-lines", 400, _post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                                        b"0\r\n\r\n")),
    ("te-in-http10", 400, _post(b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", b"HTTP/1.0")),
    ("te-unknown-coding", 501, _post(b"Transfer-Encoding: foo, chunked\r\n", b"0\r\n\r\n")),
    ("bare-lf-in-head", 400, _get(b"Host: example.test\nX-A: a\r\n")),
    ("bare-lf-after-request-line", 400, b"GET /vector HTTP/1.1\n" + HOST + b"\r\n"),
    ("bare-cr", 400, _get(HOST + b"X-A: a\rX-B: b\r\n")),
    ("obs-fold", 400, _get(HOST + b"X-A: a\r\n b\r\n")),
    ("obs-fold-te", 400, _post(b"Transfer-Encoding:\r\n\tchunked\r\n", b"0\r\n\r\n")),
    ("space-before-colon", 400, _post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    ("header-name-paren", 400, _get(HOST + b"X-Fo(o: bar\r\n")),
    ("header-name-space", 400, _get(HOST + b"X Foo: bar\r\n")),
    ("header-name-non-ascii", 400, _get(HOST + b"X-F\xc3\xa9o: bar\r\n")),
    ("header-name-empty", 400, _get(HOST + b": bar\r\n")),
    ("value-nul", 400, _get(HOST + b"X-A: a\x00b\r\n")),
    ("value-ctl", 400, _get(HOST + b"X-A: a\x01b\r\n")),
    ("value-del", 400, _get(HOST + b"X-A: a\x7fb\r\n")),
    ("host-missing-http11", 400, _get(b"")),
    ("host-twice", 400, _get(b"Host: a.example\r\nHost: b.example\r\n")),
    ("request-line-double-space", 400, b"GET  /vector HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("request-target-control-char", 400, b"GET /vec\x01tor HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("request-line-no-version", 400, b"GET /vector\r\n" + HOST + b"\r\n"),
    ("version-http2", 505, b"GET /vector HTTP/2.0\r\n" + HOST + b"\r\n"),
    ("connect", 501, b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n"),
]

CHUNKED = b"Transfer-Encoding: chunked\r\n"
# Rejected while relaying a chunked body: the head may have been forwarded,
# but the bad framing (POISON) and anything after it never reach the server.
BODY_VECTORS = [
    ("chunk-size-zz", _post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n"), b"zz\r\n"),
    ("chunk-size-negative", _post(CHUNKED, b"-1\r\nhello\r\n0\r\n\r\n"), b"-1\r\n"),
    ("chunk-size-overlong", _post(CHUNKED, b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n"), b"0" * 16),
    ("chunk-size-bare-lf", _post(CHUNKED, b"5\nhello\r\n0\r\n\r\n"), b"5\nhello"),
    ("chunk-ext-control-char", _post(CHUNKED, b"5;a\x01b\r\nhello\r\n0\r\n\r\n"), b"a\x01b"),
    ("chunk-data-without-crlf", _post(CHUNKED, b"5\r\nhelloXX0\r\n\r\n"), b"helloXX"),
]


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory):
    """One proxyd (one worker) and one recording server for all the vectors:
    each test counts the server's connections before its vector and checks
    the new ones after a barrier request (accepts are in order)."""
    server = HTTPBackend(name="vectors")
    port = free_port()
    directory = tmp_path_factory.mktemp("smuggling")
    config = write_config(directory, http_config(port, {"app": [server]}, workers=1,
                                                 frontend={"timeout_http_request": "5s"}))
    proxy = Proxyd(config, directory / "proxyd.log")
    try:
        proxy.start().wait_ready([port], 1)
        proxy.port = port
        yield proxy, server
    finally:
        proxy.stop()
        server.close()


def _send_vector(proxy, server, vector_id: str, raw: bytes, status: int, split_at: int | None = None):
    """Send RAW + a smuggled request in one write (or, with SPLIT_AT, the
    bytes from there on only once the server has received the head); expect
    one own answer with STATUS, then the connection closed.  Returns the
    number of server connections before, and the ones made meanwhile other
    than the barrier's."""
    before = len(server.connections())
    with HTTPClient(proxy.port) as client:
        data = raw + SMUGGLED
        if split_at is not None:
            client.send(data[:split_at])
            wait_for(lambda: server.saw(b"POST /vector ", since=before)
                     and server.conns()[-1].raw.endswith(b"\r\n\r\n"), 10, "the head to reach the server")
            data = data[split_at:]
        client.send(data)
        try:
            resp = client.read_response()
        except (AssertionError, OSError) as e:
            raise AssertionError(f"{vector_id}: no valid response ({e!r}); log tail:\n{proxy.log_tail(10)}")
        assert_own_error(resp, status)
        rest, how = client.rest_and_close()
        assert rest == b"", f"{vector_id}: more after the {status}: {rest[:300]!r}"
    # barrier: a good request on a new connection; any connection the
    # vector made to the server was accepted before this one
    barrier = f"/barrier-{vector_id}"
    assert get(proxy.port, barrier).status == 200
    server.wait_request_for(barrier)
    return before, [c for c in server.conns()[before:] if barrier.encode() not in c.raw]


@pytest.mark.parametrize("vector_id,status,raw", HEAD_VECTORS, ids=[v[0] for v in HEAD_VECTORS])
def test_smuggling_vector_rejected_in_head(vector_id, status, raw, shared_proxy):
    proxy, server = shared_proxy
    before, others = _send_vector(proxy, server, vector_id, raw, status)
    assert others == [], f"the server saw: {[bytes(c.raw[:300]) for c in others]}"
    assert not server.saw(b"/smuggled", since=before)


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "body-after-head-forwarded"])
@pytest.mark.parametrize("vector_id,raw,poison", BODY_VECTORS, ids=[v[0] for v in BODY_VECTORS])
def test_smuggling_vector_rejected_in_chunked_body(vector_id, raw, poison, split, shared_proxy):
    """In one write, or the body only once the server has the head (as it
    must for Expect: 100-continue): proxyd is then relaying the body and
    finds the bad framing there."""
    proxy, server = shared_proxy
    head_end = raw.index(b"\r\n\r\n") + 4
    before, others = _send_vector(proxy, server, vector_id, raw, 400, split_at=head_end if split else None)
    for conn in others:
        assert poison not in conn.raw and b"/smuggled" not in conn.raw, \
            f"the server saw the bad framing: {bytes(conn.raw[-300:])!r}"
        assert conn.request is None, f"the server got a complete request: {bytes(conn.raw[-300:])!r}"
    assert not server.saw(b"/smuggled", since=before)


def test_bad_chunk_arriving_while_connecting_is_rejected(http_backend, http_proxy):
    """The head is complete, proxyd is connecting (the server's accept queue
    is full, so its SYN waits for a retransmission), and meanwhile a bad
    chunk arrives: once connected, proxyd answers 400 and forwards neither
    the bad framing nor the request smuggled behind it."""
    server = http_backend(name="slow-accept", backlog=0, accept=False)
    held = fill_backlog(server.port)
    proxy = http_proxy({"app": {"servers": [server], "timeout_connect": "10s", "retries": 0}})
    raw = _post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n") + SMUGGLED
    head_end = raw.index(b"\r\n\r\n") + 4
    try:
        with HTTPClient(proxy.port) as client:
            client.send(raw[:head_end])
            wait_for(lambda: "SYN-SENT" in states_towards(server.port), 10, "proxyd connecting to the server")
            client.send(raw[head_end:])
            server.accepting.set()  # room in the queue: the retransmitted SYN gets in
            assert_own_error(client.read_response("POST"), 400)
            rest, how = client.rest_and_close()
            assert rest == b""
    finally:
        for s in held:
            s.close()
    assert not server.saw(b"zz\r\n") and not server.saw(b"/smuggled")
    assert server.requests() == []
    log = proxy.log_text()
    assert "unexpected error" not in log and "Traceback" not in log, proxy.log_tail()


# -------------------------------------------------------- limits and timeouts

def test_408_on_a_slow_request_head(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"timeout_http_request": "1s"})
    with HTTPClient(proxy.port) as client:
        client.send(b"GET /slow HTTP/1.1\r\nHost: example.test\r\n")  # no end of head
        resp = client.read_response()
        assert_own_error(resp, 408)
        rest, how = client.rest_and_close()
        assert rest == b""
    line = wait_http_access_lines(proxy, 1)[0]
    assert (line.status, line.term, line.server) == (408, "cR", "<NOSRV>"), line.raw
    assert app.connections() == []


def test_idle_keepalive_connection_closed_silently(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"timeout_http_keep_alive": "1s"})
    with HTTPClient(proxy.port) as client:
        assert client.request(build_request("GET", "/once")).status == 200
        rest, how = client.rest_and_close()  # no 408, just the close
        assert rest == b"", rest[:300]


def test_431_on_a_huge_head(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"max_header_size": 1024})
    assert get(proxy.port, "/small-head", headers=[("X-Pad", "a" * 500)]).status == 200
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/huge-head", [("X-Pad", "a" * 2000)]))
        assert_own_error(client.read_response(), 431)
        client.rest_and_close()
    assert not app.saw(b"/huge-head")
    assert len(app.conns()) == 1


def test_414_on_a_long_request_line(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"max_request_line": 256})
    assert get(proxy.port, "/short-" + "a" * 100).status == 200
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/long-" + "a" * 1000))
        assert_own_error(client.read_response(), 414)
        client.rest_and_close()
    assert not app.saw(b"/long-")
    assert len(app.conns()) == 1


def test_413_when_the_body_is_over_max_body_size(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"max_body_size": 1000})
    body = payload(1000, seed=413)
    with HTTPClient(proxy.port) as client:
        resp = client.request(build_request("POST", "/at-limit", body=body), "POST")
        assert resp.status == 200 and resp.json()["body_sha256"] == sha256(body), resp.head
    with HTTPClient(proxy.port) as client:
        client.send(build_request("POST", "/over-limit", body=body + b"!"))
        assert_own_error(client.read_response("POST"), 413)
        client.rest_and_close()
    assert not app.saw(b"/over-limit")
    assert len(app.conns()) == 1


# --------------------------------------------------------- proxyd's answers

def test_503_when_the_server_port_is_closed(reserve_port, http_proxy):
    # No server could be connected: 503 (no server available), as HAProxy;
    # 502 is for a bad or failed reply.
    closed = reserve_port()
    proxy = http_proxy({"app": {"servers": [f"{LOCALHOST}:{closed}"], "retries": 1}})
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/refused"))
        assert_own_error(client.read_response(), 503)
        client.rest_and_close()
    line = wait_http_access_lines(proxy, 1)[0]
    assert (line.status, line.term, line.Tc) == (503, "SC", -1), line.raw


@pytest.mark.parametrize("action", ["reset", "close"])
def test_502_when_the_server_ends_before_answering(action, http_backend, http_proxy):
    app = http_backend(Reply(action=action))
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", f"/{action}"))
        assert_own_error(client.read_response(), 502)
        client.rest_and_close()
    assert app.wait_request_for(f"/{action}")
    line = wait_http_access_lines(proxy, 1)[0]
    assert (line.status, line.term, line.server) == (502, "SH", "s1"), line.raw


MALFORMED_RESPONSES = [
    ("bad-status-code", b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n"),
    ("not-http", b"this is not http\r\n\r\n"),
    ("header-without-colon", b"HTTP/1.1 200 OK\r\nNo-Colon-Here\r\nContent-Length: 0\r\n\r\n"),
    ("two-content-lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello"),
]


@pytest.mark.parametrize("raw", [m[1] for m in MALFORMED_RESPONSES], ids=[m[0] for m in MALFORMED_RESPONSES])
def test_502_on_a_malformed_response_head(raw, http_backend, http_proxy):
    app = http_backend(Reply(raw=raw))
    proxy = http_proxy([app])
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/malformed"))
        assert_own_error(client.read_response(), 502)
        client.rest_and_close()
    line = wait_http_access_lines(proxy, 1)[0]
    assert line.status == 502, line.raw


def test_503_when_the_connect_times_out(full_backlog, http_proxy):
    proxy = http_proxy({"app": {"servers": [full_backlog], "timeout_connect": "500ms", "retries": 0}})
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/no-server"))
        assert_own_error(client.read_response(), 503)
        client.rest_and_close()
    line = wait_http_access_lines(proxy, 1)[0]
    assert (line.status, line.term, line.Tc) == (503, "sC", -1), line.raw


def test_504_when_the_server_never_answers(http_backend, http_proxy):
    app = http_backend(Reply(action="hang"))
    proxy = http_proxy({"app": {"servers": [app], "timeout_server": "1s"}})
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/hang"))
        assert_own_error(client.read_response(), 504)
        client.rest_and_close()
    conn = app.wait_done(1)[0]
    assert conn.end == "reset", f"the server connection ended with {conn.end}, not a reset"
    line = wait_http_access_lines(proxy, 1)[0]
    assert (line.status, line.term, line.Tr) == (504, "sH", -1), line.raw


def test_errorfile_sent_as_is_for_503(tmp_path, full_backlog, http_proxy):
    body = b"<h1>We are down</h1>\n" + b"sorry " * 2000
    page = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
            b"Connection: close\r\nX-Errorfile: custom\r\n\r\n" % len(body)) + body
    path = tmp_path / "503.http"
    path.write_bytes(page)
    proxy = http_proxy({"app": {"servers": [full_backlog], "timeout_connect": "500ms", "retries": 0}},
                       frontend={"errorfiles": {"503": str(path)}})
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", "/errorfile"))
        data, how = client.rest_and_close(20)
    assert data == page, f"got {len(data)} bytes: {data[:200]!r}"
    assert wait_http_access_lines(proxy, 1)[0].status == 503


# ------------------------------------------------------ upgrade, 100-continue

def test_upgrade_then_bytes_relayed_both_ways(http_backend, http_proxy):
    greeting = b"hello from the server after 101\n"
    app = http_backend(Reply(status=101, reason="Switching Protocols", framing="none", action="upgrade",
                             headers=[("Connection", "Upgrade"), ("Upgrade", "x-test")], after_head=greeting))
    proxy = http_proxy([app])
    data = payload(2 * MiB, seed=101)

    with HTTPClient(proxy.port, timeout=30) as client:
        client.send(build_request("GET", "/tunnel", [("Connection", "Upgrade"), ("Upgrade", "x-test")]))
        resp = client.read_response()
        assert resp.status == 101, resp.head
        assert (resp.header("upgrade") or "").lower() == "x-test", resp.head
        assert "upgrade" in resp.header_tokens("connection"), resp.head
        assert client.read_exact(len(greeting)) == greeting
        sender = threading.Thread(target=client.send, args=(data,), daemon=True)
        sender.start()
        echoed = client.read_exact(len(data))
        sender.join(30)
        assert echoed is not None and sha256(echoed) == sha256(data)
        client.sock.shutdown(socket.SHUT_WR)
        rest, how = client.rest_and_close(20)
        assert rest == b""

    req = app.wait_request_for("/tunnel")
    assert req.header("upgrade") == "x-test", req.head
    assert "upgrade" in req.header_tokens("connection"), req.head
    app.wait_done(1)
    conn = app.conns()[0]
    assert sha256(bytes(conn.raw[len(req.head):])) == sha256(data)


def test_expect_100_continue_relayed_from_the_server(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app])
    body = b"the body, sent after 100 Continue"
    request = build_request("POST", "/expect", [("Expect", "100-continue")], body)
    head = request[:-len(body)]

    with HTTPClient(proxy.port) as client:
        client.send(head)
        interim = client.read_response("POST")
        assert interim.status == 100, interim.head
        client.send(body)
        final = client.read_response("POST")
        assert final.status == 200, final.head
        assert final.json()["body_sha256"] == sha256(body)

    req = app.wait_request_for("/expect")
    assert req.header("expect") == "100-continue", req.head
    assert req.continue_sent and req.body == body


# --------------------------------------------------------------- access log

def test_access_line_per_request(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy({"app": [{"name": "web1", "address": app.address}]}, frontend_name="front")
    body = payload(3000, seed=7)

    with HTTPClient(proxy.port) as client:
        first = client.request(build_request("GET", "/a?x=1"))
        second = client.request(build_request("POST", "/b", body=body), "POST")
        address = client.address
    assert (first.status, second.status) == (200, 200)
    with HTTPClient(proxy.port) as bad:
        bad.send(b"GET /bad HTTP/1.1\r\nHost: example.test\r\nBad Header: x\r\n\r\n")
        assert_own_error(bad.read_response(), 400)
        bad_address = bad.address

    lines = wait_http_access_lines(proxy, 3)
    assert len(lines) == 3, [a.raw for a in lines]
    by_target = {a.target: a for a in lines}
    assert set(by_target) == {"/a?x=1", "/b", "/bad"}, [a.raw for a in lines]
    app.wait_done(2)
    conns = {c.request.target: c for c in app.conns()}
    for target, method, resp in (("/a?x=1", "GET", first), ("/b", "POST", second)):
        line = by_target[target]
        assert line.request == f"{method} {target} HTTP/1.1", line.raw
        assert (line.client, line.frontend, line.backend, line.server) == (address, "front", "app", "web1"), line.raw
        assert (line.status, line.term) == (200, "--"), line.raw
        assert line.Tq >= 0 and line.Tc >= 0 and 0 <= line.Tr <= line.Tt, line.raw
        # bytes as relayed: head + body, as the client or the server counts them
        assert line.down in (resp.raw_size, conns[target].rec.sent), (line.raw, resp.raw_size)
        assert line.up in (len(build_request(method, target, body=b"" if method == "GET" else body)),
                           conns[target].rec.received), line.raw
    line = by_target["/bad"]
    assert (line.client, line.status, line.term, line.server) == (bad_address, 400, "PR", "<NOSRV>"), line.raw
    assert (line.Tc, line.Tr) == (-1, -1), line.raw
    assert line.method == "GET", line.raw


FORGED = ('2026-01-01T00:00:00.000Z proxyd[1]: 10.9.9.9:1 [01/Jan/2026:00:00:00.000] fe app/s1 0/0/0/0/0 200 1 '
          '- - ---- 1/1/1/1/0 0/0 "GET /forged HTTP/1.1" up=1').encode()


def test_access_lines_cannot_be_forged_by_request_bytes(http_backend, http_proxy):
    """Whatever a client sends, each log line is one `TIME proxyd[PID]:`
    line (docs/CONTRACT.md, "Log lines"): a bare LF or CR in a request line
    does not start a line of the client's making, and control characters
    (terminal escapes, NUL, CR) never reach the log raw."""
    app = http_backend()
    proxy = http_proxy([app])
    attempts = [
        b"GET /lf HTTP/1.1\n" + FORGED + b"\r\nHost: example.test\r\n\r\n",
        b"GET /cr HTTP/1.1\r" + FORGED + b"\r\nHost: example.test\r\n\r\n",
        b"GET /esc\x1b[2J\x1b[31mred HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"GET /nul\x00 HTTP/1.1\r\nHost: example.test\r\n\r\n",
    ]
    for raw in attempts:
        with HTTPClient(proxy.port) as client:
            client.send(raw)
            resp = client.read_response()
            assert_own_error(resp, 505 if resp.status == 505 else 400)  # which one is not the point here
            client.rest_and_close()
    rejected = r'\] fe fe/<NOSRV> -?\d+/-1/-1/-1/\d+ (?:400|505) '
    wait_for(lambda: len(re.findall(rejected, proxy.log_text())) >= len(attempts), 10,
             "an access line for each rejected request")

    text = proxy.log_text()
    bad = [line for line in text.split("\n")[:-1] if not LOG_LINE.match(line)]
    assert not bad, f"log lines not of proxyd's making: {bad}"
    assert not any(FORGED.decode() in line[:len(FORGED) + 1] for line in text.split("\n")), text
    controls = re.findall(r"[\x00-\x08\x0b-\x1f\x7f]", text)
    assert not controls, f"raw control characters in the log: {sorted(set(controls))!r}"


# --------------------------------------------------------------------- fuzz

FUZZ_CASES = 10_000
FUZZ_THREADS = 8

FUZZ_BASES = [
    build_request("GET", "/fuzz/get?q=1", [("User-Agent", "fuzz"), ("Accept", "*/*")]),
    build_request("POST", "/fuzz/post", [("Content-Type", "text/plain")], b"hello world " * 5),
    build_request("POST", "/fuzz/chunked", [], b"chunked body data " * 4, framing="chunked", chunk_size=7),
    build_request("GET", "/fuzz/ten", version="HTTP/1.0", host=None),
    build_request("PUT", "/fuzz/expect", [("Expect", "100-continue")], b"x" * 100),
    build_request("GET", "/fuzz/upgrade", [("Connection", "Upgrade"), ("Upgrade", "websocket")]),
    build_request("GET", "/fuzz/ka", [("Connection", "keep-alive")]) + build_request("GET", "/fuzz/ka2"),
]
FUZZ_INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"\x7f", b"\xff", b"0", b"9",
                b"f", b"-", b"+", b"\r\n ", b"\r\n\r\n", b" HTTP/1.1", b"HTTP/2.0", b"Transfer-Encoding: chunked\r\n",
                b"Transfer-Encoding: gzip, chunked\r\n", b"Content-Length: 5\r\n", b"Content-Length: -1\r\n",
                b"Content-Length: 99999999999999999999999\r\n", b"Host: x\r\n", b"ffffffffffffffffff\r\n",
                b"0\r\n\r\n", b"Expect: 100-continue\r\n", b"Connection: close\r\n"]


def fuzz_case(rng: random.Random) -> bytes:
    if rng.random() < 0.05:
        return rng.randbytes(rng.randint(1, 400))
    data = bytearray(rng.choice(FUZZ_BASES))
    if rng.random() < 0.25:  # a valid request cut short
        return bytes(data[:rng.randint(0, len(data) - 1)])
    for _ in range(rng.randint(1, 4)):
        op, pos = rng.randrange(5), rng.randint(0, len(data))
        if op == 0:
            data[pos:pos] = rng.choice(FUZZ_INSERTS)
        elif op == 1 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 2:
            del data[pos:pos + rng.randint(1, 8)]
        elif op == 3:
            start = rng.randint(0, len(data))
            data[pos:pos] = data[start:start + rng.randint(1, 40)]
        else:
            data = data[:pos]
    if rng.random() < 0.02:  # oversized heads and request lines
        at = data.find(b" ") + 1
        data[at:at] = b"a" * rng.choice([300, 9000, 20000, 70000])
    return bytes(data)


def test_worker_survives_10000_random_and_truncated_requests(http_backend, http_proxy):
    app = http_backend(Reply(body=b"fuzzed"), early=True)
    proxy = http_proxy({"app": {"servers": [app], "timeout_server": "2s", "timeout_connect": "2s"}}, workers=2,
                       frontend={"timeout_http_request": "2s", "timeout_http_keep_alive": "2s",
                                 "timeout_client": "2s", "max_body_size": 1 << 20})
    pids = proxy.worker_pids()
    rng = random.Random(20240601)
    cases = [fuzz_case(rng) for _ in range(FUZZ_CASES)]
    split = [rng.random() < 0.2 for _ in range(FUZZ_CASES)]
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    hung: list[bytes] = []

    def one(i):
        if len(hung) > 20:
            return  # give up early: the assertion below reports it
        data = cases[i]
        outcome = "closed"
        s = socket.create_connection((LOCALHOST, proxy.port), timeout=10)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if split[i] and len(data) > 2:
                s.sendall(data[:len(data) // 2])
                s.sendall(data[len(data) // 2:])
            else:
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while len(got) < MiB:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            m = re.match(rb"HTTP/1\.[01] (\d{3}) ", got)
            outcome = m[1].decode() if m else ("closed" if not got else "other")
        except socket.timeout:
            outcome = "hung"
            with lock:
                hung.append(data)
        except OSError as e:
            # the proxy ended the connection first (e.g. right after a 400)
            if e.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                raise
            outcome = "reset"
        finally:
            s.close()
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    errors = run_parallel(FUZZ_CASES, FUZZ_THREADS, one)
    assert not errors, f"{len(errors)} client errors, first: {errors[0]!r}"
    assert not hung, f"{len(hung)} connections still open 10s after the client's FIN, e.g. {hung[0][:300]!r}; " \
                     f"outcomes {outcomes}"
    print("fuzz outcomes:", outcomes)
    assert sum(outcomes.values()) == FUZZ_CASES, outcomes
    # some of each kind of answer: the fuzz reached the server and the parser
    assert outcomes.get("200", 0) > 0 and outcomes.get("400", 0) > 0, outcomes

    resp = get(proxy.port, "/after-the-fuzz")
    assert (resp.status, resp.body) == (200, b"fuzzed"), resp.head
    assert proxy.worker_pids() == pids, f"workers changed: {pids} -> {proxy.worker_pids()}"
    log = proxy.log_text()
    assert "unexpected error" not in log and "Traceback" not in log, \
        log[max(0, log.find("unexpected error"), log.find("Traceback")) - 200:][:3000]
    assert not re.search(r"worker \d+ gen \d+ \(pid \d+\) (exited|killed)", log), proxy.log_tail()
