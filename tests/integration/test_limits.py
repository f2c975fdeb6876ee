"""Timeouts and connection limits."""

from __future__ import annotations

import select
import socket
import time

import pytest

from tests.support import (LOCALHOST, connect, echo_handler, hold_handler, is_open, recv_exactly,
                           settle_towards, stays, timewait_towards, wait_closed, wait_for)


@pytest.mark.parametrize("side", ["client", "server"])
def test_idle_timeout_closes_session(side, backend, tcp_proxy):
    """timeout_client (term cD) or timeout_server (term sD) = 1s ends a
    session where neither side sends anything; the server side is reset."""
    hold = backend(hold_handler)  # never sends, never closes
    # timeout_connect far above the idle timeout: a session must not wait for
    # the (long since met) connect deadline before its idle timeout applies.
    if side == "client":
        proxy = tcp_proxy([hold], frontend={"timeout_client": "1s"}, backend={"timeout_connect": "30s"})
    else:
        proxy = tcp_proxy([hold], backend={"timeout_server": "1s", "timeout_connect": "30s"})

    started = time.monotonic()
    with connect(proxy.port) as client:
        hold.wait_connections(1)
        try:
            end = wait_closed(client, 10)
        except AssertionError:
            raise AssertionError(f"an idle session with timeout_{side} = 1s is still open after 10 s") from None
        lasted = time.monotonic() - started
    assert end in ("eof", "reset")
    # Not a speed check: the session must not be cut before it was idle for
    # 1 s, and it must be cut at its own timeout, not at some other deadline.
    assert lasted >= 0.9, f"idle session cut after {lasted:.3f}s with timeout_{side} = 1s"

    line = proxy.wait_access_lines(1)[0]
    assert line.term == ("cD" if side == "client" else "sD"), line.raw
    assert line.server == "s1", line.raw
    # The proxy ended the session itself, so the server side was reset.
    rec = hold.wait_done(1)[0]
    assert rec.end == "reset", rec.end
    settle_towards(hold.port)
    assert timewait_towards(hold.port) == 0


@pytest.fixture
def full_backlog():
    """A listener with listen(0) that never accepts, its queue filled by
    direct connections: further SYNs are dropped, so connects hang."""
    listener = socket.socket()
    listener.bind((LOCALHOST, 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    try:
        for _ in range(16):
            c = socket.socket()
            c.setblocking(False)
            fillers.append(c)
            c.connect_ex(address)
            _, writable, _ = select.select([], [c], [], 0.5)
            if not writable:
                break  # this one hangs: the queue is full
        else:
            pytest.fail("could not fill the listen queue")
        yield address
    finally:
        for c in fillers:
            c.close()
        listener.close()


def test_timeout_connect(full_backlog, tcp_proxy):
    host, port = full_backlog
    proxy = tcp_proxy([f"{host}:{port}"], backend={"timeout_connect": "1s", "retries": 0})

    with connect(proxy.port) as client:
        assert wait_closed(client, 20) in ("eof", "reset")

    line = proxy.wait_access_lines(1)[0]
    assert line.term == "sC", line.raw
    assert line.Tc == -1, line.raw
    assert (line.up, line.down) == (0, 0), line.raw


def test_global_maxconn_keeps_extra_connections_in_backlog(backend, tcp_proxy):
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo], workers=1, global_={"maxconn": 5})

    first = [connect(proxy.port) for _ in range(5)]
    try:
        for i, client in enumerate(first):
            client.sendall(b"client %d\n" % i)
            assert recv_exactly(client, 9) == b"client %d\n" % i
        sixth = connect(proxy.port)  # the kernel completes it: it waits in the backlog
        first.append(sixth)
        sixth.sendall(b"sixth\n")

        assert stays(lambda: len(echo.connections()) == 5 and is_open(sixth), 1.0), \
            f"the 6th connection was served (or cut) while 5 were open: {len(echo.connections())} " \
            f"server connections"

        first[0].close()
        assert recv_exactly(sixth, 6) == b"sixth\n"
        wait_for(lambda: len(echo.connections()) == 6, 10, "the 6th server connection")
    finally:
        for client in first:
            client.close()
