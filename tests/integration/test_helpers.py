"""The measuring tools measure: `ss`-based counts see real sockets."""

from __future__ import annotations

import socket

import struct

from tests.support import (Load, connect, echo_close_handler, echo_handler, listen_count,
                           recv_exactly, settle_towards, states_towards, timewait_towards, wait_for)


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


def _read_request(conn) -> bytes:
    """The whole request (so that closing sends a FIN, not a RST for unread data)."""
    head = recv_exactly(conn, 2)
    return head + recv_exactly(conn, int.from_bytes(head, "big"))


def _reply_garbled(conn, rec, backend):
    request = _read_request(conn)
    conn.sendall(request[:2] + bytes(b ^ 1 for b in request[2:]))


def _close_without_reply(conn, rec, backend):
    _read_request(conn)  # then EOF and no reply: "short"


def _reset_without_reply(conn, rec, backend):
    _read_request(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST


def test_load_clients_count_each_outcome(backend, reserve_port):
    """The load clients tell a good session from a refused, cut or reset one
    (a control for the lifecycle tests, which expect zero of the latter)."""
    cases = [(backend(echo_close_handler).port, "ok"), (reserve_port(), "refused"),
             (backend(_close_without_reply).port, "short"), (backend(_reset_without_reply).port, "reset"),
             (backend(_reply_garbled).port, "wrong")]
    clients = [(Load(port, 0.5, processes=1, rate=40).start(), outcome) for port, outcome in cases]
    try:
        for load, outcome in clients:
            result = load.result()
            counts = result["counts"]
            assert counts[outcome] == result["sessions"] >= 1, (outcome, result)
    finally:
        for load, _ in clients:
            load.stop()
