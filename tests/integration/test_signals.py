"""Process supervision and signals: a killed worker is replaced; TERM stops
at once; QUIT lets open sessions finish (up to grace)."""

from __future__ import annotations

import os
import signal

from tests.support import (alive, connect, connection_refused, echo_handler, listen_count,
                           recv_exactly, wait_closed, wait_for)


def echo_once(port: int, data: bytes = b"are you there?\n") -> None:
    with connect(port) as client:
        client.sendall(data)
        assert recv_exactly(client, len(data)) == data


def exchange(client, data: bytes) -> None:
    client.sendall(data)
    assert recv_exactly(client, len(data)) == data


def test_killed_worker_is_replaced(backend, tcp_proxy):
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo], workers=2)
    master_pid = proxy.pid
    slots = proxy.worker_slots()
    assert len(slots) == 2
    victim = min(slots)

    os.kill(victim, signal.SIGKILL)

    def replaced():
        now = proxy.worker_slots()
        return now if len(now) == 2 and victim not in now else None

    now = wait_for(replaced, 10, "a new worker in place of the killed one")
    new_pid = (set(now) - set(slots)).pop()
    assert now[new_pid] == slots[victim], "the replacement should take the killed worker's slot"
    assert proxy.running() and proxy.pid == master_pid
    assert alive(proxy.master)
    # Service continues; 20 sessions spread over both workers' listeners.
    for i in range(20):
        echo_once(proxy.port, b"after the kill %d\n" % i)


def test_term_stops_at_once(backend, tcp_proxy):
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo])
    workers = proxy.workers()
    client = connect(proxy.port)
    exchange(client, b"before TERM\n")

    proxy.signal(signal.SIGTERM)

    assert proxy.wait_exit(5) == 0
    wait_for(lambda: not any(alive(w) for w in workers), 5, "workers to exit")
    assert connection_refused(proxy.port)
    assert wait_closed(client, 5) in ("eof", "reset")  # the open session was cut
    client.close()


def test_quit_refuses_new_and_finishes_open_sessions(backend, tcp_proxy):
    echo = backend(echo_handler)
    # grace defaults to 30s; the session ends timeout_fin after the client closes
    proxy = tcp_proxy([echo], frontend={"timeout_fin": "300ms"})
    workers = proxy.workers()
    client = connect(proxy.port)
    exchange(client, b"before QUIT\n")

    proxy.signal(signal.SIGQUIT)

    wait_for(lambda: listen_count(proxy.port) == 0, 10, "listeners to close after QUIT")
    assert connection_refused(proxy.port)
    # The session opened before QUIT goes on working...
    for i in range(5):
        exchange(client, b"after QUIT %d\n" % i + b"x" * 10000)
    assert proxy.running()
    # ...until it ends; then the master exits 0.
    client.close()
    assert proxy.wait_exit(10) == 0
    wait_for(lambda: not any(alive(w) for w in workers), 5, "workers to exit")


def test_quit_cuts_sessions_after_grace(backend, tcp_proxy):
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo], global_={"grace": "1s"})
    client = connect(proxy.port)
    exchange(client, b"before QUIT\n")

    proxy.signal(signal.SIGQUIT)

    wait_for(lambda: listen_count(proxy.port) == 0, 10, "listeners to close after QUIT")
    assert wait_closed(client, 15) in ("eof", "reset")
    client.close()
    assert proxy.wait_exit(15) == 0
    assert echo.wait_done(1)[0].end in ("eof", "reset")
