"""What the kernel shows: one SO_REUSEPORT listener per worker on a port, and
bytes moved with splice(2) (or not, with `splice = false`)."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess

import pytest

from tests.support import (connect, listen_count, payload, read_to_end, sha256, sink_handler,
                           source_handler, ss, wait_for)


@pytest.mark.parametrize("workers", [2, 3])
def test_one_reuseport_listener_per_worker(workers, backend, tcp_proxy):
    """Several LISTEN sockets on one address and port can only exist with
    SO_REUSEPORT on each of them."""
    sink = backend(sink_handler())
    proxy = tcp_proxy([sink], workers=workers)
    lines = ss("-ltn", f"( sport = :{proxy.port} )")
    assert len(lines) == workers, lines
    assert all(f"127.0.0.1:{proxy.port}" in line for line in lines), lines
    assert listen_count(proxy.port) == workers


# ------------------------------------------------------------------- splice

SPLICE_CALL = re.compile(r"splice\(.*\)\s+=\s+(-?\d+)")
SPLICE_RESUMED = re.compile(r"<\.\.\. splice resumed>.*=\s+(-?\d+)")


class Strace:
    """strace -f -e trace=splice attached to some pids, stopped by its pid."""

    def __init__(self, pids, out_path, err_path):
        self.out_path, self.err_path = out_path, err_path
        args = ["strace", "-f", "-e", "trace=splice", "-o", str(out_path)]
        for pid in pids:
            args += ["-p", str(pid)]
        with open(err_path, "wb") as err:
            self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.pids = list(pids)

    def wait_attached(self) -> None:
        def attached():
            text = self.err_path.read_text()
            if self.popen.poll() is not None:
                raise AssertionError(f"strace exited with {self.popen.returncode}: {text}")
            return all(f"Process {pid} attached" in text for pid in self.pids)
        wait_for(attached, 15, "strace to attach")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)  # strace detaches and exits
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def results(self) -> list[int]:
        """Return values of every splice call traced."""
        values = []
        for line in self.out_path.read_text().splitlines():
            m = SPLICE_CALL.search(line) or SPLICE_RESUMED.search(line)
            if m:
                values.append(int(m.group(1)))
        return values

    def calls(self) -> int:
        return sum(1 for line in self.out_path.read_text().splitlines() if "splice" in line)


@pytest.fixture
def strace(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    started = []

    def start(pids) -> Strace:
        n = len(started)
        s = Strace(pids, tmp_path / f"strace{n}.out", tmp_path / f"strace{n}.err")
        started.append(s)
        s.wait_attached()
        return s

    yield start
    for s in started:
        s.stop()


SIZE = 1024 * 1024


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_splice_on_tcp_path(use_splice, backend, tcp_proxy, strace):
    up = payload(SIZE, seed=11)
    down = payload(SIZE, seed=12)
    sink = backend(sink_handler(), name="sink")
    source = backend(source_handler(down), name="source")
    global_ = {} if use_splice else {"splice": False}
    to_sink = tcp_proxy([sink], global_=global_)
    from_source = tcp_proxy([source], global_=global_)
    tracer = strace(sorted(to_sink.worker_pids() | from_source.worker_pids()))

    with connect(to_sink.port) as client:
        client.sendall(up)
        client.shutdown(socket.SHUT_WR)
        rec = sink.wait_done(1, timeout=60)[0]
    with connect(from_source.port) as client:
        digest, count, _ = read_to_end(client)
    to_sink.wait_access_lines(1, timeout=30)
    from_source.wait_access_lines(1, timeout=30)
    tracer.stop()

    assert (rec.received, rec.sha256) == (SIZE, sha256(up))
    assert (count, digest) == (SIZE, sha256(down))
    values = tracer.results()
    if use_splice:
        moved = sum(v for v in values if v > 0)
        # each byte is spliced twice: socket -> pipe, pipe -> socket
        assert moved >= 2 * 2 * SIZE, f"{moved} bytes spliced for 2 x {SIZE} relayed ({len(values)} calls)"
    else:
        assert tracer.calls() == 0, f"{tracer.calls()} splice calls with splice = false"
