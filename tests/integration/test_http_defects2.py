"""Regression tests for HTTP-mode defects 7, 8, 10, 13, 14 and 15.

 7. a server streaming 1xx interim responses endlessly froze the worker (no
    bound on the work of one wake-up, to_client grew while the client did
    not read): other clients got no answer and the master killed the worker;
 8. an error file truncated in place made the worker spin in sendfile until
    the master killed it: error pages are read at configuration load;
10. an absolute-form target was routed by its authority while Host said
    otherwise: a mismatch is a 400 (RFC 9112 3.2, as HAProxy);
13. timeout_http_request and timeout_http_keep_alive, when not set, are at
    most timeout_client;
14. 0 means "no timeout" for every timeout_* key, and --check warns about it;
15. max_body_size applies to chunked bodies too (their decoded size), and the
    manual says so (the man page check is in tests/unit/test_config_defects.py).

Real proxyd processes, real sockets on 127.0.0.1, polling with deadlines.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time

import psutil
import pytest

from tests.http_support import (HTTPClient, Reply, assert_own_error, build_request,
                                http_config, wait_http_access_lines)
from tests.support import (LOCALHOST, echo_handler, free_port, payload, recv_exactly,
                           run_proxyd, sha256, stays, tcp_config, wait_for, write_config)

MiB = 1 << 20


# ------------------------------------------------------------------ fixtures

def only_worker(proxy) -> psutil.Process:
    workers = proxy.workers()
    assert len(workers) == 1, proxy.children_description()
    return workers[0]


def assert_clean_log(proxy) -> None:
    log = proxy.log_text()
    assert "Traceback" not in log, proxy.log_tail(80)
    assert "killing it" not in log, proxy.log_tail(80)


# ---------------------------------------------- 7. a server streaming 1xx

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = (b"HTTP/1.1 103 Early Hints\r\nLink: </" + b"h" * 4000 + b".css>; rel=preload\r\n"
               b"X-Hint: " + b"x" * 2000 + b"\r\n\r\n")
INTERIM_BLOCK = (CONTINUE + EARLY_HINTS) * 16   # whole heads only: the stream stays well formed


def interim_stream_handler(duration: float):
    """Read one request head, then send 100 and 103 interim responses as fast
    as the proxy takes them, for DURATION seconds at most (or until the proxy
    resets the connection); never a final response."""
    def handler(conn, rec, backend):
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(65536)
            if not data:
                rec.end = "eof"
                return
            rec.feed(data)
            head += data
        rec.stream_started = time.monotonic()
        conn.settimeout(0.2)
        view = memoryview(INTERIM_BLOCK)
        offset = 0
        deadline = time.monotonic() + duration
        for _ in range(100_000_000):  # bounded; the deadline ends it first
            if time.monotonic() >= deadline or backend.stopping.is_set():
                break
            try:
                n = conn.send(view[offset:])   # send(), not sendall(): a timeout never cuts a head
            except socket.timeout:
                continue
            rec.sent += n
            offset = (offset + n) % len(INTERIM_BLOCK)
        rec.stream_ended = time.monotonic()
    return handler


def test_server_streaming_1xx_does_not_freeze_the_worker(backend, http_backend, proxyd):
    streamer = backend(interim_stream_handler(duration=5.0), name="streamer")
    app = http_backend(Reply(body=b"normal"), name="app")
    config = http_config(free_port(), {"app": [app], "streamer": [streamer]}, default="app",
                         routes=[{"path_prefix": "/stream", "backend": "streamer"}],
                         global_={"worker_timeout": "2s"})
    proxy = proxyd(config)
    worker = only_worker(proxy)
    pid = worker.pid

    with HTTPClient(proxy.port, timeout=10) as sink:
        sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sink.send(build_request("GET", "/stream/interims"))   # and never reads
        rec = wait_for(lambda: next((r for r in streamer.connections()
                                     if getattr(r, "stream_started", None)), None),
                       10, "the streaming server to get the request")
        start = rec.stream_started
        answered, rss_max, failures = 0, 0, []
        for i in range(100_000):                   # bounded; the 4.5 s deadline ends it first
            if time.monotonic() - start >= 4.5:
                break
            try:
                with HTTPClient(proxy.port, timeout=3) as other:
                    resp = other.request(build_request("GET", f"/normal/{i}"))
                if resp.status != 200 or resp.body != b"normal":
                    failures.append(f"request {i}: {resp.status} {resp.body[:100]!r}")
                else:
                    answered += 1
            except (OSError, AssertionError) as e:
                failures.append(f"request {i} at {time.monotonic() - start:.1f}s: {e!r}")
                break
            try:
                rss_max = max(rss_max, worker.memory_info().rss)
            except psutil.NoSuchProcess:
                failures.append(f"worker {pid} gone at {time.monotonic() - start:.1f}s")
                break
        assert not failures, (f"{answered} answered; {failures[:5]}; server sent {rec.sent} bytes of "
                              f"interims; workers {proxy.worker_pids()}")
        assert answered >= 3, answered
        assert time.monotonic() - start >= 4.0   # the worker lived through 2 x worker_timeout

    assert proxy.worker_pids() == {pid}, f"worker {pid} replaced: {proxy.worker_pids()}"
    assert rss_max < 200 * MiB, f"worker RSS reached {rss_max / MiB:.0f} MiB"
    assert_clean_log(proxy)


# -------------------------------------------- 8. an error file truncated in place

def test_errorfile_truncated_in_place_sends_the_page_read_at_load(tmp_path, full_backlog, http_backend,
                                                                   proxyd):
    body = b"<h1>We are down</h1>\n" + b"sorry " * 2000
    page = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
            b"Connection: close\r\nX-Errorfile: custom\r\n\r\n" % len(body)) + body
    path = tmp_path / "503.http"
    path.write_bytes(page)
    app = http_backend(Reply(body=b"up"), name="app")
    config = http_config(free_port(), {"app": [app], "down": {"servers": [full_backlog],
                                                              "timeout_connect": "500ms", "retries": 0}},
                         default="app", routes=[{"path_prefix": "/down", "backend": "down"}],
                         global_={"worker_timeout": "5s"}, frontend={"errorfiles": {"503": str(path)}})
    proxy = proxyd(config)
    pid = only_worker(proxy).pid

    with open(path, "r+b") as f:
        f.truncate(10)
    assert path.stat().st_size == 10

    with HTTPClient(proxy.port, timeout=20) as client:
        client.send(build_request("GET", "/down/page"))
        data, how = client.rest_and_close(10)
    assert data == page, f"got {len(data)} of {len(page)} bytes ({how}): {data[:80]!r}"
    assert wait_http_access_lines(proxy, 1)[0].status == 503

    assert stays(lambda: proxy.worker_pids() == {pid}, 2.5), \
        f"worker {pid} replaced: {proxy.worker_pids()}; log:\n{proxy.log_tail()}"
    with HTTPClient(proxy.port, timeout=5) as client:
        resp = client.request(build_request("GET", "/served"))
    assert resp.status == 200 and resp.body == b"up", resp.head
    assert proxy.worker_pids() == {pid}
    assert_clean_log(proxy)


# ------------------------------------- 10. absolute-form target against Host

@pytest.fixture
def admin_and_public(http_backend, http_proxy):
    admin = http_backend(Reply(body=b"admin"), name="admin")
    public = http_backend(Reply(body=b"public"), name="public")
    proxy = http_proxy({"public": [public], "admin": [admin]}, default="public",
                       routes=[{"host": "admin.internal", "backend": "admin"}])
    return proxy, admin, public


@pytest.mark.parametrize("target, host", [
    ("http://admin.internal/", "www.public.example"),
    ("http://www.public.example/", "admin.internal"),
    ("http://admin.internal:8080/x", "admin.internal:8081"),
], ids=["authority-routed-admin", "host-routed-admin", "ports-differ"])
def test_absolute_form_authority_not_matching_host_is_400(target, host, admin_and_public):
    proxy, admin, public = admin_and_public
    with HTTPClient(proxy.port) as client:
        client.send(build_request("GET", target, host=host))
        assert_own_error(client.read_response(), 400)
        client.rest_and_close()
    assert wait_http_access_lines(proxy, 1)[0].status == 400
    assert admin.conns() == [] and public.conns() == [], "a mismatched request reached a server"


@pytest.mark.parametrize("target, host", [
    ("http://admin.internal/", "admin.internal"),
    ("http://admin.internal:8080/x", "admin.internal:8080"),
], ids=["same-host", "same-host-and-port"])
def test_absolute_form_matching_host_is_routed_by_it(target, host, admin_and_public):
    proxy, admin, public = admin_and_public
    with HTTPClient(proxy.port) as client:
        resp = client.request(build_request("GET", target, host=host))
    assert resp.status == 200 and resp.body == b"admin", resp.head
    assert len(admin.wait_requests(1)) == 1
    assert public.conns() == []


# ------------------------------- 13. HTTP timeouts at most timeout_client

def client_timeout_1s(where: str) -> dict:
    return {"defaults": {"timeout_client": "1s"}} if where == "defaults" else \
        {"frontend": {"timeout_client": "1s"}}


@pytest.mark.parametrize("where", ["defaults", "frontend"])
def test_silent_client_closed_after_about_timeout_client(where, http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], **client_timeout_1s(where))
    with HTTPClient(proxy.port) as client:
        connected = time.monotonic()
        data, how = client.rest_and_close(5)   # the default timeout_http_request is 10 s
        assert time.monotonic() - connected < 5
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert app.conns() == []


@pytest.mark.parametrize("where", ["defaults", "frontend"])
def test_idle_keepalive_closed_after_about_timeout_client(where, http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], **client_timeout_1s(where))
    with HTTPClient(proxy.port) as client:
        assert client.request(build_request("GET", "/once")).status == 200
        idle_from = time.monotonic()
        data, how = client.rest_and_close(5)   # the default timeout_http_keep_alive is 10 s
        assert time.monotonic() - idle_from < 5
    assert data == b"", data[:200]


def test_explicit_keepalive_timeout_wins_over_timeout_client(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"timeout_client": "1s", "timeout_http_keep_alive": "3s"})
    with HTTPClient(proxy.port) as client:
        assert client.request(build_request("GET", "/first")).status == 200
        assert stays(client.is_open, 1.8), "closed before the explicit timeout_http_keep_alive"
        assert client.request(build_request("GET", "/second")).status == 200
    # timeout_http_request, not set, still follows timeout_client
    with HTTPClient(proxy.port) as silent:
        connected = time.monotonic()
        silent.rest_and_close(5)
        assert time.monotonic() - connected < 5


def test_explicit_request_timeout_wins_over_timeout_client(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"timeout_client": "1s", "timeout_http_request": "3s"})
    with HTTPClient(proxy.port) as client:
        client.send(b"GET /slow HTTP/1.1\r\n")
        assert stays(client.is_open, 1.8), "closed before the explicit timeout_http_request"
        resp = client.request(b"Host: example.test\r\n\r\n")
        assert resp.status == 200, resp.head
        # timeout_http_keep_alive, not set, still follows timeout_client
        idle_from = time.monotonic()
        data, how = client.rest_and_close(5)
        assert time.monotonic() - idle_from < 5
        assert data == b"", data[:200]


# ------------------------------------------------- 14. 0 means no timeout

@pytest.mark.parametrize("key", ["timeout_client", "timeout_server"])
def test_tcp_timeout_zero_means_no_timeout(key, backend, tcp_proxy):
    echo = backend(echo_handler, name="echo")
    proxy = tcp_proxy([echo], workers=1, defaults={key: 0})
    with socket.create_connection((LOCALHOST, proxy.port), timeout=10) as sock:
        sock.sendall(b"first")
        assert recv_exactly(sock, 5) == b"first"
        assert stays(lambda: not select.select([sock], [], [], 0)[0], 1.5), f"{key} = 0 ended an idle session"
        sock.sendall(b"second")
        assert recv_exactly(sock, 6) == b"second"


def paused_response_handler(release: threading.Event):
    """Read a request (Content-Length body), answer 200 with the body's sha256
    in two halves: the second once RELEASE is set."""
    def handler(conn, rec, backend):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            rec.feed(chunk)
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        length = int(m[1]) if m else 0
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            rec.feed(chunk)
            body += chunk
        answer = sha256(body).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer[:32])
        release.wait(10)
        conn.sendall(answer[32:])
    return handler


def test_http_timeout_client_zero_means_no_timeout(backend, http_backend, http_proxy):
    release = threading.Event()
    paused = backend(paused_response_handler(release), name="paused")
    tunnel = http_backend(Reply(status=101, reason="Switching Protocols", framing="none", action="upgrade",
                                headers=[("Connection", "Upgrade"), ("Upgrade", "x-test")]), name="tunnel")
    # a short timeout_connect: a timer of the exchange runs out while the client pauses
    proxy = http_proxy({"paused": {"servers": [paused], "timeout_connect": "500ms"}, "tunnel": [tunnel]},
                       default="paused", routes=[{"path_prefix": "/tunnel", "backend": "tunnel"}],
                       defaults={"timeout_client": 0})
    body = payload(2000, seed=14)
    request = build_request("POST", "/upload", body=body)
    head_and_half = request[:len(request) - 1000]
    with HTTPClient(proxy.port) as client:
        # an exchange: the client pauses in its upload, then while the response comes
        client.send(head_and_half)
        assert stays(client.is_open, 1.5), "timeout_client = 0 ended the exchange during the upload"
        client.send(request[len(head_and_half):])
        head = client.read_until(b"\r\n\r\n")
        assert head is not None and head.startswith(b"HTTP/1.1 200 "), head
        first = client.read_exact(32)
        assert stays(client.is_open, 1.5), "timeout_client = 0 ended the exchange during the response"
        release.set()
        rest = client.read_exact(32)
        assert first is not None and rest is not None and (first + rest).decode() == sha256(body)
        # an idle keep-alive connection
        assert stays(client.is_open, 1.5), "timeout_client = 0 closed the idle keep-alive connection"
        # an upgraded connection (TCP relaying)
        resp = client.request(build_request("GET", "/tunnel", [("Connection", "Upgrade"), ("Upgrade", "x-test")]))
        assert resp.status == 101, resp.head
        client.send(b"ping-1")
        assert client.read_exact(6) == b"ping-1"
        assert stays(client.is_open, 1.5), "timeout_client = 0 ended the upgraded connection"
        client.send(b"ping-2")
        assert client.read_exact(6) == b"ping-2"


def test_http_timeout_server_zero_means_no_timeout(http_backend, http_proxy):
    app = http_backend(Reply(body=b"slow but fine", delay=1.5))
    proxy = http_proxy({"app": {"servers": [app], "timeout_server": 0}})
    with HTTPClient(proxy.port) as client:
        resp = client.request(build_request("GET", "/slow"))
    assert resp.status == 200 and resp.body == b"slow but fine", resp.head


@pytest.mark.parametrize("key", ["timeout_http_request", "timeout_http_keep_alive"])
def test_http_timeouts_zero_mean_no_timeout(key, http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={key: 0})
    with HTTPClient(proxy.port) as client:
        assert stays(client.is_open, 1.5), f"{key} = 0 closed a silent new connection"
        assert client.request(build_request("GET", "/first")).status == 200
        assert stays(client.is_open, 1.5), f"{key} = 0 closed the idle keep-alive connection"
        assert client.request(build_request("GET", "/second")).status == 200


@pytest.mark.parametrize("where, key", [
    ("defaults", "timeout_client"),
    ("frontend", "timeout_client"),
    ("backend", "timeout_server"),
])
def test_check_accepts_and_warns_about_a_zero_timeout(where, key, tmp_path):
    cfg = tcp_config(free_port(), [f"{LOCALHOST}:{free_port()}"], workers=1,
                     **{where: {key: 0}})
    directory = tmp_path / "conf"
    directory.mkdir()
    path = write_config(directory, cfg, "p.toml")
    result = run_proxyd("-c", str(path), "--check")
    assert result.returncode == 0, result.stderr + result.stdout
    # The file's path (which holds the test's name) is not what we look for.
    output = (result.stdout + result.stderr).replace(str(path), "FILE")
    assert key in output.lower(), output
    assert "warn" in output.lower(), output


# ------------------------------------------ 15. max_body_size and chunked bodies

@pytest.mark.parametrize("size", [2000, 1001])
def test_chunked_body_over_max_body_size_is_413(size, http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"max_body_size": 1000})
    body = payload(size, seed=size)
    with HTTPClient(proxy.port) as client:
        client.send(build_request("POST", "/chunked-over", body=body, framing="chunked", chunk_size=100))
        assert_own_error(client.read_response("POST"), 413)
        client.rest_and_close()
    assert not any(r.target == "/chunked-over" for r in app.requests()), "the over-limit body was forwarded"
    assert wait_http_access_lines(proxy, 1)[0].status == 413


def test_chunked_body_over_max_body_size_arriving_late_is_413(http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"max_body_size": 1000})
    body = payload(2000, seed=15)
    request = build_request("POST", "/chunked-late", body=body, framing="chunked", chunk_size=100)
    first = request[:request.index(b"\r\n\r\n") + 4 + 5 * 105]   # the head and 500 bytes of chunks
    with HTTPClient(proxy.port) as client:
        client.send(first)
        wait_for(lambda: app.saw(b"/chunked-late"), 10, "the head to reach the server")
        client.send(request[len(first):])
        assert_own_error(client.read_response("POST"), 413)
        client.rest_and_close()
    assert not any(r.target == "/chunked-late" for r in app.requests()), "the over-limit body was forwarded"


@pytest.mark.parametrize("size", [500, 1000])
def test_chunked_body_within_max_body_size_is_forwarded_intact(size, http_backend, http_proxy):
    app = http_backend()
    proxy = http_proxy([app], frontend={"max_body_size": 1000})
    body = payload(size, seed=size)
    with HTTPClient(proxy.port) as client:
        # chunk framing makes the wire bytes more than the limit for 1000: the payload is what counts
        resp = client.request(build_request("POST", "/chunked-ok", body=body, framing="chunked",
                                            chunk_size=100), "POST")
    assert resp.status == 200, resp.head
    assert resp.json()["body_sha256"] == sha256(body)
    req = app.wait_request_for("/chunked-ok")
    assert req.framing == "chunked" and req.body_sha256 == sha256(body)
