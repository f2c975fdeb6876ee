"""The access log in HAProxy's layouts, read by HAProxy's own tool: the
tcplog and httplog lines field by field, `halog` on a known mix of answers,
and the syslog framings (RFC 3164, RFC 5424) as a receiver sees them over a
unix datagram socket, UDP and TCP (man/proxyd.8, "TCP access log", "HTTP
access log"; man/proxyd.toml.5, syslog_format)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest

from tests.http_support import HTTPClient, Reply, get, http_access_lines, http_config, wait_http_access_lines
from tests.support import LOG_LINE, connect, echo_handler, free_port, recv_exactly, tcp_config, wait_for

HALOG = shutil.which("halog") or ("/usr/sbin/halog" if os.path.exists("/usr/sbin/halog") else None)
needs_halog = pytest.mark.skipif(HALOG is None, reason="halog (Debian's haproxy package) is not installed")

# What a file log's lines start with: `ISO-TIME proxyd[PID]: `, 2 fields where
# halog expects syslog's 5 (`Mmm dd hh:mm:ss host proxyd[PID]:`): -s -2.
FILE_SKIP = "-2"

DATE = r"\[[0-3]\d/(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)/\d{4}:\d\d:\d\d:\d\d\.\d{3}\]"
TCPLOG = re.compile(
    r"^127\.0\.0\.1:(?P<cp>\d+) " + DATE + r" (?P<ft>tcp_in) (?P<b>pool)/(?P<s>one)"
    r" (?P<Tw>0)/(?P<Tc>\d+)/(?P<Tt>\d+) (?P<B>5) (?P<ts>--)"
    r" (?P<ac>\d+)/(?P<fc>\d+)/(?P<bc>\d+)/(?P<sc>\d+)/(?P<rc>0) (?P<sq>0)/(?P<bq>0)"
    r" up=(?P<up>5) fin=(?P<fin>client)(?: err=timeout_fin)?$")
HTTPLOG = re.compile(
    r"^127\.0\.0\.1:(?P<cp>\d+) " + DATE + r" (?P<ft>web) (?P<b>app)/(?P<s>s1)"
    r" (?P<TR>\d+)/(?P<Tw>0)/(?P<Tc>\d+)/(?P<Tr>\d+)/(?P<Ta>\d+) (?P<ST>200) (?P<B>\d+)"
    r" (?P<CC>-) (?P<CS>-) (?P<tsc>----) (?P<ac>\d+)/(?P<fc>\d+)/(?P<bc>\d+)/(?P<sc>\d+)/(?P<rc>0)"
    r" (?P<sq>0)/(?P<bq>0) \"(?P<r>[^\"]*)\" up=(?P<up>\d+)$")
HTTPLOG_REJECTED = re.compile(
    r"^127\.0\.0\.1:\d+ " + DATE + r" web web/<NOSRV> -1/-1/-1/-1/\d+ 400 (?P<B>\d+) - - PR--"
    r" \d+/\d+/0/0/0 0/0 \"(?P<r>[^\"]*)\" up=0 err=(?P<err>.+)$")


def messages(proxy) -> list[str]:
    return [m["message"] for m in map(LOG_LINE.match, proxy.log_lines()) if m]


def test_tcplog_layout_field_by_field(backend, proxyd):
    echo = backend(echo_handler)
    port = free_port()
    config = tcp_config(port, [{"name": "one", "address": echo.address}], workers=1,
                        frontend_name="tcp_in", backend_name="pool", frontend={"timeout_fin": "200ms"})
    proxy = proxyd(config)
    with connect(port) as client:
        name = client.getsockname()
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == b"hello"
    wait_for(lambda: [m for m in messages(proxy) if " tcp_in " in m], 10, "the tcplog line")
    (line,) = [m for m in messages(proxy) if " tcp_in " in m]
    m = TCPLOG.match(line)
    assert m, f"not HAProxy's tcplog layout: {line!r}"
    assert int(m["cp"]) == name[1]
    assert int(m["Tc"]) <= int(m["Tt"]), line
    # The session was over when logged: the worker counts no session left.
    assert (m["ac"], m["fc"], m["bc"], m["sc"]) == ("0", "0", "0", "0"), line


def test_httplog_layout_field_by_field_with_escaped_request_bytes(http_backend, proxyd):
    app = http_backend(lambda req: Reply(body=b"x" * 10))
    port = free_port()
    proxy = proxyd(http_config(port, {"app": [{"name": "s1", "address": app.address}]}, frontend_name="web"))
    resp = get(port, "/ok?a=1")
    assert resp.status == 200
    with HTTPClient(port) as client:
        # A quote, a backslash, a control character and a byte beyond ASCII:
        # none may reach the log raw, and the quoted field stays one field.
        client.send(b'GET /q"uo\\te\x01\xe9 HTTP/1.1\r\nHost: example.test\r\n\r\n')
        assert client.read_response().status == 400
    lines = wait_http_access_lines(proxy, 1, where=lambda a: a.status == 200)
    ok = [m for m in messages(proxy) if " web app/s1 " in m]
    assert len(ok) == 1 and len(lines) == 1, ok
    m = HTTPLOG.match(ok[0])
    assert m, f"not HAProxy's httplog layout: {ok[0]!r}"
    assert m["r"] == "GET /ok?a=1 HTTP/1.1"
    assert int(m["B"]) == resp.raw_size, (ok[0], resp.raw_size)
    assert int(m["TR"]) + int(m["Tc"]) + int(m["Tr"]) <= int(m["Ta"]), ok[0]
    assert (m["ac"], m["fc"]) == ("1", "1"), ok[0]   # the client connection was still open
    wait_for(lambda: [x for x in messages(proxy) if " web/<NOSRV> " in x], 10, "the rejected request's line")
    (bad,) = [x for x in messages(proxy) if " web/<NOSRV> " in x]
    r = HTTPLOG_REJECTED.match(bad)
    assert r, f"not HAProxy's httplog layout: {bad!r}"
    assert r["r"] == r"GET /q\x22uo\x5cte\x01\xe9 HTTP/1.1", bad
    assert r["err"] == "malformed request line", bad


# ----------------------------------------------------------------- halog

def halog(args: list[str], text: str, key: int = 0) -> tuple[dict[str, list[str]], str]:
    """Run halog on TEXT; (rows keyed by their column KEY, stderr)."""
    done = subprocess.run([HALOG, *args], input=text, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done
    print(f"$ halog {' '.join(args)}\n{done.stdout}{done.stderr}")
    rows = {}
    for row in done.stdout.splitlines():
        if row and not row.startswith("#"):
            fields = row.split()
            rows[fields.pop(key)] = fields
    return rows, done.stderr


@needs_halog
def test_halog_reads_the_http_log_of_a_known_mix(http_backend, reserve_port, proxyd):
    """20 x 200 and 7 x 404 from the server, 5 x 503 for a backend whose
    only server is down, 3 x 400 for malformed requests: halog -st, -srv,
    -tc and -u report exactly that, from the file log (-s -2) and from the
    same lines with syslog's header (halog's default)."""
    app = http_backend(lambda req: Reply(status=404, reason="Not Found", body=b"no")
                       if req.target.startswith("/missing") else Reply(body=b"yes"))
    dead = reserve_port()
    port = free_port()
    config = http_config(port, {"app": [{"name": "s1", "address": app.address}],
                                "gone": {"servers": [{"name": "dead", "address": f"127.0.0.1:{dead}"}],
                                         "retries": 0}},
                         default="app", routes=[{"path_prefix": "/gone", "backend": "gone"}], frontend_name="web")
    proxy = proxyd(config)
    statuses = Counter()
    for i in range(20):
        statuses[get(port, f"/page/{i % 4}").status] += 1
    for i in range(7):
        statuses[get(port, f"/missing/{i}").status] += 1
    for i in range(5):
        statuses[get(port, "/gone/x").status] += 1
    for raw in (b"GARBAGE\r\n\r\n", b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"):
        with HTTPClient(port) as client:
            client.send(raw)
            statuses[client.read_response().status] += 1
    assert statuses == {200: 20, 404: 7, 503: 5, 400: 3}, statuses
    wait_http_access_lines(proxy, 35)
    assert len(http_access_lines(proxy)) == 35
    access = "".join(m.group(0) + "\n" for m in map(LOG_LINE.match, proxy.log_lines())
                     if m and " [" in m["message"])
    assert access.count("\n") == 35

    rows, err = halog(["-s", FILE_SKIP, "-st"], access)
    assert {k: int(v[0]) for k, v in rows.items()} == {"200": 20, "404": 7, "503": 5, "400": 3}, (rows, err)
    assert "35 lines in, 4 lines out, 0 parsing errors" in err, err

    rows, err = halog(["-s", FILE_SKIP, "-srv"], access)
    # srv_name 1xx 2xx 3xx 4xx 5xx other tot_req req_ok pct_ok avg_ct avg_rt
    by_class = {k: [int(x) for x in v[:7]] for k, v in rows.items()}
    assert by_class == {"app/s1": [0, 20, 0, 7, 0, 0, 27],
                        "gone/dead": [0, 0, 0, 0, 5, 0, 5],
                        "web/<NOSRV>": [0, 0, 0, 3, 0, 0, 3]}, (rows, err)
    assert int(rows["app/s1"][7]) == 27 and int(rows["gone/dead"][7]) == 0, rows   # req_ok: every timer valid

    rows, err = halog(["-s", FILE_SKIP, "-tc"], access)
    assert {k: int(v[0]) for k, v in rows.items()} == {"--": 27, "SC": 5, "PR": 3}, (rows, err)

    rows, err = halog(["-s", FILE_SKIP, "-u"], access, key=-1)
    # #req err ttot tavg oktot okavg bavg btot src: per URL, requests and errors (5xx, or a -1 timer)
    counts = {url: (int(v[0]), int(v[1])) for url, v in rows.items()}
    assert {u: c for u, c in counts.items() if u.startswith(("/page/", "/gone"))} == \
        {"/page/0": (5, 0), "/page/1": (5, 0), "/page/2": (5, 0), "/page/3": (5, 0), "/gone/x": (5, 5)}, rows
    assert sum(n for u, (n, e) in counts.items() if u.startswith("/missing/")) == 7, rows
    assert sum(n for n, e in counts.values()) == 35, rows

    # The same lines as a syslog daemon writes them (`Mmm dd hh:mm:ss host
    # proxyd[PID]: `): halog's default -s.
    syslogged = "".join(f"Dec  2 10:00:00 testhost proxyd[{m['pid']}]: {m['message']}\n"
                        for m in map(LOG_LINE.match, access.splitlines()))
    rows, err = halog(["-st"], syslogged)
    assert {k: int(v[0]) for k, v in rows.items()} == {"200": 20, "404": 7, "503": 5, "400": 3}, (rows, err)


@needs_halog
def test_halog_tells_http_lines_from_tcp_lines_with_H(backend, proxyd):
    """On a log with tcplog lines too, halog -H keeps the HTTP lines only (as
    with HAProxy's own tcplog lines, which have no status field)."""
    echo = backend(echo_handler)
    port = free_port()
    proxy = proxyd(tcp_config(port, [echo], workers=1, frontend={"timeout_fin": "200ms"}))
    for _ in range(3):
        with connect(port) as client:
            client.sendall(b"abc")
            assert recv_exactly(client, 3) == b"abc"
    proxy.wait_access_lines(3)
    access = "\n".join(line for line in proxy.log_lines() if "] fe be/" in line) + "\n"
    rows, err = halog(["-s", FILE_SKIP, "-H", "-st"], access)
    assert rows == {} and "3 lines in, 0 lines out, 0 parsing errors" in err, (rows, err)
    rows, err = halog(["-s", FILE_SKIP, "-c"], access)
    assert rows == {"3": []}, (rows, err)   # every line read as an access line


# ---------------------------------------------------------------- syslog

RFC3164 = re.compile(r"^<(?P<pri>\d{1,3})>(?P<mon>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                     r"(?P<day>[ 1-3]\d) (?P<time>\d\d:\d\d:\d\d) proxyd\[(?P<pid>\d+)\]: (?P<msg>.*)$", re.S)
RFC5424 = re.compile(r"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d) "
                     r"(?P<host>[!-~]{1,255}) proxyd (?P<pid>\d+) - - (?P<msg>.*)$", re.S)
DAEMON = 3


class Receiver:
    """Syslog messages received on a unix datagram socket, UDP or TCP."""

    def __init__(self, kind: str, path: str = ""):
        self.kind = kind
        self.messages: list[bytes] = []
        self.stream = bytearray()
        self.lock = threading.Lock()
        if kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(path)
            self.target = f"syslog:{path}"
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            port = self.sock.getsockname()[1]
            self.target = f"syslog:127.0.0.1:{port}" if kind == "udp" else f"syslog:tcp@127.0.0.1:{port}"
            if kind == "tcp":
                self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conns = []
        while not self.done.is_set():
            if self.kind == "tcp":
                try:
                    conn, _ = self.sock.accept()
                    conn.settimeout(0.05)
                    conns.append([conn, bytearray()])
                except socket.timeout:
                    pass
                for entry in conns:
                    try:
                        data = entry[0].recv(65536)
                    except socket.timeout:
                        continue
                    entry[1] += data
                    with self.lock:
                        self.streams = [bytes(e[1]) for e in conns]
            else:
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    continue
                with self.lock:
                    self.messages.append(data)
        for conn, _ in conns:
            conn.close()

    def received(self, framing: str) -> list[bytes]:
        """Every whole message so far, unframed (TCP: octet counting for
        rfc5424, a newline after each for rfc3164; strictly)."""
        if self.kind != "tcp":
            with self.lock:
                return list(self.messages)
        with self.lock:
            streams = list(getattr(self, "streams", []))
        out = []
        for data in streams:
            while data:
                if framing == "rfc5424":
                    length, sep, rest = data.partition(b" ")
                    assert sep and length.isdigit() and not length.startswith(b"0"), data[:80]
                    if len(rest) < int(length):
                        break
                    frame, data = rest[:int(length)], rest[int(length):]
                    assert frame.endswith(b"\n") and b"\n" not in frame[:-1], frame
                    out.append(frame[:-1])
                else:
                    end = data.find(b"\n")
                    if end < 0:
                        break
                    out.append(data[:end])
                    data = data[end + 1:]
        return out

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("framing", ["rfc3164", "rfc5424"])
@pytest.mark.parametrize("kind", ["unix", "udp", "tcp"])
def test_syslog_framing(kind, framing, backend, proxyd, tmp_path):
    receiver = Receiver(kind, str(tmp_path / "log.sock"))
    try:
        echo = backend(echo_handler)
        port = free_port()
        proxy = proxyd(tcp_config(port, [{"name": "s1", "address": echo.address}], workers=1,
                                  global_={"log": receiver.target, "syslog_format": framing},
                                  frontend={"timeout_fin": "200ms"}))
        with connect(port) as client:
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
        pattern = RFC5424 if framing == "rfc5424" else RFC3164

        def access():
            return [pattern.match(m.decode()) for m in receiver.received(framing) if b"] fe be/s1 " in m]

        (m,) = wait_for(access, 15, "the access line at the receiver")
        assert m, receiver.received(framing)
        worker = proxy.workers()[0]
        assert int(m["pid"]) == worker.pid, (m["pid"], worker.pid)
        assert int(m["pri"]) == DAEMON * 8 + 6, m["pri"]   # daemon.info
        now = time.time()
        if framing == "rfc5424":
            assert m["host"] == socket.gethostname(), m["host"]
            stamp = time.mktime(time.strptime(m["ts"][:19], "%Y-%m-%dT%H:%M:%S"))
            offset = time.localtime(stamp).tm_gmtoff
            assert m["ts"][-6:] == f"{'-' if offset < 0 else '+'}{abs(offset) // 3600:02d}:{abs(offset) % 3600 // 60:02d}"
        else:
            stamp = time.mktime(time.strptime(f"{time.localtime().tm_year} {m['mon']} {m['day'].strip()} {m['time']}",
                                              "%Y %b %d %H:%M:%S"))
            assert m["day"] == f"{time.localtime(stamp).tm_mday:2d}", m["day"]
        assert now - 60 < stamp <= now + 1, m.group(0)
        line = m["msg"]
        assert re.match(r"^127\.0\.0\.1:\d+ " + DATE + r" fe be/s1 0/\d+/\d+ 4 -- \d+/\d+/\d+/\d+/0 0/0 up=4 "
                        r"fin=client(?: err=timeout_fin)?$", line), line
        # Other messages go the same way, each a whole message.
        for raw in receiver.received(framing):
            assert pattern.match(raw.decode()), raw
    finally:
        receiver.close()
