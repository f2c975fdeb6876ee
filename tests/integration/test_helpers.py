"""The measuring tools measure: `ss`-based counts see real sockets."""

from __future__ import annotations

import socket

from tests.support import (connect, echo_handler, listen_count, settle_towards, states_towards,
                           timewait_towards, wait_for)


def test_timewait_towards_sees_time_wait(backend):
    """A socket that closes first towards a port ends in TIME_WAIT, and
    timewait_towards(port) counts it (a control for the TIME_WAIT tests)."""
    echo = backend(echo_handler)
    assert timewait_towards(echo.port) == 0
    for _ in range(3):
        with connect(echo.port) as client:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
        # we close first; the echo server closes at our EOF
    settle_towards(echo.port)
    assert wait_for(lambda: timewait_towards(echo.port) == 3, 10, "3 TIME-WAIT sockets")
    assert states_towards(echo.port) == ["TIME-WAIT"] * 3


def test_listen_count():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert listen_count(port) == 0
        s.listen(1)
        assert listen_count(port) == 1
