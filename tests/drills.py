"""Helpers for the resource drills (tests/integration/test_drills.py):
network namespaces, a proxyd started inside one, the "no busy loop" CPU
figure, and a slowloris client that runs as its own process.

A namespace is created per test (a unique name, deleted at teardown) with
`ip netns`; proxyd runs inside it as `ip netns exec NAME python -m proxyd`
(`ip netns exec` execs the command, so the pid we hold is proxyd's
master), and the test's own sockets (backends, clients) are created inside
it by a thread that enters it with setns(2) for the moment of socket(): a
socket stays in the namespace it was created in, whichever thread uses it.

Same rules as tests/support.py: real processes, every wait a poll with a
deadline, every loop bounded, every process stopped by its pid.

`python -m tests.drills slowloris PORT COUNT ...` is the attacker of the
slowloris drill: one thread, `selectors`, COUNT connections each sending
one byte of an endless request head per second, reporting as JSON when
and how each one was answered.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.support import REPO, START_TIMEOUT, Proxyd

CLONE_NEWNET = 0x40000000
LINGER_RST = struct.pack("ii", 1, 0)
_libc = ctypes.CDLL(None, use_errno=True)
_names = itertools.count()


# ------------------------------------------------------------- CPU figure

def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU time PROC has used so far."""
    t = proc.cpu_times()
    return t.user + t.system


def cpu_over(proc: psutil.Process, seconds: float, holds=None, interval: float = 0.1) -> float:
    """CPU seconds PROC uses over the next SECONDS of wall time.  HOLDS, if
    given, must stay true throughout (checked every INTERVAL): the figure
    is about a state (starved, idle), so the state is checked, not assumed.
    This waits on purpose: it is a measurement window, not a wait for an
    event."""
    before = cpu_seconds(proc)
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / interval) + 2):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if holds is not None:
            assert holds(), "the measured state ended during the measurement window"
        time.sleep(min(interval, left))
    return cpu_seconds(proc) - before


def ctx_switches(proc: psutil.Process) -> int:
    """Voluntary context switches so far: each epoll_wait that sleeps is one,
    so over a window it counts the worker's wake-ups."""
    return proc.num_ctx_switches().voluntary


# ------------------------------------------------------------- namespaces

def netns_available() -> str | None:
    """None if this process can create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return None


class Netns:
    """A network namespace of its own, with lo up.  delete() removes it."""

    def __init__(self, tag: str = "drill"):
        self.name = f"pxd-{tag}-{os.getpid()}-{next(_names)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=30)
        self.path = Path("/var/run/netns") / self.name
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run CMD inside the namespace to completion."""
        out = subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in netns {self.name} failed ({out.returncode}): "
                                 f"{out.stderr.strip()}")
        return out

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def ss(self, *args: str) -> list[str]:
        out = self.run("ss", "-H", *args)
        return [line for line in out.stdout.splitlines() if line.strip()]

    def listen_count(self, port: int) -> int:
        return len(self.ss("-ltn", f"( sport = :{port} )"))

    def states_towards(self, port: int) -> list[str]:
        return [line.split()[0] for line in self.ss("-tan", f"( dport = :{port} )")]

    def nft(self, script: str) -> None:
        """Load an nft script (rules) inside the namespace."""
        out = subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=script,
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise AssertionError(f"nft in netns {self.name} failed: {out.stderr.strip()}\n{script}")

    @contextlib.contextmanager
    def inside(self):
        """The calling thread is in the namespace for the block: sockets it
        creates there belong to it (and stay so after the block)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns into {self.name}: {os.strerror(e)}")
            try:
                yield self
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:  # never leave a thread behind in it
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns back from {self.name}: {os.strerror(e)}")
        finally:
            os.close(target)
            os.close(own)

    def socket(self, *args) -> socket.socket:
        with self.inside():
            return socket.socket(*args)

    def connect(self, address: tuple, timeout: float = 10.0, source: tuple | None = None) -> socket.socket:
        """A TCP connection made from inside the namespace (optionally from
        SOURCE, e.g. a port outside a narrowed ip_local_port_range)."""
        with self.inside():
            s = socket.socket()
        try:
            if source is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(source)
            s.settimeout(timeout)
            s.connect(address)
        except BaseException:
            s.close()
            raise
        return s

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=30)


class NetnsProxyd(Proxyd):
    """support.Proxyd started inside NETNS (`ip netns exec NAME python -m proxyd`);
    readiness is asked of `ss` inside the namespace."""

    def __init__(self, netns: Netns, config_path, log_path, extra_args=()):
        super().__init__(config_path, log_path, extra_args)
        self.netns = netns

    def start(self) -> "NetnsProxyd":
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", self.netns.name,
                 sys.executable, "-m", "proxyd", "-c", str(self.config_path), *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO, env=env)
        # `ip netns exec` execs: this pid becomes proxyd's master.
        self.master = psutil.Process(self.popen.pid)
        return self

    def wait_ready(self, ports=(), workers: int = 2, timeout: float = START_TIMEOUT) -> "NetnsProxyd":
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise AssertionError(f"proxyd exited with {self.popen.returncode} during start-up; "
                                     f"log:\n{self.log_text()}")
            listening = all(self.netns.listen_count(p) >= 1 for p in ports)
            if listening and len(self.workers()) == workers:
                return self
            if time.monotonic() >= deadline:
                raise AssertionError(f"proxyd in {self.netns.name} not ready after {timeout}s: "
                                     f"listening={listening}, workers={len(self.workers())}/{workers}; "
                                     f"log:\n{self.log_text()}")
            time.sleep(0.05)


# -------------------------------------------------------------- statistics

def median(values) -> float:
    values = sorted(values)
    n = len(values)
    if not n:
        return float("nan")
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def percentile(values, p: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


# --------------------------------------------------------------- slowloris

SLOW_HEAD = b"GET /slow HTTP/1.1\r\nHost: slow.test\r\nX-Slow: " + b"a" * 4000


def slowloris(port: int, count: int, interval: float, limit: float, host: str = "127.0.0.1",
              out=sys.stdout) -> dict:
    """COUNT connections to HOST:PORT, each sending one byte of SLOW_HEAD every
    INTERVAL seconds (spread evenly), never completing it; each is read until
    the proxy closes it.  Ends when every connection is closed, or LIMIT
    seconds after the last one connected (those still open are reported as
    such).  Prints `ready <monotonic>` once all are connected, then returns
    per-connection results."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), hard), hard))

    sel = selectors.DefaultSelector()
    conns = []
    started = time.monotonic()
    for i in range(count):
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, f"connect {i}: {os.strerror(err)}")
        c = {"i": i, "sock": s, "connected": None, "sent": 0, "data": bytearray(), "end": None,
             "closed": None, "next": 0.0}
        conns.append(c)
        sel.register(s, selectors.EVENT_WRITE, c)
    # Wait for every connect (bounded), then start the one-byte-per-interval drip.
    pending = count
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            c = key.data
            err = c["sock"].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect {c['i']}: {os.strerror(err)}")
            c["connected"] = time.monotonic()
            sel.modify(c["sock"], selectors.EVENT_READ, c)
            pending -= 1
    if pending:
        raise AssertionError(f"{pending} of {count} slow connections not connected after 60 s")
    ready = time.monotonic()
    print(f"ready {ready:.6f}", file=out, flush=True)
    for c in conns:
        c["next"] = ready + interval * c["i"] / count   # spread the bytes over each interval
    open_ = count
    end_by = ready + limit
    drip = sorted(conns, key=lambda c: c["next"])
    while open_ and time.monotonic() < end_by:
        now = time.monotonic()
        # One byte for every connection whose turn it is.
        for c in drip:
            if c["next"] > now:
                break
            if c["end"] is None and c["sent"] < len(SLOW_HEAD):
                try:
                    c["sent"] += c["sock"].send(SLOW_HEAD[c["sent"]:c["sent"] + 1])
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    c["end"] = f"send:{errno.errorcode.get(e.errno, e.errno)}"
                    c["closed"] = now
                    sel.unregister(c["sock"])
                    c["sock"].close()
                    open_ -= 1
            c["next"] += interval
        drip.sort(key=lambda c: c["next"])
        wait = max(0.0, min(drip[0]["next"] - time.monotonic(), 0.05)) if drip else 0.05
        for key, _ in sel.select(wait):
            c = key.data
            try:
                data = c["sock"].recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                data, c["end"] = b"", "reset"
            if data:
                c["data"] += data
                continue
            c["end"] = c["end"] or "eof"
            c["closed"] = time.monotonic()
            sel.unregister(c["sock"])
            # A reset, not a FIN: it ends the proxy's TIME_WAIT for this
            # connection too (2,000 of them would outlive the test).
            c["sock"].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            c["sock"].close()
            open_ -= 1
    results = []
    for c in conns:
        if c["end"] is None:
            c["sock"].close()
        data = bytes(c["data"])
        results.append({
            "connected": c["connected"], "closed": c["closed"], "end": c["end"] or "open",
            "sent": c["sent"], "status": data[9:12].decode("latin-1") if data.startswith(b"HTTP/1.") else "",
            "raw": data[:2048].decode("latin-1")})
    return {"started": started, "ready": ready, "finished": time.monotonic(), "conns": results}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "slowloris":
        port, count = int(argv[1]), int(argv[2])
        interval = float(argv[3]) if len(argv) > 3 else 1.0
        limit = float(argv[4]) if len(argv) > 4 else 30.0
        result = slowloris(port, count, interval, limit)
        print(json.dumps(result), flush=True)
        return 0
    print("usage: python -m tests.drills slowloris PORT COUNT [INTERVAL [LIMIT]]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
