"""Logging: one small writer for stderr, a file, or syslog (unix or UDP).

Access lines are the hot path (one per session), so they are buffered and
written once per event-loop iteration with a single write; other messages are
written at once.  The timestamp prefix is rebuilt once per second, not per
line.  USR1 reopens a log file so logrotate can move it away.
"""

from __future__ import annotations

import os
import socket
import sys
import time

LEVELS = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "err": 3}
FACILITY_DAEMON = 3


class Log:
    def __init__(self, target: str = "stderr", level: str = "info", tag: str = "proxyd"):
        self.target = target
        self.threshold = LEVELS[level]
        self.tag = tag
        self.pid = os.getpid()
        self.fd = 2
        self.sock: socket.socket | None = None
        self.pending: list[str] = []
        self._second = -1
        self._prefix = ""
        self.open()

    # ------------------------------------------------------------ the target
    def open(self) -> None:
        """Open the target; raises OSError with a clear message if it cannot."""
        if self.target == "stderr":
            self.fd = sys.stderr.fileno()
        elif self.target.startswith("syslog"):
            where = self.target[7:] or "/dev/log"
            if where.startswith("/"):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            else:
                host, _, port = where.rpartition(":")
                host = host.strip("[]")
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self.sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                where = (host, int(port))
            self.sock.connect(where)
            self.sock.setblocking(False)
        else:
            self.fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def reopen(self) -> None:
        """USR1: reopen a log file (logrotate moved the old one away)."""
        if self.target.startswith("/"):
            old = self.fd
            self.fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            os.close(old)

    def set_tag(self, tag: str) -> None:
        self.tag = tag
        self.pid = os.getpid()
        self._second = -1

    # ------------------------------------------------------------ writing
    def _stamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z {self.tag}[{self.pid}]: "

    def _emit(self, severity: int, lines: list[str]) -> None:
        if self.sock is not None:
            header = f"<{FACILITY_DAEMON * 8 + severity}>{time.strftime('%b %d %H:%M:%S')} {self.tag}[{self.pid}]: "
            for line in lines:
                try:
                    self.sock.send((header + line).encode(errors="replace"))
                except OSError:
                    pass  # syslog is lossy by nature; never block or crash the loop for it
            return
        stamp = self._stamp()
        data = "".join(f"{stamp}{line}\n" for line in lines).encode(errors="replace")
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except BlockingIOError:
            pass  # a full pipe on stderr: drop rather than stall every session
        except OSError:
            pass

    def access(self, line: str) -> None:
        """Queue an access line; flush() writes the batch."""
        if self.threshold >= 6:
            self.pending.append(line)

    def flush(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            self._emit(6, lines)

    def log(self, level: str, message: str) -> None:
        severity = LEVELS[level]
        if severity <= self.threshold:
            self.flush()
            self._emit(severity, [message])

    def debug(self, message: str) -> None:
        self.log("debug", message)

    def info(self, message: str) -> None:
        self.log("info", message)

    def notice(self, message: str) -> None:
        self.log("notice", message)

    def warning(self, message: str) -> None:
        self.log("warning", message)

    def error(self, message: str) -> None:
        self.log("err", message)
