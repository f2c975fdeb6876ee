"""A bounded concurrent load of tagged sessions, many of them ending
abnormally (clients resetting downloads and uploads, servers resetting
mid-upload and mid-answer), beside short tagged exchanges: TCP and HTTP, one
and two workers, splice and copy.

Every byte is checked (tests/tagged.py): zero foreign bytes on either side.
Afterwards every worker fd but the pool's idle pipes is back to its count
before the load, and the idle pipes are bounded by what the load had in use
at once (2 pumps per concurrent session): a leak of a pipe per aborted
session, hundreds here, does not fit in that.  No Traceback in the log.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests import tagged
from tests.http_support import HTTPClient, http_config
from tests.support import free_port, tcp_config, wait_for
from tests.tagged import (DOWN, RECORD, UP, Plan, TaggedBackend, check_stream, describe, fd_kinds, http_head,
                          http_request, settle, stream)

KiB, MiB = 1 << 10, 1 << 20
BIG = 64 * MiB
DURATION = 2.5                 # seconds of load (each thread stops at its next session after it)
MAX_SESSIONS = 400             # per thread, whatever the time
SHORT_THREADS, ABORT_THREADS = 4, 3
THREADS = SHORT_THREADS + ABORT_THREADS


class Load:
    def __init__(self, mode: str, proxy, backend: TaggedBackend, seed: int):
        self.mode, self.proxy, self.backend, self.seed = mode, proxy, backend, seed
        self.lock = threading.Lock()
        self.next_sid = (seed & 0xFF) << 24
        self.problems: list[str] = []
        self.counts: dict = {}
        self.foreign = 0   # bytes of other sessions' records received by clients

    def sid(self) -> int:
        with self.lock:
            self.next_sid += 1
            return self.next_sid

    def note(self, kind: str, problem: str = "") -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if problem:
                self.problems.append(f"{kind}: {problem}")

    def check(self, kind: str, data: bytes, sid: int, expect: int | None = None, end: str = "") -> None:
        problem = describe(data, sid, DOWN, "client side")
        if problem:
            with self.lock:
                self.foreign += check_stream(data, sid, DOWN).foreign_bytes
        if not problem and expect is not None and len(data) != expect:
            problem = f"session {sid:08x}: client got {len(data)} of {expect} B, then {end}"
        self.note(kind, problem)

    # ------------------------------------------------------------ TCP kinds
    def tcp_short(self, rng) -> None:
        sid, request, answer = self.sid(), rng.randrange(1, 4096) * RECORD // 8 + RECORD, rng.randrange(64, 300 * KiB)
        self.backend.plan(sid, Plan(request=request, answer=answer))
        with tagged.connect(self.proxy.port) as c:
            c.sendall(stream(sid, UP, 0, request))
            data, end = tagged.recv_upto(c, answer + MiB)
        self.check("short", data, sid, answer, end)

    def tcp_client_reset_download(self, rng) -> None:
        sid = self.sid()
        self.backend.plan(sid, Plan(request=RECORD, answer=BIG))
        c = tagged.connect(self.proxy.port, rcvbuf=64 * KiB)
        try:
            c.sendall(stream(sid, UP, 0, RECORD))
            data = tagged.recv_upto(c, rng.randrange(1, 256 * KiB))[0]
        finally:
            tagged.reset(c)
        self.check("client reset mid-download", data, sid)

    def tcp_client_reset_upload(self, rng) -> None:
        sid = self.sid()
        self.backend.plan(sid, Plan(request=BIG, answer=RECORD))
        c = tagged.connect(self.proxy.port)
        try:
            tagged.send_stream(c, sid, UP, 0, rng.randrange(RECORD, 2 * MiB))
        finally:
            tagged.reset(c)
        self.note("client reset mid-upload")

    def tcp_server_reset_upload(self, rng) -> None:
        sid = self.sid()
        self.backend.plan(sid, Plan(reset_after=rng.randrange(RECORD, 1 * MiB)))
        with tagged.connect(self.proxy.port) as c:
            try:
                tagged.send_stream(c, sid, UP, 0, rng.randrange(2 * MiB, 8 * MiB))
                data, end = tagged.recv_upto(c, MiB)
            except OSError:
                data = b""
        self.check("server reset mid-upload", data, sid)

    def tcp_server_reset_download(self, rng) -> None:
        sid = self.sid()
        self.backend.plan(sid, Plan(request=RECORD, reset_mid_answer=rng.randrange(RECORD, 2 * MiB)))
        with tagged.connect(self.proxy.port) as c:
            c.sendall(stream(sid, UP, 0, RECORD))
            data = tagged.recv_upto(c, BIG)[0]
        self.check("server reset mid-answer", data, sid)

    # ----------------------------------------------------------- HTTP kinds
    def http_short(self, rng) -> None:
        with HTTPClient(self.proxy.port) as client:
            n = rng.randrange(1, 6)
            for i in range(n):
                sid, up, down = self.sid(), rng.choice([0, rng.randrange(1, 300 * KiB)]), rng.randrange(64, 300 * KiB)
                client.send(http_request(sid, up, down, keep_alive=i < n - 1))
                resp = client.read_response()
                if resp.status != 200:
                    self.note("short", f"session {sid:08x}: status {resp.status}")
                    return
                self.check("short", resp.body, sid, down)

    def _http_body_after_head(self, c, limit: int) -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf and len(buf) < 65536:
            data = c.recv(65536)
            if not data:
                break
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        return body + (tagged.recv_upto(c, limit)[0] if limit > len(body) else b"")

    def http_client_reset_download(self, rng, upgrade: bool = False) -> None:
        sid = self.sid()
        c = tagged.connect(self.proxy.port, rcvbuf=64 * KiB)
        try:
            c.sendall(http_head(sid, down=BIG, act="upgrade" if upgrade else "respond",
                                headers=b"Connection: upgrade\r\nUpgrade: tagged\r\n" if upgrade else b""))
            data = self._http_body_after_head(c, rng.randrange(1, 256 * KiB))
        finally:
            tagged.reset(c)
        self.check("upgraded, client reset" if upgrade else "client reset mid-download", data, sid)

    def http_client_reset_upload(self, rng) -> None:
        sid = self.sid()
        c = tagged.connect(self.proxy.port)
        try:
            c.sendall(http_head(sid, up=BIG))
            tagged.send_stream(c, sid, UP, 0, rng.randrange(RECORD, 2 * MiB))
        finally:
            tagged.reset(c)
        self.note("client reset mid-upload")

    def http_server_reset_upload(self, rng) -> None:
        sid = self.sid()
        up = rng.randrange(MiB, 8 * MiB)
        with tagged.connect(self.proxy.port) as c:
            try:
                c.sendall(http_head(sid, up=up, act="reset_upload", after=rng.randrange(RECORD, MiB)))
                tagged.send_stream(c, sid, UP, 0, up)
                tagged.recv_upto(c, MiB)
            except OSError:
                pass
        self.note("server reset mid-upload")

    def http_server_reset_download(self, rng) -> None:
        sid = self.sid()
        with tagged.connect(self.proxy.port) as c:
            c.sendall(http_head(sid, down=BIG, act="reset_download", after=rng.randrange(RECORD, 2 * MiB)))
            data = self._http_body_after_head(c, BIG)
        self.check("server reset mid-answer", data, sid)

    # ------------------------------------------------------------ running
    def aborts(self):
        if self.mode == "tcp":
            return [self.tcp_client_reset_download, self.tcp_client_reset_upload,
                    self.tcp_server_reset_upload, self.tcp_server_reset_download]
        return [self.http_client_reset_download, self.http_client_reset_upload, self.http_server_reset_upload,
                self.http_server_reset_download, lambda rng: self.http_client_reset_download(rng, upgrade=True)]

    def short(self):
        return self.tcp_short if self.mode == "tcp" else self.http_short

    def thread(self, index: int, deadline: float, aborting: bool, sessions: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        for _ in range(sessions):
            if time.monotonic() >= deadline:
                return
            kind = rng.choice(self.aborts()) if aborting else self.short()
            try:
                kind(rng)
            except Exception as e:  # a hang (socket timeout) or a broken answer: reported
                self.note("error", f"thread {index}: {getattr(kind, '__name__', kind)}: {e!r}")

    def run(self, duration: float, sessions: int = MAX_SESSIONS) -> None:
        deadline = time.monotonic() + duration
        threads = [threading.Thread(target=self.thread, args=(i, deadline, i >= SHORT_THREADS, sessions),
                                    daemon=True) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 60)
        assert not any(t.is_alive() for t in threads), f"seed {self.seed}: load threads still running"


CASES = [(mode, workers, splice) for mode in ("tcp", "http") for workers in (1, 2) for splice in (True, False)]


@pytest.mark.parametrize("mode, workers, splice, seed", [
    pytest.param(*case, 1 + i, id=f"{case[0]}-{case[1]}w-{'splice' if case[2] else 'copy'}")
    for i, case in enumerate(CASES)])
def test_concurrent_aborts_leak_nothing(mode, workers, splice, seed, tagged_backend, proxyd):
    server = tagged_backend(http=mode == "http")
    port, glob = free_port(), {"splice": splice}
    proxy = proxyd(tcp_config(port, [server], workers=workers, global_=glob) if mode == "tcp"
                   else http_config(port, {"app": [server]}, workers=workers, global_=glob))
    load = Load(mode, proxy, server, seed)

    load.run(duration=60, sessions=2)  # warm-up: a few of each, so the pools exist
    settle(proxy, server)
    before = fd_kinds(proxy)
    load.run(DURATION)
    settle(proxy, server)
    server.wait_done(len(server.connections()), timeout=15)

    aborted = sum(n for k, n in load.counts.items() if k not in ("short", "error"))
    where = f"seed {seed}, {mode}, {workers} workers, {'splice' if splice else 'copy'}; sessions {load.counts}"
    failures = []
    problems = load.problems + server.problems()
    if problems:
        server_foreign = sum(check_stream(t.received, t.sid, UP).foreign_bytes for t in server.tags()
                             if t.sid is not None)
        failures.append(f"{len(problems)} problems, foreign bytes {load.foreign} at clients, {server_foreign} "
                        f"at servers:\n  " + "\n  ".join(problems[:20]))
    if aborted <= 4 * THREADS:
        failures.append(f"too few aborted sessions ({aborted}) to tell a leak from the pool")
    pool_bound = 2 * 2 * THREADS  # each concurrent session: at most 2 pumps, a pipe (2 fds) each

    def others(kinds):
        return {k: n for k, n in kinds.items() if k != "pipe"}

    def back(kinds):
        return others(kinds) == others(before) and kinds.get("pipe", 0) <= before.get("pipe", 0) + pool_bound

    try:  # a socket reset by both peers is gone from `ss` a moment before the worker closes it
        wait_for(lambda: back(fd_kinds(proxy)), 5, "the worker fds to come back")
    except AssertionError:
        pass  # reported below
    after = fd_kinds(proxy)
    if others(after) != others(before):
        failures.append(f"worker fds other than pipes changed: {before} before, {after} after")
    if after.get("pipe", 0) > before.get("pipe", 0) + pool_bound:
        failures.append(f"{after.get('pipe', 0) - before.get('pipe', 0)} more pipe fds after {aborted} aborted "
                        f"sessions (an idle pool holds at most {pool_bound} more): {before} -> {after}")
    if "Traceback" in proxy.log_text():
        failures.append("Traceback in the log")
    assert not failures, f"{where}:\n" + "\n".join(failures)
