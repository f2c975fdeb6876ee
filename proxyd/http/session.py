"""An HTTP-mode client connection: requests one after another (keep-alive).

Each request gets its own server connection (HAProxy's http-server-close):
the head is parsed and checked, rewritten (hop-by-hop headers out,
X-Forwarded-For in, `Connection: close` to the server) and sent; a body of
known length is spliced; a chunked one is copied with its framing checked.
The response head is parsed the same way, and the moment its last byte has
been received the server socket is reset, so the next request of the
client, pipelined or not, goes on at once and no TIME_WAIT is left behind.

Everything one request needs is in the `Exchange`; what outlives it (the
client socket, bytes read ahead of the next request) is in the session.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import termios
import time

from proxyd.accesslog import NOSRV, accept_date, http_state
from proxyd.counters import exchange_ended
from proxyd.http.errors import builtin_page
from proxyd.http.parser import (ChunkedDecoder, HttpError, Message, forwarded_head, host_without_port,
                                parse_request, parse_response, request_path, same_authority,
                                target_host)
from proxyd.tcp import (BUDGET, INF, RESOURCE_ERRORS, PeerError, Side, TcpSession, abandon_attempt, connect_next,
                        errno_name, ioctl_int, peer_label)

READ_SIZE = 65536
MAX_RESPONSE_HEAD = 65536
MAX_INTERIM = 16          # 1xx responses allowed before the final one (502 beyond)
MAX_TO_CLIENT = 65536     # interim heads waiting for the client before we read the server again
# Lingering close, as nginx's lingering_timeout and lingering_time: once our
# answer is written, the client's FIN is awaited (its bytes read and dropped)
# so that its unread input does not make the kernel reset our answer away.
LINGER_TIMEOUT = 5.0      # silence allowed while lingering
LINGER_TIME = 30.0        # lingering at most this long in all
DISCARD = bytearray(READ_SIZE)
# Session states
WAIT_REQUEST, CONNECTING, EXCHANGE, TUNNEL, CLOSING, LINGER, CLOSED = (
    "wait-request", "connecting", "exchange", "tunnel", "closing", "linger", "closed")


LOG_SAFE = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\x7e]*")  # printable, no '"' nor '\\'


def log_safe(raw: bytes) -> str:
    """Request bytes for the access log: nothing in them can end or forge a line."""
    if LOG_SAFE.fullmatch(raw):
        return raw.decode("ascii")
    return "".join(chr(b) if LOG_SAFE.fullmatch(bytes((b,))) else f"\\x{b:02x}" for b in raw)


class BytesOut:
    """Bytes made in Python (heads, the start of a body) on their way to a socket."""

    __slots__ = ("data", "sent")

    def __init__(self):
        self.data = bytearray()
        self.sent = 0   # bytes written, for the access log

    def flush(self, side: Side, now: float) -> bool:
        """Write what can be written; True once nothing is left."""
        while self.data:
            if not side.writable:
                return False
            try:
                n = side.sock.send(self.data)
            except BlockingIOError:
                side.writable = False
                return False
            except OSError as e:
                raise PeerError(side, e.errno) from None
            del self.data[:n]
            self.sent += n
            side.seen = now
        return True


class ChunkedPump:
    """Copies a chunked body SRC -> DST, checking its framing, stopping at its end.

    Bytes read past the end of the message belong to what follows (the next
    pipelined request) and are kept in `leftover`.  Same interface as Pump.
    """

    __slots__ = ("src", "dst", "decoder", "out", "ended", "fin", "leftover", "max_size")

    def __init__(self, src: Side, dst: Side | None, bad_status: int, initial: bytes, max_size: int = 0):
        self.src = src
        self.dst = dst
        self.decoder = ChunkedDecoder(bad_status)
        self.max_size = max_size  # payload bytes allowed, 0 = no limit (413 beyond)
        self.out = BytesOut()
        self.ended = self.fin = False
        self.leftover = b""
        self._take(initial)

    @property
    def queued(self) -> int:
        return len(self.out.data)

    @property
    def moved(self) -> int:
        return self.out.sent

    def take_checked(self) -> bytearray:
        """The checked bytes that came with the head: the caller sends them after it."""
        data, self.out.data = self.out.data, bytearray()
        return data

    def _take(self, data) -> None:
        used = self.decoder.feed(data)
        if self.max_size and self.decoder.decoded > self.max_size:
            raise HttpError(413, "body larger than max_body_size")
        self.out.data += data[:used]
        if self.decoder.done:
            self.ended = True
            self.leftover = bytes(data[used:])

    def run(self, now: float) -> bool:
        src = self.src
        budget = BUDGET
        while self.out.flush(self.dst, now) and not self.ended and src.readable:
            if budget <= 0:
                return True  # more to do: others get a turn first
            try:
                data = src.sock.recv(READ_SIZE)
            except BlockingIOError:
                src.readable = False
            except OSError as e:
                raise PeerError(src, e.errno) from None
            else:
                if not data:
                    self.ended = self.fin = True  # truncated: the message never ended
                else:
                    src.seen = now
                    budget -= len(data)
                    self._take(data)
        return False

    def close(self) -> None:
        pass


class Exchange:
    """One request and its response."""

    __slots__ = ("request", "backend", "started", "head_at", "connected_at", "sent_at", "response_at",
                 "status", "up", "down", "own_page", "response", "client_keepalive",
                 "line", "interim", "queued_until")

    def __init__(self, now: float):
        self.request: Message | None = None
        self.backend = None
        self.started = now
        self.head_at = self.connected_at = self.sent_at = self.response_at = -1.0
        self.status = -1
        self.up = None          # request body pump (Pump with a limit, or ChunkedPump)
        self.down = None        # response body pump
        self.own_page = 0       # size of an answer of proxyd's own
        self.response: Message | None = None
        self.client_keepalive = False
        self.line = "-"
        self.interim = 0        # 1xx responses relayed so far
        self.queued_until = 0.0  # waiting in the backend's queue for a server slot, until then


class HttpSession:
    __slots__ = ("worker", "loop", "frontend", "client", "peer", "inbuf", "state", "x", "server",
                 "server_ref", "tried", "attempt_started", "timer_at", "to_server", "to_client",
                 "sbuf", "term", "err", "requests", "idle_since", "on_client", "on_server",
                 "close_after", "errorfile", "linger_until", "__weakref__")

    def __init__(self, worker, frontend, sock: socket.socket, peer: tuple):
        loop = worker.loop
        self.worker = worker
        self.loop = loop
        self.frontend = frontend
        self.client = Side(sock, loop.now)
        self.client.writable = True
        self.client.readable = True   # try at once: the request is often already there
        self.peer = peer
        self.inbuf = bytearray()      # client bytes read ahead, not yet used
        self.server: Side | None = None
        self.server_ref = None
        self.tried: list = []
        self.attempt_started = 0.0
        self.timer_at = INF
        self.to_server = BytesOut()
        self.to_client = BytesOut()
        self.sbuf = bytearray()       # server bytes before the response head is complete
        self.term = ""
        self.err = ""
        self.requests = 0
        self.idle_since = loop.now
        self.close_after = False
        self.errorfile = None         # [fd, offset, end] of an errorfiles page being sent
        self.linger_until = 0.0
        self.on_client = self._client_ready
        self.on_server = self._server_ready
        self.state = WAIT_REQUEST
        self.x = Exchange(loop.now)
        loop.add(self.client.fd, self.on_client)
        worker.session_opened(self)
        self._arm(loop.now + frontend.config.timeout_http_request)
        self._step()

    # ------------------------------------------------------------ events
    def _client_ready(self, mask: int) -> None:
        self.client.ready(mask)
        self._step()

    def _server_ready(self, mask: int) -> None:
        server = self.server
        if self.state is CONNECTING:
            result = server.connect_result(mask)
            if result > 0:
                return self._connect_failed(result)
            if result == 0:
                self._connected()
            return
        server.ready(mask)
        self._step()

    def _step(self) -> None:
        """Do all that can be done now, whatever the state."""
        try:
            if self.state is WAIT_REQUEST:
                self._read_request()
            elif self.state is EXCHANGE:
                self._exchange()
            elif self.state is TUNNEL:
                self._tunnel()
            elif self.state is CLOSING:
                if self.to_client.flush(self.client, self.loop.now) and self._send_errorfile():
                    # After an answer, always: a request the client pipelines
                    # meanwhile would make the kernel reset the answer away.
                    self._close(linger=True)
            elif self.state is LINGER:
                self._linger()
        except PeerError as e:
            self._peer_failed(e)
        except HttpError as e:
            self._reject(e.status, e.reason)

    # ------------------------------------------------------------ request head
    def _read_request(self) -> None:
        config = self.frontend.config
        while True:
            while self.inbuf.startswith(b"\r\n"):
                del self.inbuf[:2]  # RFC 9112 2.2: empty lines before a request are ignored
            end = self.inbuf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if b"\n\n" in self.inbuf:
                raise HttpError(400, "bare LF")  # a head ended by LF alone: no need to wait
            if len(self.inbuf) > config.max_header_size:
                raise HttpError(431, "request head too large")
            line_end = self.inbuf.find(b"\r\n")
            if (line_end if line_end >= 0 else len(self.inbuf)) > config.max_request_line:
                raise HttpError(414, "request line too long")
            if not self.client.readable:
                return
            try:
                data = self.client.sock.recv(READ_SIZE)
            except BlockingIOError:
                self.client.readable = False
                return
            except OSError as e:
                raise PeerError(self.client, e.errno) from None
            if not data:
                # The client closed between requests (normal) or mid-head (logged).
                self.term = "CR" if self.inbuf else ""
                return self._close(log=bool(self.inbuf), linger=False)
            if not self.inbuf and self.requests and self.x.started <= self.idle_since:
                # After a response, timeout_http_request runs from the first
                # byte of the next request (the first one: from accept).
                self.x.started = self.loop.now
                self._arm(self.loop.now + config.timeout_http_request)
            self.inbuf += data
        head = bytes(self.inbuf[:end])
        del self.inbuf[:end + 4]
        if len(head) > config.max_header_size:
            raise HttpError(431, "request head too large")
        first_line = head.split(b"\r\n", 1)[0]
        if len(first_line) > config.max_request_line:
            raise HttpError(414, "request line too long")
        self.x.line = log_safe(first_line)
        self._start_exchange(parse_request(head), first_line)

    def _start_exchange(self, request: Message, first_line: bytes) -> None:
        x = self.x
        config = self.frontend.config
        x.request = request
        x.head_at = self.loop.now
        if config.max_body_size and request.length > config.max_body_size:
            raise HttpError(413, "body larger than max_body_size")
        if request.version == 11:
            x.client_keepalive = b"close" not in request.connection
        else:
            x.client_keepalive = b"keep-alive" in request.connection
        authority = target_host(request.target)
        if authority and request.host and not same_authority(authority, request.host, request.target):
            # RFC 9112 3.2: a client MUST send a Host identical to the
            # authority; one that differs is a routing trick, not a mistake.
            raise HttpError(400, "Host differs from the target's authority")
        x.backend = self._route(request)
        extra = []
        if x.backend.config.forwardfor:
            previous = request.get(b"x-forwarded-for")
            chain = b", ".join(previous + [self.peer[0].encode()])
            extra.append(b"X-Forwarded-For: " + chain)
            extra.append(b"X-Forwarded-Proto: http")
            request.headers = [h for h in request.headers
                               if h[0] not in (b"x-forwarded-for", b"x-forwarded-proto")]
        if request.upgrade:
            extra += [b"Connection: upgrade", b"Upgrade: " + request.upgrade]
        else:
            extra.append(b"Connection: close")
        head = forwarded_head(first_line, request, extra)
        self.to_server.data += head
        self._body_start()
        self.requests += 1
        self.state = CONNECTING
        self._connect()

    def _route(self, request: Message):
        host = host_without_port(target_host(request.target) or request.host)
        path = request_path(request.target)
        for route in self.frontend.config.routes:
            if route.host is not None and route.host != host:
                continue
            if route.path_prefix is not None and not path.startswith(route.path_prefix):
                continue
            return self.worker.backends[route.backend]
        return self.frontend.backend

    def _body_start(self) -> None:
        """Queue the body bytes already read; a pump moves the rest once connected."""
        x, request = self.x, self.x.request
        if request.chunked:
            x.up = ChunkedPump(self.client, None, 400, bytes(self.inbuf),
                               self.frontend.config.max_body_size)
            # Read past the body's end: the next pipelined request, kept once.
            self.inbuf = bytearray(x.up.leftover)
            x.up.leftover = b""
            self.to_server.data += x.up.take_checked()
        elif request.length > 0:
            have = min(len(self.inbuf), request.length)
            self.to_server.data += self.inbuf[:have]
            del self.inbuf[:have]
            if request.length > have:
                x.up = self.worker.new_pump(self.client, None)
                x.up.stop_reading(request.length - have)

    # ------------------------------------------------------------ connecting
    def _connect(self) -> None:
        x = self.x
        server, sock = connect_next(self.worker, x.backend, self.peer[0], self.tried)
        if server is None:
            term, err = sock
            if term == "Q":
                return self._queue()
            self.err = err
            return self._reject(503, err, term[0] + "C")  # no server could take it
        x.queued_until = 0.0
        self.server_ref = server
        self.server = Side(sock, self.loop.now)
        self.attempt_started = self.loop.now
        self.loop.add(self.server.fd, self.on_server)
        self._arm(self.loop.now + x.backend.config.timeout_connect)

    def _queue(self) -> None:
        """Every usable server is at its maxconn: wait for a slot (FIFO),
        up to timeout_queue, then 503."""
        x = self.x
        again = bool(x.queued_until)
        if not again:
            x.queued_until = self.loop.now + x.backend.config.timeout_queue
            self._arm(x.queued_until)
        x.backend.wait(self, front=again)

    def slot_free(self) -> None:
        """The backend's queue: a slot may be free now; try again."""
        if self.state is CONNECTING and self.server is None:
            self._connect()

    def _connect_failed(self, err: int, timed_out: bool = False) -> None:
        """This attempt failed; the request, head and body, waits for the next one."""
        abandon_attempt(self.loop, self.server, self.server_ref)
        self.server = None
        if len(self.tried) <= self.x.backend.config.retries:
            return self._connect()
        self.err = errno_name(err)
        if timed_out:
            return self._reject(503, "connect timeout", "sC")
        self._reject(503, self.err, "RC" if err in RESOURCE_ERRORS else "SC")

    def _connected(self) -> None:
        x = self.x
        now = self.loop.now
        self.state = EXCHANGE
        x.connected_at = now
        self.server.writable = True
        self.server.seen = self.client.seen = now
        if x.up is not None:
            x.up.dst = self.server
        self._step()

    # ------------------------------------------------------------ request & response
    def _exchange(self) -> None:
        x = self.x
        now = self.loop.now
        if self.to_server.flush(self.server, now) and x.up is not None:
            if x.up.run(now):
                self.loop.soon(self._step)
            if x.up.fin:  # the client closed before the end of its body
                self.term = "C" + self._phase()
                self.err = "request truncated"
                self._drop_server(reset=True)
                self._log()
                return self._close(linger=False)
        if x.sent_at < 0 and not self.to_server.data:
            x.sent_at = now
            self._arm(now + x.backend.config.timeout_server)
        if x.response is None:
            self._read_response_head()
            if self.state is TUNNEL:
                return self._tunnel()
            if self.state is not EXCHANGE:
                return
            if x.response is None:
                self.to_client.flush(self.client, now)  # interim answers: 100 Continue
                return
        if not self.to_client.flush(self.client, now):
            return
        down = x.down
        if down is not None:
            if down.run(now):
                self.loop.soon(self._step)
            if down.queued or not down.ended:
                return
            if down.fin and (isinstance(down, ChunkedPump) or down.limit > 0):
                self.term = "SD"
                self.err = "response truncated"
                self.close_after = True
        self._exchange_done(server_closed=down is not None and down.fin)

    def _read_response_head(self) -> None:
        server = self.server
        while True:
            end = self.sbuf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.sbuf[:end])
                del self.sbuf[:end + 4]
                if not self._response_head(head):
                    continue  # a 1xx: the real response follows
                return
            if len(self.to_client.data) > MAX_TO_CLIENT and not self.to_client.flush(self.client, self.loop.now):
                return  # interim heads the client does not read: read no more from the server
            if len(self.sbuf) > MAX_RESPONSE_HEAD:
                raise HttpError(502, "response head too large")
            if not server.readable:
                return
            try:
                data = server.sock.recv(READ_SIZE)
            except BlockingIOError:
                server.readable = False
                return
            except OSError as e:
                raise PeerError(server, e.errno) from None
            if not data:
                self.term = "SH"
                raise HttpError(502, "server closed before a complete response head")
            server.seen = self.loop.now
            self.sbuf += data

    def _response_head(self, head: bytes) -> bool:
        """Relay a response head; False if it was an interim (1xx) one."""
        x = self.x
        response = parse_response(head)
        # We speak HTTP/1.1 to the client whatever the server spoke: the
        # framing we send is our own (Content-Length, chunked or close).
        status_line = b"HTTP/1.1" + head.split(b"\r\n", 1)[0][8:]
        if 100 <= response.status < 200 and response.status != 101:
            x.interim += 1
            if x.interim > MAX_INTERIM:
                raise HttpError(502, "too many interim responses")
            self.to_client.data += forwarded_head(status_line, response, [])
            return False
        if response.status == 101 and not x.request.upgrade:
            raise HttpError(502, "101 without an upgrade request")
        x.response_at = self.loop.now
        no_body = x.request.method == b"HEAD" or response.status in (204, 304)
        upgrade = response.status == 101 and x.request.upgrade
        close_delimited = not (no_body or upgrade or response.chunked or response.length >= 0)
        body_unread = x.up is not None and not (x.up.ended and not x.up.queued)
        keep = x.client_keepalive and not (close_delimited or body_unread or self.worker.stopping)
        extra = []
        if upgrade:
            extra += [b"Connection: upgrade", b"Upgrade: " + response.upgrade]
        elif not keep:
            extra.append(b"Connection: close")
            self.close_after = True
        elif x.request.version == 10:
            extra.append(b"Connection: keep-alive")
        if response.chunked and not no_body:
            # Check the framing of what came with the head before sending
            # anything: bad framing here is still a clean 502.
            x.down = ChunkedPump(self.server, self.client, 502, bytes(self.sbuf))
        x.response = response
        x.status = response.status
        self.to_client.data += forwarded_head(status_line, response, extra)
        if upgrade:
            self._start_tunnel()
        elif no_body:
            pass
        elif response.chunked:
            self.to_client.data += x.down.take_checked()
        else:
            length = response.length
            have = len(self.sbuf) if length < 0 else min(len(self.sbuf), length)
            self.to_client.data += self.sbuf[:have]
            if length < 0 or length > have:
                x.down = self.worker.new_pump(self.server, self.client)
                if length > have:
                    x.down.stop_reading(length - have)
        self.sbuf.clear()
        return True

    def _exchange_done(self, server_closed: bool) -> None:
        """The response is complete: reset the server now, then the next request."""
        x = self.x
        self._drop_server(reset=not server_closed)
        if isinstance(x.up, ChunkedPump):
            self.inbuf[:0] = x.up.leftover
        self._log()
        if self.close_after:
            self.state = CLOSING
            return self._step()
        self.state = WAIT_REQUEST
        self.x = Exchange(self.loop.now)
        self.tried = []
        self.idle_since = self.loop.now
        self._arm(self.loop.now + self.frontend.config.timeout_http_keep_alive)
        if self.inbuf:
            self.client.readable = True
        self._step()

    # ------------------------------------------------------------ upgrade
    def _start_tunnel(self) -> None:
        """101: what is already read goes on its way, then the TCP relay takes over."""
        self.state = TUNNEL
        self.to_server.data += self.inbuf
        self.inbuf.clear()
        self.to_client.data += self.sbuf

    def _tunnel(self) -> None:
        now = self.loop.now
        up = self.x.up
        if up is not None:
            # The request body read so far goes first; what the client sends
            # next (the rest of the body, then the tunnel) the relay moves.
            up.ended = True
            up.run(now)
            if up.queued:
                return
            up.close()
        if not (self.to_server.flush(self.server, now) and self.to_client.flush(self.client, now)):
            return
        self._log()
        self.state = CLOSED   # this object is done; events now go to the TCP session
        TcpSession.adopt(self, self.x.backend, self.client, self.server, self.server_ref)
        self._release_handlers()

    # ------------------------------------------------------------ failures
    def _peer_failed(self, e: PeerError) -> None:
        self.err = errno_name(e.err)
        x = self.x
        if e.side is self.client:
            if self.state is WAIT_REQUEST and not self.inbuf:
                # Between requests (or before the first byte of one): no
                # request to log or count, as when the client closes there.
                return self._close(linger=False)
            self.term = self.term or ("C" + self._phase())
            self._drop_server(reset=True)
            self._log()
            return self._close(linger=False)
        # The server reset or vanished.
        if x.response is None and self.state is EXCHANGE:
            return self._reject(502, self.err, "S" + self._phase())
        self.term = self.term or ("S" + self._phase())
        self._drop_server(reset=False)
        self._log()
        self.close_after = True
        self.state = CLOSING
        self._step()

    def _phase(self) -> str:
        if self.state is WAIT_REQUEST:
            return "R"
        if self.state is CONNECTING:
            return "C"
        if self.x.response is None:
            return "H"
        return "D"

    def _reject(self, status: int, reason: str, term: str = "") -> None:
        """Answer STATUS ourselves and close the client connection after it."""
        x = self.x
        if x.response is not None:
            # A response is under way: nothing valid can be said any more.
            if not self.to_client.sent and not (x.down is not None and x.down.moved):
                x.status = -1   # and the client got nothing of it
            self.term = self.term or term or "PD"
            self.err = self.err or reason
            self._drop_server(reset=True)
            self._log()
            return self._close(linger=True)
        self.term = self.term or term or ("P" + self._phase())
        self.err = self.err or reason
        self._drop_server(reset=True)
        x.status = status
        self.inbuf.clear()
        self.to_client.data.clear()
        # RFC 9110 9.3.2: no content in an answer to HEAD, ours included.
        head_only = x.line.startswith("HEAD ")
        errorfile = self.frontend.errorfiles.get(status)
        if errorfile is not None:
            fd, size, head_size = errorfile
            size = head_size if head_only else size
            self.errorfile = [fd, 0, size]
            x.own_page = size
        else:
            page = builtin_page(status)
            if head_only:
                page = page[:page.index(b"\r\n\r\n") + 4]
            self.to_client.data += page
            x.own_page = len(page)
        self._log()
        self.state = CLOSING
        self._step()

    def _send_errorfile(self) -> bool:
        """An operator's error page goes out with sendfile; True once sent."""
        if self.errorfile is None:
            return True
        fd, offset, size = self.errorfile
        while offset < size:
            if not self.client.writable:
                return False
            try:
                sent = os.sendfile(self.client.fd, fd, offset, size - offset)
            except BlockingIOError:
                self.client.writable = False
                return False
            except OSError as e:
                raise PeerError(self.client, e.errno) from None
            if not sent:
                break  # the file is shorter than it was: nothing more to send
            offset += sent
            self.errorfile[1] = offset
        self.errorfile = None
        return True

    def _drop_server(self, reset: bool) -> None:
        """The exchange with the server is over, whatever its end: let go of
        its socket and of the pipes and buffers between the two."""
        x = self.x
        if x.queued_until:
            x.queued_until = 0.0
            x.backend.leave(self)
        for pump in (x.up, x.down):
            if pump is not None:
                pump.close()
        self.sbuf.clear()
        self.to_server.data.clear()
        server, self.server = self.server, None
        if server is not None:
            self.loop.forget(server.fd)
            server.close(reset)
            self.server_ref.closed()

    # ------------------------------------------------------------ timers
    def _arm(self, when: float) -> None:
        if when < self.timer_at:
            self.timer_at = when
            self.loop.call_at(when, self)

    def on_timer(self, when: float) -> None:
        if when != self.timer_at or self.state is CLOSED:
            return
        self.timer_at = INF
        now = self.loop.now
        expiry, action = self._expiry()
        if now < expiry:
            return self._arm(expiry)
        action()

    def _expiry(self):
        config = self.frontend.config
        x = self.x
        if self.state is LINGER:
            return min(self.client.seen + min(LINGER_TIMEOUT, config.timeout_client),
                       self.linger_until), self._release
        if self.state is WAIT_REQUEST:
            if not self.inbuf and self.requests and self.x.started <= self.idle_since:
                return self.idle_since + config.timeout_http_keep_alive, self._keepalive_timeout
            return x.started + config.timeout_http_request, self._request_timeout
        if self.state is CONNECTING and x.queued_until:
            return x.queued_until, lambda: self._reject(503, "queue_timeout", "sQ")
        if self.state is CONNECTING:
            return (self.attempt_started + x.backend.config.timeout_connect,
                    lambda: self._connect_failed(errno.ETIMEDOUT, timed_out=True))
        if self.state is EXCHANGE and x.response is None and x.sent_at >= 0:
            return self.server.seen + x.backend.config.timeout_server, self._server_timeout
        seen = self.client.seen
        timeout = config.timeout_client
        if self.server is not None:
            server_expiry = self.server.seen + x.backend.config.timeout_server if x.backend else INF
            if server_expiry < seen + timeout:
                return server_expiry, self._server_timeout
        return seen + timeout, self._client_timeout

    def _keepalive_timeout(self) -> None:
        if self.client.progressed(self.loop.now):
            # Still reading the last answer from our send buffer: not idle yet.
            self.idle_since = self.loop.now
            return self._arm(self._expiry()[0])
        self._close()

    def _request_timeout(self) -> None:
        self.term = "cR"
        self._reject(408, "timeout")

    def _server_timeout(self) -> None:
        now, server, down = self.loop.now, self.server, self.x.down
        if server is not None and (self.to_client.data or (down is not None and down.queued)
                                   or self.client.progressed(now) or server.progressed(now)):
            server.seen = now  # the answer waits for the client, not for the server
            return self._arm(self._expiry()[0])
        self._reject(504, "timeout", "sH" if self.x.response is None else "sD")

    def _client_timeout(self) -> None:
        if self.client.progressed(self.loop.now):
            return self._arm(self._expiry()[0])
        if self.state is CLOSING:
            return self._close(linger=False)  # our answer was logged; the client never read it
        self.term = self.term or "c" + self._phase()
        self.err = "timeout"
        self._drop_server(reset=True)
        self._log()
        self._close()

    # ------------------------------------------------------------ the end
    def kill(self) -> None:
        if self.state is not CLOSED:
            self.term = "K" + self._phase()
            self.err = self.err or "stopped"
            self._drop_server(reset=True)
            if self.x.request is not None and self.state is not LINGER:
                self._log()
            self._close(linger=False)

    def crash(self) -> None:
        if self.state is not CLOSED:
            self.term = "P" + self._phase()
            self.err = "internal_error"
            self._drop_server(reset=True)
            if self.state is not LINGER:
                self._log()
            self._close(linger=False)

    def _close(self, log: bool = False, linger: bool | None = None) -> None:
        """End the client connection.  LINGER true, or None while the client
        may still be sending, waits for its FIN first (see LINGER_TIMEOUT);
        false (the client is gone, or a fast stop) closes now."""
        if self.state is LINGER and linger is False:
            return self._release()
        if self.state in (CLOSED, LINGER):
            return
        if log:
            self._log()
        up = self.x.up
        if linger is None:
            linger = bool(self.inbuf or (up is not None and not up.ended)
                          or ioctl_int(self.client.fd, termios.FIONREAD))
        self._drop_server(reset=True)
        if linger:
            self.state = LINGER
            self.inbuf = bytearray()
            self.client.shutdown()
            self.client.seen = self.loop.now
            self.linger_until = self.loop.now + LINGER_TIME
            self._arm(self._expiry()[0])
            return self._linger()
        self._release()

    def _linger(self) -> None:
        """Read and drop what the client sends until its FIN (or an error)."""
        client = self.client
        for _ in range(BUDGET // READ_SIZE):
            try:
                n = client.sock.recv_into(DISCARD)
            except BlockingIOError:
                client.readable = False
                return
            except OSError:
                break
            if not n:
                break
            client.seen = self.loop.now
        else:
            return self.loop.soon(self._step)
        self._release()

    def _release(self) -> None:
        self.state = CLOSED
        self.loop.forget(self.client.fd)
        self.client.sock.close()
        self.worker.session_closed(self)
        self._release_handlers()

    def _release_handlers(self) -> None:
        # The bound methods kept for epoll make a reference cycle: break it, so
        # a finished session is freed by its refcount (when its last timer
        # entry pops), not left for the garbage collector's full passes.
        self.on_client = self.on_server = None

    def _log(self) -> None:
        """The request is over: count it, and write its line in HAProxy's
        httplog layout (proxyd/accesslog.py)."""
        x = self.x
        now = self.loop.now
        # Bytes as delivered: what left our buffers and pumps, not what was queued.
        up = self.to_server.sent + (x.up.moved if x.up is not None else 0)
        down = self.to_client.sent + (x.down.moved if x.down is not None else 0) + x.own_page
        self.to_server.sent = self.to_client.sent = 0
        exchange_ended(self.frontend, x.backend, self.tried, x.connected_at >= 0, up, down, self.term or "--",
                       self.err, x.status)
        backend, tried, head_at = x.backend, self.tried, x.head_at
        # Tw: -1 for a request that never reached a server choice (refused,
        # or no server usable); the wait in the queue, known exactly with
        # one connection attempt (it began when the wait ended), 0 after
        # retries (the wait is then in Tc).
        if head_at < 0 or backend is None or (not tried and self.err == "no_server"):
            waited = -1
        elif not tried:    # it waited in the queue until the end
            waited = int((now - head_at) * 1000)
        elif len(tried) == 1:
            waited = max(int((self.attempt_started - head_at) * 1000), 0)
        else:
            waited = 0
        connected_at = x.connected_at
        server = tried[-1] if tried else None
        err = self.err
        frontend = self.frontend
        self.worker.log.access(
            f"{peer_label(self.peer)} [{accept_date(time.time() - (now - x.started))}] {frontend.name} "
            f"{backend.name if backend else frontend.name}/{server.name if server else NOSRV} "
            f"{int((head_at - x.started) * 1000) if head_at >= 0 else -1}/{waited}/"
            f"{int((connected_at - head_at) * 1000) - waited if connected_at >= 0 else -1}/"
            f"{int((x.response_at - connected_at) * 1000) if x.response_at >= 0 and connected_at >= 0 else -1}/"
            f"{int((now - x.started) * 1000)} {x.status} {down} - - "
            f"{http_state(self.term, err, not tried and head_at >= 0 and backend is not None)} "
            f"{self.worker.active}/{frontend.active}/{backend.active if backend else 0}/"
            f"{server.sessions() if server else 0}/{max(len(tried) - 1, 0)} "
            f"0/{len(backend.queue) if backend else 0} \"{x.line}\" up={up}{' err=' + err if err else ''}")
        self.term = ""
        self.err = ""
