"""Resource drills: proxyd starved of one resource at a time, with real
processes, bounded in count and time.  Each drill shows

- a clean error for what cannot be served (a TCP session closed with its
  termination code, an HTTP answer of proxyd's own), or a wait in the
  kernel backlog where waiting is the answer;
- nothing lost for the rest: every session that is served gets its own
  bytes back, whole;
- no busy loop while starved: the worker's CPU time over the starved
  seconds, printed beside the same worker's over as many idle seconds
  (a spinning worker would use about one CPU second per second; a waiting
  one uses a few hundredths);
- one log line per episode where proxyd logs episodes;
- full service once the resource is back.

The drills that take more than ~15 s are marked `drill` and skipped by the
default run (setup.cfg); run them with `pytest -m drill -s` (-s shows the
figures).  The namespace drills need root and iproute2 (and nftables for the
black hole); they create their own namespace and delete it.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import drills
from tests.drills import Netns, NetnsProxyd, cpu_over, ctx_switches, median, percentile
from tests.http_support import (HTTPClient, Reply, _Buffered, assert_own_error, build_request, http_access_lines,
                                http_config)
from tests.support import (LOCALHOST, REPO, echo_handler, free_port, parse_access_line, payload, tcp_config,
                           wait_for, write_config)

LINGER_RST = struct.pack("ii", 1, 0)
STARVED_SECONDS = 3.0
# A worker that spins burns about a CPU second per wall second; one that
# waits in epoll a few hundredths.  The bound separates the two, generously.
BUSY_LOOP_CPU = 0.5


def report(title: str, **figures) -> None:
    """Print a drill's figures (shown with -s, and in the report on failure)."""
    print(f"\n[drill] {title}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def rst_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass
    sock.close()


def log_messages(proxy, needle: str) -> list[str]:
    return [line for line in proxy.log_lines() if needle in line]


# ---------------------------------------------------------- client states

class TaggedClient:
    """One client of the fd drill: sends TAG at once, expects TAG back."""

    def __init__(self, port: int, tag: bytes, send: bool = True):
        self.tag = tag
        self.sock = socket.create_connection((LOCALHOST, port), timeout=10)
        self.address = "%s:%d" % self.sock.getsockname()[:2]
        if send:
            self.sock.sendall(tag)
        self.sock.setblocking(False)
        self.got = bytearray()
        self.end: str | None = None   # "eof" | "reset" once the proxy ended it

    @property
    def echoed(self) -> bool:
        return bytes(self.got) == self.tag

    def poll(self) -> None:
        """Take whatever has arrived (never blocks)."""
        for _ in range(64):
            if self.end is not None:
                return
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except ConnectionResetError:
                self.end = "reset"
                return
            if not data:
                self.end = "eof"
                return
            self.got += data
            assert self.tag.startswith(bytes(self.got)), \
                f"client {self.tag[:20]!r} received bytes that are not its own: {bytes(self.got[:60])!r}"

    @property
    def state(self) -> str:
        if self.echoed:
            return "served"
        if self.end is not None:
            return "closed"
        return "waiting"


def poll_all(clients: list[TaggedClient], settle: float = 1.0, timeout: float = 20.0) -> dict[str, int]:
    """Poll every client until the counts of served / closed / waiting have
    not changed for SETTLE seconds; return them."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        socks = [c.sock for c in clients if c.end is None and not c.echoed]
        if socks:
            select.select(socks, [], [], 0.05)
        else:
            time.sleep(0.05)
        for c in clients:
            c.poll()
        counts = {s: sum(c.state == s for c in clients) for s in ("served", "closed", "waiting")}
        now = time.monotonic()
        if counts != last:
            last, since = counts, now
        elif now - since >= settle:
            return counts
        if now >= deadline:
            return counts


def exchange(messages: dict, timeout: float = 60.0) -> list:
    """Send each client its message (non-blocking, all at once: every
    client first sends what the kernel takes, reading nothing), then send
    the rest and read until each has its whole tag back.  Returns
    (bytes got, end) of those that did not."""
    left = {c: memoryview(m) for c, m in messages.items()}

    def send(c):
        view = left[c]
        try:
            while view:
                view = view[c.sock.send(view[:262144]):]
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            c.end = c.end or "reset"
            view = view[:0]
        left[c] = view

    for c in left:
        send(c)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [c for c in left if c.end is None and not c.echoed]
        if not pending:
            break
        wants = [c.sock for c in pending if left[c]]
        select.select([c.sock for c in pending], wants, [], 0.1)
        for c in pending:
            send(c)
            c.poll()
    return [(len(c.got), c.end) for c in left if not c.echoed]


# ------------------------------------------------------------ namespaces

@pytest.fixture
def netns():
    """A network namespace of the test's own (lo up), deleted at teardown."""
    why = drills.netns_available()
    if why:
        pytest.skip(why)
    try:
        ns = Netns()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace here: {e.stderr.decode(errors='replace').strip()}")
    yield ns
    ns.delete()


@pytest.fixture
def ns_proxyd(request, tmp_path, netns):
    """ns_proxyd(config, port, workers=1) -> a NetnsProxyd running in `netns`,
    stopped (by pid) at teardown, before the namespace is deleted."""
    started: list[NetnsProxyd] = []

    def start(config, port: int, workers: int = 1) -> NetnsProxyd:
        n = len(started)
        cfg = write_config(tmp_path, config, f"ns-proxyd{n}.toml")
        p = NetnsProxyd(netns, cfg, tmp_path / f"ns-proxyd{n}.log")
        p.port = port
        started.append(p)
        p.start()
        p.wait_ready([port], workers)
        return p

    yield start
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    for p in reversed(started):
        code = p.stop()
        if failed:
            print(f"---- proxyd {p.config_path.name} in {netns.name} (exit {code}) log tail:\n{p.log_tail(60)}")


class SourcePorts:
    """Client source ports outside the namespace's narrowed ephemeral range,
    each used once: clients never take a port the proxy needs."""

    def __init__(self, first: int = 50000):
        self._next = iter(range(first, 61000))
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            return next(self._next)


class NsTaggedClient(TaggedClient):
    """A TaggedClient connecting from inside NETNS, from SOURCE_PORT."""

    def __init__(self, netns: Netns, port: int, source_port: int, tag: bytes):
        self.tag = tag
        self.sock = netns.connect((LOCALHOST, port), source=(LOCALHOST, source_port))
        self.address = "%s:%d" % self.sock.getsockname()[:2]
        self.sock.sendall(tag)
        self.sock.setblocking(False)
        self.got = bytearray()
        self.end = None


class NsHTTPClient(HTTPClient):
    """An HTTPClient connecting from inside NETNS, from SOURCE_PORT."""

    def __init__(self, netns: Netns, port: int, source_port: int | None = None, timeout: float = 30.0):
        source = (LOCALHOST, source_port) if source_port else None
        _Buffered.__init__(self, netns.connect((LOCALHOST, port), timeout, source))
        self.received = 0
        self.sent = 0


def narrow_ports(netns: Netns, first: int, last: int) -> None:
    netns.sysctl("net.ipv4.ip_local_port_range", f"{first} {last}")
    out = netns.run("sysctl", "-n", "net.ipv4.ip_local_port_range").stdout.split()
    assert out == [str(first), str(last)], out


# ================================================================ drills


# ------------------------------------------------------ file descriptors

def worker_fds_of(worker, kind: str) -> int:
    """Fds of KIND ("socket", "pipe") open in WORKER."""
    count = 0
    for name in os.listdir(f"/proc/{worker.pid}/fd"):
        try:
            count += os.readlink(f"/proc/{worker.pid}/fd/{name}").startswith(kind + ":")
        except FileNotFoundError:
            pass
    return count


def worker_sockets(worker) -> int:
    """Sockets open in WORKER (pooled pipes left aside: they come and go)."""
    return worker_fds_of(worker, "socket")


def other_lines(proxy, needle: str) -> list[str]:
    """Log lines holding NEEDLE that are not access lines."""
    return [line for line in proxy.log_lines() if needle in line and parse_access_line(line) is None]




@pytest.mark.drill
@pytest.mark.parametrize("starve", ["accept", "connect"])
def test_drill_file_descriptors(starve, backend, proxyd):
    """Copying relay (splice = false: pipes, which hold fds, are
    test_drill_splice_pipe_out_of_fds's), ulimit_n about 64 on one worker and, twice, half again as many clients as its
    fds hold.  STARVE picks the parity of the fds left free once the
    worker's own are open: even, the last fd goes to a server socket and
    the next accept fails (EMFILE on accept); odd, a client is accepted
    into the last fd and its server socket fails (EMFILE on socket()).

    Either way: the clients it can take are served and stay so (a second
    message from each, all at once while starved, is echoed whole: no
    pipe or buffer missing); what cannot be served waits in the kernel
    backlog (a client closed instead has its access line, term RC); the
    worker does not spin (CPU figure beside the idle one); one error line
    when each episode starts and one notice when it ends; once the served
    clients leave, every waiting client is served, and the worker's
    sockets are back where they started."""
    echo = backend(echo_handler)
    splice = False
    # The worker's own fds decide the parity: ask a first proxyd, then
    # start the drill's with the ulimit_n that gives the wanted one.
    probe = proxyd(tcp_config(free_port(), [echo], workers=1, global_={"ulimit_n": 64, "splice": splice}))
    own_fds = probe.workers()[0].num_fds()
    probe.stop()
    limit = 64 + ((64 - own_fds) % 2 != (starve == "connect"))
    port = free_port()
    proxy = proxyd(tcp_config(port, [echo], workers=1, global_={"ulimit_n": limit, "splice": splice}))
    worker = proxy.workers()[0]
    assert worker.rlimit(__import__("resource").RLIMIT_NOFILE) == (limit, limit)
    fds_idle, sockets_idle = worker.num_fds(), worker_sockets(worker)
    wakeups = ctx_switches(worker)
    idle_cpu = cpu_over(worker, STARVED_SECONDS)
    idle_wakeups = ctx_switches(worker) - wakeups
    capacity = (limit - fds_idle) // 2        # a client fd and a server fd per session
    extra = capacity * 2 // 3                 # fewer than capacity: all served once the first leave
    report(f"fds idle ({'splice' if splice else 'copy'}, starved on {starve})", ulimit_n=limit,
           worker_fds=fds_idle, capacity=capacity, idle_cpu_s=f"{idle_cpu:.3f}",
           idle_wakeups=idle_wakeups)

    rc_total, served_least, closed_addresses = 0, capacity, set()
    def fd_lines():
        return len(other_lines(proxy, "Too many open files")), len(other_lines(proxy, "accepting again"))

    for episode in (1, 2):
        # Every episode logged so far has ended (fds may come back in steps:
        # see test_drill_fd_episode_trickle for how many lines that makes).
        wait_for(lambda: fd_lines()[0] == fd_lines()[1], 5, f"the log quiet before episode {episode}")
        errors_before, notices_before = fd_lines()
        clients = [TaggedClient(port, b"episode %d client %03d " % (episode, i) + payload(200, seed=i))
                   for i in range(capacity + extra)]
        try:
            counts = poll_all(clients)
            assert counts["served"] > 0, f"episode {episode}: no client served: {counts}"
            assert counts["waiting"] > 0, \
                f"episode {episode}: no client left waiting in the backlog: {counts}; log:\n{proxy.log_tail(8)}"
            wait_for(lambda: fd_lines()[0] == errors_before + 1, 5, f"the out-of-fds line of episode {episode}")

            # Starved: every served client sends 1 MiB more, all at once,
            # reading nothing until all is sent as far as the kernel takes
            # it: many sessions hold a pipe (or a buffer) at the same time.
            served = [c for c in clients if c.state == "served"]
            served_least = min(served_least, len(served))  # pooled pipes hold fds too
            second = {c: b" and again %03d " % i + payload(1 << 20, seed=i) for i, c in enumerate(served)}
            for c, data in second.items():
                c.tag += data
            lost = exchange(second)
            assert not lost, \
                f"episode {episode}: {len(lost)} of {len(served)} served clients lost their second message " \
                f"while starved (bytes got, end): {lost[:5]}; log:\n{proxy.log_tail(8)}"

            fds_starved = worker.num_fds()
            wakeups = ctx_switches(worker)
            def still_starved():
                assert fd_lines() == (errors_before + 1, notices_before), \
                    f"accepting resumed while nothing was released; log:\n{proxy.log_tail(12)}"
                return True

            starved_cpu = cpu_over(worker, STARVED_SECONDS, holds=still_starved)
            wakeups = ctx_switches(worker) - wakeups
            report(f"fds episode {episode} starved", clients=len(clients), **counts,
                   worker_fds=f"{fds_starved}/{limit}", starved_cpu_s=f"{starved_cpu:.3f}",
                   idle_cpu_s=f"{idle_cpu:.3f}", starved_wakeups=wakeups, idle_wakeups=idle_wakeups)
            assert starved_cpu < BUSY_LOOP_CPU, \
                f"the starved worker used {starved_cpu:.2f} s of CPU in {STARVED_SECONDS} s (idle: " \
                f"{idle_cpu:.2f} s): a busy loop"
            closed = [c for c in clients if c.state == "closed"]
            for c in closed:
                assert not c.got, f"a client closed by the proxy got {len(c.got)} bytes first"

            # The resource comes back: the served clients leave (reset, so
            # their sessions end at once); every waiting client is served.
            waiting = [c for c in clients if c.state == "waiting"]
            for c in served:
                rst_close(c.sock)
                c.end = "left"
            wait_for(lambda: fd_lines()[1] > notices_before, 15,
                     f"the notice that accepting works again (episode {episode})")

            def none_waiting():
                for c in waiting:
                    c.poll()
                return all(c.state != "waiting" for c in waiting)

            wait_for(none_waiting, 30, f"the {len(waiting)} waiting clients of episode {episode} to be served")
            late_closed = [c for c in waiting if c.state == "closed"]
            report(f"fds episode {episode} back", waited_then_served=len(waiting) - len(late_closed),
                   waited_then_closed=len(late_closed))
            rc_total += len(closed) + len(late_closed)
            closed_addresses |= {c.address for c in closed + late_closed}
        finally:
            for c in clients:
                rst_close(c.sock)
        wait_for(lambda: worker_sockets(worker) == sockets_idle, 15,
                 f"the worker's sockets back at {sockets_idle} after episode {episode} "
                 f"(now {worker_sockets(worker)})")

    # One line when each episode starts, one when it ends (and no more
    # while starved: checked above); every episode that started ended.
    wait_for(lambda: fd_lines()[0] == fd_lines()[1], 15, "every episode ended")
    errors = other_lines(proxy, "Too many open files")
    notices = other_lines(proxy, "accepting again")
    assert len(errors) >= 2, (errors, notices)
    rc = [a for a in proxy.access_lines() if a.term == "RC"]
    assert len(rc) == rc_total, \
        f"{rc_total} clients closed by the proxy, {len(rc)} RC lines; theirs: " \
        f"{[a.raw for a in proxy.access_lines() if a.client in closed_addresses]}"
    assert all(a.err == "EMFILE" for a in rc), [a.raw for a in rc if a.err != "EMFILE"][:3]
    assert rc_total <= 2 * 4, f"{rc_total} clients closed with RC instead of waiting in the backlog"

    # Full service: a round of sessions as large as the fds held, all echoed.
    after = [TaggedClient(port, b"after %03d " % i + payload(300, seed=1000 + i)) for i in range(served_least)]
    try:
        counts = poll_all(after)
        assert counts == {"served": served_least, "closed": 0, "waiting": 0}, counts
    finally:
        for c in after:
            rst_close(c.sock)
    report("fds", error_lines=len(errors), notice_lines=len(notices), rc_lines=len(rc),
           notices=" | ".join(n.split(": ", 1)[1] for n in notices))






def test_drill_fd_episode_trickle(backend, proxyd):
    """One worker at its fd limit with clients waiting in the backlog; the
    served clients leave one at a time, the first accepted (lowest fds)
    first, each leaving when the client before it has been replaced by
    one from the backlog.  Nothing is lost: each departure lets one
    waiting client in.  And it is one episode all along, since clients
    wait throughout: one error line when it started, no notice until the
    backlog is empty, then one."""
    echo = backend(echo_handler)
    port = free_port()
    proxy = proxyd(tcp_config(port, [echo], workers=1, global_={"ulimit_n": 64, "splice": False}))
    clients = [TaggedClient(port, b"trickle %03d " % i + payload(200, seed=i)) for i in range(45)]
    steps = 6
    try:
        counts = poll_all(clients)
        assert counts["waiting"] > steps, counts
        served = [c for c in clients if c.state == "served"]   # in accept order: lowest fds first
        for i in range(steps):
            target = len([c for c in clients if c.state == "served" and c.end != "left"])
            rst_close(served[i].sock)
            served[i].end = "left"

            def replaced():
                for c in clients:
                    if c.state == "waiting":
                        c.poll()
                return len([c for c in clients if c.state == "served" and c.end != "left"]) >= target

            wait_for(replaced, 10, f"a waiting client let in after departure {i + 1}")
        errors = other_lines(proxy, "Too many open files")
        notices = other_lines(proxy, "accepting again")
        report("fd trickle", departures=steps, error_lines=len(errors), notice_lines=len(notices),
               still_waiting=sum(c.state == "waiting" for c in clients))
        assert (len(errors), len(notices)) == (1, 0), \
            f"{steps} sessions ended one at a time while clients waited: {len(errors)} error lines, " \
            f"{len(notices)} notices for one episode:\n" + "\n".join(other_lines(proxy, "ccept"))
    finally:
        for c in clients:
            rst_close(c.sock)


def gated_framed_echo(go: threading.Event):
    """Read nothing until GO; then read a 4-byte length and that many bytes,
    echoing them as they come, and close."""
    def handler(conn, rec, backend):
        while not go.wait(0.1):
            if backend.stopping.is_set():
                return
        got = b""
        while len(got) < 4:
            data = conn.recv(4 - len(got))
            if not data:
                rec.end = "eof"
                return
            got += data
        left = struct.unpack(">I", got)[0]
        conn.sendall(got)
        while left:
            data = conn.recv(min(262144, left))
            if not data:
                rec.end = "eof"
                return
            rec.feed(data)
            conn.sendall(data)
            left -= len(data)
    return handler


def push(client: TaggedClient, view: memoryview) -> memoryview:
    """Send what the kernel takes now; the rest."""
    try:
        while view:
            view = view[client.sock.send(view[:262144]):]
    except BlockingIOError:
        pass
    return view


@pytest.mark.drill
def test_drill_splice_pipe_out_of_fds(backend, proxyd):
    """Splice, ulimit_n leaving room for K = 3 sessions that each hold a
    pipe (their server reads nothing yet, so the bytes wait in the pipe:
    2 socket fds + 2 pipe fds each) and 2 fds more.  A 4th client is then
    accepted and connected, but its bytes need a pipe and no fd is left
    for one; 2 more clients come after it.  Once the server reads, every
    client, the 4th and the 2 after it included, must get its own bytes
    back whole: a missing pipe is a resource to wait for (or to do
    without, by copying), not a reason to drop a client's bytes."""
    go = threading.Event()
    server = backend(gated_framed_echo(go))
    # A server that reads nothing shows a small window: the proxy's bytes
    # pile up in its pipes, not in socket buffers.
    server.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    probe = proxyd(tcp_config(free_port(), [server], workers=1, global_={"ulimit_n": 64}))
    own_fds = probe.workers()[0].num_fds()
    probe.stop()
    k = 3
    limit = own_fds + 4 * k + 2
    port = free_port()
    proxy = proxyd(tcp_config(port, [server], workers=1, global_={"ulimit_n": limit},
                              frontend={"timeout_client": "60s"}))
    worker = proxy.workers()[0]
    assert worker.num_fds() == own_fds, (worker.num_fds(), own_fds)
    pipes_idle = worker_fds_of(worker, "pipe")

    size = 8 << 20
    clients, rest = [], {}
    try:
        for i in range(k):
            body = payload(size, seed=i)
            c = TaggedClient(port, struct.pack(">I", size) + body, send=False)
            clients.append(c)
            rest[c] = memoryview(c.tag)

            def holds_pipe():
                rest[c] = push(c, rest[c])
                return worker_fds_of(worker, "pipe") - pipes_idle >= 2 * (i + 1)

            wait_for(holds_pipe, 20, f"session {i} to hold a pipe")
        report("pipes held", sessions=k, worker_fds=f"{worker.num_fds()}/{limit}")
        for i in range(k, k + 3):
            c = TaggedClient(port, struct.pack(">I", 1000) + payload(1000, seed=i), send=False)
            clients.append(c)
            rest[c] = push(c, memoryview(c.tag))
        # The worker takes the 4th client and connects it; its bytes wait
        # for a pipe.  Then (client states settled) the server reads.
        wait_for(lambda: len(server.connections()) >= k + 1, 10, "the 4th client's server connection")
        poll_all(clients[k:], settle=0.5, timeout=5)
        go.set()
        lost = exchange({c: rest[c] for c in clients})
        access = {a.client: a.raw for a in proxy.access_lines()}
        report("pipes", clients=len(clients), lost=len(lost))
        assert not lost, f"{len(lost)} of {len(clients)} clients did not get their bytes back " \
                         f"(bytes got, end): {lost}; their access lines: " \
                         f"{[access.get(c.address) for c in clients if not c.echoed]}"
    finally:
        for c in clients:
            rst_close(c.sock)


# ------------------------------------------------------------ source ports

PORTS = (40000, 40031)        # 32 ephemeral ports in the drill's namespace
HELD = 48                     # concurrent sessions: more than the ports
AFTER = 100                   # sequential sessions after: 3 times the ports


def ns_backend(netns, make, *args, **kw):
    """A backend (fixture factory MAKE) listening inside NETNS, on a port
    outside the narrowed range (made before the range is narrowed)."""
    for _ in range(10):
        with netns.inside():
            b = make(*args, **kw)
        if not PORTS[0] <= b.port <= PORTS[1]:
            return b
    raise AssertionError("no backend port outside the drill's range in 10 tries")


def test_drill_source_ports_tcp(netns, ns_proxyd, backend):
    """In a namespace whose ip_local_port_range holds 32 ports, 48 TCP
    sessions at once through one worker towards one server: those that get
    a source port are relayed (their bytes echoed whole), the others are
    closed at once with term RC err=EADDRNOTAVAIL; the worker does not
    spin while the ports are all held (CPU beside idle).  The clients then
    reset: every server socket is reset (no TIME_WAIT), so the ports are
    back at once, and 100 sequential sessions (3 times the ports) all
    succeed."""
    echo = ns_backend(netns, backend, echo_handler)
    narrow_ports(netns, *PORTS)
    port = 8000
    proxy = ns_proxyd(tcp_config(port, [echo], workers=1), port)
    worker = proxy.workers()[0]
    idle_cpu = cpu_over(worker, STARVED_SECONDS)
    sources = SourcePorts()

    clients = [NsTaggedClient(netns, port, sources.take(), b"held %03d " % i + payload(300, seed=i))
               for i in range(HELD)]
    try:
        counts = poll_all(clients)
        served = [c for c in clients if c.state == "served"]
        closed = [c for c in clients if c.state == "closed"]
        assert counts["waiting"] == 0, f"clients neither served nor closed: {counts}"
        assert closed, f"all {HELD} sessions got a source port out of {PORTS}: {counts}"
        assert 16 <= len(served) <= PORTS[1] - PORTS[0] + 1, counts
        towards = netns.states_towards(echo.port)
        starved_cpu = cpu_over(worker, STARVED_SECONDS)
        report("source ports tcp held", ports=PORTS[1] - PORTS[0] + 1, sessions=HELD, **counts,
               sockets_towards_server=len(towards), starved_cpu_s=f"{starved_cpu:.3f}",
               idle_cpu_s=f"{idle_cpu:.3f}")
        assert starved_cpu < BUSY_LOOP_CPU, f"{starved_cpu:.2f} s of CPU in {STARVED_SECONDS} s: a busy loop"
        lines = {a.client: a for a in proxy.wait_access_lines(len(closed))}
        for c in closed:
            a = lines.get(c.address)
            assert a is not None and (a.term, a.err) == ("RC", "EADDRNOTAVAIL"), \
                f"closed client {c.address}: {a.raw if a else 'no access line'}"
            assert not c.got
    finally:
        for c in clients:
            rst_close(c.sock)

    # The resource comes back: every server socket reset, none in TIME_WAIT.
    wait_for(lambda: not netns.states_towards(echo.port), 10, "no socket left towards the server")
    assert not netns.ss("-tan", "state", "time-wait"), netns.ss("-tan", "state", "time-wait")
    failures = []
    for i in range(AFTER):
        c = NsTaggedClient(netns, port, sources.take(), b"after %03d " % i + payload(100, seed=i))
        try:
            wait_for(lambda: (c.poll(), c.state != "waiting")[1], 10, f"session {i} after")
            if c.state != "served":
                failures.append(i)
        finally:
            rst_close(c.sock)
    tw = netns.ss("-tan", "state", "time-wait", f"( dport = :{echo.port} )")
    report("source ports tcp after", sequential_sessions=AFTER, failed=len(failures),
           time_wait_towards_server=len(tw))
    assert not failures, f"{len(failures)} of {AFTER} sessions failed once the ports were back: {failures[:10]}"
    assert not tw, tw


def gated_reply(gate: threading.Event):
    def reply(req):
        gate.wait(30)  # held until the test opens the gate: its source port stays taken
        return Reply(body=req.target.encode())
    return reply


def test_drill_source_ports_http(netns, ns_proxyd, http_backend):
    """The same namespace and 32 ports, in HTTP mode: 48 requests at once
    whose server answers only when the test lets it.  Those that got a
    source port are answered 200 with their own body once it does; the
    others at once with proxyd's own 503.  No busy loop while the ports
    are held.  Each server connection is reset after its response, so the
    ports are back at once: 100 sequential requests after all get 200."""
    gate = threading.Event()
    server = ns_backend(netns, http_backend, gated_reply(gate))
    narrow_ports(netns, *PORTS)
    port = 8000
    proxy = ns_proxyd(http_config(port, {"app": [server]}, workers=1), port)
    worker = proxy.workers()[0]
    idle_cpu = cpu_over(worker, STARVED_SECONDS)
    sources = SourcePorts()

    def one(i: int):
        with NsHTTPClient(netns, port, sources.take()) as client:
            return client.request(build_request("GET", f"/held/{i}"))

    try:
        with ThreadPoolExecutor(HELD) as pool:
            futures = [pool.submit(one, i) for i in range(HELD)]
            wait_for(lambda: sum(f.done() for f in futures) + len(server.conns()) >= HELD, 20,
                     "every request answered 503 or held by the server")
            rejected = [f.result() for f in futures if f.done()]
            held = len(server.conns())
            starved_cpu = cpu_over(worker, STARVED_SECONDS)
            report("source ports http held", ports=PORTS[1] - PORTS[0] + 1, requests=HELD,
                   held_by_server=held, answered_503=len(rejected), starved_cpu_s=f"{starved_cpu:.3f}",
                   idle_cpu_s=f"{idle_cpu:.3f}")
            assert rejected, f"all {HELD} requests got a source port out of {PORTS}"
            for resp in rejected:
                assert_own_error(resp, 503)
            assert starved_cpu < BUSY_LOOP_CPU, f"{starved_cpu:.2f} s of CPU in {STARVED_SECONDS} s: a busy loop"
            gate.set()
            results = [f.result(timeout=30) for f in futures]
    finally:
        gate.set()
    ok = [(i, r) for i, r in enumerate(results) if r.status == 200]
    assert len(ok) == held and len(ok) + len(rejected) == HELD, \
        f"{len(ok)} answered 200, {len(rejected)} 503, {held} held by the server"
    for i, r in ok:
        assert r.body == f"/held/{i}".encode(), (i, r.body[:80])
    lines = wait_http_lines(proxy, HELD)
    assert sorted(a.status for a in lines) == sorted(r.status for r in results), [a.raw for a in lines][:5]
    assert {(a.term[:2], a.err) for a in lines if a.status == 503} == {("RC", "EADDRNOTAVAIL")}, \
        [a.raw for a in lines if a.status == 503][:3]

    wait_for(lambda: not netns.states_towards(server.port), 10, "no socket left towards the server")
    statuses = []
    for i in range(AFTER):
        with NsHTTPClient(netns, port, sources.take()) as client:
            statuses.append(client.request(build_request("GET", f"/after/{i}")).status)
    tw = netns.ss("-tan", "state", "time-wait", f"( dport = :{server.port} )")
    report("source ports http after", sequential_requests=AFTER, not_200=sum(s != 200 for s in statuses),
           time_wait_towards_server=len(tw))
    assert statuses == [200] * AFTER, statuses
    assert not tw, tw


def wait_http_lines(proxy, count: int, timeout: float = 15.0):
    lines = []

    def enough():
        nonlocal lines
        lines = http_access_lines(proxy)
        return len(lines) >= count

    wait_for(enough, timeout, f"{count} http access lines")
    return lines




def test_drill_source_ports_episode_line(netns, ns_proxyd, backend):
    """8 ephemeral ports, 12 TCP sessions held at once, then all reset and
    8 more: the episode of the 4 that found no source port is one error
    line in the log (besides their access lines), with one line when
    connects work again, as for fds."""
    echo = ns_backend(netns, backend, echo_handler)
    narrow_ports(netns, 40000, 40007)
    port = 8000
    proxy = ns_proxyd(tcp_config(port, [echo], workers=1), port)
    sources = SourcePorts()
    clients = [NsTaggedClient(netns, port, sources.take(), b"held %03d " % i) for i in range(12)]
    try:
        counts = poll_all(clients)
        assert counts["closed"] and not counts["waiting"], counts
    finally:
        for c in clients:
            rst_close(c.sock)
    wait_for(lambda: not netns.states_towards(echo.port), 10, "no socket left towards the server")
    after = [NsTaggedClient(netns, port, sources.take(), b"after %03d " % i) for i in range(8)]
    try:
        assert poll_all(after)["served"] == 8
    finally:
        for c in after:
            rst_close(c.sock)
    errors = [line for line in proxy.log_lines() if parse_access_line(line) is None
              and ("EADDRNOTAVAIL" in line or "Cannot assign requested address" in line)]
    assert len(errors) == 1, f"{len(errors)} episode lines for one episode of {counts['closed']} failed " \
                             f"connects: {errors[:3]}; log:\n{proxy.log_tail(20)}"
    assert any("again" in line for line in proxy.log_lines()[proxy.log_lines().index(errors[0]):]
               if parse_access_line(line) is None), "no line when connects work again"


# ----------------------------------------------------------- black hole

def framed_echo_close(conn, rec, backend) -> None:
    """Read a 4-byte length and that many bytes, echo them, close first."""
    got = b""
    while len(got) < 4:
        data = conn.recv(4 - len(got))
        if not data:
            rec.end = "eof"
            return
        got += data
    left = struct.unpack(">I", got)[0]
    conn.sendall(got)
    while left:
        data = conn.recv(min(262144, left))
        if not data:
            rec.end = "eof"
            return
        rec.feed(data)
        conn.sendall(data)
        left -= len(data)


def ns_tagged_session(netns: Netns, port: int, tag: bytes, timeout: float = 30.0) -> tuple:
    """One TCP session from inside NETNS: send TAG framed, read to the end:
    (ok, bytes got, end, seconds)."""
    started = time.monotonic()
    sock = netns.connect((LOCALHOST, port), timeout)
    try:
        sock.sendall(struct.pack(">I", len(tag)) + tag)
        got, end = bytearray(), "eof"
        try:
            while True:
                data = sock.recv(262144)
                if not data:
                    break
                got += data
        except ConnectionResetError:
            end = "reset"
        except socket.timeout:
            end = "timeout"
    finally:
        sock.close()
    return bytes(got) == struct.pack(">I", len(tag)) + tag, len(got), end, time.monotonic() - started


def ns_get(netns: Netns, port: int, target: str, timeout: float = 30.0):
    started = time.monotonic()
    with NsHTTPClient(netns, port, timeout=timeout) as client:
        resp = client.request(build_request("GET", target))
    return resp, time.monotonic() - started


def test_drill_black_hole(netns, ns_proxyd, backend, http_backend):
    """In a namespace, nft drops every packet towards some servers' ports:
    their SYNs go unanswered.  One worker; TCP and HTTP frontends each on a
    backend [black hole, good] (timeout_connect 500ms, retries 1, round
    robin) and on one with only black holes (timeout_connect 2s, retries 1).

    - [hole, good]: every session and request is served, those first sent
      to the hole after its timeout_connect, on the good server (Tc >= 0.5 s);
    - holes only: each TCP session is closed with term sC and each request
      answered with proxyd's own 503, within a generous bound of the two
      attempts' 4 s; the worker does not spin while they wait (CPU beside
      idle); no socket is left towards the holes;
    - the rule removed: the former holes serve at once, the retry backend
      without any connect wait."""
    if shutil.which("nft") is None:
        pytest.skip("nft (nftables) is not installed")
    tcp_good = ns_backend(netns, backend, framed_echo_close, name="tcp-good")
    tcp_holes = [ns_backend(netns, backend, framed_echo_close, name=f"tcp-hole{i}") for i in (1, 2)]
    http_good = ns_backend(netns, http_backend, name="http-good")
    http_holes = [ns_backend(netns, http_backend, name=f"http-hole{i}") for i in (1, 2)]
    holes = tcp_holes + http_holes
    ports = {"tcp_retry": 8001, "tcp_none": 8002, "http_retry": 8003, "http_none": 8004}
    retry = {"balance": "roundrobin", "timeout_connect": "500ms", "retries": 1}
    none = {"balance": "roundrobin", "timeout_connect": "2s", "retries": 1}

    def servers(*bs):
        return [{"name": b.name, "address": b.address} for b in bs]

    config = {
        "global": {"workers": 1},
        "frontends": {
            name: {"bind": [f"{LOCALHOST}:{p}"], "backend": name,
                   **({"mode": "http"} if name.startswith("http") else {})}
            for name, p in ports.items()},
        "backends": {
            "tcp_retry": {"servers": servers(tcp_holes[0], tcp_good), **retry},
            "tcp_none": {"servers": servers(*tcp_holes), **none},
            "http_retry": {"servers": servers(http_holes[0], http_good), **retry},
            "http_none": {"servers": servers(*http_holes), **none},
        },
    }
    proxy = ns_proxyd(config, ports["tcp_retry"])
    worker = proxy.workers()[0]
    idle_cpu = cpu_over(worker, STARVED_SECONDS)
    hole_ports = ", ".join(str(b.port) for b in holes)
    netns.nft(f"""table inet drill {{
        chain out {{ type filter hook output priority 0; ip daddr 127.0.0.1 tcp dport {{ {hole_ports} }} drop; }}
    }}""")

    # [hole, good]: every session served, some after a connect timeout.
    n = 20
    with ThreadPoolExecutor(2 * n) as pool:
        tcp = [pool.submit(ns_tagged_session, netns, ports["tcp_retry"], b"retry %02d " % i + payload(5000, seed=i))
               for i in range(n)]
        http = [pool.submit(ns_get, netns, ports["http_retry"], f"/retry/{i}") for i in range(n)]
        tcp = [f.result(timeout=60) for f in tcp]
        http = [f.result(timeout=60) for f in http]
    assert all(ok for ok, *_ in tcp), [t for t in tcp if not t[0]][:5]
    assert [r.status for r, _ in http] == [200] * n, [(r.status, r.head[:60]) for r, _ in http]
    assert [r.json()["target"] for r, _ in http] == [f"/retry/{i}" for i in range(n)]
    tcp_lines = [a for a in proxy.wait_access_lines(n) if a.frontend == "tcp_retry"]
    http_lines = wait_http_lines(proxy, n)
    assert {a.server for a in tcp_lines} == {"tcp-good"}, {a.server for a in tcp_lines}
    assert {a.server for a in http_lines} == {"http-good"}, {a.server for a in http_lines}
    tcp_retried = sum(a.Tc >= 450 for a in tcp_lines)
    http_retried = sum(a.Tc >= 450 for a in http_lines)
    assert tcp_retried and http_retried, ([a.Tc for a in tcp_lines], [a.Tc for a in http_lines])
    report("black hole retry", tcp_sessions=n, tcp_retried=tcp_retried, http_requests=n,
           http_retried=http_retried, slowest_tcp_s=f"{max(t[3] for t in tcp):.2f}",
           slowest_http_s=f"{max(t for _, t in http):.2f}")

    # Holes only: clean ends within a bound, no busy loop while waiting.
    m = 10
    with ThreadPoolExecutor(2 * m) as pool:
        tcp = [pool.submit(ns_tagged_session, netns, ports["tcp_none"], b"none %02d" % i) for i in range(m)]
        http = [pool.submit(ns_get, netns, ports["http_none"], f"/none/{i}") for i in range(m)]
        wait_for(lambda: len(netns.ss("-tan", "state", "syn-sent")) >= 2 * m, 10,
                 f"{2 * m} connects towards the holes")
        waiting_cpu = cpu_over(worker, STARVED_SECONDS,
                               holds=lambda: not any(f.done() for f in tcp + http))
        tcp = [f.result(timeout=60) for f in tcp]
        http = [f.result(timeout=60) for f in http]
    report("black hole none left", tcp_sessions=m, http_requests=m, waiting_cpu_s=f"{waiting_cpu:.3f}",
           idle_cpu_s=f"{idle_cpu:.3f}", tcp_ends=sorted({t[2] for t in tcp}),
           slowest_tcp_s=f"{max(t[3] for t in tcp):.2f}", slowest_http_s=f"{max(t for _, t in http):.2f}")
    assert waiting_cpu < BUSY_LOOP_CPU, f"{waiting_cpu:.2f} s of CPU in {STARVED_SECONDS} s: a busy loop"
    for ok, got, end, took in tcp:
        assert (got, end) in ((0, "eof"), (0, "reset")) and 3.5 <= took < 12, (ok, got, end, took)
    for resp, took in http:
        assert_own_error(resp, 503)
        assert 3.5 <= took < 12, took
    lines = [a for a in proxy.wait_access_lines(n + m) if a.frontend == "tcp_none"]
    assert len(lines) == m and {a.term for a in lines} == {"sC"}, [a.raw for a in lines][:3]
    hlines = [a for a in wait_http_lines(proxy, n + m) if a.frontend == "http_none"]
    assert len(hlines) == m and {a.term[:2] for a in hlines} == {"sC"} and {a.status for a in hlines} == {503}, \
        [a.raw for a in hlines][:3]
    for b in holes:
        wait_for(lambda: not netns.states_towards(b.port), 10, f"no socket left towards {b.name}")
        assert not b.connections(), f"{b.name} got a connection through the black hole"

    # The rule removed: full service at once.
    netns.nft("delete table inet drill")
    before = len(proxy.access_lines())
    for i in range(6):
        ok, *rest = ns_tagged_session(netns, ports["tcp_none"], b"back %02d " % i + payload(3000, seed=i))
        assert ok, rest
        ok, *rest = ns_tagged_session(netns, ports["tcp_retry"], b"back %02d " % i + payload(3000, seed=i))
        assert ok, rest
        for name in ("http_none", "http_retry"):
            resp, _ = ns_get(netns, ports[name], f"/back/{i}")
            assert resp.status == 200 and resp.json()["target"] == f"/back/{i}", resp.head
    back = proxy.wait_access_lines(before + 12)[before:]
    assert max(a.Tc for a in back) < 450, [a.raw for a in back if a.Tc >= 450]
    assert {a.server for a in back} == {"tcp-hole1", "tcp-hole2", "tcp-good"}, {a.server for a in back}
    report("black hole back", sessions=12, requests=12, max_Tc_ms=max(a.Tc for a in back))


# ------------------------------------------------------------- slowloris

SLOW = 2000
ORDINARY = 50
HTTP_REQUEST_TIMEOUT = 3.0


def parse_raw_response(raw: bytes):
    """RAW (a whole response, as a client received it) through the strict
    client reader."""
    a, b = socket.socketpair()
    try:
        a.sendall(raw)
        a.close()
        reader = HTTPClient.__new__(HTTPClient)
        _Buffered.__init__(reader, b)
        reader.received = reader.sent = 0
        return reader.read_response()
    finally:
        b.close()


def ordinary_gets(port: int, count: int) -> list[tuple[float, float, int, bytes]]:
    """COUNT sequential GETs, each on a new connection: (start, end, status, body)."""
    out = []
    for i in range(count):
        started = time.monotonic()
        with HTTPClient(port, timeout=30) as client:
            resp = client.request(build_request("GET", f"/ordinary/{i}"))
        out.append((started, time.monotonic(), resp.status, resp.json()["target"].encode()
                    if resp.status == 200 else resp.body))
    return out


def test_drill_slowloris(http_backend, http_proxy):
    """One worker, timeout_http_request 3s; 2,000 connections each send one
    byte of a request head per second, never finishing it.  Each is
    answered proxyd's own 408 about 3 s after it was accepted (the
    timeout counts from accept, total, not from the last byte: at least
    3 s and well under 3 times that), and logged; meanwhile 50 ordinary
    GETs on the same worker all get their 200, their median latency
    printed beside the same figure without the attack."""
    server = http_backend()
    proxy = http_proxy([server], workers=1, frontend={"timeout_http_request": f"{HTTP_REQUEST_TIMEOUT:g}s"})
    worker = proxy.workers()[0]
    calm = ordinary_gets(proxy.port, ORDINARY)
    assert [s for _, _, s, _ in calm] == [200] * ORDINARY

    env = dict(os.environ, PYTHONPATH=str(REPO))
    attacker = subprocess.Popen(
        [sys.executable, "-m", "tests.drills", "slowloris", str(proxy.port), str(SLOW), "1.0", "20"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env, text=True)
    try:
        ready_line = attacker.stdout.readline()
        assert ready_line.startswith("ready "), (ready_line, attacker.stderr.read() if attacker.poll() else "")
        cpu_before, wall_before = drills.cpu_seconds(worker), time.monotonic()
        attack = ordinary_gets(proxy.port, ORDINARY)
        out, err = attacker.communicate(timeout=90)
        attack_cpu = drills.cpu_seconds(worker) - cpu_before
        attack_wall = time.monotonic() - wall_before
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.communicate(timeout=10)
    assert attacker.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    conns = result["conns"]

    # Every slow connection: proxyd's own 408, about timeout_http_request after accept.
    ends = {}
    for c in conns:
        ends[c["end"]] = ends.get(c["end"], 0) + 1
    assert ends.keys() <= {"eof", "reset"}, f"slow connections not closed by the proxy: {ends}"
    statuses = [c["status"] for c in conns]
    assert statuses == ["408"] * SLOW, {s: statuses.count(s) for s in set(statuses)}
    for c in conns[:: SLOW // 50]:
        assert_own_error(parse_raw_response(c["raw"].encode("latin-1")), 408)
    sent = [c["sent"] for c in conns]
    assert min(sent) >= 2, f"a slow connection sent {min(sent)} bytes: the drip did not run"
    lasted = [c["closed"] - c["connected"] for c in conns]
    # The worker's clock is read once per loop turn: 2,000 accepts in one
    # burst may start their timers a few hundred ms before the last of them
    # is really accepted, so the lower bound leaves half a second.
    assert min(lasted) >= HTTP_REQUEST_TIMEOUT - 0.5, f"a slow connection cut after {min(lasted):.2f} s"
    assert max(lasted) < 3 * HTTP_REQUEST_TIMEOUT, f"a slow connection answered after {max(lasted):.2f} s"

    # Every ordinary request served, during the attack.
    assert [s for _, _, s, _ in attack] == [200] * ORDINARY, [s for _, _, s, _ in attack]
    assert [b for *_, b in attack] == [f"/ordinary/{i}".encode() for i in range(ORDINARY)]
    under_attack = [sum(c["connected"] <= end < c["closed"] for c in conns) for _, end, _, _ in attack]
    calm_ms = [1000 * (e - s) for s, e, _, _ in calm]
    attack_ms = [1000 * (e - s) for s, e, _, _ in attack]
    report("slowloris", port=proxy.port, slow_connections=SLOW, ramp_s=f"{result['ready'] - result['started']:.2f}",
           answered_408=statuses.count("408"), head_bytes_sent=f"{min(sent)}..{max(sent)}", lasted_s=f"{min(lasted):.2f}..{max(lasted):.2f}",
           median_lasted_s=f"{median(lasted):.2f}",
           ordinary_median_ms=f"{median(attack_ms):.1f} (calm {median(calm_ms):.1f})",
           ordinary_p90_ms=f"{percentile(attack_ms, 90):.1f} (calm {percentile(calm_ms, 90):.1f})",
           slow_open_during_ordinary=f"{min(under_attack)}..{max(under_attack)}",
           worker_cpu_during_attack_s=f"{attack_cpu:.2f} over {attack_wall:.1f} s")
    assert min(under_attack) >= SLOW // 2, \
        f"ordinary requests did not all run during the attack: slow connections open {under_attack}"
    lines = wait_http_lines(proxy, SLOW + 2 * ORDINARY, timeout=30)
    timeouts = [a for a in lines if a.status == 408]
    assert len(timeouts) == SLOW and {a.term[:2] for a in timeouts} == {"cR"}, \
        (len(timeouts), {a.term for a in timeouts})
