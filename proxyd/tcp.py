"""A TCP-mode session: one client, one server, two one-way pumps.

Bytes move socket -> pipe -> socket with os.splice and never enter Python.
Pipes come from the worker's pool when there is something to move and go
back as soon as they are empty, so an idle session holds two sockets and
nothing else.

How a session ends (PRODUCT.md, "TCP mode"):

* half_close = false (default): the client's FIN is not passed on (our FIN
  would leave our socket in TIME_WAIT when the server answers with its own).
  What the client sent is flushed to the server, and relaying server ->
  client goes on until the server closes (a plain close: the TIME_WAIT is
  theirs), the client proves gone (a reset when its bytes arrive), or the
  server is silent for timeout_fin; then the server socket is reset.
* half_close = true: each FIN is passed on with shutdown(SHUT_WR) once the
  pipe towards that peer is empty; the session ends when both directions are
  closed, or after timeout_fin of silence.
* The server closing first: its FIN is passed to the client, and the server
  socket is closed plainly when the session ends (the TIME_WAIT is theirs).
* The proxy ending a session itself (timeout, error, stop, the client gone):
  server reset.  When the client is gone, the reset waits until the server
  has acknowledged every byte it was sent (TIOCOUTQ == 0, bounded by
  timeout_server): what the client sent before it left still arrives.

A pump that hits EAGAIN remembers which end is blocked: `readable` false on
its source (socket empty) or `writable` false on its destination (socket
full).  The pipe is only filled when it is empty, so an EAGAIN from a fill
always means "socket empty", never "pipe full".
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import time

from proxyd.accesslog import NOSRV, accept_date, tcp_state
from proxyd.balance import QUEUE
from proxyd.counters import exchange_ended
from proxyd.loop import IN, OUT, TROUBLE

CONNECTING, RELAYING, ACK_WAIT, CLOSED = "connecting", "relaying", "ack-wait", "closed"
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
COPY_SIZE = 65536        # the most copied at once when no pipe can be had
CHUNK = 1 << 20          # ask for this much per call; the pipe's capacity caps it
BUDGET = 4 << 20         # bytes one pump may move per wake-up before others get a turn
ACK_POLL_FIRST = 0.001   # first wait for the server's ACKs; doubles up to ACK_POLL_MAX
ACK_POLL_MAX = 0.05
LINGER_RST = struct.pack("ii", 1, 0)
INF = float("inf")
ZERO = bytes(4)
# Errors on connect() that say "this server, now" rather than "this session":
RESOURCE_ERRORS = {errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class PeerError(Exception):
    """A socket failed (reset, broken pipe): SIDE tells which peer."""

    def __init__(self, side: "Side", err: int):
        self.side = side
        self.err = err


class Side:
    """One socket of a session and what we know of its readiness."""

    __slots__ = ("sock", "fd", "readable", "writable", "seen", "shut", "outq")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.readable = False
        self.writable = False
        self.seen = now     # last time bytes moved from or to this peer
        self.shut = False   # we sent it our FIN
        self.outq = 0       # bytes it had not acknowledged when last asked

    def ready(self, mask: int) -> None:
        """Remember what epoll said; an error or hang-up lets the next call report it."""
        if mask & (IN | TROUBLE):
            self.readable = True
        if mask & (OUT | TROUBLE):
            self.writable = True

    def connect_result(self, mask: int) -> int:
        """For a connecting socket: -1 still connecting, 0 connected, else the errno."""
        if mask & TROUBLE:
            return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED
        return 0 if mask & OUT else -1

    def progressed(self, now: float) -> bool:
        """Did the peer acknowledge bytes since we last asked?  A slow reader
        drains a send buffer of megabytes long before we can write again:
        the kernel, not our writes, says whether it is still there."""
        unacked = ioctl_int(self.fd, termios.TIOCOUTQ)
        if unacked != self.outq:
            # Down to 0 counts too: the peer took the last bytes since we
            # last asked, maybe a moment ago, and its next request may be on
            # its way (it was never idle).
            self.outq = unacked
            self.seen = now
            return True
        return False

    def close(self, reset: bool) -> None:
        """Close; with RESET, SO_LINGER {1, 0} makes it an RST: no TIME_WAIT here."""
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            except OSError:
                pass
        self.sock.close()

    def shutdown(self) -> None:
        """Pass a FIN on to this peer (once)."""
        if not self.shut:
            self.shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already gone: the pumps will see it


class Pump:
    """Moves bytes one way, SRC -> pipe -> DST, with os.splice."""

    __slots__ = ("src", "dst", "pool", "pipe", "queued", "moved", "ended", "fin", "limit", "spill")

    def __init__(self, src: Side, dst: Side, pool):
        self.src = src
        self.dst = dst
        self.pool = pool
        self.pipe = None       # (read fd, write fd) while bytes are in flight
        self.queued = 0        # bytes read from src, not yet written to dst
        self.moved = 0         # bytes delivered to dst
        self.ended = False     # nothing more will be read from src
        self.fin = False       # ...because src sent its FIN
        self.limit = -1        # bytes still to read before ending; -1 = no limit
        self.spill = None      # bytes copied instead, when no fd was left for a pipe

    def run(self, now: float) -> bool:
        """Move what can move now; True if stopped by the budget with more to do."""
        src, dst = self.src, self.dst
        budget = BUDGET
        while True:
            if self.queued:
                if not dst.writable:
                    return False
                try:
                    n = self._flush()
                except BlockingIOError:
                    dst.writable = False
                    return False
                except OSError as e:
                    raise PeerError(dst, e.errno) from None
                self.queued -= n
                self.moved += n
                budget -= n
                dst.seen = now
                continue
            if self.ended or not src.readable:
                break
            if budget <= 0:
                self._release()
                return True
            try:
                n = self._fill(CHUNK if self.limit < 0 else min(CHUNK, self.limit))
            except BlockingIOError:
                src.readable = False
                break
            except OSError as e:
                raise PeerError(src, e.errno) from None
            if n == 0:
                self.ended = self.fin = True
                break
            src.seen = now
            self.queued = n
            if self.limit > 0:
                self.limit -= n
                self.ended = self.limit == 0
        self._release()
        return False

    def stop_reading(self, limit: int = 0) -> None:
        """Read at most LIMIT more bytes from the source, then end."""
        if limit <= 0:
            self.ended = True
        else:
            self.limit = limit

    def discard(self) -> None:
        """The destination is gone: drop what is queued and read nothing more."""
        self.ended = True
        self.queued = 0
        self._release()

    # The two primitives a copying pump replaces.
    def _fill(self, size: int) -> int:
        if self.pipe is None:
            try:
                self.pipe = self.pool.get()
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                # No fd left for a pipe: copy this once rather than fail a peer.
                self.spill = self.src.sock.recv(min(size, COPY_SIZE))
                return len(self.spill)
        return os.splice(self.src.fd, self.pipe[1], size, flags=SPLICE_FLAGS)

    def _flush(self) -> int:
        if self.spill is not None:
            n = self.dst.sock.send(self.spill)
            self.spill = self.spill[n:]
            return n
        return os.splice(self.pipe[0], self.dst.fd, self.queued, flags=SPLICE_FLAGS)

    def _release(self) -> None:
        if not self.queued:
            self.spill = None
            if self.pipe is not None:
                self.pool.put(self.pipe)
                self.pipe = None

    def close(self) -> None:
        """Session over: the pool takes the pipe back if the kernel says it is
        empty, and closes it otherwise."""
        if self.pipe is not None:
            self.pool.put(self.pipe)
            self.pipe = None


class CopyPump(Pump):
    """The fallback: recv_into / send through a buffer, when splice cannot serve."""

    __slots__ = ("offset",)

    def __init__(self, src: Side, dst: Side, pool):
        super().__init__(src, dst, pool)
        self.offset = 0

    def _fill(self, size: int) -> int:
        if self.pipe is None:
            self.pipe = self.pool.get()
        self.offset = 0
        return self.src.sock.recv_into(self.pipe, min(size, len(self.pipe)))

    def _flush(self) -> int:
        n = self.dst.sock.send(memoryview(self.pipe)[self.offset:self.offset + self.queued])
        self.offset += n
        return n

    def close(self) -> None:
        if self.pipe is not None:
            self.pool.put(self.pipe)
            self.pipe = None


def peer_label(peer: tuple) -> str:
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def connect_next(worker, backend, client_ip: str, tried: list) -> tuple:
    """Start a non-blocking connect to the next server of BACKEND.

    Returns (server, socket), or (None, (term, error)) once no server is left
    to try: a connect that fails at once (no source port: EADDRNOTAVAIL) goes
    on to the next server, `retries` times at most, never in a busy loop.
    (None, ("Q", ...)): every usable server is at its maxconn; the caller
    waits in the backend's queue for a slot.
    """
    full = []
    while True:
        server = backend.balancer.choose(client_ip, tried, full)
        if server is QUEUE:
            return None, ("Q", "queued")
        if server is None:
            return None, ("SC", "no_server")
        if not server.take_slot():
            full.append(server)   # another worker took its last slot first
            continue
        server.opened()
        family, sockaddr = server.addresses[tried.count(server) % len(server.addresses)]
        tried.append(server)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as e:
            server.closed()
            worker.out_of_resources("fds", "connect", e.errno)
            return None, ("RC", errno_name(e.errno))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        result = sock.connect_ex(sockaddr)
        if result in (0, errno.EINPROGRESS):
            if worker.starved:
                worker.resources_back("ports")
            return server, sock
        sock.close()
        server.closed()
        if result in RESOURCE_ERRORS:
            worker.out_of_resources("ports" if result == errno.EADDRNOTAVAIL else "fds", "connect", result)
        if len(tried) > backend.config.retries:
            return None, ("RC" if result in RESOURCE_ERRORS else "SC", errno_name(result))


def abandon_attempt(loop, side: Side, server) -> None:
    """A connect that failed: the socket never carried a byte, so a plain
    close (no TIME_WAIT, nothing to reset); the server has one session less."""
    loop.forget(side.fd)
    side.sock.close()
    server.closed()


def ioctl_int(fd: int, request: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, request, ZERO), "little", signed=True)


class TcpSession:
    """One proxied TCP connection, from accept to the access-log line."""

    __slots__ = (
        "worker", "loop", "frontend", "backend", "client", "server", "peer", "server_ref",
        "up", "down", "state", "tried", "started", "attempt_started", "connect_ms",
        "timer_at", "ack_poll", "unacked", "term", "err", "on_client", "on_server", "queued_until",
        "__weakref__",
    )

    def __init__(self, worker, frontend, sock: socket.socket, peer: tuple):
        self._setup(worker, frontend, frontend.backend, Side(sock, worker.loop.now), peer)
        self.loop.add(self.client.fd, self.on_client)
        worker.session_opened(self)
        self._connect()

    @classmethod
    def adopt(cls, previous, backend, client: Side, server: Side, server_ref) -> "TcpSession":
        """Take over PREVIOUS's connected pair as a TCP relay: an HTTP connection
        upgraded by a 101 goes on with everything this class knows about closing."""
        self = cls.__new__(cls)
        worker = previous.worker
        self._setup(worker, previous.frontend, backend, client, previous.peer)
        worker.session_handed_over(previous, self)
        self.server, self.server_ref = server, server_ref
        self.tried.append(server_ref)
        # Same fds, same epoll interest: only who handles their events changes.
        self.loop.rebind(client.fd, self.on_client)
        self.loop.rebind(server.fd, self.on_server)
        client.readable = True
        self._connected(IN)
        return self

    def _setup(self, worker, frontend, backend, client: Side, peer: tuple) -> None:
        loop = worker.loop
        self.worker = worker
        self.loop = loop
        self.frontend = frontend
        self.backend = backend
        self.client = client
        self.server: Side | None = None
        self.peer = peer
        self.server_ref = None   # balance.Server we are connected/connecting to
        self.up: Pump | None = None
        self.down: Pump | None = None
        self.state = CONNECTING
        self.tried: list = []
        self.started = loop.now
        self.attempt_started = loop.now
        self.connect_ms = -1
        self.timer_at = INF
        self.ack_poll = ACK_POLL_FIRST
        self.unacked = -1
        self.term = ""
        self.err = ""
        self.on_client = self._client_ready
        self.on_server = self._server_ready
        self.queued_until = 0.0   # waiting in the backend's queue for a server slot, until then

    # ------------------------------------------------------------ connecting
    def _connect(self) -> None:
        server, sock = connect_next(self.worker, self.backend, self.peer[0], self.tried)
        if server is None:
            if sock[0] == "Q":
                return self._queue()
            return self._end(*sock)
        self.queued_until = 0.0
        self.server_ref = server
        self.server = Side(sock, self.loop.now)
        self.attempt_started = self.loop.now
        self.loop.add(self.server.fd, self.on_server)
        self._arm(self.loop.now + self.backend.config.timeout_connect)

    def _queue(self) -> None:
        """Every usable server is at its maxconn: wait for a slot (in FIFO
        order, behind those already waiting), up to timeout_queue."""
        again = bool(self.queued_until)
        if not again:
            self.queued_until = self.loop.now + self.backend.config.timeout_queue
            self._arm(self.queued_until)
        self.backend.wait(self, front=again)

    def slot_free(self) -> None:
        """The backend's queue: a slot may be free now; try again."""
        if self.state is CONNECTING and self.server is None:
            self._connect()

    def _connect_failed(self, err: int, code: str = "") -> None:
        abandon_attempt(self.loop, self.server, self.server_ref)
        self.server = self.server_ref = None
        if len(self.tried) <= self.backend.config.retries:
            return self._connect()
        self._end(code or ("RC" if err in RESOURCE_ERRORS else "SC"), errno_name(err))

    def _connected(self, mask: int) -> None:
        now = self.loop.now
        self.state = RELAYING
        self.connect_ms = int((now - self.started) * 1000)
        server, client = self.server, self.client
        server.writable = True
        server.readable = bool(mask & IN)
        server.seen = client.seen = now
        client.writable = True
        self.up = self.worker.new_pump(client, server)
        self.down = self.worker.new_pump(server, client)
        self._arm(self._expiry()[0])  # idle timeouts may be shorter than timeout_connect
        self._progress()

    # ------------------------------------------------------------ events
    def _client_ready(self, mask: int) -> None:
        client = self.client
        if mask & TROUBLE:
            if self.state is CONNECTING:
                return self._end("CC", "client_gone")
            err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err and self.state is RELAYING:
                # Reset (a client that had closed answers our bytes so): no
                # need to wait for the server to send more to find out.
                return self._peer_failed(PeerError(client, err))
        client.ready(mask)
        if self.state is not CONNECTING:
            self._progress()

    def _server_ready(self, mask: int) -> None:
        server = self.server
        if self.state is CONNECTING:
            result = server.connect_result(mask)
            if result > 0:
                return self._connect_failed(result)
            if result == 0:
                self._connected(mask)
            return
        server.ready(mask)
        self._progress()

    # ------------------------------------------------------------ relaying
    def _progress(self) -> None:
        """Run both pumps, then act on what changed."""
        if self.state is CLOSED:
            return  # a queued continuation of a session that has ended since
        up, down = self.up, self.down
        now = self.loop.now
        try:
            more = up.run(now)
            more = down.run(now) or more
        except PeerError as e:
            return self._peer_failed(e)
        if more:
            self.loop.soon(self._progress)
        if self.state is CLOSED:
            return
        self._advance()

    def _advance(self) -> None:
        up, down = self.up, self.down
        if not self.term:
            self.term = "CD" if up.fin else "SD" if down.fin else ""
        up_done = up.ended and not up.queued
        down_done = down.ended and not down.queued
        if down_done and down.fin:
            self.client.shutdown()                 # pass the server's FIN on
        if up_done and not down_done and (down.fin or self.frontend.config.half_close):
            self.server.shutdown()                 # pass the client's FIN on
        if up.ended or down.ended:
            self._arm(self._expiry()[0])           # timeout_fin may come sooner
        if not (up_done and down_done):
            return      # still relaying (after a client FIN: until the server closes)
        if down.fin:
            return self._finish(reset_server=False)
        if self.state is RELAYING:                 # the client is gone: reset the server
            self.state = ACK_WAIT                  # once it holds every byte we sent
            self._check_acks()

    def _check_acks(self) -> None:
        unacked = ioctl_int(self.server.fd, termios.TIOCOUTQ)
        if not unacked:
            return self._finish(reset_server=True)
        if unacked != self.unacked:
            self.unacked = unacked
            self.server.seen = self.loop.now  # the server is making progress
        self._arm(self.loop.now + self.ack_poll)
        self.ack_poll = min(self.ack_poll * 2, ACK_POLL_MAX)

    def _peer_failed(self, e: PeerError) -> None:
        """A peer reset or vanished: save what can be saved for the other one."""
        self.err = errno_name(e.err)
        up, down = self.up, self.down
        if e.side is self.client:
            self.term = self.term or "CD"
            down.discard()       # nobody to deliver it to
            up.stop_reading()    # what was read still goes to the server
        else:
            self.term = self.term or "SD"
            up.discard()
            down.stop_reading()
            down.fin = True      # the server is gone: no reset needed, nor possible
        self._progress()

    # ------------------------------------------------------------ timers
    def _arm(self, when: float) -> None:
        if when < self.timer_at:
            self.timer_at = when
            self.loop.call_at(when, self)

    def on_timer(self, when: float) -> None:
        if when != self.timer_at or self.state is CLOSED:
            return  # stale entry: the deadline moved, or the session is over
        self.timer_at = INF
        now = self.loop.now
        if self.state is ACK_WAIT:
            self._check_acks()
            if self.state is CLOSED:
                return
        expiry, code = self._expiry()
        if now >= expiry and self.state is RELAYING and self._still_moving(code, now):
            expiry, code = self._expiry()
        if now < expiry:
            return self._arm(expiry)
        if self.state is CONNECTING and self.queued_until:
            self._end("sQ", "queue_timeout")
        elif self.state is CONNECTING:
            self._connect_failed(errno.ETIMEDOUT, "sC")
        elif self.state is RELAYING and (self.up.ended or self.down.ended):
            # One side closed and the other stayed silent: the code keeps who
            # closed first; the rest was cut after timeout_fin.
            self.err = "timeout_fin"
            self.term = self.term or code
            self._finish(reset_server=True)
        else:
            self.err = "timeout"
            self.term = code
            self._finish(reset_server=True)

    def _still_moving(self, code: str, now: float) -> bool:
        """Before an idle timeout: is that side only waiting for the other?
        A client acknowledging bytes is active; a server whose answer still
        waits for the client (in our pipe, or unacknowledged) is not idle."""
        if code == "cD":
            return self.client.progressed(now)
        if self.down.queued or self.client.progressed(now):
            self.server.seen = now
            return True
        return self.server.progressed(now)

    def _expiry(self) -> tuple[float, str]:
        """When this session times out in its current state, and the code it gets."""
        if self.state is CONNECTING:
            if self.queued_until:
                return self.queued_until, "sQ"
            return self.attempt_started + self.backend.config.timeout_connect, "sC"
        client, server = self.client, self.server
        timeout_server = self.backend.config.timeout_server
        if self.state is ACK_WAIT:
            return server.seen + timeout_server, "sD"
        if self.up.ended or self.down.ended:
            # Half-closed: whichever side is still open has timeout_fin to finish.
            waiting_for = "sD" if self.up.ended else "cD"
            return max(client.seen, server.seen) + self.frontend.config.timeout_fin, waiting_for
        client_expiry = client.seen + self.frontend.config.timeout_client
        server_expiry = server.seen + timeout_server
        if client_expiry <= server_expiry:
            return client_expiry, "cD"
        return server_expiry, "sD"

    # ------------------------------------------------------------ the end
    def kill(self) -> None:
        """Fast stop or grace expired: end now, server reset."""
        if self.state is not CLOSED:
            self.term = "K" + ("C" if self.state is CONNECTING else "D")
            self.err = self.err or "stopped"
            self._finish(reset_server=True)

    def crash(self) -> None:
        """An unexpected exception in this session: end it, server reset."""
        if self.state is not CLOSED:
            self.term = "P" + ("C" if self.state is CONNECTING else "D")
            self.err = "internal_error"
            self._finish(reset_server=True)

    def _end(self, term: str, err: str) -> None:
        """End before any server connection was established."""
        self.term = term
        self.err = err
        self._finish(reset_server=True)

    def _finish(self, reset_server: bool) -> None:
        if self.state is CLOSED:
            return
        self.state = CLOSED
        if self.queued_until:
            self.backend.leave(self)
        loop = self.loop
        server = self.server
        if server is not None:
            loop.forget(server.fd)
            server.close(reset_server)
            self.server_ref.closed()
        loop.forget(self.client.fd)
        self.client.sock.close()
        up, down = self.up, self.down
        if up is not None:
            up.close()
            down.close()
        self.worker.session_closed(self)
        exchange_ended(self.frontend, self.backend, self.tried, self.connect_ms >= 0,
                       up.moved if up else 0, down.moved if down else 0, self.term or "--", self.err)
        self._log()
        # Break the cycle of the bound methods kept for epoll: the session is
        # then freed by refcount, without work for the garbage collector.
        self.on_client = self.on_server = None

    def _log(self) -> None:
        """The session's line in HAProxy's tcplog layout (proxyd/accesslog.py).
        Tw, the wait in the backend's queue, is known exactly when there was
        one connection attempt (it began when the wait ended); after
        retries it counts as 0, the whole wait in Tc.  The counts are this
        worker's, once the session has let go of them (as HAProxy's tcplog)."""
        now = self.loop.now
        tried, backend, frontend, worker = self.tried, self.backend, self.frontend, self.worker
        queued = self.queued_until > 0
        if queued:   # still in the queue: since it went in
            waited = int((now - self.queued_until + backend.config.timeout_queue) * 1000)
        elif len(tried) == 1:
            waited = int((self.attempt_started - self.started) * 1000)
        else:
            waited = 0 if tried else -1
        connect = self.connect_ms - waited if self.connect_ms >= 0 else -1
        server = tried[-1] if tried else None
        state, fin = tcp_state(self.term, self.err, frontend.config.half_close, queued)
        err = self.err
        worker.log.access(
            f"{peer_label(self.peer)} [{accept_date(time.time() - (now - self.started))}] {frontend.name} "
            f"{backend.name}/{server.name if server else NOSRV} {waited}/{connect}/{int((now - self.started) * 1000)} "
            f"{self.down.moved if self.down else 0} {state} {worker.active}/{frontend.active}/{backend.active}/"
            f"{server.sessions() if server else 0}/{max(len(tried) - 1, 0)} 0/{len(backend.queue)} "
            f"up={self.up.moved if self.up else 0}{' fin=' + fin if fin else ''}{' err=' + err if err else ''}")
