"""The stats listener's figures (/metrics, /stats) against real proxyd
processes and real traffic on 127.0.0.1.

Every figure is checked against what the test itself did and counted: the
sessions and requests its clients made, the bytes each side sent and
received (every payload tagged with its session and checked by hash),
what each server saw.  Counts are written when a session (tcp) or a
request (http) ends, so the tests poll the stats listener with a deadline
until the figures are the expected ones, and report the last scrape's
differences when they never get there.

/metrics is read with prometheus_client's parser (every scrape: each family
with HELP and TYPE, counters ending in _total, no duplicate series) and
checked by `promtool check metrics` where promtool is installed (.ci/run
installs Debian's prometheus package for it).
"""

# ruff: noqa: F811 (the fixtures imported from tests.control_fixtures are test arguments)
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil
import pytest

from tests.control_fixtures import admin_path, proxyd, servers  # noqa: F401 (fixtures)
from tests.support import (LOCALHOST, admin_command, connect, control_processes, free_port,
                           http_hello, listen_count, recv_all, run_sessions, ss, wait_for)

prometheus_parser = pytest.importorskip("prometheus_client.parser")

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROMTOOL = shutil.which("promtool")
# A TCP check every 100 ms; a timeout well over the interval, so that a
# loaded box never fails a check of a live server (a refused one fails at once).
CHECK = {"interval": "100ms", "timeout": "2s", "rise": 1, "fall": 1}
SERVER_STATES = ("UP", "DOWN", "MAINT", "DRAIN", "NOLB")
WAIT = 30.0   # the upper bound of every wait for figures (never an expectation of speed)


# ------------------------------------------------------------ the listener

class ScrapeLost(Exception):
    """The stats listener closed or reset the connection before a whole answer."""


def http_get(port: int, path: str = "/metrics", method: str = "GET", raw: bytes | None = None,
             timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request to the stats listener (RAW bytes as they are, if given):
    (status, headers with lower-case names, body).  The listener answers one
    request per connection and closes: the body is checked against its
    Content-Length (ScrapeLost if the answer is cut short)."""
    request = raw if raw is not None else f"{method} {path} HTTP/1.1\r\nHost: stats.test\r\n\r\n".encode()
    data = b""
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(262144):
                data += chunk
        except ConnectionResetError:
            raise ScrapeLost(f"{method} {path}: reset after {len(data)} bytes") from None
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ScrapeLost(f"{method} {path}: closed after {len(data)} bytes, no whole head: {data[:100]!r}")
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        assert colon and name == name.strip(), f"malformed header line {line!r}"
        assert name.lower() not in headers, f"header {name} twice: {head!r}"
        headers[name.lower()] = value.strip()
    if method != "HEAD":
        if int(headers["content-length"]) > len(body):
            raise ScrapeLost(f"{method} {path}: {len(body)} of {headers['content-length']} bytes of body")
        assert int(headers["content-length"]) == len(body), f"Content-Length {headers['content-length']}, " \
                                                            f"body {len(body)} bytes"
    return int(status), headers, body


@dataclass
class Scrape:
    """One /metrics answer, parsed and checked."""

    text: str
    families: dict            # family name (as prometheus_client names it) -> Metric
    samples: dict             # (sample name, frozenset of labels) -> value

    def get(self, name: str, **labels) -> float:
        key = ("proxyd_" + name, frozenset((k, str(v)) for k, v in labels.items()))
        if key not in self.samples:
            raise KeyError(f"no series proxyd_{name}{labels}")
        return self.samples[key]

    def series(self, name: str, **labels) -> dict[frozenset, float]:
        """Every series of proxyd_NAME whose labels include LABELS."""
        want = {(k, str(v)) for k, v in labels.items()}
        return {lab: v for (n, lab), v in self.samples.items() if n == "proxyd_" + name and want <= lab}


def parse_metrics(text: str) -> Scrape:
    """TEXT through prometheus_client's parser, with the checks every scrape
    must pass: every family declared with HELP and TYPE, once; every counter
    ending in _total (its samples read as NAME_total); no series twice."""
    families, samples = {}, {}
    declared = {}
    for line in text.splitlines():
        if line.startswith("# "):
            _, kind, name, *rest = line.split(" ", 3)
            assert (kind, name) not in declared, f"{kind} of {name} twice"
            declared[(kind, name)] = rest
    for family in prometheus_parser.text_string_to_metric_families(text):
        assert family.name not in families, f"family {family.name} split in two"
        families[family.name] = family
        assert family.type in ("counter", "gauge"), f"{family.name}: type {family.type!r} (no TYPE line?)"
        assert family.documentation, f"{family.name}: no HELP"
        exposed = family.name + "_total" if family.type == "counter" else family.name
        assert ("TYPE", exposed) in declared and ("HELP", exposed) in declared, exposed
        for sample in family.samples:
            assert sample.name == exposed, f"{family.type} {family.name}: sample named {sample.name}"
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"series twice: {sample.name}{sample.labels}"
            samples[key] = sample.value
    assert len(families) * 2 == len(declared), "a HELP or TYPE line without its family"
    return Scrape(text, families, samples)


class Stats:
    """The stats listener at 127.0.0.1:PORT."""

    def __init__(self, port: int):
        self.port = port

    def wait_listening(self) -> "Stats":
        wait_for(lambda: listen_count(self.port) >= 1, 20, f"the stats listener on :{self.port}")
        return self

    def get(self, path: str) -> tuple[int, dict, bytes]:
        return http_get(self.port, path)

    def scrape(self) -> Scrape:
        status, headers, body = self.get("/metrics")
        assert status == 200, (status, body[:200])
        assert headers["content-type"] == METRICS_TYPE, headers
        return parse_metrics(body.decode())

    def json(self) -> dict:
        status, headers, body = self.get("/stats")
        assert status == 200 and headers["content-type"] == "application/json", (status, headers)
        return json.loads(body)

    def wait_figures(self, expected: dict, what: str, timeout: float = WAIT) -> Scrape:
        """Scrape until every (name, labels-dict-as-tuple) -> value of
        EXPECTED holds; AssertionError with the differences left otherwise."""
        last: list = []

        def differences(scrape: Scrape) -> dict:
            diff = {}
            for (name, labels), want in expected.items():
                try:
                    got = scrape.get(name, **dict(labels))
                except KeyError:
                    got = "missing"
                if got != want:
                    diff[f"{name}{dict(labels)}"] = f"expected {want}, got {got}"
            return diff

        deadline = time.monotonic() + timeout
        while True:
            scrape = self.scrape()
            diff = differences(scrape)
            if not diff:
                return scrape
            last[:] = [diff]
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: after {timeout}s, /metrics still differs:\n"
                                     + "\n".join(f"  {k}: {v}" for k, v in diff.items()))
            time.sleep(0.05)


def stats_port_of(config: dict) -> int:
    return int(config["global"]["stats_bind"].rsplit(":", 1)[1])


def port_of(config: dict, frontend: str) -> int:
    return int(config["frontends"][frontend]["bind"][0].rsplit(":", 1)[1])


def key(name: str, **labels) -> tuple:
    return name, tuple(sorted(labels.items()))


# ------------------------------------------------------- tcp: tagged echoes

def _read_exact(conn: socket.socket, rec, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        data = conn.recv(min(n - got, 262144))
        if not data:
            rec.end = "eof"
            return None
        rec.feed(data)
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def tagged_echo(conn, rec, backend) -> None:
    """A 4-byte length, then that many bytes: sent back, followed by the
    sha256 (hex) of everything received, then close (the server closes
    first).  So what a client receives is 64 bytes more than it sent: a
    figure that swapped the directions could not pass."""
    head = _read_exact(conn, rec, 4)
    if head is None:
        return
    body = _read_exact(conn, rec, int.from_bytes(head, "big"))
    if body is None:
        return
    reply = body + hashlib.sha256(head + body).hexdigest().encode()
    conn.sendall(reply)
    rec.sent += len(reply)


@dataclass
class Tally:
    """What the test's clients did and got, added up under a lock."""

    sessions: int = 0
    sent: int = 0
    received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sent: int, received: int) -> None:
        with self.lock:
            self.sessions += 1
            self.sent += sent
            self.received += received


def tcp_session(port: int, tag: str, rnd: random.Random, tally: Tally, max_size: int = 65536) -> None:
    """One tcp session: a tagged payload of random size, its echo and hash checked."""
    body = f"[{tag}]".encode() + rnd.randbytes(rnd.randrange(0, max_size))
    request = len(body).to_bytes(4, "big") + body
    with connect(port) as client:
        client.sendall(request)
        got = recv_all(client)
    expected = body + hashlib.sha256(request).hexdigest().encode()
    assert got == expected, f"session {tag}: {len(got)} bytes back, sha256 {hashlib.sha256(got).hexdigest()}; " \
                            f"expected {len(expected)}, {hashlib.sha256(expected).hexdigest()}"
    tally.add(len(request), len(got))


def run_tcp(port: int, count: int, tally: Tally, seed: int, clients: int = 12, prefix: str = "tcp") -> None:
    def one(i):
        tcp_session(port, f"{prefix}-{seed}-{i}", random.Random(seed * 1_000_003 + i), tally)

    errors = run_sessions(count, clients, one)
    assert not errors, f"{len(errors)} tcp sessions failed, first: {errors[0]!r}"


def wait_records_done(backends, count: int, timeout: float = WAIT) -> None:
    """Wait until the BACKENDS saw COUNT connections in all, every one ended."""
    def done():
        recs = [r for b in backends for r in b.connections()]
        return len(recs) == count and all(r.done.is_set() for r in recs)

    wait_for(done, timeout, f"{count} ended connections on {[b.name for b in backends]}")


# ----------------------------------------------- http: a mix of statuses

REASONS = {200: "OK", 201: "Created", 302: "Found", 400: "Bad Request", 404: "Not Found",
           500: "Internal Server Error", 503: "Service Unavailable"}
# one status per request, in turn: per 25 requests 17 2xx, 1 3xx, 5 4xx, 2 5xx
MIX = [200] * 15 + [201] * 2 + [302] + [404] * 4 + [400] + [500, 503]


def mixed_http(conn, rec, backend) -> None:
    """One request per connection (proxyd's default: server-close): the
    status is the last part of the target (`/r/TAG/STATUS`), the body a JSON
    object naming this server, the target and the sha256 of the request
    body.  rec.received counts every byte the server read."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            rec.end = "eof"
            return
        rec.feed(data)
        buf += data
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].decode("latin-1").split(" ")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        data = conn.recv(65536)
        if not data:
            rec.end = "eof"
            return
        rec.feed(data)
        body += data
    status = int(target.rsplit("/", 1)[1])
    answer = json.dumps({"server": backend.name, "target": target, "method": method,
                         "body_sha256": hashlib.sha256(body).hexdigest()}).encode()
    extra = "Location: /elsewhere\r\n" if status == 302 else ""
    reply = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n{extra}"
             f"Content-Length: {len(answer)}\r\nConnection: close\r\n\r\n").encode() + answer
    rec.status = status
    conn.sendall(reply)
    rec.sent += len(reply)


@dataclass
class HTTPTally:
    requests: int = 0
    connections: int = 0
    received: int = 0                                   # every byte the clients received
    by_code: dict = field(default_factory=dict)         # "2xx" -> n
    by_server: dict = field(default_factory=dict)       # server -> {"requests", "bytes", "codes"}
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class KeepAliveClient:
    """One client connection kept alive over several requests, counting
    every byte it receives; responses must have a Content-Length."""

    def __init__(self, port: int):
        self.sock = connect(port)
        self.buf = bytearray()
        self.received = 0

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise AssertionError(f"the proxy closed a kept-alive connection; pending {bytes(self.buf[:200])!r}")
        self.received += len(data)
        self.buf += data

    def exchange(self, request: bytes) -> tuple[int, dict, bytes, int]:
        """REQUEST sent, one response read: (status, headers, body, its size on the wire)."""
        assert not self.buf, f"bytes before a response: {bytes(self.buf[:200])!r}"
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n\r\n") + 4
        lines = bytes(self.buf[:end - 4]).decode("latin-1").split("\r\n")
        _, status, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        assert "content-length" in headers, f"no Content-Length: {lines}"
        size = end + int(headers["content-length"])
        while len(self.buf) < size:
            self._fill()
        body = bytes(self.buf[end:size])
        del self.buf[:size]
        return int(status), headers, body, size

    def close(self) -> None:
        self.sock.close()


def http_conversation(port: int, c: int, per_connection: int, seed: int, tally: HTTPTally) -> None:
    """Connection C: PER_CONNECTION requests kept alive, numbered
    C * PER_CONNECTION + k, each with the next status of MIX, a GET or a
    POST with a random tagged body; every response checked."""
    rnd = random.Random(seed * 7919 + c)
    client = KeepAliveClient(port)
    results = []
    try:
        for k in range(per_connection):
            i = c * per_connection + k
            status = MIX[i % len(MIX)]
            target = f"/r/{seed}-{i}/{status}"
            if rnd.random() < 0.5:
                body = b""
                request = f"GET {target} HTTP/1.1\r\nHost: metrics.test\r\n\r\n".encode()
            else:
                body = f"[http {seed}-{i}]".encode() + rnd.randbytes(rnd.randrange(0, 6000))
                request = (f"POST {target} HTTP/1.1\r\nHost: metrics.test\r\nContent-Type: application/octet-stream"
                           f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            got, _, answer, size = client.exchange(request)
            assert got == status, f"request {target}: status {got}, body {answer[:200]!r}"
            seen = json.loads(answer)
            assert seen["target"] == target and seen["body_sha256"] == hashlib.sha256(body).hexdigest(), \
                (target, seen)
            results.append((seen["server"], f"{status // 100}xx", size))
    finally:
        client.close()
    assert client.received == sum(size for _, _, size in results)
    with tally.lock:
        tally.connections += 1
        tally.received += client.received
        for server, code, size in results:
            tally.requests += 1
            tally.by_code[code] = tally.by_code.get(code, 0) + 1
            row = tally.by_server.setdefault(server, {"requests": 0, "bytes": 0, "codes": {}})
            row["requests"] += 1
            row["bytes"] += size
            row["codes"][code] = row["codes"].get(code, 0) + 1


def run_http(port: int, connections: int, per_connection: int, tally: HTTPTally, seed: int,
             clients: int = 8) -> None:
    errors = run_sessions(connections, clients, lambda c: http_conversation(port, c, per_connection, seed, tally))
    assert not errors, f"{len(errors)} http conversations failed, first: {errors[0]!r}"


# ------------------------------------------------------------------ configs

def two_mode_config(tcp_servers, http_servers, workers: int = 4, **global_) -> dict:
    """Frontend "tcp" -> backend "echo" (TCP_SERVERS), frontend "web"
    (http) -> backend "app" (HTTP_SERVERS), a stats listener."""
    return {
        "global": {"workers": workers, "stats_bind": f"{LOCALHOST}:{free_port()}", **global_},
        "frontends": {
            "tcp": {"bind": [f"{LOCALHOST}:{free_port()}"], "backend": "echo"},
            "web": {"bind": [f"{LOCALHOST}:{free_port()}"], "mode": "http", "backend": "app"},
        },
        "backends": {
            "echo": {"servers": [{"name": b.name, "address": b.address} for b in tcp_servers]},
            "app": {"servers": [{"name": b.name, "address": b.address} for b in http_servers]},
        },
    }


def tcp_only_config(tcp_servers, workers: int = 2, **global_) -> dict:
    return {
        "global": {"workers": workers, "stats_bind": f"{LOCALHOST}:{free_port()}", **global_},
        "frontends": {"tcp": {"bind": [f"{LOCALHOST}:{free_port()}"], "backend": "echo"}},
        "backends": {"echo": {"servers": [{"name": b.name, "address": b.address} for b in tcp_servers]}},
    }


def tcp_expectations(tally: Tally, backends, frontend: str = "tcp", backend: str = "echo") -> dict:
    """The tcp figures that TALLY and what each server counted make exact."""
    received = sum(r.received for b in backends for r in b.connections())
    sent = sum(r.sent for b in backends for r in b.connections())
    assert (received, sent) == (tally.sent, tally.received), "the servers and the clients disagree"
    expected = {
        key("frontend_sessions_total", proxy=frontend): tally.sessions,
        key("frontend_bytes_in_total", proxy=frontend): tally.sent,
        key("frontend_bytes_out_total", proxy=frontend): tally.received,
        key("frontend_current_sessions", proxy=frontend): 0,
        key("backend_sessions_total", proxy=backend): tally.sessions,
        key("backend_bytes_in_total", proxy=backend): tally.sent,
        key("backend_bytes_out_total", proxy=backend): tally.received,
        key("backend_connection_errors_total", proxy=backend): 0,
    }
    for b in backends:
        recs = b.connections()
        expected[key("server_sessions_total", proxy=backend, server=b.name)] = len(recs)
        expected[key("server_bytes_in_total", proxy=backend, server=b.name)] = sum(r.received for r in recs)
        expected[key("server_bytes_out_total", proxy=backend, server=b.name)] = sum(r.sent for r in recs)
        expected[key("server_current_sessions", proxy=backend, server=b.name)] = 0
    return expected


# ------------------------------------------------------------ 2: exact totals

def test_totals_are_exact_over_four_workers(proxyd, backend):
    """workers = 4; 1,000 tcp sessions (random sizes up to 64 KiB, each
    echoed whole and checked) and 500 http requests over 100 kept-alive
    connections (statuses from the servers: 2xx, 3xx, 4xx and 5xx): the
    totals are exactly what the clients and servers counted."""
    echo = [backend(tagged_echo, name=f"t{i}") for i in (1, 2, 3)]
    http = [backend(mixed_http, name=f"h{i}") for i in (1, 2)]
    config = two_mode_config(echo, http, workers=4)
    proxy = proxyd(config)
    stats = Stats(stats_port_of(config)).wait_listening()
    tcp_port, web_port = port_of(config, "tcp"), port_of(config, "web")
    tcp_tally, http_tally = Tally(), HTTPTally()

    tcp_thread_errors: list = []

    def tcp_load():
        try:
            run_tcp(tcp_port, 1000, tcp_tally, seed=2, clients=12)
        except BaseException as e:   # reported below
            tcp_thread_errors.append(e)

    tcp_thread = threading.Thread(target=tcp_load, daemon=True)
    tcp_thread.start()   # the tcp sessions and the http requests at the same time
    run_http(web_port, 100, 5, http_tally, seed=3, clients=6)
    tcp_thread.join(240)
    assert not tcp_thread.is_alive(), "tcp clients still running"
    assert not tcp_thread_errors, tcp_thread_errors[0]
    assert tcp_tally.sessions == 1000 and http_tally.requests == 500 and http_tally.connections == 100
    wait_records_done(echo, 1000)
    wait_records_done(http, 500)
    # Every server connection carried one request.
    assert sum(1 for b in http for r in b.connections() if hasattr(r, "status")) == 500

    expected = tcp_expectations(tcp_tally, echo)
    http_in = sum(r.received for b in http for r in b.connections())
    codes = {c: http_tally.by_code.get(c, 0) for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")}
    assert codes == {"1xx": 0, "2xx": 340, "3xx": 20, "4xx": 100, "5xx": 40, "other": 0}
    expected.update({
        key("frontend_sessions_total", proxy="web"): 100,
        key("frontend_http_requests_total", proxy="web"): 500,
        key("frontend_bytes_in_total", proxy="web"): http_in,
        key("frontend_bytes_out_total", proxy="web"): http_tally.received,
        key("frontend_current_sessions", proxy="web"): 0,
        key("frontend_request_errors_total", proxy="web"): 0,
        key("backend_sessions_total", proxy="app"): 500,
        key("backend_bytes_in_total", proxy="app"): http_in,
        key("backend_bytes_out_total", proxy="app"): http_tally.received,
        key("backend_connection_errors_total", proxy="app"): 0,
        key("backend_response_errors_total", proxy="app"): 0,
        key("backend_retry_warnings_total", proxy="app"): 0,
        key("process_connections_total"): 1100,
        key("process_requests_total"): 500,
    })
    for code, n in codes.items():
        expected[key("frontend_http_responses_total", proxy="web", code=code)] = n
        expected[key("backend_http_responses_total", proxy="app", code=code)] = n
    for b in http:
        recs = b.connections()
        row = http_tally.by_server.get(b.name, {"requests": 0, "bytes": 0, "codes": {}})
        assert row["requests"] == len(recs), (b.name, row, len(recs))
        expected[key("server_sessions_total", proxy="app", server=b.name)] = len(recs)
        expected[key("server_bytes_in_total", proxy="app", server=b.name)] = sum(r.received for r in recs)
        expected[key("server_bytes_out_total", proxy="app", server=b.name)] = row["bytes"]
        for code in codes:
            want = sum(1 for r in recs if f"{r.status // 100}xx" == code)
            assert want == row["codes"].get(code, 0)
            expected[key("server_http_responses_total", proxy="app", server=b.name, code=code)] = want
    scrape = stats.wait_figures(expected, "1,000 tcp sessions and 500 http requests")

    # The sums over servers are the backends' figures.
    for backend_name, total in (("echo", 1000), ("app", 500)):
        assert sum(scrape.series("server_sessions_total", proxy=backend_name).values()) == total
    # A tcp frontend or backend has no http response series, and counts no http request.
    assert scrape.series("frontend_http_responses_total", proxy="tcp") == {}
    assert scrape.series("backend_http_responses_total", proxy="echo") == {}
    assert scrape.get("frontend_http_requests_total", proxy="tcp") == 0
    assert proxy.running()


def test_backend_http_requests_total_counts_requests(proxyd, backend):
    """HAProxy's backend http_requests_total counts the backend's requests:
    10 requests through backend "app" make it 10."""
    http = [backend(mixed_http, name="h1")]
    config = two_mode_config([backend(tagged_echo, name="t1")], http, workers=1)
    proxyd(config)
    stats = Stats(stats_port_of(config)).wait_listening()
    tally = HTTPTally()
    run_http(port_of(config, "web"), 2, 5, tally, seed=5, clients=2)
    scrape = stats.wait_figures({key("frontend_http_requests_total", proxy="web"): 10,
                                 key("backend_sessions_total", proxy="app"): 10}, "10 requests counted")
    # Written by the same call as the backend's sessions: no more waiting.
    assert scrape.get("backend_http_requests_total", proxy="app") == 10


# ------------------------------------------- 3: totals across reloads, TTIN/TTOU

# The figures a scrape must never see go down (counters, and the reloads).
MONOTONIC = (("frontend_sessions_total", {"proxy": "tcp"}), ("frontend_bytes_in_total", {"proxy": "tcp"}),
             ("frontend_bytes_out_total", {"proxy": "tcp"}), ("backend_sessions_total", {"proxy": "echo"}),
             ("backend_bytes_in_total", {"proxy": "echo"}), ("backend_bytes_out_total", {"proxy": "echo"}),
             ("process_connections_total", {}), ("process_reloads_total", {}), ("process_generation", {}))


class Monitor:
    """A thread scraping /metrics again and again (each scrape parsed and
    checked) until stopped: the MONOTONIC figures of every scrape, in order."""

    def __init__(self, stats: Stats, servers=()):
        self.stats = stats
        self.servers = list(servers)
        self.seen: list[tuple] = []
        self.failures: list[BaseException] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="metrics-monitor")

    def _one(self) -> tuple:
        scrape = self.stats.scrape()
        figures = [scrape.get(name, **labels) for name, labels in MONOTONIC]
        figures += [scrape.get("server_sessions_total", proxy="echo", server=s) for s in self.servers]
        return tuple(figures)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.seen.append(self._one())
            except BaseException as e:   # reported by check()
                self.failures.append(e)
            self.stopping.wait(0.01)

    def __enter__(self) -> "Monitor":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(30)

    def mark(self) -> int:
        return len(self.seen)

    def check(self) -> None:
        assert not self.thread.is_alive(), "the monitor still runs"
        assert not self.failures, f"{len(self.failures)} scrapes failed, first: {self.failures[0]!r}"
        names = [n for n, _ in MONOTONIC] + [f"server_sessions_total{{{s}}}" for s in self.servers]
        for before, after in zip(self.seen, self.seen[1:]):
            went_back = [f"{n}: {a} after {b}" for n, b, a in zip(names, before, after) if a < b]
            assert not went_back, f"a scrape saw figures go back: {went_back}"


def wait_generation(proxy, stats: Stats, generation: int, workers: int) -> dict[int, int]:
    """Wait until the master says GENERATION serves and its WORKERS workers
    are the only ones alive (the older generations have left)."""
    wait_for(lambda: stats.json()["process"]["generation"] == generation, WAIT, f"generation {generation}")
    gens: dict[int, int] = {}

    def alone():
        nonlocal gens
        gens = proxy.worker_generations()
        return len(gens) == workers and set(gens.values()) == {generation}

    try:
        wait_for(alone, WAIT, f"generation {generation} alone")
    except AssertionError:
        raise AssertionError(f"workers (pid: generation) {gens}, not {workers} of generation {generation}; "
                             f"log tail:\n{proxy.log_tail(30)}") from None
    return gens


def sessions_until_slot(proxy, port: int, slot: int, tally: Tally, tries: int = 200) -> int:
    """Sessions (counted in TALLY) until one is held by the worker in SLOT:
    how many it held (1), after at most TRIES."""
    for i in range(tries):
        rnd = random.Random(900_000 + i)
        body = f"[slot-{slot}-{i}]".encode() + rnd.randbytes(rnd.randrange(0, 4096))
        request = len(body).to_bytes(4, "big") + body
        with connect(port) as client:
            holder = wait_for(lambda: proxy.worker_of(client), WAIT, "the worker holding a session")
            held = proxy.worker_slots().get(holder.pid)
            client.sendall(request)
            got = recv_all(client)
        assert got == body + hashlib.sha256(request).hexdigest().encode(), f"session slot-{slot}-{i}"
        tally.add(len(request), len(got))
        if held == slot:
            return 1
    raise AssertionError(f"no session reached worker {slot} in {tries} tries")


def test_totals_survive_reloads_and_ttin_ttou(proxyd, backend):
    """3 reloads (each with sessions running through it, then more
    sessions once the new generation serves alone), then a TTIN and a TTOU:
    after each step the totals are exactly the cumulative counts; a thread
    scraping all along never sees one go back."""
    echo = [backend(tagged_echo, name=f"t{i}") for i in (1, 2)]
    config = tcp_only_config(echo, workers=2, grace="10s")
    proxy = proxyd(config)
    stats = Stats(stats_port_of(config)).wait_listening()
    port = port_of(config, "tcp")
    tally = Tally()

    def expect(what: str, generation: int, reloads: int) -> None:
        wait_records_done(echo, tally.sessions)
        expected = tcp_expectations(tally, echo)
        expected[key("process_generation")] = generation
        expected[key("process_reloads_total")] = reloads
        stats.wait_figures(expected, what)

    with Monitor(stats, [b.name for b in echo]) as monitor:
        run_tcp(port, 60, tally, seed=10)
        expect("60 sessions in generation 1", 1, 0)
        for generation in (2, 3, 4):
            # Sessions all through the reload: none may fail, every one counts.
            stop = threading.Event()
            during: list[BaseException] = []

            def through(generation=generation, stop=stop, during=during):
                i = 0
                while not stop.is_set() and i < 2000:
                    try:
                        tcp_session(port, f"during-{generation}-{i}", random.Random(generation * 10_000 + i),
                                    tally, max_size=8192)
                    except BaseException as e:   # reported below
                        during.append(e)
                        return
                    i += 1

            thread = threading.Thread(target=through, daemon=True)
            before = tally.sessions
            mark = monitor.mark()
            thread.start()
            proxy.signal(signal.SIGHUP)
            wait_generation(proxy, stats, generation, 2)
            stop.set()
            thread.join(60)
            assert not thread.is_alive() and not during, f"a session failed during reload {generation - 1}: {during}"
            assert tally.sessions > before, "no session ran during the reload"
            wait_for(lambda mark=mark: monitor.mark() > mark + 3, WAIT, "scrapes during the reload")
            run_tcp(port, 40, tally, seed=10 + generation)
            expect(f"after reload {generation - 1}", generation, generation - 1)

        proxy.signal(signal.SIGTTIN)
        wait_for(lambda: sorted(proxy.worker_slots().values()) == [1, 2, 3], WAIT, "3 workers after TTIN")
        run_tcp(port, 40, tally, seed=20)
        # The worker TTOU will remove (slot 3) must have counted sessions of its own.
        on_slot_3 = sessions_until_slot(proxy, port, 3, tally)
        expect("after TTIN", 4, 3)
        ttou_victim = next(pid for pid, slot in proxy.worker_slots().items() if slot == 3)
        victim_counted = tally.sessions
        proxy.signal(signal.SIGTTOU)
        wait_for(lambda: sorted(proxy.worker_slots().values()) == [1, 2], WAIT, "2 workers after TTOU")
        assert ttou_victim not in proxy.worker_pids()
        # What the removed worker counted stays: nothing changed since the last check.
        expect("right after TTOU", 4, 3)
        assert tally.sessions == victim_counted
        run_tcp(port, 40, tally, seed=21)
        expect("after TTIN and TTOU", 4, 3)

    monitor.check()
    assert on_slot_3 >= 1
    assert len(monitor.seen) > 20, f"only {len(monitor.seen)} scrapes"
    print(f"{len(monitor.seen)} scrapes, none lost")
    final = stats.scrape()
    assert final.get("process_reloads_total") == 3 and final.get("process_generation") == 4
    assert final.get("frontend_sessions_total", proxy="tcp") == tally.sessions > 260


# ------------------------------------------------------ 4: per-worker series

WORKER_FAMILIES = ("worker_resident_memory_bytes", "worker_cpu_seconds_total", "worker_open_fds")


def worker_series(scrape: Scrape) -> dict[str, dict[int, tuple[int, int, float]]]:
    """family -> pid -> (worker number, generation, value)."""
    out = {}
    for family in WORKER_FAMILIES:
        rows = {}
        for labels, value in scrape.series(family).items():
            lab = dict(labels)
            assert set(lab) == {"worker", "generation", "pid"}, lab
            pid = int(lab["pid"])
            assert pid not in rows, f"{family}: pid {pid} twice"
            rows[pid] = (int(lab["worker"]), int(lab["generation"]), value)
        out[family] = rows
    return out


def check_workers(proxy, stats: Stats, workers: int, generation: int) -> set[int]:
    """The per-worker series are those of exactly the live workers, labelled
    as their process titles say, with plausible values; their pids."""
    found: dict = {}

    def matching():
        nonlocal found
        pids = proxy.worker_pids()
        found = worker_series(stats.scrape())
        return len(pids) == workers and all(set(rows) == pids for rows in found.values()) \
            and pids == proxy.worker_pids()

    try:
        wait_for(matching, WAIT, "per-worker series of exactly the live workers")
    except AssertionError:
        raise AssertionError(f"live workers {proxy.worker_generations()}, series {found}") from None
    slots, gens = proxy.worker_slots(), proxy.worker_generations()
    assert sorted(slots.values()) == list(range(1, workers + 1)) and set(gens.values()) == {generation}, \
        (slots, gens)
    for family, rows in found.items():
        for pid, (number, gen, value) in rows.items():
            assert (number, gen) == (slots[pid], gens[pid]), f"{family} pid {pid}: worker {number} gen {gen}, " \
                                                             f"title says {slots[pid]} gen {gens[pid]}"
    for pid, (_, _, rss) in found["worker_resident_memory_bytes"].items():
        real = psutil.Process(pid).memory_info().rss
        assert 1 << 20 < rss < 1 << 31 and 0.5 * real < rss < 2 * real, (pid, rss, real)
    for pid, (_, _, fds) in found["worker_open_fds"].items():
        assert 3 < fds < 10_000 and fds == int(fds), (pid, fds)
    for pid, (_, _, cpu) in found["worker_cpu_seconds_total"].items():
        times = psutil.Process(pid).cpu_times()
        assert 0 <= cpu <= times.user + times.system + 0.05, (pid, cpu, times)
    return set(found["worker_open_fds"])


def test_worker_series_follow_the_live_workers(proxyd, backend):
    """3 workers: one series per live worker in each per-worker family,
    labelled with its pid, worker number and generation as its title says;
    after a reload, exactly the new generation's."""
    echo = [backend(tagged_echo, name="t1")]
    config = tcp_only_config(echo, workers=3)
    proxy = proxyd(config)
    stats = Stats(stats_port_of(config)).wait_listening()
    tally = Tally()
    run_tcp(port_of(config, "tcp"), 30, tally, seed=30, clients=6)
    first = check_workers(proxy, stats, 3, 1)
    assert first == proxy.worker_pids()

    proxy.signal(signal.SIGHUP)
    wait_generation(proxy, stats, 2, 3)
    second = check_workers(proxy, stats, 3, 2)
    assert not first & second, "the new generation has the old one's pids"
    assert stats.scrape().get("process_generation") == 2


# ------------------------------------------------- the scene: 1, 5 and 6

@dataclass
class Scene:
    proxy: object
    stats: Stats
    config: dict
    admin: str
    by_name: dict


def set_scene(proxyd, backend, servers, admin_path, reserve_port, workers: int = 2) -> Scene:
    """Frontend "tcp" -> backend "echo": t1 (a tagged echo) and t2 (a port
    that refuses: connection errors, retries, redispatches); frontend "web"
    (http) -> backend "app": s1, s2, s3 with a TCP check every 100 ms.
    Traffic on both, a few malformed requests (proxyd's own 400s), then s2
    stopped (its check marks it DOWN) and s3 disabled over the admin socket
    (MAINT), and more traffic: once the states have settled, nothing moves
    but the checks."""
    t1 = backend(tagged_echo, name="t1")
    s1, s2, s3 = servers("s1", "s2", "s3")
    config = {
        "global": {"workers": workers, "admin_socket": admin_path, "stats_bind": f"{LOCALHOST}:{free_port()}"},
        "frontends": {
            "tcp": {"bind": [f"{LOCALHOST}:{free_port()}"], "backend": "echo"},
            "web": {"bind": [f"{LOCALHOST}:{free_port()}"], "mode": "http", "backend": "app"},
        },
        "backends": {
            "echo": {"servers": [{"name": "t1", "address": t1.address},
                                 {"name": "t2", "address": f"{LOCALHOST}:{reserve_port()}"}]},
            "app": {"servers": [{"name": s.name, "address": s.address} for s in (s1, s2, s3)],
                    "health_check": dict(CHECK)},
        },
    }
    proxy = proxyd(config)
    stats = Stats(stats_port_of(config)).wait_listening()
    scene = Scene(proxy, stats, config, admin_path, {"t1": t1, "s1": s1, "s2": s2, "s3": s3})
    wait_states(stats, {"s1": "UP", "s2": "UP", "s3": "UP"})
    tcp, web = port_of(config, "tcp"), port_of(config, "web")
    tally = Tally()
    run_tcp(tcp, 20, tally, seed=40, clients=4)
    for i in range(12):
        status, body = http_hello(web, f"/scene/{i}")
        assert status == 200 and body in ("s1", "s2", "s3"), (status, body)
    for i in range(3):
        with connect(web) as client:
            client.sendall(b"GET /bad/%d HTTP/1.1\r\nHost: scene.test\r\nBad Header\r\n\r\n" % i)
            answer = recv_all(client)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    s2.stop_listening()
    assert admin_command(admin_path, "disable server app/s3").strip() == ""
    wait_states(stats, {"s1": "UP", "s2": "DOWN", "s3": "MAINT"})
    for i in range(6):
        status, body = http_hello(web, f"/after/{i}")
        assert (status, body) == (200, "s1")
    scene.tally = tally
    return scene


def wait_states(stats: Stats, want: dict[str, str]) -> None:
    """Poll /stats until backend "app"'s servers have the states WANT."""
    got = {}

    def settled():
        nonlocal got
        snap = stats.json()
        got = {s["name"]: s["status"] for b in snap["backends"] if b["name"] == "app" for s in b["servers"]}
        return got == want

    try:
        wait_for(settled, WAIT, f"server states {want}")
    except AssertionError:
        raise AssertionError(f"server states {got}, not {want}") from None


def test_metrics_parse_and_pass_promtool(proxyd, backend, servers, admin_path, reserve_port):
    """/metrics of a proxyd with tcp and http traffic, errors, a DOWN and a
    MAINT server: prometheus_client reads it (HELP and TYPE for every
    family, counters in _total, no duplicate series), promtool finds nothing
    to say, and it is served as the text format 0.0.4."""
    scene = set_scene(proxyd, backend, servers, admin_path, reserve_port)
    status, headers, body = http_get(scene.stats.port, "/metrics")
    assert status == 200 and headers["content-type"] == METRICS_TYPE, (status, headers)
    scrape = parse_metrics(body.decode())
    # Every family HAProxy's exporter users look for is there, with series.
    for name in ("proxyd_frontend_sessions", "proxyd_backend_sessions", "proxyd_server_sessions",
                 "proxyd_frontend_http_responses", "proxyd_server_status", "proxyd_server_check_status",
                 "proxyd_server_check_failures", "proxyd_backend_connection_errors", "proxyd_process_reloads",
                 "proxyd_worker_resident_memory_bytes", "proxyd_worker_cpu_seconds", "proxyd_worker_open_fds"):
        assert scrape.families[name].samples, f"no series in {name}"
    assert len(scrape.samples) > 150
    assert scrape.get("backend_connection_errors_total", proxy="echo") >= 1
    assert scrape.get("frontend_request_errors_total", proxy="web") == 3
    # HEAD: the same head, no body.
    status, headers, body = http_get(scene.stats.port, "/metrics", method="HEAD")
    assert status == 200 and headers["content-type"] == METRICS_TYPE and body == b"", (status, headers, body)

    if PROMTOOL is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape.text, capture_output=True, text=True,
                             timeout=60, check=False)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", ""), checked


# Keys of /stats rows that are not counters or steady gauges of /metrics.
NOT_SERIES = {"name", "mode", "status", "admin", "checked", "address", "balance", "check_status", "check_reason",
              "servers", "backup", "check_last_change_seconds", "last_session_seconds", "check_duration_seconds"}
TIMED = {"downtime_seconds_total"}   # grows while a server or backend is down: bracketed, not equal


def test_stats_json_matches_metrics(proxyd, backend, servers, admin_path, reserve_port):
    """For every frontend, backend and server, every counter of /stats (and
    every steady gauge) is the value of its /metrics series, and every
    counter series of /metrics is in /stats.  Taken with no traffic running:
    /stats, /metrics, /stats again, the two /stats equal but for downtime,
    which the /metrics value must lie between."""
    scene = set_scene(proxyd, backend, servers, admin_path, reserve_port)
    stats = scene.stats

    for _ in range(20):
        before, scrape, after = stats.json(), stats.scrape(), stats.json()
        if strip_moving(before) == strip_moving(after):
            break
    else:
        raise AssertionError("/stats kept changing with no traffic")

    compared = 0
    rows = [("frontend", (("proxy", f["name"]),), f, g) for f, g in zip(before["frontends"], after["frontends"])]
    for b, b2 in zip(before["backends"], after["backends"]):
        rows.append(("backend", (("proxy", b["name"]),), b, b2))
        rows += [("server", (("proxy", b["name"]), ("server", s["name"])), s, s2)
                 for s, s2 in zip(b["servers"], b2["servers"])]
    for section, labels, row, row2 in rows:
        where = f"{section} {dict(labels)}"
        for name, value in row.items():
            if name in NOT_SERIES or name.startswith("check_") and name not in ("check_failures_total",
                                                                               "check_up_down_total", "check_code"):
                continue
            metric = f"{section}_{name}"
            if name == "http_responses_total":
                if row["mode"] != "http":   # HAProxy's exporter has them for http proxies only
                    assert scrape.series(metric, **dict(labels)) == {} and not any(value.values()), (where, value)
                    continue
                for code, n in value.items():
                    assert scrape.get(metric, **dict(labels), code=code) == n, (where, code)
                    compared += 1
                assert len(scrape.series(metric, **dict(labels))) == len(value), where
                continue
            try:
                got = scrape.get(metric, **dict(labels))
            except KeyError:
                if name.endswith("_total"):
                    raise AssertionError(f"{where}: /stats has {name} = {value}, /metrics no {metric}") from None
                continue    # a figure of /stats alone (e.g. a frontend's current_queue)
            if name in TIMED:
                assert value <= got <= row2[name], f"{where} {name}: /metrics {got} not within [{value}, {row2[name]}]"
            else:
                assert got == value, f"{where} {name}: /stats {value}, /metrics {got}"
            compared += 1
        # The other way: every counter series of this object is in /stats.
        prefix = f"proxyd_{section}_"
        for series_name, series_labels in scrape.samples:
            own = {k: v for k, v in series_labels if k != "code"}
            if series_name.startswith(prefix) and series_name.endswith("_total") and own == dict(labels):
                assert series_name[len(prefix):] in row, f"{where}: {series_name} not in /stats"
    assert compared > 100, compared
    # Non-trivial figures, so that the comparison compared something.
    t1 = next(s for b in before["backends"] for s in b["servers"] if s["name"] == "t1")
    t2 = next(s for b in before["backends"] for s in b["servers"] if s["name"] == "t2")
    assert t1["sessions_total"] == 20 and t2["connection_errors_total"] >= 1 and t2["sessions_total"] == 0
    web = next(f for f in before["frontends"] if f["name"] == "web")
    assert web["http_requests_total"] == 21 and web["http_responses_total"]["4xx"] == 3


def strip_moving(snap: dict) -> str:
    """SNAP without what moves while nothing happens (times, downtime, check durations, workers' figures)."""
    def strip(row):
        return {k: v for k, v in row.items()
                if k not in TIMED | {"check_duration_seconds", "uptime_seconds", "servers"}}
    frontends = [strip(f) for f in snap["frontends"]]
    backends = [(strip(b), [strip(s) for s in b["servers"]]) for b in snap["backends"]]
    return json.dumps([frontends, backends], sort_keys=True)


def test_server_state_series(proxyd, backend, servers, admin_path, reserve_port):
    """proxyd_server_status: s1 UP, s2 (stopped, its check fails) DOWN,
    s3 (disabled over the admin socket) MAINT, each with 1 on its own state
    and 0 on the others; s2's failed checks counted, s1's none; and the
    series follow back: s2 listening again and s3 enabled make both UP."""
    scene = set_scene(proxyd, backend, servers, admin_path, reserve_port)
    stats = scene.stats
    scrape = stats.scrape()
    for server, state in (("s1", "UP"), ("s2", "DOWN"), ("s3", "MAINT"), ("t1", "UP"), ("t2", "UP")):
        proxy = "echo" if server.startswith("t") else "app"
        got = {dict(lab)["state"]: v for lab, v in scrape.series("server_status", proxy=proxy, server=server).items()}
        assert got == {st: int(st == state) for st in SERVER_STATES}, (server, got)
    assert scrape.get("server_check_failures_total", proxy="app", server="s2") >= 1
    assert scrape.get("server_check_up_down_total", proxy="app", server="s2") >= 1
    assert scrape.get("server_check_failures_total", proxy="app", server="s1") == 0
    assert scrape.get("server_check_up_down_total", proxy="app", server="s1") == 0
    assert scrape.get("server_check_status", proxy="app", server="s1", state="L4OK") == 1
    assert scrape.get("server_check_status", proxy="app", server="s2", state="L4CON") == 1
    assert scrape.series("server_check_status", proxy="app", server="s3") == {}, "a MAINT server has no check"
    assert scrape.get("backend_active_servers", proxy="app") == 1
    assert scrape.get("backend_status", proxy="app", state="UP") == 1

    scene.by_name["s2"].listen_again()
    assert admin_command(scene.admin, "enable server app/s3").strip() == ""
    wait_states(stats, {"s1": "UP", "s2": "UP", "s3": "UP"})
    scrape = stats.scrape()
    for server in ("s1", "s2", "s3"):
        got = {dict(lab)["state"]: v for lab, v in scrape.series("server_status", proxy="app", server=server).items()}
        assert got == {st: int(st == "UP") for st in SERVER_STATES}, (server, got)
    assert scrape.get("backend_active_servers", proxy="app") == 3


# -------------------------------------------------- 7: a strict, small listener

def unread(port: int, client: socket.socket) -> int | None:
    """Bytes from CLIENT waiting unread in the listener's socket (its Recv-Q, from ss)."""
    cport = client.getsockname()[1]
    lines = ss("-tn", f"( sport = :{port} and dport = :{cport} )")
    return int(lines[0].split()[1]) if lines else None


def raw_answer(port: int, *parts: bytes, separately: bool = False) -> tuple[int, dict, bytes]:
    """PARTS sent one after the other (SEPARATELY: each once the listener
    has read all of the one before), then the whole answer."""
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        for i, part in enumerate(parts):
            if i and separately:
                wait_for(lambda: unread(port, sock) == 0, WAIT, "the listener to read the first part")
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break   # answered (and closed) before the rest: read the answer
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass   # the listener closed with bytes of the request unread: the answer came first
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 "), f"no response: {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == len(body), (headers, body)
    return int(lines[0].split(" ")[1]), headers, body


def test_stats_listener_is_strict(proxyd, backend):
    """A bad request line gets 400, POST 405 (with Allow), an unknown path
    404, a head over 8 KiB 431; the control process serving the listener
    lives through all of it (same pid, a good scrape after each)."""
    config = tcp_only_config([backend(tagged_echo, name="t1")], workers=1)
    proxy = proxyd(config)
    stats = Stats(stats_port_of(config)).wait_listening()
    stats.scrape()
    control = wait_for(lambda: control_processes(proxy), WAIT, "the control process")
    assert len(control) == 1
    big = b"X-Filler: " + b"f" * 9000 + b"\r\n"
    cases = [
        ("garbage request line", (b"GARBAGE\r\n\r\n",), 400),
        ("no version", (b"GET /metrics\r\n\r\n",), 400),
        ("bad version", (b"GET /metrics HTTP/2.0\r\nHost: s\r\n\r\n",), 400),
        ("bare LF", (b"GET /metrics HTTP/1.1\nHost: s\n\n\r\n\r\n",), 400),
        ("a body", (b"GET /metrics HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\nhi",), 400),
        ("POST", (b"POST /metrics HTTP/1.1\r\nHost: s\r\n\r\n",), 405),
        ("DELETE", (b"DELETE /stats HTTP/1.1\r\nHost: s\r\n\r\n",), 405),
        ("unknown path", (b"GET /nothing-here HTTP/1.1\r\nHost: s\r\n\r\n",), 404),
        ("a path below a page", (b"GET /metrics/x HTTP/1.1\r\nHost: s\r\n\r\n",), 404),
        ("an endless head", (b"GET /metrics HTTP/1.1\r\nHost: s\r\n" + big,), 431),
        ("a complete head over 8 KiB", (b"GET /metrics HTTP/1.1\r\nHost: s\r\n" + big + b"\r\n",), 431),
    ]
    for what, parts, status in cases:
        try:
            got, headers, body = raw_answer(stats.port, *parts)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
        assert got == status, f"{what}: {got} {body[:100]!r}, not {status}"
        assert headers.get("connection") == "close", (what, headers)
        if status == 405:
            assert headers.get("allow") == "GET, HEAD", headers
        assert stats.scrape().families, what
    # A client that says nothing holds up no one.
    with socket.create_connection((LOCALHOST, stats.port), timeout=10) as idle:
        idle.sendall(b"GET /metr")
        stats.scrape()
        assert http_get(stats.port, "/stats")[0] == 200
    assert [p.pid for p in control_processes(proxy)] == [control[0].pid], "the control process was replaced"


def test_stats_listener_refuses_a_large_head_read_in_pieces(proxyd, backend):
    """A head of 8,246 bytes gets 431 when it comes at once, and must when
    it comes in two parts (6,000 bytes, then the rest once the listener has
    read them, as ss shows)."""
    config = tcp_only_config([backend(tagged_echo, name="t1")], workers=1)
    proxyd(config)
    stats = Stats(stats_port_of(config)).wait_listening()
    head = b"GET /metrics HTTP/1.1\r\nHost: s\r\nX-Filler: " + b"f" * 8200 + b"\r\n\r\n"
    assert len(head) > 8192
    status, _, body = raw_answer(stats.port, head)
    assert status == 431, (status, body[:100])
    status, _, body = raw_answer(stats.port, head[:6000], head[6000:], separately=True)
    assert status == 431, (status, body[:100])


def test_scrape_in_flight_survives_a_reload(proxyd, backend):
    """A scrape whose request the control process has begun to read when
    a SIGHUP comes (the first line sent, read as ss shows, then the rest
    once the master has told that process to stop): the client still gets
    its whole answer, and then the old control process leaves and the new
    generation serves the stats."""
    config = tcp_only_config([backend(tagged_echo, name="t1")], workers=1)
    proxy = proxyd(config)
    stats = Stats(stats_port_of(config)).wait_listening()
    old = wait_for(lambda: control_processes(proxy), WAIT, "the control process")
    with socket.create_connection((LOCALHOST, stats.port), timeout=30) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\n")
        wait_for(lambda: unread(stats.port, client) == 0, WAIT, "the control process to read the request line")
        logged = len(proxy.log_lines())
        proxy.signal(signal.SIGHUP)
        # The master has told the old control process to stop (it logs the
        # reload once it has): the rest of the request reaches a process
        # that is leaving, and must still get its answer.
        wait_for(lambda: any("reloading" in line for line in proxy.log_lines()[logged:]), WAIT,
                 "the master to start the reload")
        data, end = b"", "eof"
        try:
            client.sendall(b"Host: stats.test\r\n\r\n")
            while chunk := client.recv(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError) as e:
            end = type(e).__name__
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"\r\nContent-Length: (\d+)", head)
    assert head.startswith(b"HTTP/1.1 200 ") and length and int(length[1]) == len(body), \
        f"{len(data)} bytes, then {end}: {data[:80]!r}"
    wait_for(lambda: not any(p.pid == old[0].pid for p in control_processes(proxy)), WAIT,
             "the old control process to leave")
    wait_generation(proxy, stats, 2, 1)
