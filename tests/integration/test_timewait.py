"""No TIME_WAIT towards backends with default settings, whichever side closes
first (PRODUCT.md, Bars)."""

from __future__ import annotations


from tests.support import (connect, echo_handler, read_to_end, recv_exactly, run_sessions, settle_towards,
                           source_handler, timewait_towards)

SESSIONS = 2000
CLIENTS = 4  # sessions run a few at a time, each one complete


def test_no_timewait_client_closes_first(backend, tcp_proxy):
    echo = backend(echo_handler)
    # The echo server waits for an EOF that is not passed on: it is reset
    # (no TIME_WAIT) once timeout_fin has passed.
    proxy = tcp_proxy([echo], frontend={"timeout_fin": "300ms"})

    def session(i):
        with connect(proxy.port) as client:
            client.sendall(b"ping %d\n" % i)
            recv_exactly(client, len(b"ping %d\n" % i))
        # the client closes first, with the session idle

    errors = run_sessions(SESSIONS, CLIENTS, session)
    assert not errors, f"{len(errors)} sessions failed, first: {errors[0]!r}"
    echo.wait_done(SESSIONS, timeout=60)
    proxy.wait_access_lines(SESSIONS, timeout=60)
    states = settle_towards(echo.port)
    assert timewait_towards(echo.port) == 0, f"{len(states)} sockets towards the backend: TIME-WAIT"


def test_no_timewait_server_closes_first(backend, tcp_proxy):
    reply = b"hello from the server\n"
    source = backend(source_handler(reply))
    proxy = tcp_proxy([source])

    def session(i):
        with connect(proxy.port) as client:
            digest, count, end = read_to_end(client)
            assert (count, end) == (len(reply), "eof")

    errors = run_sessions(SESSIONS, CLIENTS, session)
    assert not errors, f"{len(errors)} sessions failed, first: {errors[0]!r}"
    source.wait_done(SESSIONS, timeout=60)
    proxy.wait_access_lines(SESSIONS, timeout=60)
    states = settle_towards(source.port)
    assert timewait_towards(source.port) == 0, f"{len(states)} sockets towards the backend: TIME-WAIT"
