"""A server's maxconn across all workers, the queue behind it, leastconn
over every worker's counts.

How many connections a server has at once is asked of the kernel: each
time the backend accepts one, it counts the sockets connected or
connecting *to* its port (proxyd's ends, in /proc/net/tcp).  proxyd's end
is gone the moment it closes it; the server's end of a connection proxyd
has reset may linger a moment in ESTABLISHED (the reset is processed by
another CPU's softirq, after the next SYN), so it is not the measure.
"""

from __future__ import annotations

import socket
import threading

from tests import support
from tests.http_support import get
from tests.support import IO_TIMEOUT, free_port, run_parallel, wait_for


def connections_to(port: int) -> int:
    """TCP sockets (IPv4) ESTABLISHED with, or SYN_SENT to, remote port PORT."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] in ("01", "02") and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


class Counted:
    """Wraps a handler: records, at each accept, how many connections the
    kernel says the server has (this one included)."""

    def __init__(self, handler):
        self.handler = handler
        self.seen: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, conn, rec, backend):
        with self.lock:
            self.seen.append(connections_to(backend.port))
        self.handler(conn, rec, backend)


def slow_echo(hold: float):
    """Read the client's tagged request, hold it HOLD seconds, echo it, close."""
    def handler(conn, rec, backend):
        data = conn.recv(65536)
        rec.feed(data)
        backend.stopping.wait(hold)
        conn.sendall(b"echo:" + data)
        rec.sent += len(data) + 5
    return handler


def slow_http(hold: float):
    def handler(conn, rec, backend):
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(65536)
            if not data:
                return
            head += data
        rec.feed(head)
        backend.stopping.wait(hold)
        tag = head.split(b" ", 2)[1]
        body = b"answer " + tag
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    return handler


def limited_config(mode: str, server, maxconn: int, timeout_queue: str, workers: int = 4) -> dict:
    config = support.tcp_config(free_port(), [{"name": "s1", "address": server.address, "maxconn": maxconn}],
                                workers=workers, backend={"timeout_queue": timeout_queue})
    config["frontends"]["fe"]["mode"] = mode
    return config


def tcp_exchange(port: int, i: int) -> bytes:
    with socket.create_connection((support.LOCALHOST, port), timeout=IO_TIMEOUT) as c:
        c.sendall(b"request-%04d" % i)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            try:
                data = c.recv(65536)
            except ConnectionResetError:
                return got + b"<reset>"
            if not data:
                return got
            got += data


def test_maxconn_holds_across_four_workers_while_forty_clients_are_served_through_the_queue(backend, proxyd):
    counted = Counted(slow_echo(0.15))
    server = backend(counted)
    p = proxyd(limited_config("tcp", server, 2, "60s"))
    answers = {}

    def client(i):
        answers[i] = tcp_exchange(p.port, i)

    errors = run_parallel(40, 40, client)
    assert not errors, errors[:3]
    assert all(answers[i] == b"echo:request-%04d" % i for i in range(40)), \
        [a for i, a in answers.items() if a != b"echo:request-%04d" % i][:3]
    assert len(counted.seen) == 40
    assert max(counted.seen) <= 2, f"the server had {max(counted.seen)} connections at once: {counted.seen}"
    assert max(counted.seen) == 2, "the queue never let two through at once: the test shows nothing"


def test_maxconn_holds_for_http_requests_across_four_workers(backend, proxyd):
    counted = Counted(slow_http(0.15))
    server = backend(counted)
    p = proxyd(limited_config("http", server, 2, "60s"))
    answers = {}

    def client(i):
        resp = get(p.port, f"/q{i:04d}", timeout=60)
        answers[i] = (resp.status, resp.body)

    errors = run_parallel(40, 40, client)
    assert not errors, errors[:3]
    assert all(answers[i] == (200, b"answer /q%04d" % i) for i in range(40)), list(answers.items())[:3]
    assert max(counted.seen) <= 2, f"the server had {max(counted.seen)} connections at once: {counted.seen}"


def test_queue_timeout_answers_503_in_http_and_closes_in_tcp_with_sQ(backend, proxyd):
    server = backend(slow_http(2.0))
    p = proxyd(limited_config("http", server, 1, "300ms", workers=2))
    statuses = []

    def client(i):
        statuses.append(get(p.port, f"/t{i}").status)

    errors = run_parallel(6, 6, client)
    assert not errors, errors[:3]
    assert statuses.count(200) == 1 and statuses.count(503) == 5, statuses
    wait_for(lambda: p.log_text().count(" 503 ") >= 5, 10, "five 503 access lines")
    queued = [line for line in p.log_text().splitlines() if " 503 " in line]
    assert all("sQ" in line for line in queued[:5]), queued

    tcp_server = backend(slow_echo(2.0))
    q = proxyd(limited_config("tcp", tcp_server, 1, "300ms", workers=2))
    got = []
    errors = run_parallel(4, 4, lambda i: got.append(tcp_exchange(q.port, i)))
    assert not errors, errors[:3]
    assert sorted(g.startswith(b"echo:") for g in got) == [False, False, False, True], got
    assert all(g in (b"", b"<reset>") for g in got if not g.startswith(b"echo:")), got
    wait_for(lambda: sum(a.term == "sQ" for a in q.access_lines()) >= 3, 10, "three access lines with term sQ")


def test_leastconn_counts_the_sessions_of_every_worker(backend, proxyd):
    hold = threading.Event()

    def held(conn, rec, backend):
        rec.feed(conn.recv(100))
        hold.wait(30)

    a, b = backend(held, name="a"), backend(held, name="b")
    config = support.tcp_config(free_port(), [a, b], workers=4, backend={"balance": "leastconn"})
    p = proxyd(config)
    socks = []
    try:
        for i in range(8):
            # Each new session lands on whichever worker the kernel picks; each
            # must see the others' sessions to choose the less loaded server.
            c = socket.create_connection((support.LOCALHOST, p.port), timeout=IO_TIMEOUT)
            c.sendall(b"x")
            socks.append(c)
            wait_for(lambda: len(a.records) + len(b.records) == i + 1, 10, f"session {i} at a server")
        assert (len(a.records), len(b.records)) == (4, 4), (len(a.records), len(b.records))
    finally:
        hold.set()
        for c in socks:
            c.close()
