"""TCP relaying: bytes intact both ways, many sessions at once, half-close,
and nothing lost when the client closes first (half_close = false).

With half_close = false the client's FIN is not passed on: a server that
waits for EOF is reset once it has been silent for timeout_fin, which the
tests that wait for that end set short (test_half_close.py has the rest)."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.support import (connect, echo_handler, payload, read_to_end, recv_exactly, sha256,
                           sink_handler, source_handler, wait_for)

SIZES = [0, 1, 64 * 1024, 20 * 1024 * 1024]
SIZE_IDS = ["0B", "1B", "64KiB", "20MiB"]
QUICK_FIN = {"timeout_fin": "300ms"}


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_client_to_server_intact(size, backend, tcp_proxy):
    sink = backend(sink_handler())
    proxy = tcp_proxy([sink], frontend=QUICK_FIN)
    data = payload(size, seed=size)

    with connect(proxy.port) as client:
        # A TCP proxy connects to the server as soon as it accepts (the server
        # may speak first); wait for that so a 0-byte session is one too.
        sink.wait_connections(1)
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        rec = sink.wait_done(1, timeout=60)[0]

    assert (rec.received, rec.sha256) == (size, sha256(data))
    assert len(sink.connections()) == 1


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_server_to_client_intact(size, backend, tcp_proxy):
    data = payload(size, seed=size + 1)
    source = backend(source_handler(data))
    proxy = tcp_proxy([source])

    with connect(proxy.port) as client:
        digest, count, end = read_to_end(client)

    assert (count, digest) == (size, sha256(data))
    assert end == "eof"


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_echo_round_trip_intact(size, backend, tcp_proxy):
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo], frontend=QUICK_FIN)
    data = payload(size, seed=size + 2)

    with connect(proxy.port) as client:
        # Send from a thread while this one reads: 20 MiB does not fit in the
        # socket buffers of one direction.
        sender = threading.Thread(target=client.sendall, args=(data,), daemon=True)
        sender.start()
        echoed = recv_exactly(client, size)
        sender.join(60)
        assert not sender.is_alive()
    # The client closes once it has its answer; the server, waiting for an
    # EOF that is not passed on, is reset after timeout_fin.

    assert sha256(echoed) == sha256(data)
    rec = echo.wait_done(1, timeout=30)[0]
    assert rec.received == size


def test_200_concurrent_sessions_intact(backend, tcp_proxy):
    """200 sessions open at the same time (all 200 server connections exist
    at once), each with its own random payload, echoed back intact."""
    n = 200
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo])
    payloads = [payload(8192 + 97 * i, seed=1000 + i) for i in range(n)]
    results: list[str | None] = [None] * n
    errors: list[BaseException] = []
    connected = threading.Barrier(n + 1, timeout=60)
    go = threading.Event()

    def session(i: int) -> None:
        try:
            with connect(proxy.port) as client:
                connected.wait()
                if not go.wait(60):
                    raise AssertionError("never released")
                client.sendall(payloads[i])
                results[i] = sha256(recv_exactly(client, len(payloads[i])))
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
    bad = [i for i in range(n) if results[i] != sha256(payloads[i])]
    assert not bad, f"{len(bad)} sessions corrupted: {bad[:10]}"


# ---------------------------------------------------------------- half-close

def test_half_close_client_first(backend, tcp_proxy):
    """half_close = true: the client's FIN reaches the server as EOF while the
    server can still answer; the client gets the whole answer."""
    request = payload(256 * 1024, seed=1)
    reply = payload(512 * 1024, seed=2)
    server = backend(sink_handler(reply=reply))
    proxy = tcp_proxy([server], frontend={"half_close": True})

    with connect(proxy.port) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        digest, count, end = read_to_end(client)

    rec = server.wait_done(1)[0]
    assert (rec.received, rec.sha256) == (len(request), sha256(request))
    assert rec.end == "eof"
    assert (count, digest) == (len(reply), sha256(reply))
    assert end == "eof"


def test_half_close_server_first(backend, tcp_proxy):
    """half_close = true: the server's FIN reaches the client as EOF while the
    client can still send; what it sends then reaches the server."""
    greeting = payload(256 * 1024, seed=3)
    late = payload(384 * 1024, seed=4)
    server = backend(source_handler(greeting, half_close=True))
    proxy = tcp_proxy([server], frontend={"half_close": True})

    with connect(proxy.port) as client:
        digest, count, end = read_to_end(client)
        assert (count, digest, end) == (len(greeting), sha256(greeting), "eof")
        client.sendall(late)
        client.shutdown(socket.SHUT_WR)
        rec = server.wait_done(1)[0]

    assert (rec.received, rec.sha256) == (len(late), sha256(late))
    assert rec.end == "eof"


def test_client_close_delivers_everything_to_slow_server(backend, tcp_proxy):
    """half_close = false (default): the client sends 4 MiB and closes at
    once; a server that starts reading 1.5 s after accept (within
    timeout_fin, 5 s by default) still gets every byte.  The reset that ends
    the session (timeout_fin after the last byte) is allowed; lost bytes are
    not."""
    data = payload(4 * 1024 * 1024, seed=5)
    sink = backend(sink_handler(delay=1.5))
    proxy = tcp_proxy([sink])

    client = connect(proxy.port)
    client.sendall(data)
    client.close()

    rec = sink.wait_done(1, timeout=60)[0]
    assert rec.end in ("eof", "reset"), rec.end
    assert rec.received == len(data), f"server got {rec.received} of {len(data)} bytes (end: {rec.end})"
    assert rec.sha256 == sha256(data)
