"""Helpers for the HTTP-mode integration tests: a recording HTTP/1.1 backend,
a small strict client, http-mode configs and the HTTP access-line parser.

Same rules as tests/support.py (which this module builds on and does not
change): real sockets on 127.0.0.1, threads in the test process for the
backends, every wait bounded by a deadline, every loop bounded in count.

The backend (HTTPBackend) keeps every raw byte it receives on each
connection, so a test can assert that a rejected request never reached it;
it parses one request per connection (the proxy sends `Connection: close`),
answers as its Reply says, and then closes its side (or, with keep_open,
waits for the proxy to close first).
"""

from __future__ import annotations

import hashlib
import json
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from tests.support import ACCEPT_DATE, COUNTS, LOCALHOST, LOG_LINE, Backend, ConnRecord, wait_for

CRLF = b"\r\n"
MAX_HEAD = 1 << 20  # the backend's and the client's own bound on a head


class ProtocolError(AssertionError):
    """Bytes that are not what an HTTP/1.1 peer may send (raised by the
    client reader, recorded by the backend)."""


# -------------------------------------------------------------- heads

def parse_headers(lines: list[bytes]) -> list[tuple[str, str]]:
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"malformed header line {line!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return headers


def split_head(head: bytes) -> list[bytes]:
    """The lines of HEAD (which ends with CRLF CRLF); every line must end
    with CRLF: a bare CR or LF is a protocol error."""
    assert head.endswith(b"\r\n\r\n"), head[-20:]
    lines = head[:-4].split(CRLF)
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise ProtocolError(f"bare CR or LF in head line {line!r}")
    return lines


class _Headers:
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        """The first value of header NAME (case-insensitive), or None."""
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def header_tokens(self, name: str) -> list[str]:
        """Comma-separated tokens of every NAME header, lower-cased."""
        return [t.strip().lower() for v in self.header_all(name) for t in v.split(",") if t.strip()]


# ------------------------------------------------------------ buffered I/O

class _Buffered:
    """A socket with a read buffer.  Subclasses record what they read."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _received(self, data: bytes) -> None:
        pass

    def fill(self) -> bool:
        """One recv into the buffer; False at EOF."""
        if self.eof:
            return False
        data = self.sock.recv(262144)
        if not data:
            self.eof = True
            return False
        self._received(data)
        self.buf += data
        return True

    def take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_until(self, sep: bytes, limit: int = MAX_HEAD) -> bytes | None:
        """Bytes up to and including SEP; None at EOF before SEP."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                return self.take(i + len(sep))
            if len(self.buf) > limit:
                raise ProtocolError(f"no {sep!r} in the first {limit} bytes")
            start = max(0, len(self.buf) - len(sep) + 1)
            if not self.fill():
                return None

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self.fill():
                return None
        return self.take(n)

    def read_to_eof(self, limit: int = 64 << 20) -> bytes:
        while len(self.buf) <= limit and self.fill():
            pass
        return self.take(len(self.buf))

    def read_chunked(self, limit: int = 64 << 20) -> tuple[bytes, list[tuple[str, str]]]:
        """A chunked body (strict framing); returns (decoded body, trailers)."""
        body = bytearray()
        for _ in range(10_000_000):
            line = self.read_until(CRLF, 4096)
            if line is None:
                raise ProtocolError("EOF in chunk size line")
            size_text = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not size_text or len(size_text) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                raise ProtocolError(f"bad chunk size line {line!r}")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > limit:
                raise ProtocolError(f"chunked body over {limit} bytes")
            data = self.read_exact(size + 2)
            if data is None:
                raise ProtocolError("EOF in chunk data")
            if data[-2:] != CRLF:
                raise ProtocolError(f"chunk data not followed by CRLF: {data[-2:]!r}")
            body += data[:-2]
        trailers = []
        for _ in range(1000):
            line = self.read_until(CRLF, 65536)
            if line is None:
                raise ProtocolError("EOF in trailers")
            if line == CRLF:
                return bytes(body), trailers
            trailers += parse_headers([line[:-2]])
        raise ProtocolError("too many trailer lines")


# ---------------------------------------------------------------- backend

@dataclass
class Request(_Headers):
    """One request as the backend parsed it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    head: bytes
    body: bytes = b""
    framing: str = "none"  # "none" | "length" | "chunked"
    trailers: list = field(default_factory=list)
    continue_sent: bool = False

    @property
    def body_sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass
class Reply:
    """How the backend answers a request.

    framing: "length" (Content-Length), "chunked", "close" (no framing header,
    the end of the body is the server's close) or "none" (no framing header
    and no body: 1xx, 204, 304).
    action: "respond"; "reset" (RST instead of an answer); "close" (FIN
    without an answer); "hang" (never answer, read until the peer ends);
    "upgrade" (send the head, then AFTER_HEAD, then echo every byte until EOF).
    raw: bytes sent as they are instead of a formatted head and body.
    keep_open: after the answer, do not close: read until the proxy ends the
    connection (a server that ignores `Connection: close`).
    """

    status: int = 200
    reason: str = "OK"
    headers: list = field(default_factory=list)
    body: bytes = b""
    framing: str = "length"
    chunk_size: int = 65536
    delay: float = 0.0
    action: str = "respond"
    raw: bytes | None = None
    after_head: bytes = b""
    keep_open: bool = False
    connection_close: bool = True  # send `Connection: close` (proxyd must strip it)

    def render(self) -> bytes:
        if self.raw is not None:
            return self.raw
        headers = list(self.headers)
        names = {n.lower() for n, _ in headers}
        if self.framing == "length" and "content-length" not in names:
            headers.append(("Content-Length", str(len(self.body))))
        elif self.framing == "chunked" and "transfer-encoding" not in names:
            headers.append(("Transfer-Encoding", "chunked"))
        if self.connection_close and self.framing != "none" and "connection" not in names:
            headers.append(("Connection", "close"))
        head = f"HTTP/1.1 {self.status} {self.reason}\r\n".encode() + b"".join(
            f"{n}: {v}\r\n".encode("latin-1") for n, v in headers) + CRLF
        if self.framing == "chunked":
            chunks = [b"%x\r\n%s\r\n" % (len(self.body[i:i + self.chunk_size]), self.body[i:i + self.chunk_size])
                      for i in range(0, len(self.body), self.chunk_size)]
            return head + b"".join(chunks) + b"0\r\n\r\n"
        return head + self.body


def echo_reply(req: Request) -> Reply:
    """200 with a JSON body describing the request as the backend saw it."""
    body = json.dumps({"method": req.method, "target": req.target, "version": req.version,
                       "body_len": len(req.body), "body_sha256": req.body_sha256,
                       "headers": req.headers}).encode()
    return Reply(body=body, headers=[("Content-Type", "application/json")])


class HTTPConn:
    """What the backend saw on one connection: every raw byte, the parsed
    request (if one was complete), and how it ended."""

    def __init__(self, rec: ConnRecord):
        self.rec = rec
        self.raw = bytearray()
        self.request: Request | None = None
        self.error: str | None = None
        self.replied = False

    @property
    def end(self) -> str | None:
        return self.rec.end

    @property
    def done(self) -> bool:
        return self.rec.done.is_set()


class _ServerSide(_Buffered):
    def __init__(self, sock: socket.socket, conn: HTTPConn):
        super().__init__(sock)
        self.conn = conn

    def _received(self, data: bytes) -> None:
        self.conn.rec.feed(data)
        self.conn.raw += data


class HTTPBackend(Backend):
    """A recording HTTP/1.1 server (threads in the test process).

    REPLY: a Reply, or a function Request -> Reply, called once the request
    (body included) is read.
    expect_continue: answer `Expect: 100-continue` with a 100 before reading
    the body.
    early: answer as soon as the head is read, without reading the body,
    then read until the proxy ends the connection.
    accept: with False, nothing is accepted until `accepting.set()` (with a
    small BACKLOG, connections then wait in the kernel, or hang once its
    queue is full: see fill_backlog).
    """

    def __init__(self, reply=None, name: str = "http", expect_continue: bool = True, early: bool = False,
                 backlog: int = 1024, accept: bool = True):
        self.reply = reply if reply is not None else echo_reply
        self.expect_continue = expect_continue
        self.early = early
        self.accepting = threading.Event()
        if accept:
            self.accepting.set()
        super().__init__(self._handle, name=name, backlog=backlog)

    def _accept_loop(self) -> None:
        while not self.accepting.wait(0.1):
            if self.stopping.is_set():
                return
        super()._accept_loop()

    # ------------------------------------------------------------ serving
    def _reply_for(self, req: Request) -> Reply:
        return self.reply(req) if callable(self.reply) else self.reply

    def _handle(self, sock: socket.socket, rec: ConnRecord, backend) -> None:
        conn = HTTPConn(rec)
        rec.http = conn
        side = _ServerSide(sock, conn)
        try:
            req = self._read_request(side, conn)
        except ProtocolError as e:
            conn.error = str(e)
            return
        if req is None:
            rec.end = "eof"
            return
        if not self.early:
            try:
                self._read_body(side, conn, req, sock)
            except ProtocolError as e:
                conn.error = str(e)
                return
        conn.request = req
        reply = self._reply_for(req)
        if reply.delay:
            self.stopping.wait(reply.delay)
        if reply.action == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            rec.end = "we reset"
            return
        if reply.action == "close":
            return
        if reply.action == "hang":
            side.read_to_eof()
            rec.end = "eof"
            return
        data = reply.render() + reply.after_head
        sock.sendall(data)
        rec.sent += len(data)
        conn.replied = True
        if reply.action == "upgrade":
            self._echo(side, sock, rec)
        elif reply.keep_open or self.early:
            side.read_to_eof()
            rec.end = "eof"

    def _read_request(self, side: _ServerSide, conn: HTTPConn) -> Request | None:
        head = side.read_until(b"\r\n\r\n")
        if head is None:
            if side.buf:
                conn.error = f"EOF inside a head: {bytes(side.buf[:200])!r}"
            return None
        lines = split_head(head)
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise ProtocolError(f"malformed request line {lines[0]!r}")
        method, target, version = (p.decode("latin-1") for p in parts)
        return Request(method, target, version, parse_headers(lines[1:]), head)

    def _read_body(self, side: _ServerSide, conn: HTTPConn, req: Request, sock: socket.socket) -> None:
        te = req.header_tokens("transfer-encoding")
        cl = req.header_all("content-length")
        if te and cl:
            raise ProtocolError("the proxy sent both Transfer-Encoding and Content-Length")
        if len(cl) > 1:
            raise ProtocolError(f"the proxy sent Content-Length {len(cl)} times")
        if self.expect_continue and (req.header("expect") or "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            req.continue_sent = True
        if te:
            if te[-1] != "chunked":
                raise ProtocolError(f"the proxy sent Transfer-Encoding {te}")
            req.body, req.trailers = side.read_chunked()
            req.framing = "chunked"
        elif cl:
            if not cl[0].isdigit():
                raise ProtocolError(f"the proxy sent Content-Length {cl[0]!r}")
            body = side.read_exact(int(cl[0]))
            if body is None:
                raise ProtocolError(f"EOF inside a body of {cl[0]} bytes")
            req.body = body
            req.framing = "length"

    def _echo(self, side: _ServerSide, sock: socket.socket, rec: ConnRecord) -> None:
        if side.buf:
            data = side.take(len(side.buf))
            sock.sendall(data)
            rec.sent += len(data)
        while side.fill():
            data = side.take(len(side.buf))
            sock.sendall(data)
            rec.sent += len(data)
        rec.end = "eof"

    # ------------------------------------------------------------ queries
    def conns(self) -> list[HTTPConn]:
        """Every connection accepted so far, in accept order (a connection
        whose handler has not started yet shows with no bytes)."""
        out = []
        for rec in self.connections():
            conn = getattr(rec, "http", None)
            if conn is None:
                conn = HTTPConn(rec)  # accepted, handler not started yet
            out.append(conn)
        return out

    def requests(self) -> list[Request]:
        return [c.request for c in self.conns() if c.request is not None]

    def saw(self, marker: bytes, since: int = 0) -> bool:
        """True if any connection from number SINCE on received MARKER."""
        return any(marker in c.raw for c in self.conns()[since:])

    def wait_requests(self, count: int, timeout: float = 10.0) -> list[Request]:
        wait_for(lambda: len(self.requests()) >= count, timeout, f"{count} requests on {self.name}")
        return self.requests()

    def wait_request_for(self, target: str, timeout: float = 10.0) -> Request:
        def find():
            return next((r for r in self.requests() if r.target == target), None)
        return wait_for(find, timeout, f"a request for {target} on {self.name}")


def fill_backlog(listener_port: int, limit: int = 16) -> list[socket.socket]:
    """Connect to a listen(0) socket that nobody accepts from until a
    connect attempt times out: its accept queue is then full and the kernel
    drops further SYNs, so a connect to it hangs.  Returns the connected
    sockets (close them when done)."""
    held = []
    for _ in range(limit):
        s = socket.socket()
        s.settimeout(0.5)
        try:
            s.connect((LOCALHOST, listener_port))
        except (socket.timeout, BlockingIOError):
            s.close()
            return held
        held.append(s)
    for s in held:
        s.close()
    raise AssertionError(f"the accept queue of :{listener_port} did not fill after {limit} connections")


# ----------------------------------------------------------------- client

@dataclass
class Response(_Headers):
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    head: bytes
    body: bytes = b""
    framing: str = "none"  # "none" | "length" | "chunked" | "close"

    @property
    def body_sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    @property
    def raw_size(self) -> int:
        """Bytes of head and body as received (chunked framing counted by the reader)."""
        return len(self.head) + self._body_wire

    _body_wire: int = 0

    def json(self):
        return json.loads(self.body)


class HTTPClient(_Buffered):
    """A client connection to the proxy with a strict response reader.

    Counts every byte received (self.received) so tests can compare with
    the access log."""

    def __init__(self, port: int, timeout: float = 10.0):
        super().__init__(socket.create_connection((LOCALHOST, port), timeout=timeout))
        self.received = 0
        self.sent = 0

    def _received(self, data: bytes) -> None:
        self.received += len(data)

    @property
    def address(self) -> str:
        return "%s:%d" % self.sock.getsockname()[:2]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def read_response(self, method: str = "GET") -> Response:
        start = self.received - len(self.buf)
        head = self.read_until(b"\r\n\r\n")
        if head is None:
            raise ProtocolError(f"connection closed before a response head (got {bytes(self.buf[:300])!r})")
        lines = split_head(head)
        m = re.fullmatch(rb"HTTP/(1\.[01]) ([1-5]\d\d) ([^\r\n]*)", lines[0])
        if not m:
            raise ProtocolError(f"malformed status line {lines[0]!r}")
        resp = Response(m[1].decode(), int(m[2]), m[3].decode("latin-1"), parse_headers(lines[1:]), head)
        te = resp.header_tokens("transfer-encoding")
        cl = resp.header_all("content-length")
        if te and cl:
            raise ProtocolError(f"response with both Transfer-Encoding and Content-Length: {head!r}")
        if len(cl) > 1:
            raise ProtocolError(f"response with {len(cl)} Content-Length headers: {head!r}")
        if 100 <= resp.status < 200 or resp.status in (204, 304) or method == "HEAD":
            resp.framing = "none"
        elif te:
            if te[-1] != "chunked":
                raise ProtocolError(f"response Transfer-Encoding {te}")
            resp.body, _ = self.read_chunked()
            resp.framing = "chunked"
        elif cl:
            if not cl[0].isdigit():
                raise ProtocolError(f"response Content-Length {cl[0]!r}")
            body = self.read_exact(int(cl[0]))
            if body is None:
                raise ProtocolError(f"EOF inside a response body of {cl[0]} bytes")
            resp.body = body
            resp.framing = "length"
        else:
            resp.body = self.read_to_eof()
            resp.framing = "close"
        resp._body_wire = self.received - len(self.buf) - start - len(head)
        return resp

    def request(self, raw: bytes, method: str = "GET") -> Response:
        self.send(raw)
        return self.read_response(method)

    def final_response(self, method: str = "GET") -> tuple[list[Response], Response]:
        """Skip interim (1xx other than 101) responses; (interims, final)."""
        interims = []
        for _ in range(10):
            resp = self.read_response(method)
            if resp.status >= 200 or resp.status == 101:
                return interims, resp
            interims.append(resp)
        raise ProtocolError("more than 10 interim responses")

    def rest_and_close(self, timeout: float = 10.0) -> tuple[bytes, str]:
        """Everything the proxy sends until it ends the connection, and how it
        ended ("eof" or "reset").  AssertionError if still open after TIMEOUT."""
        deadline = time.monotonic() + timeout
        data = self.take(len(self.buf))
        if self.eof:
            return data, "eof"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"connection still open after {timeout}s (got {data[:200]!r})")
            readable, _, _ = select.select([self.sock], [], [], left)
            if not readable:
                continue
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data, "reset"
            if not chunk:
                self.eof = True
                return data, "eof"
            self.received += len(chunk)
            data += chunk

    def is_open(self) -> bool:
        """Nothing pending: no data, no EOF, no reset."""
        if self.buf or self.eof:
            return False
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "HTTPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_request(method: str = "GET", target: str = "/", headers=(), body: bytes = b"", *,
                  version: str = "HTTP/1.1", host: str | None = "example.test", framing: str = "length",
                  chunk_size: int = 65536) -> bytes:
    """A well-formed request.  framing: "length" (Content-Length when there is
    a body or the method is POST/PUT), "chunked", or "none" (no framing header)."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{n}: {v}" for n, v in headers]
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        chunks = [b"%x\r\n%s\r\n" % (len(body[i:i + chunk_size]), body[i:i + chunk_size])
                  for i in range(0, len(body), chunk_size)]
        encoded = b"".join(chunks) + b"0\r\n\r\n"
    elif framing == "length" and (body or method in ("POST", "PUT")):
        lines.append(f"Content-Length: {len(body)}")
        encoded = body
    else:
        encoded = body
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + encoded


def get(port: int, target: str = "/", headers=(), host: str | None = "example.test",
        timeout: float = 10.0) -> Response:
    """One GET on a new connection (closed afterwards)."""
    with HTTPClient(port, timeout) as client:
        return client.request(build_request("GET", target, headers, host=host))


def assert_own_error(resp: Response, status: int) -> None:
    """RESP is one of proxyd's own answers (docs/CONTRACT.md): a small valid
    HTTP/1.1 response with Content-Type text/html, a Content-Length that
    matches its body, and Connection: close."""
    assert resp.status == status, f"expected {status}, got {resp.status} {resp.reason}: {resp.head!r}"
    assert resp.version == "1.1", resp.head
    assert (resp.header("content-type") or "").split(";")[0].strip().lower() == "text/html", resp.head
    assert resp.framing == "length" and int(resp.header("content-length")) == len(resp.body), resp.head
    assert "close" in resp.header_tokens("connection"), resp.head


# ---------------------------------------------------------------- configs

def _server_list(servers) -> list[dict]:
    out = []
    for i, srv in enumerate(servers, 1):
        if isinstance(srv, dict):
            entry = dict(srv)
        elif isinstance(srv, str):
            entry = {"address": srv}
        else:
            entry = {"address": srv.address}
        entry.setdefault("name", f"s{i}")
        out.append(entry)
    return out


def http_config(port: int, backends: dict, *, default: str | None = None, routes=(), workers: int = 1,
                global_=None, frontend=None, defaults=None, frontend_name: str = "fe") -> dict:
    """A config dict with one http frontend on 127.0.0.1:PORT.

    BACKENDS: name -> a list of servers (HTTPBackend/Backend objects,
    "host:port" strings or server dicts) or a dict of backend keys with
    "servers" in it.  DEFAULT: the frontend's backend (the first by default).
    """
    bes = {}
    for name, spec in backends.items():
        spec = dict(spec) if isinstance(spec, dict) else {"servers": spec}
        spec["servers"] = _server_list(spec["servers"])
        bes[name] = spec
    fe = {"bind": [f"{LOCALHOST}:{port}"], "mode": "http", "backend": default or next(iter(backends)),
          **(frontend or {})}
    if routes:
        fe["routes"] = list(routes)
    config = {"global": {"workers": workers, **(global_ or {})},
              "frontends": {frontend_name: fe}, "backends": bes}
    if defaults:
        config["defaults"] = dict(defaults)
    return config


# ----------------------------------------------------------- access lines

# HAProxy's httplog (`option httplog`, no header captures), then proxyd's own
# fields (man/proxyd.8, "HTTP access log"):
#   %ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %CC %CS %tsc %ac/%fc/%bc/%sc/%rc %sq/%bq %{+Q}r up=N[ err=WHAT]
HTTP_ACCESS_LINE = re.compile(
    r'^(?P<client>\S+) ' + ACCEPT_DATE + r' (?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+)'
    r' (?P<Tq>-1|\d+)/(?P<Tw>-1|\d+)/(?P<Tc>-1|\d+)/(?P<Tr>-1|\d+)/(?P<Tt>\d+) (?P<status>-1|\d{3}) (?P<down>\d+)'
    r' - - (?P<state>(?P<term>[-A-Za-z]{2})--) ' + COUNTS +
    r' "(?P<request>[^"]*)" up=(?P<up>\d+)(?: err=(?P<err>.+))?$')


@dataclass(frozen=True)
class HTTPAccessLine:
    pid: int
    client: str
    frontend: str
    backend: str
    server: str
    request: str
    status: int
    Tq: int       # HAProxy's TR: the request head, from its first byte
    Tc: int       # connecting (after the queue), -1 if never connected
    Tr: int       # connected to the response head, -1 if none came
    Tt: int       # HAProxy's Ta: the request's whole time
    up: int       # request bytes delivered to the server (proxyd's up=)
    down: int     # %B: bytes sent to the client
    term: str     # the first 2 characters of %tsc
    err: str | None
    raw: str
    state: str = ""   # %tsc, all 4 characters
    Tw: int = 0
    date: str = ""
    ac: int = 0
    fc: int = 0
    bc: int = 0
    sc: int = 0
    rc: int = 0
    sq: int = 0
    bq: int = 0

    @property
    def method(self) -> str:
        return self.request.split(" ")[0]

    @property
    def target(self) -> str:
        parts = self.request.split(" ")
        return parts[1] if len(parts) > 1 else ""


def parse_http_access_line(line: str) -> HTTPAccessLine | None:
    outer = LOG_LINE.match(line.rstrip("\n"))
    if not outer:
        return None
    m = HTTP_ACCESS_LINE.match(outer["message"])
    if not m:
        return None
    ints = {k: int(m[k]) for k in ("status", "Tq", "Tw", "Tc", "Tr", "Tt", "up", "down",
                                   "ac", "fc", "bc", "sc", "rc", "sq", "bq")}
    return HTTPAccessLine(pid=int(outer["pid"]), client=m["client"], frontend=m["frontend"],
                          backend=m["backend"], server=m["server"], request=m["request"],
                          term=m["term"], state=m["state"], err=m["err"], date=m["date"],
                          raw=line.rstrip("\n"), **ints)


def http_access_lines(proxy) -> list[HTTPAccessLine]:
    return [a for a in map(parse_http_access_line, proxy.log_lines()) if a]


def wait_http_access_lines(proxy, count: int, timeout: float = 10.0,
                           where: Callable[[HTTPAccessLine], bool] = lambda a: True) -> list[HTTPAccessLine]:
    """Wait until at least COUNT HTTP access lines matching WHERE were logged."""
    lines: list[HTTPAccessLine] = []

    def enough():
        nonlocal lines
        lines = [a for a in http_access_lines(proxy) if where(a)]
        return len(lines) >= count

    try:
        wait_for(enough, timeout, f"{count} http access lines")
    except AssertionError:
        raise AssertionError(f"expected {count} http access lines, got {len(lines)} after {timeout}s; "
                             f"log tail:\n{proxy.log_tail()}") from None
    return lines
