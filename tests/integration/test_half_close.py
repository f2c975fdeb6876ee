"""TCP mode, half_close = false (the default): a client that half-closes
(`nc -N`, shutdown(SHUT_WR)) still gets the server's whole answer
(PRODUCT.md, "TCP mode").

The client's FIN is not passed on to the server; the session goes on relaying
server -> client until the server closes (a plain close: the TIME_WAIT is
the server's), the client turns out to be gone (a reset when bytes reach
it), or the server stays silent for `timeout_fin` (then the server socket is
reset).  Zero TIME_WAIT towards the server in every case.

The request/answer protocol of these tests: the client sends an 8-byte head
(body length, answer length, big-endian) and a body; the server reads
exactly that, so it never needs the client's EOF, and answers with bytes of
its own derived from the whole request (answer_for), so an answer is this
session's and proves the request arrived whole.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import (LOCALHOST, connect, payload, read_to_end, recv_exactly, run_sessions, settle_towards,
                           sha256, source_handler, stays, timewait_towards, wait_for)

KiB, MiB = 1 << 10, 1 << 20
HEAD = struct.Struct(">II")  # request body length, answer length
SPLICE = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]


# ------------------------------------------------------------------ protocol

def make_request(body_len: int, answer_len: int, seed: int) -> bytes:
    return HEAD.pack(body_len, answer_len) + payload(body_len, seed)


def answer_for(request: bytes, size: int) -> bytes:
    """The server's answer to REQUEST: SIZE bytes that depend on all of it."""
    return hashlib.shake_256(b"answer to " + hashlib.sha256(request).digest()).digest(size)


def _read_exact(conn: socket.socket, rec, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        data = conn.recv(min(262144, n - got))
        if not data:
            rec.end = "eof"
            return None
        rec.feed(data)
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _hold(conn: socket.socket, rec) -> None:
    """Stay open, silent, until the peer ends the connection (EOF, or a reset
    raised as ConnectionResetError and recorded by Backend)."""
    while True:
        data = conn.recv(65536)
        if not data:
            rec.end = "eof"
            return
        rec.feed(data)


def answer_handler(delay: float = 0.0, then: str = "close", wait: threading.Event | None = None):
    """Read one request, wait DELAY seconds (or until WAIT is set), send its
    answer; then close (THEN = "close": the server closes first) or stay open
    and silent until the proxy ends the connection (THEN = "hold").

    Records rec.answered (the answer was sent) and rec.answered_at.  A backend
    whose `control` attribute is set just holds each new connection (for the
    TIME_WAIT control below)."""
    def handler(conn, rec, backend):
        if getattr(backend, "control", False):
            return _hold(conn, rec)
        head = _read_exact(conn, rec, HEAD.size)
        if head is None:
            return
        body_len, answer_len = HEAD.unpack(head)
        body = _read_exact(conn, rec, body_len)
        if body is None:
            return
        rec.request_sha256 = sha256(head + body)
        if wait is not None:
            wait.wait(30)
        elif delay:
            backend.stopping.wait(delay)  # the server is slow to answer: the behaviour under test
        answer = answer_for(head + body, answer_len)
        conn.sendall(answer)
        rec.sent += len(answer)
        rec.answered = True
        rec.answered_at = time.monotonic()
        if then == "hold":
            _hold(conn, rec)
    return handler


def framed_echo_handler(conn, rec, backend) -> None:
    """Read a head, then echo the body as it arrives; close once it is all
    echoed (the server closes first)."""
    head = _read_exact(conn, rec, HEAD.size)
    if head is None:
        return
    left = HEAD.unpack(head)[0]
    while left:
        data = conn.recv(min(262144, left))
        if not data:
            rec.end = "eof"
            return
        rec.feed(data)
        conn.sendall(data)
        rec.sent += len(data)
        left -= len(data)


def controllable(handler):
    """HANDLER, except that while backend.control is set a connection is held."""
    def wrapped(conn, rec, backend):
        if getattr(backend, "control", False):
            return _hold(conn, rec)
        return handler(conn, rec, backend)
    return wrapped


def ends(backend) -> dict:
    out: dict = {}
    for rec in backend.connections():
        out[rec.end] = out.get(rec.end, 0) + 1
    return out


def splice_global(splice: bool) -> dict:
    return {"splice": splice}


# ------------------------------------------------------------ whole answers

DELAYS = [pytest.param(0.0, id="0ms"), pytest.param(0.3, id="300ms"), pytest.param(1.5, id="1500ms")]
ANSWER_SIZES = (64 * KiB, 4 * MiB)


@pytest.mark.parametrize("splice", SPLICE)
@pytest.mark.parametrize("delay", DELAYS)
def test_half_closing_client_gets_whole_answer_server_closes(delay, splice, backend, tcp_proxy):
    """The client sends its request and half-closes; the server answers
    DELAY after it has the whole request, then closes.  Sessions of 64 KiB
    and 4 MiB (request and answer), side by side: each server gets its
    request whole, each client its own whole answer, then EOF."""
    server = backend(answer_handler(delay, "close"))
    proxy = tcp_proxy([server], workers=1, global_=splice_global(splice))
    requests = {size: make_request(size, size, seed=size + int(delay * 10)) for size in ANSWER_SIZES}

    def session(size):
        with connect(proxy.port) as client:
            client.sendall(requests[size])
            client.shutdown(socket.SHUT_WR)
            return read_to_end(client)

    with ThreadPoolExecutor(len(ANSWER_SIZES)) as pool:
        got = dict(zip(ANSWER_SIZES, pool.map(session, ANSWER_SIZES)))

    recs = server.wait_done(len(ANSWER_SIZES), timeout=30)
    assert sorted((r.received, getattr(r, "request_sha256", None)) for r in recs) == \
        sorted((len(r), sha256(r)) for r in requests.values()), "each request reaches the server whole"
    for size in ANSWER_SIZES:
        digest, count, end = got[size]
        expected = answer_for(requests[size], size)
        assert (count, end) == (size, "eof"), f"{size}-byte answer: the client got {count} bytes, then {end}"
        assert digest == sha256(expected), f"{size}-byte answer: wrong bytes"


HOLD_FIN = {0.0: 1.5, 0.3: 2.0, 1.5: 3.0}  # timeout_fin: the answer's delay and a margin


@pytest.mark.parametrize("splice", SPLICE)
@pytest.mark.parametrize("delay", DELAYS)
def test_half_closing_client_gets_whole_answer_server_stays_open(delay, splice, backend, tcp_proxy):
    """As above, but the server stays open after its answer, silent.  The
    client gets the whole answer; once the server has been silent for
    timeout_fin the proxy ends the session: EOF to the client after the
    answer, a reset (or EOF) to the server."""
    fin = HOLD_FIN[delay]
    server = backend(answer_handler(delay, "hold"))
    proxy = tcp_proxy([server], workers=1, global_=splice_global(splice), frontend={"timeout_fin": f"{fin}s"})
    requests = {size: make_request(size, size, seed=size + 7 + int(delay * 10)) for size in ANSWER_SIZES}

    def session(size):
        with connect(proxy.port) as client:
            client.sendall(requests[size])
            client.shutdown(socket.SHUT_WR)
            answer = recv_exactly(client, size)
            answered = time.monotonic()
            digest, extra, end = read_to_end(client)
            return answer, extra, end, time.monotonic() - answered

    with ThreadPoolExecutor(len(ANSWER_SIZES)) as pool:
        got = dict(zip(ANSWER_SIZES, pool.map(session, ANSWER_SIZES)))

    recs = server.wait_done(len(ANSWER_SIZES), timeout=fin + 10)
    assert sorted((r.received, getattr(r, "request_sha256", None)) for r in recs) == \
        sorted((len(r), sha256(r)) for r in requests.values()), "each request reaches the server whole"
    assert all(getattr(r, "answered", False) for r in recs)
    assert ends(server).keys() <= {"reset", "eof"}, f"how the server connections ended: {ends(server)}"
    for size in ANSWER_SIZES:
        answer, extra, end, linger = got[size]
        assert sha256(answer) == sha256(answer_for(requests[size], size)), f"{size}-byte answer: wrong bytes"
        assert (extra, end) == (0, "eof"), f"after its {size}-byte answer the client got {extra} more bytes, then {end}"
        # A lower bound only: the session lasted at least about timeout_fin
        # past the answer (the proxy counts from the answer's last bytes).
        assert linger >= fin / 2, f"the session ended {linger:.2f}s after the answer, timeout_fin is {fin}s"


# -------------------------------------------------------- many at once

@pytest.mark.parametrize("splice", SPLICE)
def test_200_concurrent_half_closing_echo_sessions_intact(splice, backend, tcp_proxy):
    """200 sessions open at once, each sends 64 KiB of its own and
    half-closes; the server echoes as it reads and closes at the end.
    Every client gets its own 64 KiB back whole, then EOF."""
    n, size = 200, 64 * KiB
    echo = backend(framed_echo_handler)
    proxy = tcp_proxy([echo], workers=2, global_=splice_global(splice))
    bodies = [payload(size, seed=5000 + i) for i in range(n)]
    results: list = [None] * n
    errors: list[BaseException] = []
    connected = threading.Barrier(n + 1, timeout=60)
    go = threading.Event()

    def session(i: int) -> None:
        try:
            with connect(proxy.port) as client:
                connected.wait()
                if not go.wait(60):
                    raise AssertionError("never released")
                client.sendall(HEAD.pack(size, 0) + bodies[i])
                client.shutdown(socket.SHUT_WR)
                results[i] = read_to_end(client)
        except BaseException as e:  # reported below
            errors.append(e)
            connected.abort()

    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        try:
            connected.wait()
        except threading.BrokenBarrierError:
            pass  # a session failed to connect: reported below
        if not errors:
            wait_for(lambda: echo.open_count == n, 60, f"{n} open server connections")
    finally:
        go.set()
        for t in threads:
            t.join(60)

    assert not errors, f"{len(errors)} sessions failed, first: {errors[0]!r}"
    assert not any(t.is_alive() for t in threads)
    assert echo.max_open == n
    short = [(i, results[i][1], results[i][2]) for i in range(n)
             if results[i][:3] != (sha256(bodies[i]), size, "eof")]
    assert not short, f"{len(short)} of {n} sessions came back short or wrong (index, bytes, end): {short[:10]}"


# ------------------------------------------------------ the client is gone

@pytest.mark.parametrize("splice", SPLICE)
def test_closed_client_silent_server_reset_after_timeout_fin(splice, backend, tcp_proxy):
    """The client sends a request and closes (not a half-close, but the
    proxy cannot tell); the server stays silent.  The request reaches the
    server whole; the server connection stays up for a while (the proxy waits
    for an answer) and is reset once timeout_fin (1 s) has passed."""
    request = make_request(100 * KiB, 0, seed=11)
    server = backend(controllable(_hold_after_request))
    proxy = tcp_proxy([server], workers=1, global_=splice_global(splice), frontend={"timeout_fin": "1s"})

    client = connect(proxy.port)
    client.sendall(request)
    client.close()
    rec = server.wait_connections(1)[0]
    wait_for(lambda: rec.received == len(request) or rec.done.is_set(), 10, "the whole request at the server")

    assert stays(lambda: not rec.done.is_set(), 0.3), \
        f"the server connection ended at once ({rec.end}), before timeout_fin"
    assert rec.done.wait(10), "the server connection still open 10 s after the client closed (timeout_fin 1 s)"
    assert rec.end in ("reset", "eof"), rec.end
    assert (rec.received, rec.sha256) == (len(request), sha256(request))


def _hold_after_request(conn, rec, backend) -> None:
    """Read everything, never answer, until the proxy ends the connection."""
    _hold(conn, rec)


@pytest.mark.parametrize("splice", SPLICE)
def test_closed_client_answering_server_is_reset_at_once(splice, backend, tcp_proxy):
    """The client sends a request and closes.  The server answers later (the
    test lets it once the session has stood 0.3 s): the client's kernel
    answers those bytes with a reset, so the proxy knows the client is gone
    and resets the server, long before timeout_fin (30 s)."""
    request = make_request(32 * KiB, 256 * KiB, seed=12)
    release = threading.Event()
    server = backend(answer_handler(then="hold", wait=release))
    proxy = tcp_proxy([server], workers=1, global_=splice_global(splice), frontend={"timeout_fin": "30s"})

    client = connect(proxy.port)
    client.sendall(request)
    client.close()
    rec = server.wait_connections(1)[0]
    try:
        wait_for(lambda: getattr(rec, "request_sha256", None) or rec.done.is_set(), 10,
                 "the whole request at the server")
        assert stays(lambda: not rec.done.is_set(), 0.3), \
            f"the server connection ended ({rec.end}) before the server could answer"
    finally:
        release.set()

    assert rec.done.wait(10), "the server connection still open 10 s after answering a closed client"
    assert getattr(rec, "answered", False), f"the server could not send its answer (end: {rec.end})"
    assert rec.end in ("reset", "eof"), rec.end
    assert getattr(rec, "request_sha256", None) == sha256(request)


# -------------------------------------------------------------- TIME_WAIT

SESSIONS = 2000
CLIENTS = 8
SMALL_REQUEST = 100
SMALL_ANSWER = 1000


def _half_close_to_eof(port: int, i: int) -> None:
    request = make_request(SMALL_REQUEST, SMALL_ANSWER, seed=i)
    with connect(port, timeout=15) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        digest, count, end = read_to_end(client)
    assert (count, end, digest) == (SMALL_ANSWER, "eof", sha256(answer_for(request, SMALL_ANSWER))), (i, count, end)


def _half_close_read_answer(port: int, i: int) -> None:
    request = make_request(SMALL_REQUEST, SMALL_ANSWER, seed=i)
    with connect(port, timeout=15) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        assert recv_exactly(client, SMALL_ANSWER) == answer_for(request, SMALL_ANSWER), i
    # gone once it has its answer; the session ends at timeout_fin


def _read_answer_then_close(port: int, i: int) -> None:
    request = make_request(SMALL_REQUEST, SMALL_ANSWER, seed=i)
    with connect(port, timeout=15) as client:
        client.sendall(request)
        assert recv_exactly(client, SMALL_ANSWER) == answer_for(request, SMALL_ANSWER), i
    # the client closes first, with the session idle


def _close_before_answer(port: int, i: int) -> None:
    with connect(port, timeout=15) as client:
        client.sendall(make_request(SMALL_REQUEST, SMALL_ANSWER, seed=i))
    # closed without reading: the answer, when it comes, meets a reset


GREETING = b"hello from the server\n" * 20


def _server_first(port: int, i: int) -> None:
    with connect(port, timeout=15) as client:
        digest, count, end = read_to_end(client)
    assert (count, end) == (len(GREETING), "eof"), (i, count, end)


KINDS = {
    # name: (server handler, client session, timeout_fin, how the server connections end)
    "half-close-server-closes": (answer_handler(then="close"), _half_close_to_eof, None, None),
    # timeout_fin also bounds the wait for the answer after the client's FIN:
    # 1 s leaves room for a server thread slow to run on a loaded host.
    "half-close-server-stays-open": (answer_handler(then="hold"), _half_close_read_answer, "1s", {"reset"}),
    "client-closes-idle": (answer_handler(then="hold"), _read_answer_then_close, "200ms", {"reset"}),
    "client-closes-before-answer": (answer_handler(then="hold"), _close_before_answer, "200ms", {"reset"}),
    "server-closes-first": (controllable(source_handler(GREETING)), _server_first, None, None),
}


@pytest.mark.parametrize("splice", SPLICE)
@pytest.mark.parametrize("kind", KINDS)
def test_no_timewait_towards_server_after_2000_sessions(kind, splice, backend, tcp_proxy):
    """2,000 sessions of one kind, 8 at a time: every one intact, and not one
    socket towards the server left in TIME_WAIT (when the server closes first
    the TIME_WAIT is its own, on the server's port, not counted here).  The
    control: a socket that does close first towards the server is counted."""
    handler, session, fin, server_ends = KINDS[kind]
    server = backend(handler)
    proxy = tcp_proxy([server], workers=2, global_=splice_global(splice),
                      frontend={"timeout_fin": fin} if fin else None)

    errors = run_sessions(SESSIONS, CLIENTS, lambda i: session(proxy.port, i))
    assert not errors, f"{len(errors)} sessions failed, first: {errors[0]!r}"
    server.wait_done(SESSIONS, timeout=60)
    proxy.wait_access_lines(SESSIONS, timeout=60)
    if server_ends is not None:
        assert ends(server).keys() <= server_ends, f"how the server connections ended: {ends(server)}"
    states = settle_towards(server.port)
    assert timewait_towards(server.port) == 0, f"{len(states)} sockets towards the server in TIME-WAIT"

    # control: a socket towards the server that closes first ends in TIME-WAIT, and is seen
    server.control = True
    with socket.create_connection((LOCALHOST, server.port), timeout=15):
        server.wait_connections(SESSIONS + 1)
    wait_for(lambda: timewait_towards(server.port) == 1, 10, "the control socket in TIME-WAIT")
