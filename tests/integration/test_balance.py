"""Load balancing over real servers: connect retries, weighted roundrobin."""

from __future__ import annotations

from tests.support import connect, echo_handler, greet_handler, recv_all, recv_exactly


def test_refused_connect_is_retried_on_another_server(backend, reserve_port, tcp_proxy):
    closed = reserve_port()  # bound, never listening: connections are refused
    echo = backend(echo_handler)
    proxy = tcp_proxy([{"name": "down", "address": f"127.0.0.1:{closed}"},
                       {"name": "up", "address": echo.address}])
    n = 30
    for i in range(n):
        data = b"session %d\n" % i
        with connect(proxy.port) as client:
            client.sendall(data)
            assert recv_exactly(client, len(data)) == data

    assert len(echo.wait_done(n)) == n
    lines = proxy.wait_access_lines(n)
    assert len(lines) == n
    assert {(line.server, line.term, line.fin) for line in lines} == {("up", "--", "client")}, [l.raw for l in lines]


def test_weighted_roundrobin(backend, tcp_proxy):
    light = backend(greet_handler, name="light")
    heavy = backend(greet_handler, name="heavy")
    proxy = tcp_proxy([{"name": "light", "address": light.address, "weight": 1},
                       {"name": "heavy", "address": heavy.address, "weight": 3}],
                      backend={"balance": "roundrobin"}, workers=2)
    n = 400
    answers = {"light": 0, "heavy": 0}
    for _ in range(n):
        with connect(proxy.port) as client:
            name = recv_all(client).decode()  # each server says its name and closes
        answers[name] += 1

    assert sum(answers.values()) == n
    assert len(light.connections()) == answers["light"]
    assert len(heavy.connections()) == answers["heavy"]
    # 1:3 of 400 is 100:300; each worker balances on its own, so allow +-15%.
    assert 85 <= answers["light"] <= 115, answers
    assert 255 <= answers["heavy"] <= 345, answers
