"""HTTP sessions that end abnormally give back every fd they held: a client
reset mid-download or mid-upload, timeout_client mid-body, a server reset
mid-response.  Measured as the worker's open fds once every session is
over: a batch of such sessions, then the same batch again, and the count
after the second equals the count after the first (the pipe pool keeps
idle pipes, so the first batch, after a warm-up of the same kinds, sets the
level; a leak of 2 fds per aborted session shows as hundreds more).
"""

from __future__ import annotations

import pytest

from tests import tagged
from tests.http_support import http_access_lines, http_config
from tests.support import free_port, wait_for
from tests.tagged import DOWN, describe, fd_kinds, http_head, settle

KiB, MiB = 1 << 10, 1 << 20
BIG = 64 * MiB
BATCH = 50          # sessions of each sequential kind per batch
TIMEOUTS = 20       # timeout_client sessions per batch (concurrent: each waits 300 ms)


def worker_fds(proxy) -> int:
    return sum(w.num_fds() for w in proxy.workers())


class Sessions:
    """The abnormal endings, each run to its end (its access line logged)."""

    def __init__(self, proxy, backend):
        self.proxy, self.backend = proxy, backend
        self.sid = 0x50000000
        self.lines = 0
        self.problems: list[str] = []

    def _next(self) -> int:
        self.sid += 1
        return self.sid

    def _logged(self, n: int = 1) -> None:
        self.lines += n
        wait_for(lambda: len(http_access_lines(self.proxy)) + len(self.proxy.access_lines()) >= self.lines, 10,
                 f"{self.lines} access lines",
                 interval=0.002)

    def client_reset_download(self) -> None:
        sid = self._next()
        client = tagged.connect(self.proxy.port, rcvbuf=64 * KiB)
        try:
            client.sendall(http_head(sid, down=BIG))
            data = client.recv(65536)
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
        finally:
            tagged.reset(client)
        self._logged()

    def client_reset_upload(self) -> None:
        sid = self._next()
        client = tagged.connect(self.proxy.port)
        try:
            client.sendall(http_head(sid, up=BIG))
            tagged.send_stream(client, sid, tagged.UP, 0, 512 * KiB)
        finally:
            tagged.reset(client)
        self._logged()

    def server_reset_download(self) -> None:
        sid = self._next()
        with tagged.connect(self.proxy.port) as client:
            client.sendall(http_head(sid, down=BIG, act="reset_download", after=512 * KiB))
            data, end = tagged.recv_upto(client, BIG)
        body = data.partition(b"\r\n\r\n")[2]
        problem = describe(body, sid, DOWN, "client side")
        if problem:
            self.problems.append(problem)
        self._logged()

    def client_timeouts(self, n: int) -> None:
        """N clients at once that stop mid-body (half stop reading a
        download, half stop sending an upload) until a timeout ends them
        (timeout_client, or timeout_server for an upload whose request head
        has gone: both are 300 ms here)."""
        clients = []
        try:
            for i in range(n):
                sid = self._next()
                c = tagged.connect(self.proxy.port, rcvbuf=64 * KiB)
                clients.append(c)
                if i % 2:
                    c.sendall(http_head(sid, up=BIG))
                    tagged.send_stream(c, sid, tagged.UP, 0, 100 * KiB)
                else:
                    c.sendall(http_head(sid, down=BIG))
            self._logged(n)
        finally:
            for c in clients:
                tagged.reset(c)

    def batch(self, sequential: int, timeouts: int) -> None:
        self.client_timeouts(timeouts)
        for _ in range(sequential):
            self.client_reset_download()
            self.client_reset_upload()
            self.server_reset_download()


@pytest.mark.parametrize("splice", [pytest.param(True, id="splice"), pytest.param(False, id="copy")])
def test_aborted_http_sessions_leak_no_fds(splice, tagged_backend, proxyd):
    server = tagged_backend(http=True)
    proxy = proxyd(http_config(free_port(), {"app": [server]}, workers=1,
                               global_={"splice": splice}, defaults={"timeout_client": "300ms", "timeout_server": "300ms"}))
    sessions = Sessions(proxy, server)

    sessions.batch(sequential=3, timeouts=4)           # warm-up: the pool finds its level
    settle(proxy, server)
    sessions.batch(sequential=BATCH, timeouts=TIMEOUTS)
    settle(proxy, server)
    first, first_kinds = worker_fds(proxy), fd_kinds(proxy)
    sessions.batch(sequential=BATCH, timeouts=TIMEOUTS)
    settle(proxy, server)

    aborted = 3 * BATCH + TIMEOUTS
    try:
        wait_for(lambda: worker_fds(proxy) == first, 5, "the worker's fd count to come back")
    except AssertionError:
        second = worker_fds(proxy)
        raise AssertionError(
            f"worker fds after {aborted} aborted sessions: {first}, after {aborted} more: {second} "
            f"(+{second - first}); by kind {first_kinds} -> {fd_kinds(proxy)}") from None
    assert not sessions.problems, sessions.problems
    assert "Traceback" not in proxy.log_text()
