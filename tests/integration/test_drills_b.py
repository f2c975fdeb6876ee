"""Resource drills (b): many idle connections across reloads, memory
steadiness over many sessions, and log sinks that stall or fill up.

Each drill runs real proxyd processes against real backends, bounded in
count and time, and checks what a user would: every session that can be
served is served whole, what cannot be served ends cleanly, the starved
worker does not spin (its CPU time and epoll wake-ups over a starved
stretch are printed beside an idle stretch's), one log line per episode,
and full service once the resource is back.

- 9,000 idle connections across 5 reloads (ulimit_n = 20000): each carries
  an exchange afterwards, the number of draining generations never exceeds
  max_draining, a 6th reload stops the oldest generation (its sessions end
  cleanly, the others go on), and old generations leave as their
  connections close.
- Memory: 20,000 HTTP requests and 20,000 TCP sessions through one worker;
  its RSS stays within 8 MiB of its value after the first 2,000 of each
  (`scripts/bench --scenarios memory` is the 200,000 version).
- A syslog-over-TCP receiver that stops reading, and a log file on a full
  tmpfs: the data path goes on, dropped lines are counted, and reported in
  one line once the sink takes bytes again.

Load that needs thousands of sockets or more CPU than the test process's
GIL allows runs in helper processes: this module run as
`python -c "...run_role(...)"` (see spawn_role).  Every helper is stopped by
its pid at the end of its test.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager

import psutil
import pytest

from tests.http_support import http_config
from tests.support import ACCESS_LINE, LOCALHOST, LOG_LINE, REPO, free_port, ss, tcp_config, wait_for

drill = pytest.mark.drill
HTTP_REPLY = (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n"
              b"Content-Type: text/plain\r\n\r\nok\n")
DROPPED = re.compile(r"log sink was full: (\d+) log lines dropped")


# ===================================================================== roles
# Helper processes.  Servers print "READY <port>"; clients print one JSON
# line.  Every loop is bounded by a count or a deadline, or ends when the
# test stops the process (SIGTERM) or closes its stdin.

def role_echo_server(nofile: str) -> None:
    """Echo every byte back, on any number of connections (one thread,
    epoll); close when the peer closes or resets.  Made for thousands of
    idle connections: one fd each, no buffer held while idle."""
    n = int(nofile)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    ls = socket.socket()
    ls.bind((LOCALHOST, 0))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    print(f"READY {ls.getsockname()[1]}", flush=True)
    pending: dict[socket.socket, bytes] = {}

    def close(conn):
        sel.unregister(conn)
        pending.pop(conn, None)
        conn.close()

    while True:
        for key, mask in sel.select():
            if key.data is None:
                for _ in range(256):
                    try:
                        conn, _ = ls.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj
            if mask & selectors.EVENT_WRITE:
                try:
                    sent = conn.send(pending[conn])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    close(conn)
                    continue
                pending[conn] = pending[conn][sent:]
                if not pending[conn]:
                    del pending[conn]
                    sel.modify(conn, selectors.EVENT_READ, "conn")
                continue
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(conn)
                continue
            if conn in pending:
                pending[conn] += data
                continue
            try:
                sent = conn.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                close(conn)
                continue
            if sent < len(data):
                pending[conn] = data[sent:]
                sel.modify(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, "conn")


def role_http_server() -> None:
    """Read a request head, answer HTTP_REPLY (Content-Length, Connection:
    close), close: the server closes first.  Serves the TCP frontend (an
    HTTP/1.0 request relayed as bytes) and the HTTP frontend alike."""
    ls = socket.socket()
    ls.bind((LOCALHOST, 0))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    print(f"READY {ls.getsockname()[1]}", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                for _ in range(256):
                    try:
                        conn, _ = ls.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, bytearray())
                continue
            conn, head = key.fileobj, key.data
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            head += data
            if data and b"\r\n\r\n" not in head:
                continue
            if data:
                try:
                    conn.send(HTTP_REPLY)      # 90 bytes on a fresh socket: one send
                except OSError:
                    pass
            sel.unregister(conn)
            conn.close()


def _reply_done(buf: bytearray) -> int:
    """Length of the complete `200 ok` response at the start of BUF, 0 if
    not complete yet, -1 if it is not one."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0 if len(buf) < 8192 else -1
    head = bytes(buf[:end])
    if not head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")):
        return -1
    m = re.search(rb"(?im)^content-length:[ \t]*(\d+)[ \t]*\r?$", head)
    if m is None:
        return -1
    total = end + 4 + int(m.group(1))
    if len(buf) < total:
        return 0
    return total if bytes(buf[end + 4:total]) == b"ok\n" else -1


def role_count_client(mode: str, port: str, count: str, concurrency: str, per_conn: str = "100",
                      seconds: str = "120") -> None:
    """Exactly COUNT exchanges, CONCURRENCY at a time (one thread, epoll).

    tcp:  a session each: connect, send an HTTP/1.0 request, read to EOF,
          check that it was one whole `200 ok` response.
    http: keep-alive requests: each connection sends PER_CONN requests one
          after the other (reconnecting sooner if the proxy says
          `Connection: close` or closes), each response checked.
    Each exchange ends as ok, or as the name of what went wrong; none may
    take longer than 10 s (then "timeout").  After SECONDS the client stops:
    what was not done is "unfinished".  Prints {"counts": ..., "seconds": ...}."""
    port_, total, k, per = int(port), int(count), int(concurrency), int(per_conn)
    tcp = mode == "tcp"
    request = (b"GET /tcp HTTP/1.0\r\nHost: drill\r\n\r\n" if tcp else
               b"GET /http HTTP/1.1\r\nHost: drill\r\n\r\n")
    sel = selectors.DefaultSelector()
    counts: Counter = Counter()
    started = finished = 0
    t0 = time.monotonic()
    deadline = t0 + float(seconds)

    class Conn:
        __slots__ = ("sock", "buf", "done", "at", "phase")

    def open_conn() -> None:
        nonlocal started
        c = Conn()
        c.sock = socket.socket()
        c.sock.setblocking(False)
        c.buf, c.done, c.at, c.phase = bytearray(), 0, time.monotonic(), "connect"
        err = c.sock.connect_ex((LOCALHOST, port_))
        started += 1
        if err not in (0, errno.EINPROGRESS):
            finish(c, errno.errorcode.get(err, str(err)), reuse=False)
            return
        sel.register(c.sock, selectors.EVENT_WRITE, c)

    def finish(c, outcome: str, reuse: bool) -> None:
        nonlocal finished
        counts[outcome] += 1
        finished += 1
        c.done += 1
        if reuse and outcome == "ok" and c.done < per and started < total:
            send(c)
            return
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def send(c) -> None:
        nonlocal started
        if c.done:
            started += 1
        c.buf.clear()
        c.at = time.monotonic()
        c.phase = "read"
        try:
            c.sock.send(request)
        except OSError as e:
            finish(c, errno.errorcode.get(e.errno, "send"), reuse=False)
            return
        sel.modify(c.sock, selectors.EVENT_READ, c)

    while finished < total and time.monotonic() < deadline:
        while len(sel.get_map()) < k and started < total:
            open_conn()
        for key, _ in sel.select(timeout=0.2):
            c = key.data
            if c.phase == "connect":
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(c, errno.errorcode.get(err, str(err)), reuse=False)
                else:
                    send(c)
                continue
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                finish(c, errno.errorcode.get(e.errno, "recv"), reuse=False)
                continue
            if data:
                c.buf += data
                if tcp:
                    if len(c.buf) > 8192:
                        finish(c, "wrong", reuse=False)
                    continue
                n = _reply_done(c.buf)
                if n < 0 or (n and len(c.buf) > n):
                    finish(c, "wrong", reuse=False)
                elif n:
                    closing = b"connection: close" in bytes(c.buf[:n]).lower()
                    finish(c, "ok", reuse=not closing)
                continue
            if tcp:
                finish(c, "ok" if _reply_done(c.buf) == len(c.buf) > 0 else "short", reuse=False)
            else:
                finish(c, "short" if c.buf else "closed", reuse=False)
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            if now - key.data.at > 10.0:
                finish(key.data, "timeout", reuse=False)
    if finished < total:
        counts["unfinished"] = total - finished
    print(json.dumps({"counts": dict(counts), "started": started, "seconds": time.monotonic() - t0}), flush=True)


ROLES = {"echo-server": role_echo_server, "http-server": role_http_server, "count-client": role_count_client}


def run_role(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    ROLES[argv[0]](*argv[1:])


class Role:
    """A helper process running one of ROLES; stopped by its pid."""

    def __init__(self, name: str, *args):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = "import sys; from tests.integration.test_drills_b import run_role; run_role(sys.argv[1:])"
        self.popen = subprocess.Popen([sys.executable, "-c", code, name, *map(str, args)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      cwd=REPO, env=env)
        self.proc = psutil.Process(self.popen.pid)

    def line(self, timeout: float) -> str:
        """One line of its stdout (AssertionError if none comes in time)."""
        box: list[bytes] = []
        t = threading.Thread(target=lambda: box.append(self.popen.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            err = b""
            if self.popen.poll() is not None:
                err = self.popen.stderr.read()
            raise AssertionError(f"helper pid {self.popen.pid} said nothing within {timeout}s; "
                                 f"stderr: {err.decode(errors='replace')[-2000:]}")
        return box[0].decode().strip()

    def ready_port(self) -> int:
        line = self.line(20)
        assert line.startswith("READY "), line
        return int(line.split()[1])

    def result(self, timeout: float) -> dict:
        return json.loads(self.line(timeout))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        for stream in (self.popen.stdout, self.popen.stderr):
            stream.close()


@pytest.fixture
def role():
    """role(name, *args) -> a started Role; stopped by pid at teardown."""
    started: list[Role] = []

    def start(name: str, *args) -> Role:
        r = Role(name, *args)
        started.append(r)
        return r

    yield start
    for r in reversed(started):
        r.stop()


# =================================================================== figures

def quiet_figure(procs, seconds: float) -> list[tuple[float, int]]:
    """(CPU seconds, voluntary context switches) of each process over SECONDS.

    A worker sleeping in epoll_wait makes one voluntary switch per wake-up;
    a busy loop shows as CPU time (or as thousands of wake-ups).  The sleep
    is the measuring window, not a wait for something to happen."""
    def sample(p):
        t = p.cpu_times()
        return t.user + t.system, p.num_ctx_switches().voluntary

    before = [sample(p) for p in procs]
    time.sleep(seconds)
    return [(round(c1 - c0, 3), w1 - w0) for (c0, w0), (c1, w1) in zip(before, [sample(p) for p in procs])]


STALE_TIMERS = 5.5  # timeout_connect (5 s by default) and a margin: see settle()


def settle(procs, since: float, timeout: float = 30.0) -> None:
    """Wait until the dead timer entries of a burst of sessions that ended
    at SINCE (monotonic) have come due, and each process then wakes at most
    5 times in half a second, twice in a row.

    A worker's timer heap keeps an entry per session until its first
    deadline (the connect timeout, armed at connect: 5 s), also when the
    session ended long before; as they come due the loop wakes for each
    millisecond that has one: hundreds of wake-ups a second for a few
    seconds after a burst, whatever the log sink does.  A figure taken then
    would measure that, not the starved resource.  Bounded: after TIMEOUT
    the figure is taken anyway (and a worker that spins fails it)."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        calm = all(wakeups <= 5 for _, wakeups in quiet_figure(procs, 0.5))
        quiet = quiet + 1 if calm and time.monotonic() >= since + STALE_TIMERS else 0


def assert_no_spin(starved, idle, seconds: float, what: str) -> None:
    """Each starved worker used at most a tenth of a core and woke at most
    ~30 times a second over the window: a spinning loop uses a whole core
    (or wakes thousands of times).  Both figures are printed for the record."""
    print(f"{what}: over {seconds:g}s, starved (CPU s, wake-ups) {starved}; idle {idle}")
    for cpu, wakeups in starved:
        assert cpu <= 0.1 * seconds + 0.05, f"{what}: a starved worker used {cpu}s of CPU in {seconds}s " \
                                            f"(idle: {idle}): a busy loop"
        assert wakeups <= 30 * seconds, f"{what}: a starved worker woke {wakeups} times in {seconds}s " \
                                        f"(idle: {idle}): a busy loop"


@contextmanager
def nofile(needed: int):
    """This process's soft RLIMIT_NOFILE raised to its hard limit (and the
    hard limit to NEEDED where that is allowed: root with CAP_SYS_RESOURCE),
    restored afterwards; the test is skipped if NEEDED cannot be had."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = old[1]
    if hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            hard = needed
        except (ValueError, OSError):
            pytest.skip(f"needs {needed} open files; the hard limit is {hard} and cannot be raised here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


# ============================================ 9,000 idle connections, reloads

class Clients:
    """Thousands of client connections driven from one selector.

    Each connection has a tag; an exchange sends `TAG ROUND\\n` and expects
    the same bytes back (the echo server behind the proxy)."""

    def __init__(self, port: int):
        self.port = port
        self.sel = selectors.DefaultSelector()

    def open(self, count: int, in_flight: int = 200, timeout: float = 60.0) -> list[socket.socket]:
        """COUNT connections, at most IN_FLIGHT handshakes at a time."""
        deadline = time.monotonic() + timeout
        done: list[socket.socket] = []
        failed: Counter = Counter()
        started = 0
        connecting = 0
        while len(done) + sum(failed.values()) < count:
            assert time.monotonic() < deadline, f"{len(done)} of {count} connected after {timeout}s ({failed})"
            while connecting < in_flight and started < count:
                s = socket.socket()
                s.setblocking(False)
                err = s.connect_ex((LOCALHOST, self.port))
                started += 1
                if err not in (0, errno.EINPROGRESS):
                    failed[errno.errorcode.get(err, str(err))] += 1
                    s.close()
                    continue
                self.sel.register(s, selectors.EVENT_WRITE)
                connecting += 1
            for key, _ in self.sel.select(timeout=0.5):
                s = key.fileobj
                self.sel.unregister(s)
                connecting -= 1
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    failed[errno.errorcode.get(err, str(err))] += 1
                    s.close()
                else:
                    done.append(s)
        assert not failed, f"connections failed: {dict(failed)} ({len(done)} of {count} connected)"
        return done

    def exchange(self, socks: list[socket.socket], tags: dict, round_: int,
                 timeout: float = 60.0) -> Counter:
        """Send each socket its line, read it back; {"ok": n, ...}."""
        want = {}
        outcome: Counter = Counter()
        for s in socks:
            data = b"%s round %d\n" % (tags[s], round_)
            try:
                if s.send(data) != len(data):  # a few dozen bytes on an idle socket
                    outcome["short send"] += 1
                    continue
            except OSError as e:
                outcome[f"send {errno.errorcode.get(e.errno, e.errno)}"] += 1
                continue
            want[s] = [data, bytearray()]
            self.sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while want and time.monotonic() < deadline:
            for key, _ in self.sel.select(timeout=0.5):
                s = key.fileobj
                expected, got = want[s]
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError as e:
                    data, err = None, f"recv {errno.errorcode.get(e.errno, e.errno)}"
                if data:
                    got += data
                    if len(got) < len(expected) and expected.startswith(got):
                        continue
                    result = "ok" if got == expected else "wrong"
                else:
                    result = "eof" if data == b"" else err
                outcome[result] += 1
                self.sel.unregister(s)
                del want[s]
        for s in want:
            outcome["timeout"] += 1
            self.sel.unregister(s)
        return outcome

    def wait_ended(self, socks: list[socket.socket], timeout: float = 30.0) -> Counter:
        """Wait until each of SOCKS sees EOF or a reset; {"eof": n, "reset": m, "open": k}."""
        outcome: Counter = Counter()
        left = set(socks)
        for s in socks:
            self.sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for key, _ in self.sel.select(timeout=0.5):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = None
                if data:
                    outcome["data"] += 1
                    continue
                outcome["eof" if data == b"" else "reset"] += 1
                self.sel.unregister(s)
                left.discard(s)
        for s in left:
            outcome["open"] += 1
            self.sel.unregister(s)
        return outcome

    def close(self) -> None:
        self.sel.close()


class GenerationWatch:
    """Samples the workers' generations in a thread: the most old
    generations ever alive at once, and any sample with more than LIMIT while
    the test says the proxy is steady (between reloads)."""

    def __init__(self, proxy, limit: int):
        self.proxy = proxy
        self.limit = limit
        self.steady = threading.Event()
        self.steady.set()
        self.most_old = 0          # at any time, reloads included
        self.most_old_steady = 0   # between reloads
        self.violations: list[dict] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            gens = self.proxy.worker_generations()
            if not gens:
                continue
            newest = max(gens.values())
            old = {g for g in gens.values() if g != newest}
            self.samples += 1
            self.most_old = max(self.most_old, len(old))
            if self.steady.is_set():
                self.most_old_steady = max(self.most_old_steady, len(old))
                if len(old) > self.limit:
                    self.violations.append(dict(Counter(gens.values())))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def conn_holders(port: int) -> dict[int, int]:
    """Client port -> pid of the process holding the proxy's end of it: one
    `ss -p` over the frontend port's established sockets."""
    holders = {}
    for line in ss("-tnp", "state", "established", f"( sport = :{port} )"):
        parts = line.split()
        m = re.search(r"pid=(\d+)", line)
        if m and len(parts) >= 4:
            holders[int(parts[3].rpartition(":")[2])] = int(m.group(1))
    return holders


def log_count(proxy, text: str) -> int:
    return proxy.log_text().count(text)


def wait_log(proxy, text: str, timeout: float = 20.0, count: int = 1) -> None:
    try:
        wait_for(lambda: log_count(proxy, text) >= count, timeout, repr(text))
    except AssertionError:
        raise AssertionError(f"{text!r} not logged {count} time(s) within {timeout}s; "
                             f"log tail:\n{proxy.log_tail(30)}") from None


@drill
def test_9000_idle_connections_across_5_reloads(role, proxyd):
    """workers = 2, ulimit_n = 20000, grace 600 s, max_draining = 5.

    Before each of 5 reloads and after the last, 1,500 connections are
    opened and make one exchange (9,000 in all, generation g holding batch
    g); then every one of them carries an exchange.  The old generations
    never number more than max_draining.  A 6th reload puts generation 1
    over the limit: it is stopped, its 1,500 sessions end at once (EOF or
    reset), and the 7,500 others carry another exchange.  Then the clients
    close batch by batch and each old generation exits as its last
    connection closes, until only the newest is left; it serves new
    connections.  The idle draining workers do not spin."""
    batch, reloads, limit = 1500, 5, 5
    with nofile(batch * (reloads + 1) + 1000) as limit_n:
        echo = role("echo-server", limit_n)
        backend_port = echo.ready_port()
        port = free_port()
        config = tcp_config(port, [f"{LOCALHOST}:{backend_port}"], workers=2,
                            global_={"ulimit_n": 20000, "grace": "600s", "max_draining": limit},
                            defaults={"timeout_client": "600s", "timeout_server": "600s"})
        proxy = proxyd(config)
        for w in proxy.workers():
            assert w.rlimit(psutil.RLIMIT_NOFILE) == (20000, 20000), "ulimit_n = 20000 is each worker's limit"
        clients = Clients(port)
        watch = GenerationWatch(proxy, limit)
        batches: dict[int, list[socket.socket]] = {}
        tags: dict[socket.socket, bytes] = {}
        t0 = time.monotonic()
        try:
            for generation in range(1, reloads + 2):
                if generation > 1:
                    watch.steady.clear()
                    proxy.signal(signal.SIGHUP)
                    wait_log(proxy, f"generation {generation} serving")
                    # Both workers of the previous generation hold sessions: they drain.
                    wait_log(proxy, f"gen {generation - 1} draining", count=2)
                    watch.steady.set()
                socks = clients.open(batch)
                for i, s in enumerate(socks):
                    tags[s] = b"gen %d conn %d" % (generation, i)
                got = clients.exchange(socks, tags, 0)
                assert got == {"ok": batch}, f"generation {generation}'s first exchanges: {dict(got)}"
                batches[generation] = socks
            opened = time.monotonic() - t0
            newest = reloads + 1

            # Who holds what: batch g on the workers of generation g, 2 of them each.
            gens = proxy.worker_generations()
            assert sorted(Counter(gens.values()).items()) == [(g, 2) for g in range(1, newest + 1)], gens
            holders = conn_holders(port)
            for g, socks in batches.items():
                where = Counter(gens.get(holders.get(s.getsockname()[1]), "?") for s in socks)
                assert where == {g: batch}, f"batch {g} is held by generations {dict(where)}"
            backend_conns = len(ss("-tn", "state", "established", f"( dport = :{backend_port} )"))
            assert backend_conns == batch * newest, f"{backend_conns} connections to the backend"

            # Held idle: the draining workers sleep.
            draining = [psutil.Process(pid) for pid, g in gens.items() if g < newest][:2]
            idle = [psutil.Process(pid) for pid, g in gens.items() if g == newest]
            settle(draining + idle, since=time.monotonic())
            figures = quiet_figure(draining + idle, 3.0)
            assert_no_spin(figures[:2], figures[2:], 3.0, "draining workers holding 750 idle sessions each")

            # Every idle connection carries an exchange.
            every = [s for g in sorted(batches) for s in batches[g]]
            got = clients.exchange(every, tags, 1, timeout=120)
            assert got == {"ok": batch * newest}, f"exchanges after {reloads} reloads: {dict(got)}"
            assert log_count(proxy, "stopping generation") == 0, proxy.log_tail(20)

            # One reload more: 6 old generations, over max_draining: the oldest goes now.
            watch.steady.clear()
            proxy.signal(signal.SIGHUP)
            wait_log(proxy, f"generation {newest + 1} serving")
            wait_log(proxy, "stopping generation 1 now")
            ended = clients.wait_ended(batches[1], timeout=30)
            assert ended["open"] == ended["data"] == 0 and sum(ended.values()) == batch, dict(ended)
            wait_for(lambda: 1 not in proxy.worker_generations().values(), 15, "generation 1 gone")
            watch.steady.set()
            assert log_count(proxy, "stopping generation") == 1, "one line for the one stopped generation"
            for s in batches.pop(1):
                s.close()
            newest += 1
            rest = [s for g in sorted(batches) for s in batches[g]]
            got = clients.exchange(rest, tags, 2, timeout=120)
            assert got == {"ok": len(rest)}, f"exchanges of generations 2-{newest - 1} after the 6th reload: {dict(got)}"

            # Clients close, oldest batch first: each old generation leaves with its last connection.
            for g in sorted(batches):
                for s in batches[g]:
                    s.close()
                wait_for(lambda: g not in proxy.worker_generations().values(), 30,
                         f"generation {g} to exit once its {batch} connections closed")
                left = Counter(proxy.worker_generations().values())
                assert left == {h: 2 for h in range(g + 1, newest + 1)}, f"after closing batch {g}: {dict(left)}"
            batches.clear()
            assert sorted(proxy.worker_generations().values()) == [newest, newest]

            # Full service on the newest generation.
            fresh = clients.open(300)
            for i, s in enumerate(fresh):
                tags[s] = b"fresh %d" % i
            got = clients.exchange(fresh, tags, 0)
            assert got == {"ok": 300}, dict(got)
            for s in fresh:
                s.close()
        finally:
            watch.stop()
            for socks in batches.values():
                for s in socks:
                    s.close()
            clients.close()
        print(f"9,000 idle connections: opened over {reloads} reloads in {opened:.1f}s; "
              f"most old generations at once {watch.most_old_steady} between reloads, {watch.most_old} "
              f"during one (max_draining {limit}) in {watch.samples} samples; total {time.monotonic() - t0:.1f}s")
        assert not watch.violations, f"more than {limit} old generations: {watch.violations[:5]}"
        assert watch.most_old_steady == limit, (watch.most_old_steady, watch.most_old)
        # Every session has its access line; the 1,500 that were stopped say so (K).
        lines = proxy.wait_access_lines(batch * 6 + 300, timeout=30)
        terms = Counter(a.term for a in lines)
        print(f"access-line terms: {dict(terms)}")
        assert terms["KD"] == batch, dict(terms)
        assert "Traceback" not in proxy.log_text()


# ================================================================== memory

def drive(role, tcp_port: int, http_port: int, count: int, concurrency: int = 8) -> dict:
    """COUNT TCP sessions and COUNT HTTP requests at once (two client
    processes); their outcome counts.  Bounded: each client stops after
    COUNT exchanges, each of which times out after 10 s."""
    bound = 60 + count / 50  # far beyond any sane rate: a hang, not slowness, trips it
    tcp = role("count-client", "tcp", tcp_port, count, concurrency, 1, bound)
    http = role("count-client", "http", http_port, count, concurrency, 100, bound)
    out = {"tcp": tcp.result(bound + 20), "http": http.result(bound + 20)}
    for r in (tcp, http):
        r.stop()
    return out


@pytest.mark.drill
def test_memory_steady_over_20000_sessions(role, proxyd):
    """One worker, a TCP frontend and an HTTP frontend (server-close) in
    front of the same backend: 20,000 TCP sessions (connect, HTTP/1.0
    request, reply, server close) and 20,000 HTTP requests (keep-alive, 100
    per client connection), run together.  Every one succeeds, and the
    worker's RSS after them is within 8 MiB of its RSS after the first
    2,000 of each.  (`scripts/bench --scenarios memory` does 200,000.)"""
    server = role("http-server")
    backend = f"{LOCALHOST}:{server.ready_port()}"
    tcp_port, http_port = free_port(), free_port()
    config = tcp_config(tcp_port, [backend], workers=1)
    config["frontends"]["web"] = http_config(http_port, {"app": [backend]})["frontends"]["fe"]
    config["backends"]["app"] = {"servers": [{"name": "s1", "address": backend}]}
    proxy = proxyd(config, ports=[tcp_port, http_port], workers=1)
    worker = proxy.workers()[0]
    warm, total, steps = 2000, 20000, 3
    samples = []

    def sample(done: int) -> None:
        samples.append((done, worker.memory_info().rss / (1 << 20), worker.num_fds()))

    sample(0)
    done = 0
    for count in [warm] + [(total - warm) // steps] * steps:
        got = drive(role, tcp_port, http_port, count)
        for kind in ("tcp", "http"):
            assert got[kind]["counts"] == {"ok": count}, f"{kind} after {done}: {got[kind]}"
        done += count
        sample(done)
    assert worker.is_running() and proxy.worker_pids() == {worker.pid}
    table = ", ".join(f"{n}: {rss:.1f} MiB/{fds} fds" for n, rss, fds in samples)
    delta = samples[-1][1] - samples[1][1]
    print(f"worker RSS after N TCP sessions + N HTTP requests: {table}; "
          f"delta after the first {warm}: {delta:+.2f} MiB")
    assert delta < 8, f"worker RSS grew {delta:.1f} MiB after the first {warm} of each: {table}"
    assert samples[-1][2] <= samples[1][2] + 4, f"fds grew: {table}"


# ========================================================== stalled log sinks

SYSLOG_LINE = re.compile(r"^<(?P<pri>\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d (?P<tag>\S+)\[(?P<pid>\d+)\]: (?P<message>.*)$")


def access_message(message: str) -> bool:
    return ACCESS_LINE.match(message) is not None


class SyslogReceiver:
    """A syslog-over-TCP receiver (newline-framed, RFC 6587) in a thread of
    the test process.  It accepts every connection as it comes, reads while
    `reading` is set and stops reading, without closing anything, while it
    is clear.  A small receive buffer makes a stalled receiver's window
    close soon, as a log shipper's that stopped would."""

    def __init__(self, rcvbuf: int = 4096):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # inherited by accepted sockets
        self.listener.bind((LOCALHOST, 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.reading = threading.Event()
        self.reading.set()
        self.data: dict[socket.socket, bytearray] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        watched = True      # whether the connections are registered for reading
        while not self._stop.is_set():
            if self.reading.is_set() != watched:
                watched = self.reading.is_set()
                with self.lock:
                    conns = list(self.data)
                for conn in conns:
                    if conn.fileno() < 0:
                        continue
                    if watched:
                        sel.register(conn, selectors.EVENT_READ)
                    else:
                        sel.unregister(conn)
            for key, _ in sel.select(timeout=0.05):
                if key.fileobj is self.listener:
                    while True:
                        try:
                            conn, _ = self.listener.accept()
                        except BlockingIOError:
                            break
                        conn.setblocking(False)
                        with self.lock:
                            self.data[conn] = bytearray()
                        if watched:
                            sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    chunk = conn.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(conn)
                    conn.close()
                    continue
                with self.lock:
                    self.data[conn] += chunk
        sel.close()

    def connections(self) -> int:
        with self.lock:
            return len(self.data)

    def messages(self) -> list[tuple[int, str]]:
        """(pid, message) of every whole line received; AssertionError on a
        line that is not syslog-framed (a torn or interleaved line)."""
        with self.lock:
            chunks = [bytes(d) for d in self.data.values()]
        out = []
        for chunk in chunks:
            for line in chunk.decode(errors="replace").split("\n")[:-1]:
                m = SYSLOG_LINE.match(line)
                assert m, f"not a syslog line: {line[:200]!r}"
                out.append((int(m["pid"]), m["message"]))
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with self.lock:
            conns = list(self.data)
        for conn in conns:
            conn.close()
        self.listener.close()


@pytest.fixture
def syslog_receiver():
    receivers: list[SyslogReceiver] = []

    def start() -> SyslogReceiver:
        r = SyslogReceiver()
        receivers.append(r)
        return r

    yield start
    for r in receivers:
        r.close()


def sessions(role, port: int, count: int) -> None:
    """COUNT short TCP sessions through the proxy (a client process, 8 at a
    time); every one must succeed."""
    bound = 60 + count / 50  # far beyond any sane rate: a hang, not slowness, trips it
    client = role("count-client", "tcp", port, count, 8, 1, bound)
    got = client.result(bound + 20)
    client.stop()
    assert got["counts"] == {"ok": count}, f"{count} sessions: {got}; sockets: {ss('-s')[:6]}"


def dropped_reports(messages) -> dict[int, list[int]]:
    """pid -> the N of each `log sink was full: N log lines dropped` it sent."""
    out: dict[int, list[int]] = {}
    for pid, message in messages:
        m = DROPPED.search(message)
        if m:
            out.setdefault(pid, []).append(int(m.group(1)))
    return out


@drill
def test_syslog_receiver_that_stops_reading(role, proxyd, syslog_receiver):
    """log = "syslog:tcp@…", 2 workers.  The receiver takes 500 sessions'
    lines, then stops reading (it keeps its connections): 12,000 short TCP
    sessions all succeed, the workers do not spin while their sink stays
    full, and once the receiver reads again each worker sends a
    `log sink was full: N log lines dropped` line (N > 0).  Lines delivered
    plus lines counted as dropped are exactly every session's access line.
    Then full service: 500 more sessions, 500 more lines, no new report.

    The frontend, backend and server names are 300 characters long, so
    that each access line is about 1 KiB: on loopback the kernel lets a
    stalled TCP connection's send buffer grow to several MiB (tcp_wmem),
    and with 100-byte lines it takes 100,000 sessions to fill it."""
    receiver = syslog_receiver()
    server = role("http-server")
    port = free_port()
    config = tcp_config(port, [{"name": "s" * 300, "address": f"{LOCALHOST}:{server.ready_port()}"}], workers=2,
                        global_={"log": f"syslog:tcp@{LOCALHOST}:{receiver.port}", "log_level": "info"},
                        frontend_name="f" * 300, backend_name="b" * 300)
    proxy = proxyd(config)
    workers = proxy.workers()
    pids = {w.pid for w in workers}
    wait_for(lambda: receiver.connections() >= 3, 10, "a connection from the master and from each worker")
    wait_for(lambda: {p for p, m in receiver.messages() if " started," in m} >= pids, 10,
             "both workers' start-up lines")

    def access_count() -> int:
        return sum(1 for pid, m in receiver.messages() if pid in pids and access_message(m))

    sessions(role, port, 500)
    wait_for(lambda: access_count() == 500, 15, "500 access lines at the receiver")
    settle(workers, since=time.monotonic())
    idle = quiet_figure(workers, 3.0)

    receiver.reading.clear()
    stalled_sessions = 12000
    sessions(role, port, stalled_sessions)
    settle(workers, since=time.monotonic())
    starved = quiet_figure(workers, 3.0)
    assert_no_spin(starved, idle, 3.0, "workers with a stalled syslog receiver")
    assert dropped_reports(receiver.messages()) == {}, "nothing can have been reported yet"

    receiver.reading.set()
    total = 500 + stalled_sessions
    seen = {}

    def accounted() -> bool:
        messages = receiver.messages()
        reports = dropped_reports(messages)
        delivered = sum(1 for pid, m in messages if pid in pids and access_message(m))
        seen.update(reports=reports, delivered=delivered,
                    dropped=sum(n for counts in reports.values() for n in counts))
        return set(reports) == pids and seen["delivered"] + seen["dropped"] == total

    try:
        wait_for(accounted, 20, "every line delivered or counted in a report")
    except AssertionError:
        raise AssertionError(f"{seen['delivered']} lines delivered + {seen['dropped']} counted as dropped "
                             f"(reports: {seen['reports']}) != {total} sessions") from None
    reports, delivered = seen["reports"], seen["delivered"]
    print(f"stalled syslog receiver: {stalled_sessions} sessions while stalled; {delivered} of {total} "
          f"access lines delivered, reports (pid: N) {reports}")
    # One stall, but the kernel may grow a stalled socket's send buffer
    # while it lasts: bytes go in again, the worker reports, and later lines
    # fill the new room and are dropped in turn.  A report or a few, never
    # one per dropped line.
    assert all(1 <= len(counts) <= 3 and min(counts) > 0 for counts in reports.values()), \
        f"a report or a few per worker for the one stall: {reports}"

    sessions(role, port, 500)
    wait_for(lambda: access_count() == delivered + 500, 15, "the next 500 access lines, all of them")
    assert dropped_reports(receiver.messages()) == reports, "no new episode"
    assert proxy.worker_pids() == pids and proxy.running()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs mounted on a fresh directory; unmounted at teardown
    (lazily if something still holds a file on it)."""
    where = tmp_path / "small-fs"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        # What proxyd wrote there outlives the mount, for a look after a failure.
        keep = tmp_path / "small-fs-copy"
        keep.mkdir()
        for f in where.iterdir():
            if f.name != "filler":
                shutil.copy(f, keep / f.name)
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill_filesystem(path) -> int:
    """Write PATH until the filesystem is full (ENOSPC, in ever smaller
    writes down to one byte); the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 64, 1):
            chunk = b"\0" * size
            for _ in range(1 << 20):
                try:
                    f.write(chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
                written += size
    return written


def file_messages(path) -> tuple[list[tuple[int, str]], list[str]]:
    """((pid, message) of each proxyd line in the file, the other lines)."""
    good, bad = [], []
    for line in path.read_text(errors="replace").splitlines():
        m = LOG_LINE.match(line)
        if m:
            good.append((int(m["pid"]), m["message"]))
        else:
            bad.append(line)
    return good, bad


WHOLE_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z proxyd\[\d+\]: ")


def glued_lines(path) -> list[str]:
    """Lines that are not one whole log line: the head of a line cut short
    by a full filesystem, with the next line written after it (wherever the
    cut fell: in the time stamp, the tag or the message)."""
    return [line for line in path.read_text(errors="replace").splitlines()
            if not WHOLE_LINE.match(line) or line.count(" proxyd[") != 1]


def full_filesystem_run(role, proxyd, fs, workers: int, full_sessions: int, room: int = 0):
    """A proxy logging to FS/proxyd.log: 500 sessions logged, the
    filesystem filled (with ROOM or more bytes left in the log file's last
    page, by a few more sessions first), FULL_SESSIONS sessions, the filler
    deleted, then sessions 100 at a time until every worker has reported its
    dropped lines (at most 2,000).  Returns a dict of what was seen."""
    logfile = fs / "proxyd.log"
    server = role("http-server")
    port = free_port()
    proxy = proxyd(tcp_config(port, [f"{LOCALHOST}:{server.ready_port()}"], workers=workers,
                              global_={"log": str(logfile), "log_level": "info"}))
    procs = proxy.workers()
    pids = {w.pid for w in procs}

    def access_count() -> int:
        return sum(1 for pid, m in file_messages(logfile)[0] if pid in pids and access_message(m))

    def same_workers(when: str) -> None:
        now = proxy.worker_pids()
        assert now == pids, f"workers {pids} are now {now} ({when}); log file tail:\n" + \
            "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])

    logged = 500
    sessions(role, port, logged)
    wait_for(lambda: access_count() == logged, 15, f"{logged} access lines in the log file")
    for _ in range(100):  # bounded: a page holds about 45 lines
        if -logfile.stat().st_size % 4096 >= room:
            break
        sessions(role, port, 1)
        logged += 1
        wait_for(lambda: access_count() == logged, 15, f"{logged} access lines in the log file")
    same_workers("after the first sessions")
    settle(procs, since=time.monotonic())
    idle = quiet_figure(procs, 3.0)

    filler = fs / "filler"
    filled = fill_filesystem(filler)
    assert os.statvfs(fs).f_bavail == 0, "the filesystem should be full"
    sessions(role, port, full_sessions)
    same_workers("with the filesystem full")
    settle(procs, since=time.monotonic())
    starved = quiet_figure(procs, 3.0)
    during = access_count()
    assert during < logged + full_sessions, "every line got through: the filesystem was not full"
    assert dropped_reports(file_messages(logfile)[0]) == {}, "a report while the filesystem is still full"
    # A write was cut short by ENOSPC: the file ends in the cut line (or,
    # once proxyd takes a cut line back out, short of its last page's end).
    cut_short = not logfile.read_bytes().endswith(b"\n") or logfile.stat().st_size % 4096 != 0

    filler.unlink()
    after = 0
    for _ in range(20):  # a few sessions at a time until each worker has told, or nothing was lost
        sessions(role, port, 100)
        after += 100
        if set(dropped_reports(file_messages(logfile)[0])) == pids:
            break
        if access_count() == logged + full_sessions + after:
            break   # the backlog held every line of the episode
    total = logged + full_sessions + after
    sizes = [-1]
    wait_for(lambda: sizes.append(logfile.stat().st_size) or sizes[-1] == sizes[-2], 5,
             "the log file to stop growing", interval=0.2)
    messages, other = file_messages(logfile)
    reports = dropped_reports(messages)
    delivered = access_count()
    dropped = sum(n for counts in reports.values() for n in counts)
    same_workers("at the end")
    return {"proxy": proxy, "pids": pids, "idle": idle, "starved": starved, "filled": filled,
            "during": during - logged, "cut_short": cut_short, "reports": reports, "delivered": delivered,
            "dropped": dropped, "total": total, "glued": glued_lines(logfile), "other": other}


@drill
def test_log_file_on_a_full_filesystem(small_tmpfs, role, proxyd):
    """log = a file on a 256 KiB tmpfs, 2 workers.  500 sessions are
    logged; then a filler file takes the rest of the space.  3,000 sessions
    on the full filesystem all succeed and the workers do not spin; their
    lines are dropped and counted.  Once the filler is deleted, the next
    sessions' lines get through and each worker writes one
    `log sink was full: N log lines dropped` line.  Every line is whole
    in the file or counted."""
    run = full_filesystem_run(role, proxyd, small_tmpfs, workers=2, full_sessions=3000)
    reports, delivered, dropped, total = run["reports"], run["delivered"], run["dropped"], run["total"]
    print(f"full filesystem: filler {run['filled']} bytes; 3000 sessions while full, {run['during']} of "
          f"their lines written; in the end {delivered} of {total} access lines in the file, "
          f"reports (pid: N) {reports}; glued lines {len(run['glued'])}")
    assert_no_spin(run["starved"], run["idle"], 3.0, "workers logging to a full filesystem")
    assert set(reports) == run["pids"], f"a report from each worker: {reports}"
    assert all(len(counts) == 1 and counts[0] > 0 for counts in reports.values()), \
        f"one report per worker for the one episode: {reports}"
    assert not run["glued"], f"lines cut short or glued together: {run['glued'][:2]}"
    assert delivered + dropped == total, \
        f"{delivered} lines written + {dropped} counted as dropped, of {total}"


@drill
def test_log_file_cut_short_by_a_full_filesystem_counts_every_line(small_tmpfs, role, proxyd):
    """One worker, the log file's last page with 600 bytes or more of room
    when the filesystem fills up, so that a batch of access lines is cut
    short there: after space is back, every access line is either whole in
    the file or counted in the `log sink was full` report, and no line of
    the file holds the cut line's head with the next line glued to it."""
    run = full_filesystem_run(role, proxyd, small_tmpfs, workers=1, full_sessions=300, room=600)
    if not run["cut_short"]:
        pytest.skip("the lines filled the last page exactly this time: no write was cut short")
    delivered, dropped, total = run["delivered"], run["dropped"], run["total"]
    print(f"short write: {delivered} lines in the file + {dropped} counted of {total}; "
          f"reports {run['reports']}; glued: {run['glued'][:2]}")
    assert not run["glued"], f"a line cut short by ENOSPC with the next one glued to it: {run['glued'][:2]}"
    assert delivered + dropped == total, \
        f"{delivered} lines written + {dropped} counted as dropped != {total} sessions"
