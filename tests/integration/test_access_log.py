"""One access line per session with the right names, byte counts and
termination codes, in HAProxy's tcplog and httplog layouts (man/proxyd.8,
"TCP access log", "HTTP access log"), read by halog."""

from __future__ import annotations

import socket

from tests.support import (LOG_LINE, TIME_FIELD, connect, echo_handler, payload, read_to_end,
                           recv_exactly, request_reply_handler, sink_handler, wait_closed)

NAMES = {"frontend_name": "front_1", "backend_name": "back.end-1"}
# Servers that wait for the client's EOF, which is not passed on: sessions end
# timeout_fin after the client's close, a normal end the client began (--, fin=client).
QUICK_FIN = {"timeout_fin": "300ms"}


def by_client(lines):
    return {line.client: line for line in lines}


def test_access_lines_client_closes_first(backend, tcp_proxy):
    echo = backend(echo_handler)
    proxy = tcp_proxy([{"name": "alpha", "address": echo.address}], frontend=QUICK_FIN, **NAMES)
    sizes = [1, 100, 5000, 70000, 300000]
    clients = {}
    for i, size in enumerate(sizes):
        data = payload(size, seed=20 + i)
        with connect(proxy.port) as client:
            clients["%s:%d" % client.getsockname()] = size
            client.sendall(data)
            assert recv_exactly(client, size) == data

    lines = proxy.wait_access_lines(len(sizes))
    assert len(lines) == len(sizes), [l.raw for l in lines]
    logged = by_client(lines)
    assert set(logged) == set(clients)
    workers = proxy.worker_pids()
    for client, size in clients.items():
        line = logged[client]
        assert (line.frontend, line.backend, line.server) == ("front_1", "back.end-1", "alpha"), line.raw
        assert (line.up, line.down) == (size, size), line.raw
        assert (line.term, line.fin) == ("--", "client"), line.raw  # a normal end; the client closed first
        assert 0 <= line.Tc <= line.Tt, line.raw
        assert line.pid in workers, line.raw
    for raw in proxy.log_lines():
        m = LOG_LINE.match(raw)
        assert m and TIME_FIELD.match(m["time"]), f"malformed log line: {raw!r}"


def test_access_lines_server_closes_first(backend, tcp_proxy):
    reply = payload(5000, seed=30)
    server = backend(request_reply_handler(10, reply))
    proxy = tcp_proxy([{"name": "beta", "address": server.address}], **NAMES)
    clients = []
    for i in range(3):
        with connect(proxy.port) as client:
            clients.append("%s:%d" % client.getsockname())
            client.sendall(b"0123456789")
            digest, count, end = read_to_end(client)
            assert (count, end) == (len(reply), "eof")

    lines = proxy.wait_access_lines(3)
    assert len(lines) == 3, [l.raw for l in lines]
    assert set(by_client(lines)) == set(clients)
    for line in lines:
        assert (line.frontend, line.backend, line.server) == ("front_1", "back.end-1", "beta"), line.raw
        assert (line.up, line.down) == (10, 5000), line.raw
        assert (line.term, line.fin, line.err) == ("--", "server", None), line.raw
        assert 0 <= line.Tc <= line.Tt, line.raw


def test_access_line_connection_refused(reserve_port, tcp_proxy):
    closed = reserve_port()  # bound, never listening: connections are refused
    proxy = tcp_proxy([{"name": "gamma", "address": f"127.0.0.1:{closed}"}], **NAMES)

    with connect(proxy.port) as client:
        name = "%s:%d" % client.getsockname()
        assert wait_closed(client, 15) in ("eof", "reset")

    line = proxy.wait_access_lines(1)[0]
    assert len(proxy.access_lines()) == 1
    assert line.client == name
    assert (line.frontend, line.backend) == ("front_1", "back.end-1"), line.raw
    # As HAProxy's: the server is the last one tried (<NOSRV> when none
    # was); the refusing server was tried.
    assert line.server == "gamma", line.raw
    assert line.term == "SC", line.raw
    assert (line.Tw, line.Tc) == (0, -1), line.raw
    assert (line.up, line.down) == (0, 0), line.raw


def test_access_line_counts_half_closed_upload(backend, tcp_proxy):
    """Bytes the client sent before its FIN are counted as delivered."""
    sink = backend(sink_handler())
    proxy = tcp_proxy([sink], frontend=QUICK_FIN)
    data = payload(777777, seed=31)
    with connect(proxy.port) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        rec = sink.wait_done(1, timeout=30)[0]
    assert rec.received == len(data)
    line = proxy.wait_access_lines(1)[0]
    assert (line.up, line.down, line.term, line.fin) == (len(data), 0, "--", "client"), line.raw
