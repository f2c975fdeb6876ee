"""The runtime API on the admin socket (PRODUCT.md, "Runtime API"): every
command through the real unix socket (and once through socat, as
operators use it), in HAProxy's shapes; a change takes effect in every
worker at once and survives reloads; drain lets open sessions finish;
huge or binary input closes that admin connection and nothing else.

Servers are tests.support.CheckedServers: each answers a session with its
own name, so the client and the server agree on who served it.
"""

# ruff: noqa: F811 (the fixtures imported from tests.control_fixtures are test arguments)
from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from proxyd import __version__
from tests.support import (LOCALHOST, REPO, AdminSession, admin_command, connect, control_processes,
                           free_port, http_hello, parse_servers_state, recv_exactly, servers_state, sha256,
                           stat_json, tally, tcp_hello, to_toml, wait_for)
from tests.control_fixtures import admin_path, proxyd, servers  # noqa: F401 (fixtures)

CLIENTS = 8
STEADY = {"interval": "500ms", "timeout": "300ms"}   # a check timeout well under the interval
UNKNOWN = "Unknown command: '{}'. Type 'help' for the list of commands."


# ------------------------------------------------------------------ helpers

def config(servers, admin: str, *, workers: int = 2, check: dict | None = None, http: bool = False,
           weights: dict | None = None) -> dict:
    """Backend "app" on SERVERS behind a tcp frontend "tcp" (and an http
    one, "web", with HTTP), the admin socket at ADMIN."""
    entries = [{"name": s.name, "address": s.address, **({"weight": weights[s.name]}
                                                          if weights and s.name in weights else {})}
               for s in servers]
    frontends = {"tcp": {"bind": [f"{LOCALHOST}:{free_port()}"], "backend": "app"}}
    if http:
        frontends["web"] = {"bind": [f"{LOCALHOST}:{free_port()}"], "backend": "app", "mode": "http"}
    backend = {"servers": entries}
    if check:
        backend["health_check"] = dict(check)
    return {"global": {"workers": workers, "admin_socket": admin}, "frontends": frontends,
            "backends": {"app": backend}}


def port_of(cfg: dict, frontend: str = "tcp") -> int:
    return int(cfg["frontends"][frontend]["bind"][0].rsplit(":", 1)[1])


def info(admin: str) -> dict[str, str]:
    text = admin_command(admin, "show info")
    return dict(line.split(": ", 1) for line in text.rstrip("\n").split("\n"))


def run_tcp(port: int, count: int) -> dict[str, int]:
    return tally(count, CLIENTS, lambda i: tcp_hello(port, b"hello %d" % i))


def run_http(port: int, count: int) -> dict[str, int]:
    def one(i):
        status, body = http_hello(port, f"/hello/{i}")
        assert status == 200, (status, body)
        return body
    return tally(count, CLIENTS, one)


def counts(servers) -> dict[str, int]:
    return {s.name: len(s.sessions()) for s in servers}


def since(before: dict[str, int], servers) -> dict[str, int]:
    return {s.name: len(s.sessions()) - before[s.name] for s in servers}


class Held:
    """A TCP session held open on a CheckedServer (first line `hold`): it
    knows the server that took it; finish() sends PAYLOAD and checks that
    the very same bytes come back before the server closes."""

    def __init__(self, port: int):
        self.sock = connect(port)
        self.sock.sendall(b"hold\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = self.sock.recv(1)
            assert chunk, f"closed before the greeting (got {line!r})"
            line += chunk
        self.server = line.decode().strip()

    def finish(self, payload: bytes) -> None:
        assert b"\n" not in payload[:-1] and payload.endswith(b"\n")
        self.sock.sendall(payload)
        echoed = recv_exactly(self.sock, len(payload))
        assert sha256(echoed) == sha256(payload), "the held session's answer differs from what it sent"
        assert self.sock.recv(1) == b"", "the server closes after its answer"
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything SOCK receives until the peer closes or resets it."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


# ------------------------------------------------------------------ every command

def test_show_commands(servers, proxyd, admin_path):
    """help, show info, show stat (CSV), show stat json, show servers state
    [BACKEND]: their shapes and their figures, scur summed over workers."""
    s1, s2 = both = servers("s1", "s2")
    check = {**STEADY, "rise": 2, "fall": 2}
    cfg = config(both, admin_path, check=check)
    proxy = proxyd(cfg)
    port = port_of(cfg)

    text = admin_command(admin_path, "help")
    for command in ("help", "prompt", "quit", "show info", "show stat", "show servers state", "show config",
                    "disable server", "enable server", "set server", "set weight"):
        assert f"  {command}" in text, f"help does not list {command!r}:\n{text}"

    shown = info(admin_path)
    (control,) = wait_for(lambda: control_processes(proxy) or None, 10, "the control process")
    assert shown["Name"] == "proxyd" and shown["Version"] == __version__, shown
    assert shown["Pid"] == str(proxy.pid), shown
    assert shown["Control_pid"] == str(control.pid), shown
    assert (shown["Workers"], shown["Generation"]) == ("2", "1"), shown
    assert shown["Uptime_sec"].isdigit() and shown["Uptime"].startswith("0d "), shown

    # Hold sessions open until two workers hold some: scur counts them all.
    held: list[Held] = []
    for _ in range(24):
        held.append(Held(port))
        holders = {wait_for(lambda h=h: proxy.worker_of(h.sock), 10, "the worker of a held session").pid
                   for h in held}
        if len(holders) == 2 and len(held) >= 4:
            break
    assert len(holders) == 2, "24 sessions all landed on one worker"
    wait_for(lambda: stat_json(admin_path)["app/s1"]["check_status"] == "L4OK", 10, "s1 checked")
    wait_for(lambda: stat_json(admin_path)["app/s2"]["check_status"] == "L4OK", 10, "s2 checked")
    on = {name: sum(h.server == name for h in held) for name in ("s1", "s2")}

    text = admin_command(admin_path, "show stat")
    assert text.startswith("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,"), text[:200]
    rows = list(csv.reader(io.StringIO(text[2:])))
    header, rows = rows[0], rows[1:]
    assert [(r[0], r[1]) for r in rows] == [("tcp", "FRONTEND"), ("app", "s1"), ("app", "s2"),
                                            ("app", "BACKEND")], rows
    assert all(len(r) == len(header) for r in rows), [len(r) for r in rows]
    csv_rows = {f"{r[0]}/{r[1]}": dict(zip(header, r)) for r in rows}
    for name in ("s1", "s2"):
        row = csv_rows[f"app/{name}"]
        assert (row["status"], row["check_status"], row["weight"]) == ("UP", "L4OK", "1"), row
        assert row["scur"] == str(on[name]), (name, row["scur"], on)
        assert row["addr"] == dict(zip(("s1", "s2"), (s1.address, s2.address)))[name], row
    assert csv_rows["app/BACKEND"]["scur"] == str(len(held)), csv_rows["app/BACKEND"]
    assert csv_rows["app/BACKEND"]["status"] == "UP", csv_rows["app/BACKEND"]

    as_json = json.loads(admin_command(admin_path, "show stat json"))
    assert [(r["pxname"], r["svname"]) for r in as_json] == [(r[0], r[1]) for r in rows]
    for row in as_json:
        for column, value in row.items():
            assert column in header, column
            assert str(value) == csv_rows[f"{row['pxname']}/{row['svname']}"][column] or column in (
                "lastchg", "check_duration"), (row["svname"], column, value)

    for text in (admin_command(admin_path, "show servers state"),
                 admin_command(admin_path, "show servers state app")):
        lines = text.rstrip("\n").split("\n")
        assert lines[0] == "1" and lines[1].startswith("# be_id be_name srv_id srv_name srv_addr srv_op_state "
                                                       "srv_admin_state srv_uweight srv_iweight "), lines[:2]
        state = parse_servers_state(text)
        assert sorted(state) == ["app/s1", "app/s2"], state
        for i, s in enumerate(both, 1):
            row = state[f"app/{s.name}"]
            assert (row["be_id"], row["srv_id"], row["srv_addr"], row["srv_port"]) == \
                ("1", str(i), LOCALHOST, str(s.port)), row
            assert (row["srv_op_state"], row["srv_admin_state"], row["srv_uweight"], row["srv_iweight"]) == \
                ("2", "0", "1", "1"), row
    assert admin_command(admin_path, "show servers state nope") == "Can't find backend 'nope'.\n"

    for h in held:
        h.finish(b"x" * 1000 + b"\n")
    wait_for(lambda: stat_json(admin_path)["app/BACKEND"]["scur"] == 0, 10, "scur back to 0")


def test_server_commands(servers, proxyd, admin_path):
    """disable/enable server, set server ... state ready|drain|maint, set
    weight: each answers nothing, and shows in show servers state and show
    stat; bad arguments get their error lines."""
    both = servers("s1", "s2")
    check = {**STEADY, "rise": 1, "fall": 2}
    proxyd(config(both, admin_path, check=check))
    wait_for(lambda: stat_json(admin_path)["app/s1"]["check_status"] == "L4OK", 10, "s1 checked")

    def shown(name: str = "s1") -> tuple[str, str, str]:
        row = servers_state(admin_path)[f"app/{name}"]
        return row["srv_admin_state"], row["srv_uweight"], stat_json(admin_path)[f"app/{name}"]["status"]

    steps = [("disable server app/s1", ("1", "1", "MAINT")),
             ("enable server app/s1", ("0", "1", "UP")),
             ("set server app/s1 state drain", ("8", "1", "DRAIN")),
             ("set server app/s1 state ready", ("0", "1", "UP")),
             ("set server app/s1 state maint", ("1", "1", "MAINT")),
             ("set server app/s1 state ready", ("0", "1", "UP")),
             ("set weight app/s1 5", ("0", "5", "UP")),
             ("set weight app/s1 0", ("0", "0", "UP")),
             ("set weight app/s1 256", ("0", "256", "UP"))]
    for command, expected in steps:
        assert admin_command(admin_path, command) == "", command
        assert shown() == expected, (command, shown())
    assert stat_json(admin_path)["app/s1"]["weight"] == 256
    assert shown("s2") == ("0", "1", "UP"), "s2 untouched"

    errors = {
        "disable server app/nope": "No such server.",
        "enable server nope/s1": "No such backend.",
        "disable server s1": "Require 'backend/server'.",
        "set server app/s1 state sideways": "'set server <srv> state' expects 'ready', 'drain' and 'maint'.",
        "set weight app/s1 257": "Weight must be an integer between 0 and 256.",
        "set weight app/s1 -1": "Weight must be an integer between 0 and 256.",
        "set weight app/nope 3": "No such server.",
        "frobnicate": UNKNOWN.format("frobnicate"),
        "show nothing": UNKNOWN.format("show nothing"),
    }
    for command, error in errors.items():
        assert admin_command(admin_path, command) == error + "\n", command
    assert shown() == ("0", "256", "UP"), "an error changed nothing"


def test_one_command_per_connection_without_prompt(servers, proxyd, admin_path):
    """Without prompt, a connection answers its first command and is closed
    (HAProxy's CLI); `quit` alone closes it with nothing said."""
    both = servers("s1", "s2")
    proxyd(config(both, admin_path))
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(admin_path)
        s.sendall(b"show info\nhelp\nshow stat\n")
        answer = closed_by_peer(s).decode()
    assert answer.startswith("Name: proxyd\n") and "commands are valid" not in answer \
        and "# pxname" not in answer, answer
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(admin_path)
        s.sendall(b"quit\n")
        assert closed_by_peer(s) == b""


def test_prompt_session(servers, proxyd, admin_path):
    """prompt: each answer is followed by an empty line and a `> ` prompt;
    an unknown command gets its error line and the session goes on; quit
    ends it."""
    both = servers("s1", "s2")
    proxy = proxyd(config(both, admin_path))
    with AdminSession(admin_path) as session:
        assert session.command("show info").startswith("Name: proxyd\n")
        assert session.command("frobnicate now") == UNKNOWN.format("frobnicate now") + "\n"
        assert f"Pid: {proxy.pid}\n" in session.command("show info")
        assert session.command("disable server app/s2") == ""
        assert session.command("show servers state app").split("\n")[3].split()[6] == "1"
        assert session.command("enable server app/s2") == ""
        session.sock.sendall(b"quit\n")
        assert closed_by_peer(session.sock) == b""


def test_socat(servers, proxyd, admin_path):
    """The admin socket as operators use it: `socat - UNIX-CONNECT:PATH`,
    one command, and a prompt session."""
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed")
    both = servers("s1", "s2")
    proxy = proxyd(config(both, admin_path))

    def socat(text: str) -> str:
        done = subprocess.run(["socat", "-", f"UNIX-CONNECT:{admin_path}"], input=text, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = socat("show info\n")
    assert out.startswith("Name: proxyd\n") and f"Pid: {proxy.pid}\n" in out, out
    out = socat("prompt\nshow info\nquit\n")
    assert out.startswith("> Name: proxyd\n"), out
    assert f"\nPid: {proxy.pid}\n" in out and out.endswith("\n\n> "), out
    out = socat("show stat\n")
    assert out.startswith("# pxname,svname,") and "\napp,s1," in out, out


def test_show_config(servers, proxyd, admin_path):
    if not (REPO / "proxyd" / "confdiff.py").exists():
        pytest.skip("show config needs proxyd/confdiff.py")
    both = servers("s1", "s2")
    cfg = config(both, admin_path)
    proxyd(cfg)
    shown = json.loads(admin_command(admin_path, "show config"))
    assert isinstance(shown, dict), shown
    assert "app" in json.dumps(shown) and both[0].address in json.dumps(shown), shown


# ------------------------------------------------------------------ changes take effect

def test_disable_enable_over_every_worker(servers, proxyd, admin_path):
    """disable server: none of the next 500 sessions (TCP and HTTP, 4
    workers) reaches it; enable server: it gets traffic again."""
    s1, s2 = both = servers("s1", "s2")
    cfg = config(both, admin_path, workers=4, http=True)
    proxyd(cfg)
    tcp_port, http_port = port_of(cfg), port_of(cfg, "web")
    first = run_tcp(tcp_port, 40)
    assert first.get("s1", 0) > 0, first

    assert admin_command(admin_path, "disable server app/s1") == ""
    before = counts(both)
    tcp, http = run_tcp(tcp_port, 250), run_http(http_port, 250)
    assert tcp == {"s2": 250} and http == {"s2": 250}, (tcp, http)
    assert since(before, both) == {"s1": 0, "s2": 500}

    assert admin_command(admin_path, "enable server app/s1") == ""
    before = counts(both)
    tcp, http = run_tcp(tcp_port, 100), run_http(http_port, 100)
    got = since(before, both)
    assert got["s1"] + got["s2"] == 200, got
    assert got["s1"] >= 50, f"s1 back in the round robin should take about half: {got}"
    assert got["s1"] == tcp.get("s1", 0) + http.get("s1", 0)


def test_set_weight_changes_the_split(servers, proxyd, admin_path):
    """Round robin at weights 1:1 splits 400 sessions about evenly; after
    `set weight app/s2 3`, the next 400 split about 1:3."""
    s1, s2 = both = servers("s1", "s2")
    cfg = config(both, admin_path, workers=4)
    proxyd(cfg)
    port = port_of(cfg)

    even = run_tcp(port, 400)
    assert 160 <= even.get("s1", 0) <= 240, even
    assert admin_command(admin_path, "set weight app/s2 3") == ""
    before = counts(both)
    skewed = run_tcp(port, 400)
    assert since(before, both) == {"s1": skewed.get("s1", 0), "s2": skewed.get("s2", 0)}
    assert 60 <= skewed.get("s1", 0) <= 140, f"expected about 100 of 400 on s1 at 1:3: {skewed}"


def test_weights_survive_reloads_unless_changed_in_the_file(servers, proxyd, admin_path):
    """A weight set at run time stays over a reload of an unchanged file; a
    weight changed in the file wins on the reload after the change; another
    server's run-time weight stays."""
    both = servers("s1", "s2")
    cfg = config(both, admin_path, weights={"s1": 2, "s2": 2})
    proxy = proxyd(cfg)
    assert admin_command(admin_path, "set weight app/s1 9") == ""
    assert admin_command(admin_path, "set weight app/s2 7") == ""

    def weights() -> tuple[str, str]:
        state = servers_state(admin_path)
        return state["app/s1"]["srv_uweight"], state["app/s2"]["srv_uweight"]

    def reload(generation: int) -> None:
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: f"control process started (generation {generation})" in proxy.log_text(), 20,
                 f"generation {generation}'s control process")
        wait_for(lambda: info(admin_path)["Generation"] == str(generation), 20, f"generation {generation}")

    reload(2)
    assert weights() == ("9", "7")
    cfg["backends"]["app"]["servers"][0]["weight"] = 4
    Path(proxy.config_path).write_text(to_toml(cfg))
    reload(3)
    assert weights() == ("4", "7"), "the file's new weight for s1 wins; s2's run-time weight stays"
    reload(4)
    assert weights() == ("4", "7")


def test_drain_lets_an_open_session_finish(servers, proxyd, admin_path):
    """A session held open on s1; `set server app/s1 state drain`: the next
    100 sessions all go to s2, and the held one then finishes its exchange
    (200 KB each way, bytes checked) with s1."""
    s1, s2 = both = servers("s1", "s2")
    cfg = config(both, admin_path, check={**STEADY, "rise": 1, "fall": 2})
    proxy = proxyd(cfg)
    port = port_of(cfg)
    held = [Held(port) for _ in range(4)]   # over 2 workers, each alternating: both servers get some
    mine = next(h for h in held if h.server == "s1")
    for h in held:
        if h is not mine:
            h.finish(b"not this one\n")

    assert admin_command(admin_path, "set server app/s1 state drain") == ""
    # (the other held sessions may take a moment more to leave the counts)
    wait_for(lambda: stat_json(admin_path)["app/s1"]["scur"] == 1, 10, "s1's one open session counted")
    assert stat_json(admin_path)["app/s1"]["status"] == "DRAIN"
    before = counts(both)
    assert run_tcp(port, 100) == {"s2": 100}
    assert since(before, both) == {"s1": 0, "s2": 100}

    payload = random.Random(12).randbytes(200_000).replace(b"\n", b"n") + b"\n"
    mine.finish(payload)
    wait_for(lambda: stat_json(admin_path)["app/s1"]["scur"] == 0, 10, "the drained session ended")
    (line,) = wait_for(lambda: [a for a in proxy.access_lines() if a.server == "s1" and a.up > 1000], 10,
                       "the held session's access line")
    assert (line.up, line.down) == (len(b"hold\n") + len(payload), len(b"s1\n") + len(payload)), line.raw


# ------------------------------------------------------------------ the socket itself

def test_socket_mode_and_removal(servers, proxyd, admin_path):
    """The socket is mode 0600 and is removed when proxyd exits."""
    both = servers("s1", "s2")
    proxy = proxyd(config(both, admin_path))
    wait_for(lambda: os.path.exists(admin_path), 10, "the admin socket")
    st = os.stat(admin_path)
    assert stat.S_ISSOCK(st.st_mode), oct(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert info(admin_path)["Name"] == "proxyd"
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit() == 0
    assert not os.path.exists(admin_path), "the admin socket is left behind"


def test_bad_input_closes_that_connection_only(servers, proxyd, admin_path):
    """A 1 MiB line, and binary bytes, each close their own admin connection;
    another admin session open meanwhile goes on, the same control process
    answers new connections, and sessions through proxyd work."""
    both = servers("s1", "s2")
    cfg = config(both, admin_path)
    proxyd(cfg)
    control_pid = info(admin_path)["Control_pid"]
    with AdminSession(admin_path) as session:
        assert session.command("frobnicate") == UNKNOWN.format("frobnicate") + "\n"

        with socket.socket(socket.AF_UNIX) as big:
            big.connect(admin_path)
            try:
                big.sendall(b"show " + b"a" * (1 << 20) + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass   # closed while we were still sending: that is the point
            assert closed_by_peer(big) == b"", "a 1 MiB line is not answered"

        binary = b"\x00\x01\xfe\xff" + random.Random(7).randbytes(512) + b"\n"
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(admin_path)
            raw.sendall(binary)
            assert closed_by_peer(raw) == b"", "binary input is not answered"

        with socket.socket(socket.AF_UNIX) as raw:   # the same in prompt mode
            raw.connect(admin_path)
            raw.sendall(b"prompt\n")
            raw.settimeout(10)
            assert raw.recv(2) == b"> "
            raw.sendall(binary)
            assert closed_by_peer(raw) == b""

        assert session.command("show info").startswith("Name: proxyd\n"), "the other session goes on"
    assert info(admin_path)["Control_pid"] == control_pid, "the control process was not replaced"
    assert tcp_hello(port_of(cfg)) in ("s1", "s2")


# ------------------------------------------------------------------ defects found

def test_show_stat_csv_rows_have_the_header_fields(servers, proxyd, admin_path, reserve_port):
    (s1,) = servers("s1")
    dead = f"{LOCALHOST}:{reserve_port()}"
    cfg = config([s1], admin_path, check={**STEADY, "rise": 1, "fall": 1})
    cfg["backends"]["app"]["servers"].append({"name": "dead", "address": dead})
    proxy = proxyd(cfg)
    wait_for(lambda: "Server app/dead is DOWN" in proxy.log_text(), 10, "the dead server marked down")
    text = admin_command(admin_path, "show stat")
    header, *rows = csv.reader(io.StringIO(text[2:]))
    assert {f"{r[0]}/{r[1]}": len(r) for r in rows} == {f"{r[0]}/{r[1]}": len(header) for r in rows}, text


def test_drain_shows_in_show_stat_without_checks(servers, proxyd, admin_path):
    both = servers("s1", "s2")
    proxyd(config(both, admin_path))
    assert stat_json(admin_path)["app/s1"]["status"] == "no check"
    assert admin_command(admin_path, "set server app/s1 state drain") == ""
    assert servers_state(admin_path)["app/s1"]["srv_admin_state"] == "8"
    assert stat_json(admin_path)["app/s1"]["status"] == "DRAIN"
