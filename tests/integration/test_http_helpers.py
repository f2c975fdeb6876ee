"""The HTTP test tools work, checked against each other without proxyd: the
recording backend answers as its Reply says and keeps every byte, the
client reads every framing, the access-line parser reads the contract's
format.  (A control for tests/integration/test_http.py.)"""

from __future__ import annotations

import socket

import pytest

from tests.http_support import (HTTPBackend, HTTPClient, ProtocolError, Reply, build_request,
                                parse_http_access_line)
from tests.support import payload, sha256

MiB = 1 << 20


@pytest.fixture
def server():
    started = []

    def make(reply=None, **kw) -> HTTPBackend:
        b = HTTPBackend(reply, **kw)
        started.append(b)
        return b

    yield make
    for b in started:
        b.close()


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_backend_and_client_bodies(framing, server):
    up, down = payload(3 * MiB + 5, seed=1), payload(2 * MiB + 3, seed=2)
    b = server(lambda req: Reply(body=down, framing=framing, headers=[("X-Sha", req.body_sha256)]))
    with HTTPClient(b.port, timeout=30) as c:
        req_framing = "chunked" if framing == "chunked" else "length"
        resp = c.request(build_request("POST", "/x", body=up, framing=req_framing, chunk_size=70001), "POST")
    assert resp.status == 200 and resp.framing == framing
    assert resp.header("x-sha") == sha256(up) and resp.body_sha256 == sha256(down)
    req = b.wait_request_for("/x")
    assert req.framing == req_framing and req.body == up
    conn = b.wait_done(1)[0]
    assert conn.received == len(b.conns()[0].raw) == len(build_request("POST", "/x", body=up, framing=req_framing,
                                                                         chunk_size=70001))


def test_backend_records_bytes_of_unparsable_requests(server):
    b = server()
    with socket.create_connection(("127.0.0.1", b.port)) as s:
        s.sendall(b"GARBAGE /smuggled\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""
    b.wait_done(1)
    assert b.saw(b"/smuggled") and b.requests() == []
    assert b.conns()[0].error


def test_backend_expect_continue_and_upgrade(server):
    b = server()
    with HTTPClient(b.port) as c:
        c.send(build_request("POST", "/e", [("Expect", "100-continue")], b"12345")[:-5])
        assert c.read_response().status == 100
        c.send(b"12345")
        assert c.read_response().json()["body_sha256"] == sha256(b"12345")

    u = server(Reply(status=101, framing="none", action="upgrade", after_head=b"hi"))
    with HTTPClient(u.port) as c:
        assert c.request(build_request("GET", "/u")).status == 101
        assert c.read_exact(2) == b"hi"
        c.send(b"echo me")
        assert c.read_exact(7) == b"echo me"


def test_backend_keep_open_reset_hang(server):
    b = server(Reply(body=b"x", keep_open=True))
    with HTTPClient(b.port) as c:
        assert c.request(build_request("GET", "/k")).body == b"x"
        assert c.is_open()
    assert b.wait_done(1)[0].end == "eof"

    r = server(Reply(action="reset"))
    with HTTPClient(r.port) as c:
        c.send(build_request("GET", "/r"))
        with pytest.raises((ProtocolError, ConnectionResetError)):
            c.read_response()


def test_client_rejects_bare_lf():
    with pytest.raises(ProtocolError):
        from tests.http_support import split_head
        split_head(b"HTTP/1.1 200 OK\r\nA: b\nC: d\r\n\r\n")


def test_http_access_line_parser():
    line = ('2026-01-01T00:00:00.000Z proxyd[42]: 127.0.0.1:5000 [01/Jan/2026:00:00:00.000] fe app/s1 '
            '0/0/1/2/3 200 120 - - ---- 1/1/1/1/0 0/0 "GET /a?x=1 HTTP/1.1" up=80')
    a = parse_http_access_line(line)
    assert (a.pid, a.client, a.date, a.frontend, a.backend, a.server) == \
        (42, "127.0.0.1:5000", "01/Jan/2026:00:00:00.000", "fe", "app", "s1")
    assert (a.method, a.target, a.status, a.Tq, a.Tw, a.Tc, a.Tr, a.Tt, a.up, a.down, a.term, a.state) == \
        ("GET", "/a?x=1", 200, 0, 0, 1, 2, 3, 80, 120, "--", "----")
    assert (a.ac, a.fc, a.bc, a.sc, a.rc, a.sq, a.bq, a.err) == (1, 1, 1, 1, 0, 0, 0, None)
    bad = parse_http_access_line('2026-01-01T00:00:00.000Z proxyd[42]: 127.0.0.1:5000 [01/Jan/2026:00:00:00.000] '
                                 'fe fe/<NOSRV> 0/-1/-1/-1/0 400 90 - - PR-- 1/1/0/0/0 0/0 "GET /b HTTP/1.1" '
                                 'up=0 err=x y')
    assert (bad.backend, bad.server, bad.status, bad.term, bad.state, bad.err) == \
        ("fe", "<NOSRV>", 400, "PR", "PR--", "x y")
    assert (bad.Tw, bad.Tc, bad.Tr) == (-1, -1, -1)
    # The old layout is not an access line any more.
    assert parse_http_access_line('2026-01-01T00:00:00.000Z proxyd[42]: 127.0.0.1:5000 fe app/s1 "GET /a HTTP/1.1" '
                                  '200 Tq=0 Tc=1 Tr=2 Tt=3 up=80 down=120 term=--') is None
    assert parse_http_access_line("2026-01-01T00:00:00.000Z proxyd[42]: master started") is None
