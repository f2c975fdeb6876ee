"""Active health checks (PRODUCT.md, "Health checks"): run once per host by
the control process whatever `workers` is; `fall` failures mark a server
down and `rise` successes up again, each transition logged; a server marked
down gets no new session from any worker; backups when no active server is
up; with none, 503 (HTTP) or a closed connection (TCP); checks leave no
TIME_WAIT; states survive reloads and a killed control process.

Every server is a tests.support.CheckedServer: it counts check connections
and sessions apart, answers each session with its own name (so the client
and the server agree on who served it), and answers HTTP checks as told.
"""

# ruff: noqa: F811 (the fixtures imported from tests.control_fixtures are test arguments)
from __future__ import annotations

import os
import re
import signal
import struct
import time
from pathlib import Path

import pytest

from tests.http_support import HTTPClient, assert_own_error, build_request, wait_http_access_lines
from tests.support import (LOCALHOST, admin_command, connect, control_processes, free_port,
                           hold_handler, http_hello, parse_access_line, parse_servers_state, recv_all, servers_state,
                           stat_json, tally, tcp_hello, timewait_towards, wait_closed, wait_for)
from tests.control_fixtures import admin_path, proxyd, servers  # noqa: F401 (fixtures)

CLIENTS = 8
# Check timing where states matter: a timeout well under the interval.  A
# check still running at its next due time meets the defect shown by
# test_a_check_slower_than_its_interval_keeps_the_control_process_going;
# one slower than its timeout (a loaded box) is a failure that flaps a server.
STEADY = {"interval": "500ms", "timeout": "300ms"}


# ------------------------------------------------------------------ helpers

def config(servers, check: dict, *, workers: int = 2, admin: str | None = None, tcp: bool = True,
           http: bool = False, backups=(), backend: str = "app") -> dict:
    """One backend BACKEND on SERVERS (names as theirs; those in BACKUPS are
    backups) checked with CHECK; a tcp frontend "tcp" and/or an http
    frontend "web" in front of it."""
    entries = [{"name": s.name, "address": s.address, **({"backup": True} if s.name in backups else {})}
               for s in servers]
    frontends = {}
    if tcp:
        frontends["tcp"] = {"bind": [f"{LOCALHOST}:{free_port()}"], "backend": backend}
    if http:
        frontends["web"] = {"bind": [f"{LOCALHOST}:{free_port()}"], "backend": backend, "mode": "http"}
    cfg = {"global": {"workers": workers, **({"admin_socket": admin} if admin else {})},
           "frontends": frontends,
           "backends": {backend: {"servers": entries, "health_check": dict(check)}}}
    return cfg


def port_of(cfg: dict, frontend: str) -> int:
    return int(cfg["frontends"][frontend]["bind"][0].rsplit(":", 1)[1])


def log_lines_with(proxy, text: str) -> list[str]:
    return [line for line in proxy.log_lines() if text in line]


def wait_log(proxy, text: str, count: int = 1, timeout: float = 15.0, after: int = 0) -> list[str]:
    """Wait until TEXT is in COUNT log lines (from line number AFTER on);
    return those lines."""
    def found():
        return [line for line in proxy.log_lines()[after:] if text in line]

    try:
        wait_for(lambda: len(found()) >= count, timeout, repr(text))
    except AssertionError:
        raise AssertionError(f"{text!r} not logged {count} time(s) within {timeout}s; "
                             f"log tail:\n{proxy.log_tail(30)}") from None
    return found()


def sample_until(admin: str, key: str, done, timeout: float = 20.0) -> list[tuple[str, str]]:
    """Read `show stat json` over and over until DONE() holds: the
    (status, check_status) pairs seen for server KEY, in order."""
    samples: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out after {timeout}s; {key} went through {samples}"
        row = stat_json(admin)[key]
        pair = (row["status"], row["check_status"])
        if not samples or samples[-1] != pair:
            samples.append(pair)
        time.sleep(0.01)
    return samples


def wait_stat(admin: str, key: str, timeout: float = 15.0, **expected) -> dict:
    """Wait until `show stat json` has EXPECTED (column=value) for KEY."""
    row: dict = {}

    def matches():
        nonlocal row
        row = stat_json(admin)[key]
        return all(row.get(k) == v for k, v in expected.items())

    try:
        wait_for(matches, timeout, f"{key} with {expected}")
    except AssertionError:
        raise AssertionError(f"{key} not {expected} within {timeout}s; last row: {row}") from None
    return row


def sessions_by_server(servers) -> dict[str, int]:
    return {s.name: len(s.sessions()) for s in servers}


def new_sessions(before: dict[str, int], servers) -> dict[str, int]:
    return {s.name: len(s.sessions()) - before[s.name] for s in servers}


def run_tcp(port: int, count: int) -> dict[str, int]:
    return tally(count, CLIENTS, lambda i: tcp_hello(port, b"hello %d" % i))


def run_http(port: int, count: int) -> dict[str, int]:
    def one(i):
        status, body = http_hello(port, f"/hello/{i}")
        assert status == 200, (status, body)
        return body
    return tally(count, CLIENTS, one)


def reload(proxy, generation: int, admin: str, timeout: float = 20.0) -> None:
    """HUP; wait until GENERATION serves and its control process answers."""
    proxy.signal(signal.SIGHUP)
    wait_log(proxy, f"generation {generation} serving", timeout=timeout)
    wait_log(proxy, f"control process started (generation {generation})", timeout=timeout)
    info = admin_command(admin, "show info")
    assert f"Generation: {generation}\n" in info, info


# ------------------------------------------------------------------ once per host

@pytest.mark.parametrize("kind", ["tcp", "http"])
def test_one_check_per_interval_whatever_the_workers(kind, servers, proxyd):
    """workers = 4, interval 300 ms: over a 3 s window the server sees about
    ten checks (one per interval), not forty (one per worker)."""
    interval, window = 0.3, 3.0
    (s1,) = servers("s1")
    check = {"interval": "300ms", "timeout": "100ms", "rise": 1, "fall": 1}
    if kind == "http":
        check["http_path"] = "/healthz"
    proxy = proxyd(config([s1], check, workers=4))
    assert len(proxy.workers()) == 4
    s1.wait_connections(1, timeout=15)          # checks are running
    start = time.monotonic()
    time.sleep(window)                          # the observation window, not an expectation of speed
    end = time.monotonic()
    wait_for(lambda: all(hasattr(r, "kind") for r in s1.connections() if r.accepted_at <= end), 10,
             "every connection of the window handled")
    in_window = [r for r in s1.connections() if start <= r.accepted_at <= end]
    assert all(r.kind == "check" for r in in_window), [r.kind for r in in_window]
    if kind == "http":
        assert all(r.code == 200 for r in in_window)
    expected = (end - start) / interval        # ~10 with one checker; 4 checkers would make ~40
    assert 1 <= len(in_window) < 2 * expected, \
        f"{len(in_window)} checks in {end - start:.2f}s at a {interval}s interval with 4 workers " \
        f"(one checker per host: about {expected:.0f})"
    assert len(control_processes(proxy)) == 1


# ------------------------------------------------------------------ fall and rise

def test_tcp_check_fall_and_rise(servers, proxyd, admin_path):
    """A server whose port closes is marked DOWN after `fall` (3) failed
    connects, with HAProxy's log line, and UP after `rise` (3) successful
    ones once it listens again; in between it is seen failing but still up,
    then passing but still down."""
    s1, s2 = servers("s1", "s2")
    check = {**STEADY, "rise": 3, "fall": 3}
    proxy = proxyd(config([s1, s2], check, admin=admin_path))
    wait_stat(admin_path, "app/s1", status="UP", check_status="L4OK")

    s1.stop_listening()
    down = "Server app/s1 is DOWN"
    samples = sample_until(admin_path, "app/s1", lambda: log_lines_with(proxy, down))
    line = log_lines_with(proxy, down)[0]
    assert 'is DOWN, reason: Layer4 connection problem, info: "Connection refused", check duration: ' in line, line
    assert line.endswith("ms. 1 active and 0 backup servers left."), line
    assert ("UP", "L4CON") in samples, \
        f"never seen failing while still up (fall = 3): {samples}"
    assert wait_stat(admin_path, "app/s1", status="DOWN", check_status="L4CON")

    checks_before = len(s1.checks())
    s1.listen_again()
    up = "Server app/s1 is UP"
    samples = sample_until(admin_path, "app/s1", lambda: log_lines_with(proxy, up))
    line = log_lines_with(proxy, up)[0]
    assert "is UP, reason: Layer4 check passed, check duration: " in line, line
    assert line.endswith("ms. 2 active and 0 backup servers online."), line
    assert ("DOWN", "L4OK") in samples, f"never seen passing while still down (rise = 3): {samples}"
    # The rise successes were connections the server accepted.
    wait_for(lambda: len(s1.checks()) - checks_before >= 3, 10, "three checks since the port reopened")
    assert len(log_lines_with(proxy, down)) == 1 and len(log_lines_with(proxy, up)) == 1, proxy.log_tail(20)
    assert not log_lines_with(proxy, "Server app/s2 is"), "s2 never changed state"


def test_http_check_wrong_status_and_back(servers, proxyd, admin_path):
    """HTTP check with fall 3, rise 2.  Each check answer is told apart by
    its status, and the transition lines name the status of the check that
    made them: the DOWN line must carry the third failure's 503 (a 404 is a
    failure too), the UP line the second success's 200 (a 302 is a success
    too) -- not the first, not a later one."""
    s1, s2 = servers("s1", "s2")
    check = {**STEADY, "rise": 2, "fall": 3, "http_path": "/healthz"}
    proxy = proxyd(config([s1, s2], check, admin=admin_path, tcp=False, http=True))
    wait_stat(admin_path, "app/s1", status="UP", check_status="L7OK", check_code=200)

    s1.answer_checks([(404, "Not Found"), (502, "Bad Gateway"), (503, "Service Unavailable")],
                     then=(500, "Internal Server Error"))
    down = wait_log(proxy, "Server app/s1 is DOWN")[0]
    assert 'is DOWN, reason: Layer7 wrong status, code: 503, info: "Service Unavailable", check duration: ' \
        in down, f"not the third failure's answer: {down}"
    assert down.endswith("ms. 1 active and 0 backup servers left."), down
    wait_stat(admin_path, "app/s1", status="DOWN", check_status="L7STS")

    s1.answer_checks([(302, "Found"), (200, "OK")], then=(204, "No Content"))
    up = wait_log(proxy, "Server app/s1 is UP")[0]
    assert "is UP, reason: Layer7 check passed, code: 200, check duration: " in up, \
        f"not the second success's answer: {up}"
    assert up.endswith("ms. 2 active and 0 backup servers online."), up
    wait_stat(admin_path, "app/s1", status="UP", check_status="L7OK")
    # Every check was an HTTP GET of the path, with a Host header.
    heads = [r.head for r in s1.checks()]
    assert heads and all(h.startswith(b"GET /healthz HTTP/1.") and b"\r\nHost: " in h for h in heads), heads[:3]
    assert not s1.sessions(), "only checks reached s1"
    assert len(log_lines_with(proxy, "Server app/s1 is")) == 2, proxy.log_tail(20)


# ------------------------------------------------------------------ traffic obeys the checks

def test_down_server_gets_no_session_from_any_worker(servers, proxyd):
    """workers = 4: once s2 is logged DOWN (its check answers 503 while its
    port still serves), 300 TCP sessions and 300 HTTP requests all go to s1
    and s3, none to s2."""
    s1, s2, s3 = all_servers = servers("s1", "s2", "s3")
    check = {**STEADY, "rise": 1, "fall": 1, "http_path": "/healthz"}
    cfg = config(all_servers, check, workers=4, http=True)
    proxy = proxyd(cfg)
    tcp_port, http_port = port_of(cfg, "tcp"), port_of(cfg, "web")
    s2.wait_connections(1, timeout=15)
    warmup = run_tcp(tcp_port, 60)
    assert warmup.get("s2", 0) > 0, f"s2 took sessions while up: {warmup}"

    s2.answer_checks(then=(503, "Service Unavailable"))
    wait_log(proxy, "Server app/s2 is DOWN")
    before = sessions_by_server(all_servers)
    tcp = run_tcp(tcp_port, 300)
    http = run_http(http_port, 300)
    counted = new_sessions(before, all_servers)
    assert "s2" not in tcp and "s2" not in http, f"answers from s2 after it was marked down: {tcp} {http}"
    assert counted["s2"] == 0, f"s2 got {counted['s2']} sessions after it was marked down"
    assert counted["s1"] + counted["s3"] == 600, counted
    assert counted["s1"] == tcp.get("s1", 0) + http.get("s1", 0), (counted, tcp, http)
    assert counted["s1"] > 0 and counted["s3"] > 0, counted


def test_backup_takes_over_and_gives_back(servers, proxyd):
    """The backup gets nothing while an active server is up, every session
    once both actives are down, and nothing again once one is back."""
    s1, s2, b1 = all_servers = servers("s1", "s2", "b1")
    check = {**STEADY, "rise": 2, "fall": 1, "http_path": "/healthz"}
    cfg = config(all_servers, check, backups=("b1",))
    proxy = proxyd(cfg)
    port = port_of(cfg, "tcp")
    wait_for(lambda: all(s.checks() for s in all_servers), 15, "a first check of every server")

    first = run_tcp(port, 60)
    assert first.get("b1", 0) == 0 and first.get("s1", 0) > 0 and first.get("s2", 0) > 0, first

    mark = len(proxy.log_lines())
    s1.answer_checks(then=(503, "Service Unavailable"))
    s2.answer_checks(then=(503, "Service Unavailable"))
    wait_log(proxy, "Server app/s1 is DOWN", after=mark)
    wait_log(proxy, "Server app/s2 is DOWN", after=mark)
    last_down = [line for line in proxy.log_lines()[mark:] if " is DOWN" in line][-1]
    assert last_down.endswith("0 active and 1 backup servers left."), last_down
    before = sessions_by_server(all_servers)
    second = run_tcp(port, 100)
    assert second == {"b1": 100}, second
    assert new_sessions(before, all_servers) == {"s1": 0, "s2": 0, "b1": 100}

    mark = len(proxy.log_lines())
    s1.answer_checks(then=(200, "OK"))
    up = wait_log(proxy, "Server app/s1 is UP", after=mark)[0]
    assert up.endswith("1 active and 1 backup servers online."), up
    before = sessions_by_server(all_servers)
    third = run_tcp(port, 100)
    assert third == {"s1": 100}, third
    assert new_sessions(before, all_servers) == {"s1": 100, "s2": 0, "b1": 0}


def test_no_server_up_http_503_tcp_closed(servers, proxyd):
    """The only server is marked down (its check answers 503; its port still
    serves): HTTP requests get proxyd's own 503, TCP connections are closed
    without a byte, each logged with termination code SC; the server gets
    no session."""
    (s1,) = servers("s1")
    s1.answer_checks(then=(503, "Service Unavailable"))
    check = {**STEADY, "rise": 2, "fall": 1, "http_path": "/healthz"}
    cfg = config([s1], check, http=True)
    proxy = proxyd(cfg)
    tcp_port, http_port = port_of(cfg, "tcp"), port_of(cfg, "web")
    wait_log(proxy, "Server app/s1 is DOWN")
    wait_log(proxy, "backend app has no server available!")

    for i in range(10):
        with HTTPClient(http_port) as client:
            resp = client.request(build_request("GET", f"/nothing/{i}"))
        assert_own_error(resp, 503)
    for i in range(10):
        with connect(tcp_port) as client:
            client.sendall(b"hello %d\n" % i)
            try:
                data = recv_all(client)       # until proxyd closes it (EOF or reset)
            except ConnectionResetError:
                data = b""
            assert data == b"", f"TCP client got {data!r} with no server up"
    assert s1.sessions() == [], "the down server got sessions"

    http_lines = wait_http_access_lines(proxy, 10)
    assert all(a.status == 503 and a.term.startswith("SC") for a in http_lines), [a.raw for a in http_lines]
    # tcplog lines of the "tcp" frontend (read here with a pattern of their
    # own: see test_no_server_tcp_access_line_has_the_documented_layout)
    wait_for(lambda: len(tcp_access_lines(proxy)) >= 10, 10, "10 tcp access lines")
    tcp_lines = tcp_access_lines(proxy)
    assert all(TCP_NO_SERVER.search(line) for line in tcp_lines), tcp_lines


def tcp_access_lines(proxy) -> list[str]:
    return [line for line in proxy.log_lines() if " tcp app/" in line]


TCP_NO_SERVER = re.compile(r" tcp app/<NOSRV> -1/-1/\d+ 0 SC \d+/\d+/\d+/0/0 0/\d+ up=0( |$)")


def test_no_server_tcp_access_line_has_the_documented_layout(servers, proxyd):
    (s1,) = servers("s1")
    s1.answer_checks(then=(503, "Service Unavailable"))
    check = {**STEADY, "rise": 2, "fall": 1, "http_path": "/healthz"}
    cfg = config([s1], check)
    proxy = proxyd(cfg)
    wait_log(proxy, "backend app has no server available!")
    with connect(port_of(cfg, "tcp")) as client:
        client.sendall(b"hello\n")
        wait_closed(client)
    wait_for(lambda: tcp_access_lines(proxy), 10, "the access line")
    (line,) = tcp_access_lines(proxy)
    access = parse_access_line(line)
    assert access is not None, f"not in the documented tcplog layout: {line}"
    assert access.term == "SC", line


# ------------------------------------------------------------------ no TIME_WAIT

def test_checks_leave_no_timewait(servers, proxyd):
    """Over 1,000 TCP checks (five servers checked every 20 ms) and a few
    dozen HTTP checks (two more servers, every 200 ms) leave no TIME_WAIT
    socket on the proxy host towards any of them.  (HTTP checks are not run
    every 20 ms here: one that outlasts its interval meets the defect of
    test_a_check_slower_than_its_interval_keeps_the_control_process_going.)"""
    tcp_servers = servers("t1", "t2", "t3", "t4", "t5")
    http_servers = servers("h1", "h2")
    cfg = config(tcp_servers, {"interval": "20ms", "timeout": "10ms", "rise": 1, "fall": 3}, workers=1,
                 backend="tcpchk")
    web = config(http_servers, {"interval": "200ms", "timeout": "100ms", "rise": 1, "fall": 3,
                                "http_path": "/healthz"}, workers=1, tcp=False, http=True, backend="httpchk")
    cfg["frontends"].update(web["frontends"])
    cfg["backends"].update(web["backends"])
    proxyd(cfg, workers=1)
    everyone = tcp_servers + http_servers

    def total(group):
        return sum(len(s.checks()) for s in group)

    wait_for(lambda: total(tcp_servers) >= 1000 and total(http_servers) >= 20, 60,
             "1,000 TCP checks and 20 HTTP checks")
    assert all(s.checks() for s in everyone), {s.name: len(s.checks()) for s in everyone}
    assert all(r.code == 200 for s in http_servers for r in s.checks())
    left = {s.name: timewait_towards(s.port) for s in everyone}
    assert left == {s.name: 0 for s in everyone}, \
        f"TIME_WAIT sockets towards the servers after {total(everyone)} checks"


def test_a_check_slower_than_its_interval_keeps_the_control_process_going(servers, backend, proxyd, admin_path):
    """A server that accepts and never answers its HTTP check, with a check
    timeout longer than the interval: it is marked down by a Layer7 timeout,
    the other server goes on being checked, the runtime API answers."""
    (good,) = servers("good")
    silent = backend(hold_handler, name="silent")
    check = {"interval": "300ms", "timeout": "1s", "rise": 1, "fall": 1, "http_path": "/healthz"}
    cfg = config([good], check, admin=admin_path)
    cfg["backends"]["app"]["servers"].append({"name": "silent", "address": silent.address})
    proxy = proxyd(cfg)
    silent.wait_connections(1, timeout=10)   # its first check: it will outlast the interval
    try:
        assert admin_command(admin_path, "show info", timeout=3).startswith("Name: proxyd\n")
        mark = len(good.checks())
        wait_for(lambda: len(good.checks()) >= mark + 3, 5, "three more checks of the good server")
        (line,) = wait_log(proxy, "Server app/silent is DOWN", timeout=5)
        assert "reason: Layer7 timeout, check duration: " in line, line
    finally:
        # Nothing slow to check any more, and a stuck control process goes
        # (the master starts another): the test ends without waiting for it.
        silent.close()
        for control in control_processes(proxy):
            try:
                admin_command(admin_path, "show info", timeout=1)
            except OSError:
                os.kill(control.pid, signal.SIGKILL)


# ------------------------------------------------------------------ states survive

def test_states_survive_reloads_and_a_killed_control_process(servers, proxyd, admin_path):
    """s1 marked down by its checks (its port closed), s5 marked down (its
    check answers 503), s2 drained, s3 disabled and s4's weight set over the
    admin socket: all of it stays as it is across three reloads and a
    SIGKILLed control process (respawned with a new pid), no state is
    logged as changing again, and only s4 gets sessions."""
    s1, _, s3, s4, s5 = all_servers = servers("s1", "s2", "s3", "s4", "s5")
    check = {**STEADY, "rise": 2, "fall": 1, "http_path": "/healthz"}
    cfg = config(all_servers, check, admin=admin_path)
    proxy = proxyd(cfg)
    port = port_of(cfg, "tcp")
    wait_for(lambda: all(s.checks() for s in all_servers), 15, "a first check of every server")

    s1.stop_listening()
    s5.answer_checks(then=(503, "Service Unavailable"))
    wait_log(proxy, "Server app/s1 is DOWN")
    wait_log(proxy, "Server app/s5 is DOWN")
    for command in ("set server app/s2 state drain", "disable server app/s3", "set weight app/s4 7"):
        assert admin_command(admin_path, command) == "", command

    def assert_states(when: str) -> None:
        state = servers_state(admin_path)
        seen = {k: (v["srv_op_state"], v["srv_admin_state"], v["srv_uweight"]) for k, v in state.items()}
        assert seen == {"app/s1": ("0", "0", "1"), "app/s2": ("2", "8", "1"), "app/s3": ("2", "1", "1"),
                        "app/s4": ("2", "0", "7"), "app/s5": ("0", "0", "1")}, f"{when}: {seen}"
        stat = stat_json(admin_path)
        assert [stat[f"app/s{i}"]["status"] for i in range(1, 6)] == ["DOWN", "DRAIN", "MAINT", "UP", "DOWN"], \
            f"{when}: {[stat[f'app/s{i}'] for i in range(1, 6)]}"
        before = sessions_by_server(all_servers)
        answered = run_tcp(port, 40)
        assert answered == {"s4": 40}, f"{when}: {answered}"
        assert new_sessions(before, all_servers) == {"s1": 0, "s2": 0, "s3": 0, "s4": 40, "s5": 0}, when
        changes = [line for line in proxy.log_lines() if " is DOWN" in line or " is UP" in line]
        assert len(changes) == 2, f"{when}: state changes logged again: {changes}"

    def checks_go_on() -> None:
        """The control process now running has checked s4 twice (so its
        checks, not only the records it was born with, agree)."""
        mark = len(s4.checks())
        wait_for(lambda: len(s4.checks()) >= mark + 2, 15, "two more checks of s4")

    assert_states("before any reload")
    maint_checks = len(s3.checks())
    for generation in (2, 3, 4):
        reload(proxy, generation, admin_path)
        checks_go_on()
        assert_states(f"after reload to generation {generation}")

    (control,) = wait_for(lambda: control_processes(proxy) or None, 10, "the control process")
    info = admin_command(admin_path, "show info")
    assert f"Control_pid: {control.pid}\n" in info, info
    os.kill(control.pid, signal.SIGKILL)

    def respawned():
        found = [c for c in control_processes(proxy) if c.pid != control.pid]
        return found[0] if found else None

    new = wait_for(respawned, 15, "a new control process")
    assert new.pid != control.pid
    wait_for(lambda: f"Control_pid: {new.pid}\n" in admin_command(admin_path, "show info"), 15,
             "the new control process answering")
    checks_go_on()
    assert_states("after the control process was killed")
    # In maintenance, s3 was not checked by any of the control processes
    # (one check may have been on its way when it was disabled).
    assert len(s3.checks()) == maint_checks, f"{len(s3.checks()) - maint_checks} checks of s3 in maintenance"
    assert log_lines_with(proxy, f"control process (pid {control.pid}) died"), proxy.log_tail(20)


def test_a_control_process_that_does_not_stop_is_replaced_on_reload(servers, proxyd, admin_path):
    """The control process is stopped (SIGSTOP: it cannot act on the TERM a
    reload sends it); after a HUP, the master kills it once it has overrun
    its stop, and the new generation's control process serves."""
    both = servers("s1", "s2")
    proxy = proxyd(config(both, {**STEADY, "rise": 1, "fall": 1}, admin=admin_path))
    (control,) = wait_for(lambda: control_processes(proxy) or None, 10, "the control process")
    assert admin_command(admin_path, "show info").startswith("Name: proxyd\n")
    os.kill(control.pid, signal.SIGSTOP)
    try:
        proxy.signal(signal.SIGHUP)
        wait_log(proxy, "generation 2 serving")
        # A bound on the wait, not a speed: STOP_TIMEOUT (5 s) and some.
        wait_log(proxy, "control process started (generation 2)", timeout=12)
        assert "Generation: 2\n" in admin_command(admin_path, "show info", timeout=10)
    finally:
        if control.is_running():
            os.kill(control.pid, signal.SIGKILL)


# ------------------------------------------------------------------ check failures, by kind

def not_http_handler(conn, rec, backend) -> None:
    """Read a request head, answer with something that is not HTTP, close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        rec.feed(chunk)
        data += chunk
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")


def test_check_failures_are_logged_by_kind(servers, backend, proxyd, full_backlog):
    """HTTP checks against a server whose connect hangs (Layer4 timeout), one
    that accepts and never answers (Layer7 timeout), one that answers
    something other than HTTP (Layer7 invalid response), and one that passes:
    each failing one is marked down with its own reason."""
    (good,) = servers("good")
    silent = backend(hold_handler, name="silent")
    garbage = backend(not_http_handler, name="not http")
    check = {"interval": "1s", "timeout": "300ms", "rise": 1, "fall": 1, "http_path": "/healthz"}
    cfg = config([good], check)
    cfg["backends"]["app"]["servers"] += [{"name": "hole", "address": full_backlog},
                                          {"name": "silent", "address": silent.address},
                                          {"name": "garbage", "address": garbage.address}]
    proxy = proxyd(cfg)
    expected = {"hole": "reason: Layer4 timeout, check duration: ",
                "silent": "reason: Layer7 timeout, check duration: ",
                "garbage": 'reason: Layer7 invalid response, info: "SSH-2.0-OpenSSH_9.6", check duration: '}
    for name, reason in expected.items():
        (line,) = wait_log(proxy, f"Server app/{name} is DOWN")
        assert reason in line, line
    assert not log_lines_with(proxy, "Server app/good is"), proxy.log_tail(20)
    assert wait_for(lambda: good.checks(), 10, "a check of the good server")[0].code == 200


# ------------------------------------------------------------------ a control process killed mid-write

def _shared_memory(pid: int) -> tuple[int, int]:
    """(address, size) of the master's shared mapping (MAP_SHARED anonymous:
    /dev/zero in its maps), the one of proxyd.shared's layout size."""
    from proxyd.shared import LAYOUT
    size = LAYOUT["end"][0]
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if fields[1].endswith("s") and end - start >= size and "/dev/zero" in line:
            return start, size
    raise AssertionError(f"no shared mapping of {size} bytes in the master's maps")


def test_control_process_killed_in_the_middle_of_a_record_write(servers, proxyd, admin_path):
    """What a SIGKILL that lands while the control process writes a server
    record leaves behind (the record's seqlock odd), made on purpose: the
    control process is stopped, the sequence number of app/s1's record is
    made odd in the master's shared memory (as write_server's first store
    leaves it), and the control process is killed.  The control process
    respawned in its place must still serve the runtime API."""
    from proxyd import shared as layout
    s1, s2 = both = servers("s1", "s2")
    check = {**STEADY, "rise": 1, "fall": 1}
    proxy = proxyd(config(both, check, admin=admin_path))
    wait_for(lambda: s1.checks() and s2.checks(), 10, "a first check of each server")
    (control,) = wait_for(lambda: control_processes(proxy) or None, 10, "the control process")
    base, _ = _shared_memory(proxy.pid)
    try:
        mem = open(f"/proc/{proxy.pid}/mem", "r+b", buffering=0)
    except PermissionError:
        pytest.skip("cannot write the master's memory (not root)")
    os.kill(control.pid, signal.SIGSTOP)
    with mem:
        # The record is found and read with proxyd.shared's own layout: a
        # record's place (Shared._server_offset), its fields (SERVER,
        # ServerState), its sequence number first.
        offsets = layout.Shared.__new__(layout.Shared)
        for record in range(layout.MAX_SERVERS):
            at = base + offsets._server_offset(record)
            mem.seek(at)
            fields = layout.SERVER.unpack(mem.read(layout.SERVER.size))
            if layout.ServerState(fields).name == "app/s1":
                break
        else:
            raise AssertionError("no record named app/s1")
        if fields[0] % 2 == 0:                       # (odd already if stopped in a write)
            mem.seek(at)
            mem.write(struct.pack("=I", fields[0] + 1))   # a write under way...
        os.kill(control.pid, signal.SIGKILL)         # ...that will never end
        try:
            wait_for(lambda: [c for c in control_processes(proxy) if c.pid != control.pid], 15,
                     "a new control process")
            state = parse_servers_state(admin_command(admin_path, "show servers state", timeout=5))
            assert sorted(state) == ["app/s1", "app/s2"], state
            mark = len(s1.checks())
            wait_for(lambda: len(s1.checks()) >= mark + 2, 10, "s1 checked on by the new control process")
        finally:
            # Even again (as if the write had ended), so that the test ends
            # without waiting for a process stuck on it.
            mem.seek(at)
            odd = struct.unpack("=I", mem.read(4))[0]
            if odd & 1:
                mem.seek(at)
                mem.write(struct.pack("=I", odd + 1))
