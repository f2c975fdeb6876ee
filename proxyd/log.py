"""Logging: one small writer for stderr, a file, or syslog (unix, UDP or TCP).

A file or stderr gets `ISO-TIME proxyd[PID]: MESSAGE` lines.  Syslog gets
one message per datagram (unix or UDP), or a stream of them over TCP, with
the header of the configured format (global.syslog_format):
  rfc3164: `<PRI>Mmm dd hh:mm:ss proxyd[PID]: MESSAGE` (no hostname: what
           HAProxy and logger(1) send to a local daemon), newline-framed
           over TCP (RFC 6587 3.4.2, "non-transparent framing");
  rfc5424: `<PRI>1 TIMESTAMP HOSTNAME proxyd PID - - MESSAGE`, the timestamp
           local time with its offset and microseconds, octet-counted over
           TCP (RFC 6587 3.4.1: `LENGTH SP MESSAGE`), the message ending
           with a newline that the length counts, so that every frame ends
           a line as the backlog's bookkeeping below expects.
PRI is the daemon facility (3) times 8 plus the severity.

Access lines are the hot path (one per session), so they are buffered and
written once per event-loop iteration with a single write; other messages are
written at once.  The timestamp prefix is rebuilt once per second, not per
line.  USR1 reopens a log file so logrotate can move it away.

Logging never blocks the data path or the master's supervision: a log sink
that stalls (a pipe on stderr whose reader stopped) gets what it can take,
the rest of a line waits in a small backlog, and lines beyond that are
dropped and counted; a line says how many once the sink takes bytes again.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import time

LEVELS = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "err": 3}
FACILITY_DAEMON = 3
MAX_BACKLOG = 64 * 1024   # bytes of log lines kept while the sink is full


def _inet(where: str) -> tuple[int, tuple[str, int]]:
    """"HOST:PORT" or "[IPv6]:PORT" -> (family, (host, port))."""
    host, _, port = where.rpartition(":")
    host = host.strip("[]")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def nonblocking_stderr() -> int:
    """An fd for stderr that never blocks, without changing the caller's.

    O_NONBLOCK belongs to the open file description, which a pipe or a
    terminal on stderr shares with whoever started us: reopening it through
    /proc gives a description of our own.  A regular file never blocks.
    """
    fd = sys.stderr.fileno()
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return fd
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # a socket cannot be reopened: ours to make non-blocking
        os.set_blocking(fd, False)
        return fd


class Log:
    def __init__(self, target: str = "stderr", level: str = "info", tag: str = "proxyd",
                 syslog_format: str = "rfc3164"):
        self.target = target
        self.rfc5424 = syslog_format == "rfc5424"
        self.hostname = socket.gethostname() or "-"   # RFC 5424 6.2.4: the host's name, "-" if unknown
        self.threshold = LEVELS[level]
        self.tag = tag
        self.pid = os.getpid()
        self.fd = 2
        self.sock: socket.socket | None = None      # syslog datagrams
        self.stream: tuple | None = None            # syslog over TCP: (family, address)
        self.reconnect_at = 0.0
        self.pending: list[str] = []
        self.backlog = bytearray()    # the part of the lines the sink could not take yet
        self.dropped = 0              # lines dropped since the sink was last able to take them
        self.mid_line = False         # the last byte written did not end a line
        self.regular_file = False     # the sink is a file (a cut line can be taken back)
        self._second = -1
        self._prefix = ""
        self._syslog_second = -1
        self._syslog_stamp = ""
        self.open()

    # ------------------------------------------------------------ the target
    def open(self) -> None:
        """Open the target; raises OSError with a clear message if it cannot."""
        if self.target == "stderr":
            self.fd = nonblocking_stderr()
        elif self.target.startswith("syslog"):
            where = self.target[7:] or "/dev/log"
            if where.startswith("tcp@"):
                self.stream = _inet(where[4:])
                return self._connect_stream()
            if where.startswith("/"):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            else:
                family, where = _inet(where)
                self.sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.connect(where)
            self.sock.setblocking(False)
        else:
            self.fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if self.sock is None:
            self.regular_file = stat.S_ISREG(os.fstat(self.fd).st_mode)

    def _connect_stream(self) -> None:
        """Syslog over TCP (newline-framed, RFC 6587): a non-blocking connect;
        until it completes, lines wait in the backlog as for a full sink."""
        family, address = self.stream
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        sock.connect_ex(address)
        self.fd = sock.detach()
        self.mid_line = False

    def _stream_failed(self) -> None:
        """The receiver is gone: what waits is lost (counted); reconnect in a second."""
        os.close(self.fd)
        self.fd = -1
        self.dropped += self.backlog.count(b"\n")
        self.backlog.clear()
        self.reconnect_at = time.monotonic() + 1.0

    def reopen(self) -> None:
        """USR1: reopen a log file (logrotate moved the old one away); after
        daemonizing: stderr is /dev/null now."""
        if self.target.startswith("/") or self.target == "stderr":
            old = self.fd
            self.open()
            if old not in (self.fd, 2):
                os.close(old)

    def set_tag(self, tag: str) -> None:
        """A new process (a worker, a daemon) logs under its own pid; what its
        parent had not written yet is the parent's to write."""
        self.tag = tag
        self.pid = os.getpid()
        self._second = self._syslog_second = -1
        self.pending = []
        self.backlog.clear()
        self.dropped = 0
        if self.stream is not None and self.fd >= 0:
            os.close(self.fd)       # a TCP stream of its own: lines of two
            self._connect_stream()  # processes never interleave mid-line

    # ------------------------------------------------------------ writing
    def _stamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z {self.tag}[{self.pid}]: "

    def _syslog_header(self, severity: int) -> str:
        """The header of the messages of one batch; the time down to the
        second is formatted once per second."""
        now = time.time()
        second = int(now)
        if second != self._syslog_second:
            self._syslog_second = second
            local = time.localtime(second)
            if self.rfc5424:
                offset = local.tm_gmtoff
                sign = "-" if offset < 0 else "+"
                offset = abs(offset) // 60
                self._syslog_stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", local),
                                      f"{sign}{offset // 60:02d}:{offset % 60:02d}")
            else:  # RFC 3164 4.1.2: the day of the month space-padded
                self._syslog_stamp = time.strftime(f"%b {local.tm_mday:2d} %H:%M:%S", local)
        pri = FACILITY_DAEMON * 8 + severity
        if self.rfc5424:
            date, zone = self._syslog_stamp
            return f"<{pri}>1 {date}.{int((now - second) * 1e6):06d}{zone} {self.hostname} {self.tag} {self.pid} - - "
        return f"<{pri}>{self._syslog_stamp} {self.tag}[{self.pid}]: "

    def _frame(self, header: str, line: str) -> str:
        """One message on a syslog TCP stream."""
        if self.rfc5424:
            message = f"{header}{line}\n"
            return f"{len(message.encode(errors='replace'))} {message}"
        return f"{header}{line}\n"

    def _emit(self, severity: int, lines: list[str]) -> None:
        if self.sock is not None:
            header = self._syslog_header(severity)
            if self.dropped:
                lines = [f"log sink was full: {self.dropped} log lines dropped", *lines]
                self.dropped = 0
            for line in lines:
                try:
                    self.sock.send((header + line).encode(errors="replace"))
                except OSError:
                    self.dropped += 1  # syslog is lossy by nature; never block or crash the loop for it
            return
        if self.stream is not None:
            header = self._syslog_header(severity)
            if self.fd < 0:
                if time.monotonic() < self.reconnect_at:
                    self.dropped += len(lines)
                    return
                self._connect_stream()
            return self._write("".join(self._frame(header, line) for line in lines).encode(errors="replace"))
        stamp = self._stamp()
        self._write("".join(f"{stamp}{line}\n" for line in lines).encode(errors="replace"))

    def _write(self, data: bytes) -> None:
        """Write DATA now, or keep it in the backlog, or drop it: never block."""
        if self.backlog and not self._drain():
            return self._keep(data)
        try:
            if self.mid_line:  # end the line a failed write cut short, then ours
                self.mid_line = not os.write(self.fd, b"\n")
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            self.dropped += data.count(b"\n")
            if self.stream is not None:
                self._stream_failed()
            return  # the sink is gone (EPIPE, EIO, ENOSPC): nothing to wait for
        if 0 < written < len(data):
            written = self._uncut(data, written)
        if written:
            self.mid_line = data[written - 1] != 0x0A
        if written < len(data):
            self._keep(data[written:])
        elif self.dropped:
            self._say_dropped()

    def _uncut(self, data, written: int) -> int:
        """A short write to a log file (ENOSPC) cut a line: take its head back
        out of the file, so that the file holds whole lines only and the line
        goes again, whole, from the backlog.  Returns how much of DATA stays
        written.  With O_APPEND our offset is the end of our write; if the
        file is still that long nobody appended since (on a full filesystem
        nobody can), and the cut head is ours to truncate.  Other sinks
        (pipes, sockets) go on from where they stopped: nothing was cut."""
        whole = data.rfind(b"\n", 0, written) + 1
        if whole == written or not self.regular_file:
            return written
        try:
            end = os.lseek(self.fd, 0, os.SEEK_CUR)
            if os.fstat(self.fd).st_size != end:
                return written
            os.ftruncate(self.fd, end - (written - whole))
        except OSError:
            return written
        return whole

    def _keep(self, data: bytes) -> None:
        """Keep the whole lines that fit in the backlog; count the rest as dropped."""
        room = MAX_BACKLOG - len(self.backlog)
        cut = len(data) if len(data) <= room else data.rfind(b"\n", 0, room) + 1
        self.backlog += data[:cut]
        self.dropped += data.count(b"\n", cut)

    def _drain(self) -> bool:
        """Write the backlog; True once it is empty."""
        try:
            written = os.write(self.fd, self.backlog)
        except BlockingIOError:
            return False
        except OSError:  # the sink failed (ENOSPC, EPIPE): its lines are lost, and counted
            if self.stream is not None:
                self._stream_failed()
                return False
            self.dropped += self.backlog.count(b"\n")
            self.backlog.clear()
            return False
        if 0 < written < len(self.backlog):
            written = self._uncut(self.backlog, written)
        if written:
            self.mid_line = self.backlog[written - 1] != 0x0A
        del self.backlog[:written]
        if not self.backlog and self.dropped:
            self._say_dropped()
        return not self.backlog

    def _say_dropped(self) -> None:
        dropped, self.dropped = self.dropped, 0
        self._emit(LEVELS["warning"], [f"log sink was full: {dropped} log lines dropped"])

    def access(self, line: str) -> None:
        """Queue an access line; flush() writes the batch."""
        if self.threshold >= 6:
            self.pending.append(line)

    def flush(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            self._emit(6, lines)
        elif self.backlog and self.fd >= 0:
            self._drain()

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
