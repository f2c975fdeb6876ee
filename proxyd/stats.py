"""The statistics: one snapshot of the shared counters and states, served
by the control process as Prometheus text (/metrics), JSON (/stats) and an
HTML page (/).

A scrape reads the shared memory once (shared.Shared.totals: every
process's block summed, retried while the master folds a gone process in)
and psutil for the workers; it never talks to a worker, so it can never
hold one up.  Names and labels are those of HAProxy's Prometheus exporter
(addons/promex) under a `proxyd_` prefix; docs/METRICS.md lists them.
"""

from __future__ import annotations

import json
import socket
import time

import psutil

from proxyd import __version__
from proxyd.shared import COUNTER_FIELDS, DOWN, DRAIN, MAINT, C

CODES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
TOTALS = ("sessions_total", "bytes_in_total", "bytes_out_total", "connection_errors_total",
          "response_errors_total", "retry_warnings_total", "redispatch_warnings_total", "http_requests_total",
          "request_errors_total", "requests_denied_total", "internal_errors_total", "check_failures_total",
          "check_up_down_total")
# snapshot key -> counter field, for the plain ones
PLAIN = {
    "sessions_total": C.sessions, "bytes_in_total": C.bytes_in, "bytes_out_total": C.bytes_out,
    "connection_errors_total": C.connection_errors, "response_errors_total": C.response_errors,
    "retry_warnings_total": C.retries, "redispatch_warnings_total": C.redispatches,
    "http_requests_total": C.http_requests, "request_errors_total": C.request_errors,
    "requests_denied_total": C.requests_denied, "internal_errors_total": C.internal_errors,
    "check_failures_total": C.check_failures, "check_up_down_total": C.check_up_down,
    "current_sessions": C.current_sessions, "current_queue": C.current_queue, "max_queue": C.max_queue,
    "last_session_seconds": C.last_session,
}
assert set(TOTALS) <= set(PLAIN) and len(COUNTER_FIELDS) == 24


def _figures(counts: list[int], keys) -> dict:
    figures = {key: counts[PLAIN[key]] for key in keys}
    figures["http_responses_total"] = {code: counts[C.http_1xx + i] for i, code in enumerate(CODES)}
    return figures


FRONTEND_KEYS = ("current_sessions", "sessions_total", "bytes_in_total", "bytes_out_total", "http_requests_total",
                 "request_errors_total", "requests_denied_total", "internal_errors_total")
BACKEND_KEYS = ("current_sessions", "sessions_total", "bytes_in_total", "bytes_out_total", "current_queue",
                "max_queue", "connection_errors_total", "response_errors_total", "retry_warnings_total",
                "redispatch_warnings_total", "internal_errors_total", "http_requests_total",
                "check_up_down_total", "last_session_seconds")
SERVER_KEYS = ("sessions_total", "bytes_in_total", "bytes_out_total", "connection_errors_total",
               "response_errors_total", "retry_warnings_total", "redispatch_warnings_total",
               "check_failures_total", "check_up_down_total", "last_session_seconds")


def server_status(state) -> str:
    """HAProxy's exporter states: MAINT over DRAIN over UP/DOWN."""
    if state.admin == MAINT:
        return "MAINT"
    if state.state == DOWN:
        return "DOWN"
    return "DRAIN" if state.admin == DRAIN else "UP"


def snapshot(control) -> dict:
    """Every figure, as /stats gives it (and /metrics and / render it)."""
    from proxyd.admin import backend_mode, check_status
    shared, config = control.shared, control.config
    now = time.time()
    process = shared.read_process()
    objects = [shared.proxy_object("frontend", name) for name in config.frontends]
    objects += [shared.proxy_object("backend", name) for name in config.backends]
    servers = [(b, s, shared.servers[f"{b.name}/{s.name}"]) for b in config.backends.values() for s in b.servers]
    objects += [record for _, _, record in servers]
    counted = dict(zip(objects, shared.totals(objects)))
    frontends = []
    for name, frontend in config.frontends.items():
        row = _figures(counted[shared.proxy_object("frontend", name)], FRONTEND_KEYS)
        row.update(name=name, mode=frontend.mode, status="UP", limit_sessions=frontend.maxconn)
        row["connections_total"] = counted[shared.proxy_object("frontend", name)][C.sessions]
        frontends.append(row)
    backends = {}
    for name, backend in config.backends.items():
        row = _figures(counted[shared.proxy_object("backend", name)], BACKEND_KEYS)
        counts = counted[shared.proxy_object("backend", name)]
        row.update(name=name, mode=backend_mode(control, backend), balance=backend.balance,
                   downtime_seconds_total=counts[C.downtime_ms] / 1000, servers=[])
        backends[name] = row
    for backend, server, record in servers:
        state = shared.read_server(record)
        counts = counted[record]
        row = _figures(counts, SERVER_KEYS)
        row.update(
            name=server.name, address=server.address.written, mode=backends[backend.name]["mode"],
            status=server_status(state),
            admin={0: "ready", 1: "drain", 2: "maint"}[state.admin], checked=bool(state.checked),
            weight=state.weight, backup=server.backup, limit_sessions=server.maxconn,
            current_sessions=shared.server_sessions(record), current_queue=0, max_queue=0,
            downtime_seconds_total=counts[C.downtime_ms] / 1000,
            check_status=check_status(state) if state.checked else "", check_code=state.code,
            check_duration_seconds=state.duration / 1000, check_reason=state.reason,
            check_last_change_seconds=state.changed_at)
        backends[backend.name]["servers"].append(row)
    for row in backends.values():
        usable = [s for s in row["servers"] if s["status"] == "UP"]
        row["status"] = "UP" if usable else "DOWN"
        row["active_servers"] = sum(1 for s in usable if not s["backup"])
        row["backup_servers"] = sum(1 for s in usable if s["backup"])
        row["weight"] = sum(s["weight"] for s in usable if not s["backup"])
        row["check_last_change_seconds"] = max((s["check_last_change_seconds"] for s in row["servers"]), default=0)
    return {
        "process": {"name": "proxyd", "version": __version__, "pid": process["pid"], "node": socket.gethostname(),
                    "start_time_seconds": process["started"], "uptime_seconds": now - process["started"],
                    "generation": process["generation"], "reloads": process["reloads"],
                    "workers": process["workers"]},
        "workers": _workers(shared),
        "frontends": frontends,
        "backends": list(backends.values()),
    }


def _workers(shared) -> list[dict]:
    """psutil's figures for each live worker the master recorded."""
    found = []
    for _, pid, generation, number in shared.processes():
        if not number:
            continue   # the control process
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                cpu = proc.cpu_times()
                found.append({"worker": number, "generation": generation, "pid": pid,
                              "rss_bytes": proc.memory_info().rss, "cpu_seconds": cpu.user + cpu.system,
                              "open_fds": proc.num_fds()})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue   # gone between the read and the look
    return sorted(found, key=lambda w: (w["generation"], w["worker"]))


# ---------------------------------------------------------------- /metrics

# (name, type, help, snapshot key) per section; a dict value (http
# responses) becomes one series per `code` label.
PROXY_METRICS = {
    "frontend": (
        ("current_sessions", "gauge", "Number of current sessions on the frontend (client connections)."),
        ("limit_sessions", "gauge", "Configured session limit (maxconn, per worker)."),
        ("sessions_total", "counter", "Total number of sessions (client connections)."),
        ("connections_total", "counter", "Total number of connections accepted."),
        ("bytes_in_total", "counter", "Total number of request bytes relayed from clients."),
        ("bytes_out_total", "counter", "Total number of response bytes sent to clients."),
        ("requests_denied_total", "counter", "Total number of denied requests (proxyd has no ACLs: 0)."),
        ("request_errors_total", "counter", "Total number of invalid or incomplete requests."),
        ("internal_errors_total", "counter", "Total number of internal errors."),
        ("http_requests_total", "counter", "Total number of HTTP requests received."),
        ("http_responses_total", "counter", "Total number of HTTP responses, by status class."),
    ),
    "backend": (
        ("current_queue", "gauge", "Number of current queued connections."),
        ("max_queue", "gauge", "Highest number of queued connections (the largest of any one worker's)."),
        ("current_sessions", "gauge", "Number of current sessions (http: requests) on the backend's servers."),
        ("sessions_total", "counter", "Total number of sessions (http: requests)."),
        ("bytes_in_total", "counter", "Total number of request bytes relayed."),
        ("bytes_out_total", "counter", "Total number of response bytes relayed."),
        ("connection_errors_total", "counter", "Total number of failed connections to a server."),
        ("response_errors_total", "counter", "Total number of aborted or timed-out responses."),
        ("retry_warnings_total", "counter", "Total number of connection retries."),
        ("redispatch_warnings_total", "counter", "Total number of retries on another server."),
        ("internal_errors_total", "counter", "Total number of internal errors."),
        ("weight", "gauge", "Total weight of the usable active servers."),
        ("active_servers", "gauge", "Number of usable active servers."),
        ("backup_servers", "gauge", "Number of usable backup servers."),
        ("check_up_down_total", "counter", "Total number of times the backend went DOWN (no usable server)."),
        ("check_last_change_seconds", "gauge", "Seconds since a server of the backend last changed state."),
        ("downtime_seconds_total", "counter", "Total time the backend had no usable server."),
        ("last_session_seconds", "gauge", "Seconds since the last session was assigned."),
        ("http_requests_total", "counter", "Total number of HTTP requests."),
        ("http_responses_total", "counter", "Total number of HTTP responses, by status class."),
    ),
    "server": (
        ("current_sessions", "gauge", "Number of current sessions on the server, from every worker."),
        ("limit_sessions", "gauge", "Configured maxconn of the server (0: none)."),
        ("sessions_total", "counter", "Total number of sessions (http: requests) served."),
        ("bytes_in_total", "counter", "Total number of request bytes relayed to the server."),
        ("bytes_out_total", "counter", "Total number of response bytes relayed from the server."),
        ("connection_errors_total", "counter", "Total number of failed connections to the server."),
        ("response_errors_total", "counter", "Total number of aborted or timed-out responses."),
        ("retry_warnings_total", "counter", "Total number of retries after a failed connection to it."),
        ("redispatch_warnings_total", "counter", "Total number of retries moved from it to another server."),
        ("weight", "gauge", "Effective weight of the server."),
        ("active", "gauge", "Is the server active (not a backup)?"),
        ("backup", "gauge", "Is the server a backup?"),
        ("check_failures_total", "counter", "Total number of failed checks while the server was up."),
        ("check_up_down_total", "counter", "Total number of UP to DOWN transitions."),
        ("check_last_change_seconds", "gauge", "Seconds since the last state change."),
        ("downtime_seconds_total", "counter", "Total time the server was DOWN."),
        ("check_code", "gauge", "HTTP status of the last check (0 if none)."),
        ("check_duration_seconds", "gauge", "Duration of the last check."),
        ("last_session_seconds", "gauge", "Seconds since the last session was served."),
        ("http_responses_total", "counter", "Total number of HTTP responses, by status class."),
    ),
}
WORKER_METRICS = (("resident_memory_bytes", "rss_bytes", "Resident memory of the worker."),
                  ("cpu_seconds_total", "cpu_seconds", "CPU time (user and system) of the worker."),
                  ("open_fds", "open_fds", "Open file descriptors of the worker."))
SERVER_STATES = ("DOWN", "UP", "MAINT", "DRAIN", "NOLB")
CHECK_STATES = ("L4OK", "L4TOUT", "L4CON", "L7OK", "L7TOUT", "L7RSP", "L7STS")
SINCE = {"check_last_change_seconds", "last_session_seconds"}   # stored as a time, exported as an age


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def metrics(snap: dict) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    now = time.time()
    out: list[str] = []

    def family(name, kind, text, series):
        out.append(f"# HELP proxyd_{name} {text}\n# TYPE proxyd_{name} {kind}\n")
        for labels, value in series:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels)
            out.append(f"proxyd_{name}{{{inner}}} {_number(value)}\n" if inner else f"proxyd_{name} {_number(value)}\n")

    process = snap["process"]
    frontends = snap["frontends"]
    family("process_start_time_seconds", "gauge", "Start time of the master, in seconds since the epoch.",
           [((), process["start_time_seconds"])])
    family("process_uptime_seconds", "gauge", "Seconds since the master started.", [((), process["uptime_seconds"])])
    family("process_nbthread", "gauge", "Number of worker processes configured (HAProxy: threads).",
           [((), process["workers"])])
    family("process_generation", "gauge", "Generation serving (1, and one more per reload).",
           [((), process["generation"])])
    family("process_reloads_total", "counter", "Total number of reloads (SIGHUP with a valid configuration).",
           [((), process["reloads"])])
    family("process_current_connections", "gauge", "Number of current client connections.",
           [((), sum(f["current_sessions"] for f in frontends))])
    family("process_connections_total", "counter", "Total number of client connections.",
           [((), sum(f["sessions_total"] for f in frontends))])
    family("process_requests_total", "counter", "Total number of HTTP requests.",
           [((), sum(f["http_requests_total"] for f in frontends))])
    family("process_build_info", "gauge", "Build information.", [((("version", process["version"]),), 1)])
    workers = snap["workers"]
    for name, key, text in WORKER_METRICS:
        kind = "counter" if name.endswith("_total") else "gauge"
        family(f"worker_{name}", kind, text, [((("worker", w["worker"]), ("generation", w["generation"]),
                                                 ("pid", w["pid"])), w[key]) for w in workers])

    def rows(section):
        if section == "frontend":
            return [((("proxy", f["name"]),), f) for f in frontends]
        if section == "backend":
            return [((("proxy", b["name"]),), b) for b in snap["backends"]]
        return [((("proxy", b["name"]), ("server", s["name"])), s) for b in snap["backends"] for s in b["servers"]]

    for section, table in PROXY_METRICS.items():
        objects = rows(section)
        for key, kind, text in table:
            series = []
            for labels, row in objects:
                if key == "http_responses_total":
                    if row["mode"] == "http":
                        series += [((*labels, ("code", code)), n) for code, n in row[key].items()]
                elif key in SINCE:
                    series.append((labels, max(now - row[key], 0) if row[key] else 0))
                elif key == "active":
                    series.append((labels, 0 if row["backup"] else 1))
                elif key == "backup":
                    series.append((labels, 1 if row["backup"] else 0))
                elif key in row:
                    series.append((labels, row[key]))
            family(f"{section}_{key}", kind, text, series)
        if section == "frontend":
            family("frontend_status", "gauge", "Current status of the service, per state label value.",
                   [((*labels, ("state", st)), int(row["status"] == st)) for labels, row in objects
                    for st in ("DOWN", "UP")])
        elif section == "backend":
            family("backend_status", "gauge", "Current status of the service, per state label value.",
                   [((*labels, ("state", st)), int(row["status"] == st)) for labels, row in objects
                    for st in ("DOWN", "UP")])
        else:
            family("server_status", "gauge", "Current status of the service, per state label value.",
                   [((*labels, ("state", st)), int(row["status"] == st)) for labels, row in objects
                    for st in SERVER_STATES])
            family("server_check_status", "gauge", "Status of last health check, per state label value.",
                   [((*labels, ("state", st)), int(row["check_status"] == st)) for labels, row in objects
                    if row["checked"] and row["admin"] != "maint" for st in CHECK_STATES])
    return "".join(out)


def as_json(snap: dict) -> bytes:
    return json.dumps(snap, indent=1, sort_keys=False).encode()


# ---------------------------------------------------------------- the listener

MAX_HEAD = 8192
IDLE_TIMEOUT = 10.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           431: "Request Header Fields Too Large", 500: "Internal Server Error"}
PAGES = {"/metrics": "text/plain; version=0.0.4; charset=utf-8", "/stats": "application/json",
         "/": "text/html; charset=utf-8"}


class StatsConnection:
    """One HTTP/1.1 client of the stats listener: one request, strictly
    read (a GET or HEAD head of at most 8 KiB, CRLF line ends, no body),
    one answer, then close."""

    __slots__ = ("control", "sock", "fd", "inbuf", "outbuf", "deadline", "__weakref__")

    def __init__(self, control, sock: socket.socket):
        from proxyd.loop import EDGE
        self.control = control
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        self.inbuf = bytearray()
        self.outbuf = b""
        self.deadline = control.loop.now + IDLE_TIMEOUT
        control.stats_connections.add(self)
        control.loop.add(self.fd, self.on_ready, EDGE)

    def on_ready(self, mask: int) -> None:
        if not self.outbuf:
            self._read()
        if self.outbuf:
            self._flush()

    def _read(self) -> None:
        while self.sock is not None:
            try:
                data = self.sock.recv(MAX_HEAD + 1)
            except BlockingIOError:
                return
            except OSError:
                return self.close()
            if not data:
                return self.close()
            self.inbuf += data
            end = self.inbuf.find(b"\r\n\r\n")
            if end > MAX_HEAD or end < 0 and len(self.inbuf) > MAX_HEAD:
                return self._respond(431, b"request head too large\n")
            if end >= 0:
                return self._answer(bytes(self.inbuf[:end]))

    def _answer(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") \
                or head.count(b"\n") != head.count(b"\r\n") \
                or any(not line or line[:1] in b" \t" or b":" not in line for line in lines[1:]):
            return self._respond(400, b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0].decode("latin-1")
        if any(line.split(b":", 1)[0].strip().lower() in (b"content-length", b"transfer-encoding")
               for line in lines[1:]):
            return self._respond(400, b"no request body is expected here\n")
        if method not in (b"GET", b"HEAD"):
            return self._respond(405, b"GET or HEAD only\n", extra="Allow: GET, HEAD\r\n")
        if target not in PAGES:
            return self._respond(404, b"not found: try /metrics, /stats or /\n")
        snap = snapshot(self.control)
        if target == "/metrics":
            body = metrics(snap).encode()
        elif target == "/stats":
            body = as_json(snap)
        else:
            from proxyd.stats_page import render
            body = render(snap)
        self._respond(200, body, PAGES[target], head_only=method == b"HEAD")

    def _respond(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8", extra: str = "",
                 head_only: bool = False) -> None:
        head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                f"Cache-Control: no-cache\r\nConnection: close\r\n{extra}\r\n").encode()
        self.outbuf = head + (b"" if head_only else body)
        self._flush()

    def _flush(self) -> None:
        while self.outbuf and self.sock is not None:
            try:
                sent = self.sock.send(self.outbuf)
            except BlockingIOError:
                return
            except OSError:
                return self.close()
            self.outbuf = self.outbuf[sent:]
        if self.sock is not None and not self.outbuf:
            self.close()

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def close(self) -> None:
        if self.sock is not None:
            self.control.loop.forget(self.fd)
            self.sock.close()
            self.sock = None
            self.control.stats_connections.discard(self)
