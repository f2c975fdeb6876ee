"""Helpers for the integration tests: ports, configs, a real proxyd, real
backends, `ss` and the proxyd log.

Everything here uses real processes and real sockets on 127.0.0.1.  Waiting
is always polling with a deadline (`wait_for`), never a fixed sleep; every
loop is bounded in count and time; every process is stopped by its pid.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"

# Generous bounds: the suite runs under `pytest -n auto` on 2 loaded cores.
# These are upper bounds for waits, never expectations of speed.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
IO_TIMEOUT = 30.0


# ------------------------------------------------------------------ waiting

def wait_for(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.01):
    """Poll PREDICATE until it returns something truthy; return that value.

    Raises AssertionError naming WHAT and the last value after TIMEOUT.
    """
    deadline = time.monotonic() + timeout
    value = None
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {value!r}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.1)


def stays(predicate, duration: float, interval: float = 0.02) -> bool:
    """True if PREDICATE holds on every check during DURATION (for negative
    assertions: "nothing happens for a while")."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return bool(predicate())


# -------------------------------------------------------------------- ports

def free_port() -> int:
    """A port the kernel says is free right now (it may be taken later)."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def reserve_port() -> tuple[int, socket.socket]:
    """A port held by a bound, never listening socket: connections to it are
    refused (RST), and the kernel hands it to no one else while it is held.
    Close the socket when done.
    """
    s = socket.socket()
    s.bind((LOCALHOST, 0))
    return s.getsockname()[1], s


# ------------------------------------------------------------------ configs

def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: dict) -> str:
    """A small TOML writer for config dicts: nested dicts become [tables],
    dicts inside lists become inline tables."""
    out: list[str] = []

    def table(path: list[str], tbl: dict) -> None:
        plain = {k: v for k, v in tbl.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in tbl.items() if isinstance(v, dict)}
        if path and (plain or not subs):
            out.append("")
            out.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in plain.items():
            out.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subs.items():
            table(path + [k], v)

    table([], data)
    return "\n".join(out).lstrip("\n") + "\n"


def write_config(directory: Path, config, name: str = "proxyd.toml") -> Path:
    """Write CONFIG (a dict, or TOML text as a string) to DIRECTORY/NAME."""
    path = Path(directory) / name
    path.write_text(config if isinstance(config, str) else to_toml(config))
    return path


def tcp_config(port: int, servers, *, workers=2, global_=None, defaults=None, frontend=None,
               backend=None, frontend_name="fe", backend_name="be") -> dict:
    """A one-frontend, one-backend tcp config dict.

    SERVERS: a list of Backend objects, "host:port" strings, (name, address)
    pairs, or server dicts.  Server names default to s1, s2, ...
    """
    server_list = []
    for i, srv in enumerate(servers, 1):
        if isinstance(srv, dict):
            entry = dict(srv)
        elif isinstance(srv, tuple):
            entry = {"name": srv[0], "address": srv[1]}
        elif isinstance(srv, str):
            entry = {"name": f"s{i}", "address": srv}
        else:
            entry = {"name": f"s{i}", "address": srv.address}
        entry.setdefault("name", f"s{i}")
        server_list.append(entry)
    config = {
        "global": {"workers": workers, **(global_ or {})},
        "frontends": {frontend_name: {"bind": [f"{LOCALHOST}:{port}"], "backend": backend_name,
                                      **(frontend or {})}},
        "backends": {backend_name: {"servers": server_list, **(backend or {})}},
    }
    if defaults:
        config["defaults"] = dict(defaults)
    return config


# --------------------------------------------------------------- log lines

LOG_LINE = re.compile(r"^(?P<time>\S+) proxyd\[(?P<pid>\d+)\]: (?P<message>.*)$")
TIME_FIELD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}")
# HAProxy's accept date, `[06/Feb/2009:12:12:51.443]`.
ACCEPT_DATE = r"\[(?P<date>[0-3]\d/(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)/\d{4}:\d\d:\d\d:\d\d\.\d{3})\]"
# The counts and queues shared by tcplog and httplog: %ac/%fc/%bc/%sc/%rc %sq/%bq.
COUNTS = r"(?P<ac>\d+)/(?P<fc>\d+)/(?P<bc>\d+)/(?P<sc>\d+)/(?P<rc>\d+) (?P<sq>\d+)/(?P<bq>\d+)"
# HAProxy's tcplog (`option tcplog`), then proxyd's own fields (man/proxyd.8,
# "TCP access log"):
#   %ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sq/%bq up=N[ fin=SIDE][ err=WHAT]
ACCESS_LINE = re.compile(
    r"^(?P<client>\S+) " + ACCEPT_DATE + r" (?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+)"
    r" (?P<Tw>-1|\d+)/(?P<Tc>-1|\d+)/(?P<Tt>\d+) (?P<down>\d+) (?P<term>[-A-Za-z]{2}) " + COUNTS +
    r" up=(?P<up>\d+)(?: fin=(?P<fin>client|server))?(?: err=(?P<err>\S+))?$")


@dataclass(frozen=True)
class AccessLine:
    pid: int
    client: str
    frontend: str
    backend: str
    server: str
    Tc: int       # HAProxy's Tc: connecting (after the queue), -1 if never connected
    Tt: int       # accept to the end
    up: int       # client bytes delivered to the server (proxyd's up=)
    down: int     # %B: bytes sent to the client
    term: str     # %ts, HAProxy's termination state
    err: str | None
    raw: str
    fin: str | None = None   # the side that closed first, on a normal end
    Tw: int = 0
    date: str = ""
    ac: int = 0
    fc: int = 0
    bc: int = 0
    sc: int = 0
    rc: int = 0
    sq: int = 0
    bq: int = 0


def parse_access_line(line: str) -> AccessLine | None:
    """The access fields of one log line, or None if it is another message."""
    outer = LOG_LINE.match(line.rstrip("\n"))
    if not outer:
        return None
    inner = ACCESS_LINE.match(outer["message"])
    if not inner:
        return None
    ints = {k: int(inner[k]) for k in ("Tw", "Tc", "Tt", "up", "down", "ac", "fc", "bc", "sc", "rc", "sq", "bq")}
    return AccessLine(
        pid=int(outer["pid"]), client=inner["client"], frontend=inner["frontend"], backend=inner["backend"],
        server=inner["server"], term=inner["term"], err=inner["err"], fin=inner["fin"], date=inner["date"],
        raw=line.rstrip("\n"), **ints)


# ---------------------------------------------------------------- processes

WORKER_TITLE = re.compile(r"proxyd: worker (\d+)/(\d+)")
WORKER_GENERATION = re.compile(r"proxyd: worker \d+/\d+ gen (\d+)")


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (same pid *and* start time as when found)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Proxyd:
    """One real proxyd master started with `python -m proxyd -c CONFIG`."""

    def __init__(self, config_path: Path, log_path: Path, extra_args=()):
        self.config_path = Path(config_path)
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.popen: subprocess.Popen | None = None
        self.master: psutil.Process | None = None
        self.seen: dict[int, psutil.Process] = {}  # every worker ever seen, for cleanup

    # -------------------------------------------------------- lifecycle
    def start(self) -> "Proxyd":
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "proxyd", "-c", str(self.config_path), *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO, env=env)
        self.master = psutil.Process(self.popen.pid)
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def workers(self) -> list[psutil.Process]:
        """Live children of the master whose title says `proxyd: worker N/M`."""
        if not self.running():
            return []
        try:
            children = self.master.children()
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            if WORKER_TITLE.search(_title(child)) and alive(child):
                self.seen.setdefault(child.pid, child)
                found.append(child)
        return found

    def worker_pids(self) -> set[int]:
        return {w.pid for w in self.workers()}

    def worker_slots(self) -> dict[int, int]:
        """pid -> slot number N of `worker N/M`."""
        slots = {}
        for w in self.workers():
            m = WORKER_TITLE.search(_title(w))
            if m:
                slots[w.pid] = int(m.group(1))
        return slots

    def worker_generations(self) -> dict[int, int]:
        """pid -> generation G of `worker N/M gen G`."""
        gens = {}
        for w in self.workers():
            m = WORKER_GENERATION.search(_title(w))
            if m:
                gens[w.pid] = int(m.group(1))
        return gens

    def worker_of(self, client: socket.socket) -> psutil.Process | None:
        """The worker holding the proxy's end of CLIENT's connection, if any.

        Asked of `ss -p` with a filter the kernel applies (psutil's
        net_connections reads all of /proc/net/tcp, slow on a host with many
        TIME_WAIT sockets)."""
        host, port = client.getsockname()[:2]
        pids = {int(p) for line in ss("-tnp", f"( dst {host}:{port} )")
                for p in re.findall(r"pid=(\d+)", line)}
        for w in self.workers():
            if w.pid in pids:
                return w
        return None

    def children_description(self) -> str:
        try:
            return "; ".join(f"{c.pid}: {_title(c)!r}" for c in self.master.children())
        except psutil.NoSuchProcess:
            return "(master gone)"

    def wait_ready(self, ports=(), workers: int = 2, timeout: float = START_TIMEOUT) -> "Proxyd":
        """Wait until every port in PORTS has a LISTEN socket (the kernel
        completes handshakes on it, so it accepts connections) and WORKERS
        worker processes exist.

        Readiness is checked with `ss`, not with a probe connection, so that no
        test sees a session it did not make (access lines, backend counts).
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise AssertionError(f"proxyd exited with {self.popen.returncode} during start-up; "
                                     f"log:\n{self.log_text()}")
            listening = all(listen_count(p) >= 1 for p in ports)
            if listening and len(self.workers()) == workers:
                return self
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"proxyd not ready after {timeout}s: listening={listening} on {list(ports)}, "
                    f"workers={len(self.workers())}/{workers}; children: {self.children_description()}; "
                    f"log:\n{self.log_text()}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """The master's exit status; AssertionError if it is still running after TIMEOUT."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"proxyd master {self.pid} still running {timeout}s later; "
                                 f"log:\n{self.log_tail()}") from None

    def stop(self) -> int | None:
        """TERM, then KILL after a deadline; then kill any worker left behind,
        each by its pid (checked against its start time by psutil)."""
        if self.popen is None:
            return None
        self.workers()  # record the current workers for the cleanup below
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
        for proc in self.seen.values():
            if alive(proc):
                try:
                    proc.terminate()
                    proc.wait(STOP_TIMEOUT)
                except psutil.TimeoutExpired:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
        return self.popen.returncode

    # -------------------------------------------------------------- log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_lines()[-n:])

    def access_lines(self) -> list[AccessLine]:
        return [a for a in map(parse_access_line, self.log_lines()) if a]

    def wait_access_lines(self, count: int, timeout: float = 10.0) -> list[AccessLine]:
        """Wait until at least COUNT access lines were logged; return them all."""
        lines: list[AccessLine] = []

        def enough():
            nonlocal lines
            lines = self.access_lines()
            return len(lines) >= count

        try:
            wait_for(enough, timeout, f"{count} access lines")
        except AssertionError:
            raise AssertionError(f"expected {count} access lines, got {len(lines)} after {timeout}s; "
                                 f"log tail:\n{self.log_tail()}") from None
        return lines


# ------------------------------------------------------------------ backends

@dataclass
class ConnRecord:
    """What a backend saw on one connection."""

    peer: tuple
    accepted_at: float = field(default_factory=time.monotonic)
    received: int = 0
    sent: int = 0
    end: str | None = None  # "eof", "reset", "timeout", "closed" (torn down), "error:NAME"
    first_byte_at: float | None = None
    _sha: object = field(default_factory=hashlib.sha256, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def feed(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        self.received += len(data)
        self._sha.update(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


class Backend:
    """A TCP server on 127.0.0.1 in threads of the test process: one accept
    thread and one thread per connection running HANDLER(conn, record, backend).

    HANDLER reads/writes on a blocking socket with a timeout; recv errors end
    the connection and are recorded in record.end.  The connection is closed
    when the handler returns.  close() stops everything (bounded joins).
    """

    def __init__(self, handler, name: str = "backend", backlog: int = 1024):
        self.handler = handler
        self.name = name
        self.records: list[ConnRecord] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.listener = socket.socket()
        self.listener.bind((LOCALHOST, 0))
        self.listener.listen(backlog)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.address = f"{LOCALHOST}:{self.port}"
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._open = 0
        self.max_open = 0
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(IO_TIMEOUT)
            rec = ConnRecord(peer=peer)
            with self.lock:
                self.records.append(rec)
                self._conns.add(conn)
                self._open += 1
                self.max_open = max(self.max_open, self._open)
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(target=self._serve, args=(conn, rec), daemon=True,
                                          name=f"{self.name}-conn")
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, rec: ConnRecord) -> None:
        try:
            self.handler(conn, rec, self)
            if rec.end is None:
                rec.end = "eof"
        except ConnectionResetError:
            rec.end = "reset"
        except socket.timeout:
            rec.end = "timeout"
        except OSError as e:
            rec.end = "closed" if self.stopping.is_set() else f"error:{errno.errorcode.get(e.errno, e.errno)}"
        finally:
            with self.lock:
                self._conns.discard(conn)
                self._open -= 1
            conn.close()
            rec.done.set()

    # ----------------------------------------------------------- queries
    def connections(self) -> list[ConnRecord]:
        with self.lock:
            return list(self.records)

    @property
    def open_count(self) -> int:
        with self.lock:
            return self._open

    def wait_connections(self, count: int, timeout: float = 10.0) -> list[ConnRecord]:
        wait_for(lambda: len(self.connections()) >= count, timeout, f"{count} connections on {self.name}")
        return self.connections()

    def wait_done(self, count: int, timeout: float = 10.0) -> list[ConnRecord]:
        """Wait until COUNT connections were accepted and have ended."""
        recs = self.wait_connections(count, timeout)
        wait_for(lambda: all(r.done.is_set() for r in self.connections()[:count]), timeout,
                 f"{count} finished connections on {self.name}")
        return recs

    # ----------------------------------------------------------- teardown
    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        self._accept_thread.join(5)
        with self.lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv/send
            except OSError:
                pass
        for t in threads:
            t.join(5)


def _recv_until_eof(conn: socket.socket, rec: ConnRecord, bufsize: int = 262144) -> None:
    while True:
        data = conn.recv(bufsize)
        if not data:
            rec.end = "eof"
            return
        rec.feed(data)


def echo_handler(conn, rec, backend) -> None:
    """Echo everything back; close at the peer's EOF."""
    while True:
        data = conn.recv(262144)
        if not data:
            rec.end = "eof"
            return
        rec.feed(data)
        conn.sendall(data)
        rec.sent += len(data)


def sink_handler(delay: float = 0.0, reply: bytes = b""):
    """Read and hash everything until EOF (or a reset), optionally starting
    DELAY seconds after accept; after EOF send REPLY, then close."""
    def handler(conn, rec, backend):
        if delay:
            backend.stopping.wait(delay)  # the server is slow to read: that is the behaviour under test
        _recv_until_eof(conn, rec)
        if reply:
            conn.sendall(reply)
            rec.sent += len(reply)
    return handler


def source_handler(payload: bytes, half_close: bool = False):
    """Send PAYLOAD at once, then close (the server closes first).  With
    HALF_CLOSE: shutdown(SHUT_WR) after PAYLOAD, read and hash until EOF, then close."""
    def handler(conn, rec, backend):
        conn.sendall(payload)
        rec.sent += len(payload)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
            _recv_until_eof(conn, rec)
    return handler


def request_reply_handler(request_size: int, reply: bytes):
    """Read exactly REQUEST_SIZE bytes, send REPLY, close (server closes first)."""
    def handler(conn, rec, backend):
        while rec.received < request_size:
            data = conn.recv(request_size - rec.received)
            if not data:
                rec.end = "eof"
                return
            rec.feed(data)
        conn.sendall(reply)
        rec.sent += len(reply)
    return handler


def echo_close_handler(conn, rec, backend) -> None:
    """Read one request (a 2-byte big-endian length, then that many bytes),
    send it all back, close (the server closes first).  The protocol of
    tests/loadgen.py."""
    def read(n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            data = conn.recv(n - got)
            if not data:
                rec.end = "eof"
                return None
            rec.feed(data)
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    head = read(2)
    if head is None:
        return
    body = read(int.from_bytes(head, "big"))
    if body is None:
        return
    conn.sendall(head + body)
    rec.sent += len(head) + len(body)


def hold_handler(conn, rec, backend) -> None:
    """Never send, never close: read until the peer closes or resets."""
    _recv_until_eof(conn, rec)


def greet_handler(conn, rec, backend) -> None:
    """Send the backend's name and close at once (server closes first)."""
    data = backend.name.encode()
    conn.sendall(data)
    rec.sent += len(data)


# ------------------------------------------------------------------- clients

def connect(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    s = socket.create_connection((LOCALHOST, port), timeout=timeout)
    return s


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = sock.recv(min(262144, n - got))
        if not data:
            raise AssertionError(f"EOF after {got} of {n} bytes")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def read_to_end(sock: socket.socket) -> tuple[str, int, str]:
    """Read until EOF or a reset: (sha256 hex, byte count, "eof" | "reset")."""
    sha, count = hashlib.sha256(), 0
    try:
        while True:
            data = sock.recv(262144)
            if not data:
                return sha.hexdigest(), count, "eof"
            sha.update(data)
            count += len(data)
    except ConnectionResetError:
        return sha.hexdigest(), count, "reset"


def recv_all(sock: socket.socket, limit: int = 64 * 1024 * 1024) -> bytes:
    """Everything until EOF (at most LIMIT bytes)."""
    chunks, got = [], 0
    while got < limit:
        data = sock.recv(min(262144, limit - got))
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> str:
    """Wait until the peer ends the connection; return "eof" or "reset".
    Any data that arrives first is discarded.  AssertionError if still open."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout}s")
        readable, _, _ = select.select([sock], [], [], left)
        if readable:
            try:
                if not sock.recv(65536):
                    return "eof"
            except ConnectionResetError:
                return "reset"


def is_open(sock: socket.socket) -> bool:
    """True if nothing (no data, no EOF, no reset) is pending on SOCK."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: int = 0) -> bytes:
    """SIZE pseudo-random bytes (distinct per seed, reproducible)."""
    import random
    return random.Random(seed).randbytes(size)


# -------------------------------------------------------------------- load

class Load:
    """PROCESSES load clients (`python -m tests.loadgen`, one process each, so
    the GIL of the test process throttles none of them), each opening short
    sessions to PORT for DURATION seconds against an echo_close_handler
    backend.  start(), then result() gathers their counts; finish() asks them
    to end early (SIGTERM: each ends after its current session); stop() kills
    any client still running, by its pid."""

    def __init__(self, port: int, duration: float, processes: int = 4, rate: float = 0.0,
                 timeout: float = 10.0, seed: int = 0):
        self.port = port
        self.duration = duration
        self.processes = processes
        self.rate = rate
        self.timeout = timeout
        self.seed = seed
        self.popens: list[subprocess.Popen] = []

    def start(self) -> "Load":
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for i in range(self.processes):
            self.popens.append(subprocess.Popen(
                [sys.executable, "-m", "tests.loadgen", str(self.port), str(self.duration),
                 "--seed", str(self.seed * 100 + i), "--rate", str(self.rate),
                 "--timeout", str(self.timeout)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=REPO, env=env))
        return self

    def result(self) -> dict:
        """Wait for every client (bounded: DURATION plus a few session
        timeouts) and sum their outcomes: {"counts": {...}, "sessions": N,
        "samples": [...]}.  AssertionError if a client hangs or fails."""
        deadline = time.monotonic() + self.duration + 3 * self.timeout + 20
        total = {"counts": {}, "sessions": 0, "samples": []}
        for i, popen in enumerate(self.popens):
            try:
                out, err = popen.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError(f"load client {i} (pid {popen.pid}) still running past its deadline") from None
            if popen.returncode != 0:
                raise AssertionError(f"load client {i} exited with {popen.returncode}: {err.decode(errors='replace')}")
            one = json.loads(out)
            for k, v in one["counts"].items():
                total["counts"][k] = total["counts"].get(k, 0) + v
            total["sessions"] += one["sessions"]
            total["samples"] += [f"client {i} {s}" for s in one["samples"]]
        return total

    def finish(self) -> None:
        for popen in self.popens:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        for popen in self.popens:
            if popen.poll() is None:
                popen.kill()
                try:
                    popen.communicate(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass


# ----------------------------------------------------------------------- ss

def ss(*args: str) -> list[str]:
    out = subprocess.run(["ss", "-H", *args], capture_output=True, text=True, timeout=30, check=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def listen_count(port: int) -> int:
    """LISTEN sockets on local port PORT (any address)."""
    return len(ss("-ltn", f"( sport = :{port} )"))


def timewait_towards(port: int) -> int:
    """TIME_WAIT sockets on this host whose remote port is PORT: with PORT a
    backend's port, those are the proxy's sockets towards that backend."""
    return len(ss("-tan", "state", "time-wait", f"( dport = :{port} )"))


def states_towards(port: int) -> list[str]:
    """States of every TCP socket on this host whose remote port is PORT."""
    return [line.split()[0] for line in ss("-tan", f"( dport = :{port} )")]


def settle_towards(port: int, timeout: float = 15.0) -> list[str]:
    """Wait until no socket towards PORT is in a state other than TIME-WAIT
    (connections finished, FIN exchanges over); return the final states."""
    states: list[str] = []

    def settled():
        nonlocal states
        states = states_towards(port)
        return all(s == "TIME-WAIT" for s in states)

    wait_for(settled, timeout, f"sockets towards :{port} to settle (states: {states})")
    return states


# -------------------------------------------------------------- proxyd CLI

def run_proxyd(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run `python -m proxyd ARGS` to completion (e.g. --check, --version)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "proxyd", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def run_parallel(count: int, threads: int, job) -> list[BaseException]:
    """JOB(i) for i in range(COUNT) over THREADS threads; the errors raised."""
    errors: list[BaseException] = []

    def one(i):
        try:
            job(i)
        except BaseException as e:  # collected and reported by the caller
            errors.append(e)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    return errors


def run_sessions(count: int, clients: int, session, join_timeout: float = 240) -> list[BaseException]:
    """Run SESSION(i) COUNT times over CLIENTS threads, stopping at the first
    error; return the errors."""
    errors: list[BaseException] = []
    lock = threading.Lock()
    next_index = iter(range(count))

    def loop():
        while not errors:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                session(i)
            except BaseException as e:  # collected and reported by the caller
                errors.append(e)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_timeout)
    assert not any(t.is_alive() for t in threads), "client threads still running"
    return errors


# ------------------------------------------- health checks and the admin socket

CONTROL_TITLE = re.compile(r"proxyd: control gen (\d+)")


class CheckedServer(Backend):
    """A server for health-check and runtime-API tests.  It tells health
    checks from sessions and counts both, and it can stop listening and
    listen again on the same port (held throughout, so no one else takes it:
    a port that refuses, then a server that is back).

    What it does with a connection, by its first line:
      - nothing at all, then a close or a reset: a TCP check (kind "check");
      - `GET CHECK_PATH HTTP/1.x`: an HTTP check (kind "check"), answered
        with the next of the answers given to answer_checks(), then with its
        `then` answer (200 OK by default); the code is kept in rec.code,
        the request head in rec.head;
      - any other HTTP request: a session (kind "http"), answered 200 with
        the server's name as the body;
      - any other line: a TCP session (kind "tcp"), answered with the
        server's name and a newline, then closed; a first line `hold`
        keeps the session open until the next line, which is echoed back
        before the server closes.
    Every record gets its kind (rec.kind) before anything is answered, so
    once a client has its answer, the server's counts include its session.
    """

    def __init__(self, name: str, check_path: str = "/healthz", backlog: int = 1024):
        self.handler = self._handle
        self.name = name
        self.check_path = check_path.encode()
        self.records: list[ConnRecord] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._answers: list[tuple[int, str]] = []
        self._then = (200, "OK")
        self.backlog = backlog
        # Bound to an explicit port, so that shutdown() of the listener keeps
        # the port bound to it (a port-0 bind would lose it) and listen()
        # takes it up again.
        for _ in range(100):
            sock = socket.socket()
            try:
                sock.bind((LOCALHOST, free_port()))
                break
            except OSError:
                sock.close()
        else:
            raise AssertionError("no free port for a CheckedServer")
        self.listener = sock
        self.listener.listen(backlog)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.address = f"{LOCALHOST}:{self.port}"
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._open = 0
        self.max_open = 0
        self.listening = True
        self._start_accepting()

    def _start_accepting(self) -> None:
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._accept_thread.start()

    # ------------------------------------------------------------ control
    def stop_listening(self) -> None:
        """Connections to the port are refused from now on (the port stays ours)."""
        self.listener.shutdown(socket.SHUT_RDWR)   # Linux: back to a bound, closed socket
        self._accept_thread.join(5)
        assert not self._accept_thread.is_alive(), "accept thread still running"
        self.listening = False

    def listen_again(self) -> None:
        self.listener.listen(self.backlog)
        assert self.listener.getsockname()[1] == self.port, "the port was lost"
        self.listening = True
        self._start_accepting()

    def answer_checks(self, answers=(), then: tuple[int, str] = (200, "OK")) -> None:
        """HTTP checks from now on get ANSWERS, (code, reason) each, one per
        check in order, then THEN for every later check."""
        with self.lock:
            self._answers = list(answers)
            self._then = then

    # ------------------------------------------------------------ queries
    def of_kind(self, *kinds: str) -> list[ConnRecord]:
        return [r for r in self.connections() if getattr(r, "kind", None) in kinds]

    def checks(self) -> list[ConnRecord]:
        return self.of_kind("check")

    def sessions(self) -> list[ConnRecord]:
        return self.of_kind("tcp", "http")

    # ------------------------------------------------------------ serving
    def _handle(self, conn: socket.socket, rec: ConnRecord, backend) -> None:
        data = bytearray()
        try:
            while b"\n" not in data and len(data) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rec.feed(chunk)
                data += chunk
        except ConnectionResetError:
            if data:
                raise
        if not data:
            rec.kind = "check"   # connected and closed without a byte: a TCP check
            return
        line = bytes(data.split(b"\n", 1)[0]).rstrip(b"\r")
        words = line.split(b" ")
        if len(words) == 3 and words[2].startswith(b"HTTP/1."):
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    rec.end = "eof"
                    return
                rec.feed(chunk)
                data += chunk
            rec.head = bytes(data)
            if words[1] == self.check_path:
                with self.lock:
                    code, reason = self._answers.pop(0) if self._answers else self._then
                rec.kind, rec.code = "check", code
                reply = f"HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            else:
                rec.kind = "http"
                body = self.name.encode()
                reply = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            conn.sendall(reply)
            rec.sent += len(reply)
            return
        rec.kind = "tcp"
        greeting = self.name.encode() + b"\n"
        conn.sendall(greeting)
        rec.sent += len(greeting)
        if line != b"hold":
            return
        rest = bytearray(data.split(b"\n", 1)[1])
        while b"\n" not in rest:
            chunk = conn.recv(262144)
            if not chunk:
                rec.end = "eof"
                return
            rec.feed(chunk)
            rest += chunk
        conn.sendall(rest)
        rec.sent += len(rest)


def tcp_hello(port: int, word: bytes = b"hello", timeout: float = IO_TIMEOUT) -> str:
    """One short TCP session with a CheckedServer behind PORT: the name of
    the server that answered ("" if the connection closed without an answer)."""
    with connect(port, timeout) as client:
        client.sendall(word + b"\n")
        return recv_all(client).decode().strip()


def http_hello(port: int, target: str = "/hello", timeout: float = IO_TIMEOUT) -> tuple[int, str]:
    """One GET (HTTP/1.1, Connection: close) through PORT: (status, body)."""
    with connect(port, timeout) as client:
        client.sendall(f"GET {target} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode())
        data = recv_all(client)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    return status, body.decode(errors="replace")


def tally(count: int, clients: int, session) -> dict[str, int]:
    """Run SESSION(i) -> a server name COUNT times over CLIENTS threads:
    how many sessions each name answered.  AssertionError on any error."""
    names: dict[str, int] = {}
    lock = threading.Lock()

    def one(i):
        name = session(i)
        with lock:
            names[name] = names.get(name, 0) + 1

    errors = run_sessions(count, clients, one)
    assert not errors, f"{len(errors)} sessions failed, first: {errors[0]!r}"
    return names


def admin_command(path, command: str, timeout: float = IO_TIMEOUT) -> str:
    """One command on the admin socket at PATH, without `prompt`: the whole
    answer (the control process closes the connection after it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        return recv_all(s).decode()


class AdminSession:
    """An interactive (`prompt`) session on the admin socket."""

    PROMPT = b"> "

    def __init__(self, path, timeout: float = IO_TIMEOUT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.sock.sendall(b"prompt\n")
        first = self._read_to_prompt()
        assert first == "", f"unexpected output before the first prompt: {first!r}"

    def _read_to_prompt(self) -> str:
        data = bytearray()
        while not (data == self.PROMPT or data.endswith(b"\n" + self.PROMPT)):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"admin connection closed; got {bytes(data[-300:])!r}")
            data += chunk
        return data[:-len(self.PROMPT)].decode()

    def command(self, line: str) -> str:
        """The answer to LINE, without the empty line and prompt that follow it."""
        self.sock.sendall(line.encode() + b"\n")
        answer = self._read_to_prompt()
        assert answer.endswith("\n"), f"an answer ends with an empty line: {answer!r}"
        return answer[:-1]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "AdminSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SERVERS_STATE_HEADER = ("# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
                        "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
                        "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
                        "srv_fqdn srv_port")


def parse_servers_state(text: str) -> dict[str, dict[str, str]]:
    """`show servers state` -> "backend/server" -> {column: value}."""
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "1" and lines[1] == SERVERS_STATE_HEADER, text
    columns = lines[1][2:].split()
    rows = {}
    for line in lines[2:]:
        values = line.split()
        assert len(values) == len(columns), f"{line!r} has {len(values)} fields, not {len(columns)}"
        row = dict(zip(columns, values))
        rows[f"{row['be_name']}/{row['srv_name']}"] = row
    return rows


def servers_state(path, backend: str | None = None) -> dict[str, dict[str, str]]:
    return parse_servers_state(admin_command(path, "show servers state" + (f" {backend}" if backend else "")))


def stat_json(path) -> dict[str, dict]:
    """`show stat json` -> "pxname/svname" -> row."""
    return {f"{r['pxname']}/{r['svname']}": r for r in json.loads(admin_command(path, "show stat json"))}


def control_processes(proxy: Proxyd) -> list[psutil.Process]:
    """Live children of the master whose title says `proxyd: control gen N`."""
    if not proxy.running():
        return []
    try:
        children = proxy.master.children()
    except psutil.NoSuchProcess:
        return []
    found = [c for c in children if CONTROL_TITLE.search(_title(c)) and alive(c)]
    for c in found:
        proxy.seen.setdefault(c.pid, c)   # cleaned up with the workers
    return found


def control_generation(proc: psutil.Process) -> int:
    m = CONTROL_TITLE.search(_title(proc))
    return int(m.group(1)) if m else 0
