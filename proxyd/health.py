"""Active health checks, run once per host by the control process.

Each checked server has a Check: every `interval` a non-blocking connect
(TCP check), then for an HTTP check `GET http_path` with a Host header,
expecting a 2xx or 3xx status line; the whole check bounded by `timeout`.
The checks of one backend are spread over its interval (server i of n
starts i/n of the way in) rather than all at once.  Every check connection
is closed with SO_LINGER {1, 0}: a reset, so checks leave no TIME_WAIT.

The result goes into the server's shared record (this process is its one
writer): `rise` consecutive successes mark a down server up, `fall`
consecutive failures mark an up server down.  A new server starts up with
one failure enough to mark it down (HAProxy's start-up state), so a server
dead at start is down after its first check.  Each transition is logged in
HAProxy's words.  A server in maintenance is not checked.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

from proxyd.shared import DOWN, MAINT, MAX_COUNT, UNCHECKED, UP

INF = float("inf")

LINGER_RESET = struct.pack("ii", 1, 0)
MAX_STATUS_LINE = 1024


class Check:
    """One server's check: its schedule, its connection while one runs."""

    __slots__ = ("control", "backend", "server", "config", "record", "key", "due", "sock", "started",
                 "sent", "response", "timer_at", "__weakref__")

    def __init__(self, control, backend, server, offset: float):
        self.control = control
        self.backend = backend
        self.server = server
        self.config = backend.health_check
        self.key = f"{backend.name}/{server.name}"
        self.record = control.shared.servers[self.key]
        self.sock = None
        self.started = 0.0
        self.due = control.loop.now + offset   # the next check starts then
        self.timer_at = INF
        self._arm(self.due)

    # ------------------------------------------------------------ running
    def _arm(self, when: float) -> None:
        """One timer entry per check: the earliest of its deadlines."""
        if when < self.timer_at:
            self.timer_at = when
            self.control.loop.call_at(when, self)

    def on_timer(self, when: float) -> None:
        if when != self.timer_at:
            return   # stale entry: an earlier deadline took its place
        self.timer_at = INF
        now = self.control.loop.now
        if self.sock is not None and now >= self.started + self.config.timeout:
            layer = "Layer7" if self.config.http_path and self.sent else "Layer4"
            self._done(False, f"{layer} timeout", "", 0)
        if self.sock is None and now >= self.due:
            self.due += self.config.interval
            if self.due < now:   # the loop fell behind: no burst of catch-up checks
                self.due = now + self.config.interval
            if self.control.shared.server_state(self.record)[1] != MAINT:
                self._start()
        # While a check runs, only its timeout; the next one is armed when it ends.
        self._arm(self.due if self.sock is None else self.started + self.config.timeout)

    def _start(self) -> None:
        address = self.server.address
        self.started = self.control.loop.now
        self.sent = False
        self.response = b""
        try:
            sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as e:
            return self._done(False, "Layer4 connection problem", os.strerror(e.errno), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.sock = sock
        self.control.loop.add(sock.fileno(), self.on_ready)
        result = sock.connect_ex(address.sockaddr)
        if result not in (0, errno.EINPROGRESS):
            self._done(False, "Layer4 connection problem", os.strerror(result), 0)

    def on_ready(self, mask: int) -> None:
        sock = self.sock
        if sock is None:
            return
        if not self.sent:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self._done(False, "Layer4 connection problem", os.strerror(err), 0)
            if not self.config.http_path:
                return self._done(True, "Layer4 check passed", "", 0)
            address = self.server.address
            host = address.name or (f"[{address.host}]" if address.family == socket.AF_INET6 else address.host)
            request = (f"GET {self.config.http_path} HTTP/1.1\r\nHost: {host}\r\n"
                       f"User-Agent: proxyd-check\r\nConnection: close\r\n\r\n").encode()
            try:
                sock.send(request)
            except BlockingIOError:
                return   # the next write-readiness event sends it
            except OSError as e:
                return self._done(False, "Layer4 connection problem", os.strerror(e.errno), 0)
            self.sent = True
        self._read_status()

    def _read_status(self) -> None:
        while b"\r\n" not in self.response:
            try:
                data = self.sock.recv(MAX_STATUS_LINE)
            except BlockingIOError:
                return
            except OSError as e:
                return self._done(False, "Layer7 invalid response", os.strerror(e.errno), 0)
            if not data:
                return self._done(False, "Layer7 invalid response", "connection closed before a status line", 0)
            self.response += data
            if len(self.response) > MAX_STATUS_LINE:
                break
        line = self.response.split(b"\r\n", 1)[0]
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
            return self._done(False, "Layer7 invalid response", line[:64].decode("latin-1"), 0)
        code = int(parts[1])
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        if 200 <= code < 400:
            self._done(True, "Layer7 check passed", "", code)
        else:
            self._done(False, "Layer7 wrong status", reason, code)

    def _done(self, ok: bool, status: str, info: str, code: int) -> None:
        """The check is over: reset its connection, record the result."""
        if self.sock is not None:
            self.control.loop.forget(self.sock.fileno())
            self.sock.close()   # SO_LINGER {1, 0}: a reset, no TIME_WAIT
            self.sock = None
        duration = int((time.monotonic() - self.started) * 1000)
        self.control.check_result(self, ok, status, info, code, duration)
        self._arm(self.due)   # past already if the check took longer than the interval: next loop turn


def next_state(state: int, rise: int, fall: int, ok: bool, cfg) -> tuple[int, int, int]:
    """(state, consecutive successes, consecutive failures) after one result."""
    if ok:
        rise, fall = min(rise + 1, MAX_COUNT), 0
        if state == DOWN and rise >= cfg.rise:
            state = UP
        elif state == UNCHECKED:
            state = UP
    else:
        rise, fall = 0, min(fall + 1, MAX_COUNT)
        # A server not yet confirmed by a check (UNCHECKED) is one failure from down.
        if state == UNCHECKED or (state == UP and fall >= cfg.fall):
            state = DOWN
    return state, rise, fall
