"""The runtime API: one command per line on the admin socket, answers in
HAProxy's shapes where HAProxy has the command.

Without `prompt`, a connection carries one command and is closed after its
answer (as HAProxy's CLI); `prompt` makes it interactive: a "> " prompt,
commands until `quit` or the client's close.  Served by the control
process, never by the master, and never blocking it: a client that does
not read its answer is closed once MAX_OUTPUT waits for it, a line over
MAX_LINE or bytes that are not text close that connection only.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import time

from proxyd import __version__
from proxyd.loop import EDGE
from proxyd.shared import ADMIN_NAMES, DOWN, DRAIN, MAINT, READY, STATE_NAMES

MAX_LINE = 4096
MAX_OUTPUT = 4 << 20
ADMIN_WORDS = {READY: "ready", DRAIN: "draining", MAINT: "in maintenance"}
HELP = """The following commands are valid at this level:
  help                                    : this message
  prompt                                  : interactive mode (one command per line until quit)
  quit                                    : leave the interactive mode
  show info                               : report information about the running process
  show stat [json]                        : report counters for each proxy and server (CSV or JSON)
  show servers state [BACKEND]            : the state of each server (HAProxy's server-state format)
  show config                             : the running configuration (JSON)
  disable server BACKEND/SERVER           : put a server in maintenance
  enable server BACKEND/SERVER            : take a server out of maintenance (ready)
  set server BACKEND/SERVER state STATE   : ready, drain or maint
  set weight BACKEND/SERVER WEIGHT        : change a server's weight (0-256)
"""
# HAProxy's `show stat` columns, in order; proxyd fills the ones it has.
STAT_COLUMNS = ("pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,"
                "status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,"
                "tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,"
                "hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,"
                "srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,"
                "ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,"
                "check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo").split(",")


class CommandError(Exception):
    """An answer that is an error line; the session goes on."""


class AdminConnection:
    __slots__ = ("control", "sock", "fd", "inbuf", "outbuf", "interactive", "closing", "__weakref__")

    def __init__(self, control, sock: socket.socket):
        self.control = control
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.interactive = False
        self.closing = False
        control.admin_connections.add(self)
        control.loop.add(self.fd, self.on_ready, EDGE)

    def on_ready(self, mask: int) -> None:
        self._read()
        self._flush()

    def _read(self) -> None:
        while not self.closing and self.sock is not None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                return self.close()
            if not data:
                self.closing = True   # answer what came, then close
                if self.inbuf:
                    self._command(bytes(self.inbuf))
                    self.inbuf.clear()
                return
            self.inbuf += data
            while b"\n" in self.inbuf and not self.closing and self.sock is not None:
                line, _, rest = bytes(self.inbuf).partition(b"\n")
                self.inbuf = bytearray(rest)
                self._command(line)
            if len(self.inbuf) > MAX_LINE and self.sock is not None:
                return self.close()

    def _command(self, raw: bytes) -> None:
        raw = raw.rstrip(b"\r")
        if len(raw) > MAX_LINE or any(b < 32 and b != 9 for b in raw):
            return self.close()   # not a command line: binary or far too long
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self.close()
        for command in [c.strip() for c in line.split(";")]:
            words = command.split()
            if words == ["prompt"]:
                self.interactive = not self.interactive
                continue
            if words == ["quit"]:
                self.closing = True
                return
            if not words:
                continue
            try:
                answer = run(self.control, words)
            except CommandError as e:
                answer = f"{e}\n"
            self.outbuf += answer.encode()
            if self.interactive:
                self.outbuf += b"\n"
        if self.interactive and not self.closing:
            self.outbuf += b"> "
        elif not self.interactive:
            self.closing = True   # one command per connection, as HAProxy's CLI without prompt
        if len(self.outbuf) > MAX_OUTPUT:
            self.close()

    def _flush(self) -> None:
        while self.outbuf and self.sock is not None:
            try:
                sent = self.sock.send(self.outbuf)
            except BlockingIOError:
                return
            except OSError:
                return self.close()
            del self.outbuf[:sent]
        if self.closing and self.sock is not None:
            self.close()

    def close(self) -> None:
        self.closing = True
        if self.sock is not None:
            self.control.loop.forget(self.fd)
            self.sock.close()
            self.sock = None
            self.control.admin_connections.discard(self)


# ---------------------------------------------------------------- commands

def run(control, words: list[str]) -> str:
    """The answer to one command (WORDS), or CommandError."""
    head = " ".join(words[:2])
    if words[0] == "help":
        return HELP
    if head == "show info":
        return show_info(control)
    if head == "show stat":
        if words[2:] == ["json"]:
            return json.dumps(stat_rows(control), indent=1) + "\n"
        if words[2:]:
            raise CommandError("Usage: show stat [json]")
        return show_stat_csv(control)
    if words[:3] == ["show", "servers", "state"]:
        return show_servers_state(control, words[3] if len(words) > 3 else None)
    if head == "show config":
        from proxyd.confdiff import config_as_dict
        return json.dumps(config_as_dict(control.config), indent=1) + "\n"   # in file order: order matters
    if head in ("disable server", "enable server") and len(words) == 3:
        backend, server = find_server(control, words[2])
        control.set_admin(backend, server, MAINT if words[0] == "disable" else READY)
        return ""
    if head == "set server" and len(words) == 5 and words[3] == "state":
        backend, server = find_server(control, words[2])
        states = {v: k for k, v in ADMIN_NAMES.items()}
        if words[4] not in states:
            raise CommandError("'set server <srv> state' expects 'ready', 'drain' and 'maint'.")
        control.set_admin(backend, server, states[words[4]])
        return ""
    if head == "set weight" and len(words) == 4:
        backend, server = find_server(control, words[2])
        if not (words[3].isdigit() and 0 <= int(words[3]) <= 256):
            raise CommandError("Weight must be an integer between 0 and 256.")
        control.set_weight(backend, server, int(words[3]))
        return ""
    raise CommandError(f"Unknown command: '{' '.join(words)[:80]}'. Type 'help' for the list of commands.")


def find_server(control, name: str):
    backend_name, slash, server_name = name.partition("/")
    if not slash or not server_name:
        raise CommandError("Require 'backend/server'.")
    backend = control.config.backends.get(backend_name)
    if backend is None:
        raise CommandError("No such backend.")
    for server in backend.servers:
        if server.name == server_name:
            return backend, server
    raise CommandError("No such server.")


def show_info(control) -> str:
    info = control.shared.read_process()
    uptime = int(time.time() - info["started"])
    d, rest = divmod(uptime, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    lines = {
        "Name": "proxyd", "Version": __version__, "Pid": info["pid"],
        "Uptime": f"{d}d {h}h{m:02d}m{s:02d}s", "Uptime_sec": uptime,
        "Workers": info["workers"], "Generation": info["generation"], "Reloads": info["reloads"],
        "Control_pid": os.getpid(),
        "Backends": len(control.config.backends), "Frontends": len(control.config.frontends),
        "Node": socket.gethostname(),
    }
    return "".join(f"{k}: {v}\n" for k, v in lines.items())


def server_row(control, backend, server, iid: int, sid: int) -> dict:
    record = control.shared.servers[f"{backend.name}/{server.name}"]
    state = control.shared.read_server(record)
    if state.admin == MAINT:
        status = "MAINT"
    elif state.admin == DRAIN:
        status = "DRAIN"
    elif not state.checked:
        status = "no check"
    else:
        status = "DOWN" if state.state == DOWN else "UP"
    check = backend.health_check
    return {
        "pxname": backend.name, "svname": server.name, "scur": control.shared.server_sessions(record),
        "slim": server.maxconn or "", "status": status, "weight": state.weight,
        "act": 0 if server.backup else 1, "bck": 1 if server.backup else 0,
        "lastchg": int(time.time() - state.changed_at) if state.changed_at else "",
        "pid": control.info["master_pid"], "iid": iid, "sid": sid, "type": 2,
        "check_status": check_status(state) if state.checked else "",
        "check_code": state.code or "", "check_duration": state.duration if state.checked_at else "",
        "check_desc": state.reason, "check_rise": check.rise if check else "",
        "check_fall": check.fall if check else "", "addr": str(server.address), "mode": backend_mode(control, backend),
        "algo": backend.balance,
    }


def check_status(state) -> str:
    """HAProxy's short check status: L4OK, L4CON, L4TOUT, L7OK, L7STS, L7TOUT, L7RSP."""
    reason = state.reason
    for words, short in (("Layer4 check passed", "L4OK"), ("Layer4 connection problem", "L4CON"),
                         ("Layer4 timeout", "L4TOUT"), ("Layer7 check passed", "L7OK"),
                         ("Layer7 wrong status", "L7STS"), ("Layer7 timeout", "L7TOUT"),
                         ("Layer7 invalid response", "L7RSP")):
        if reason.startswith(words):
            return short
    return "INI"


def backend_mode(control, backend) -> str:
    """The mode of the frontends that send to BACKEND (by default or by a route)."""
    modes = {f.mode for f in control.config.frontends.values()
             if f.backend == backend.name or any(r.backend == backend.name for r in f.routes)}
    return modes.pop() if len(modes) == 1 else "tcp"


# `show stat` column -> /stats figure, for the traffic counters
COUNTER_COLUMNS = {"qcur": "current_queue", "qmax": "max_queue", "stot": "sessions_total", "bin": "bytes_in_total",
                   "bout": "bytes_out_total", "dreq": "requests_denied_total", "ereq": "request_errors_total",
                   "econ": "connection_errors_total", "eresp": "response_errors_total",
                   "wretr": "retry_warnings_total", "wredis": "redispatch_warnings_total",
                   "chkfail": "check_failures_total", "chkdown": "check_up_down_total",
                   "req_tot": "http_requests_total"}


def _counters(figures: dict, now: float) -> dict:
    """The counter columns of one row, from its /stats figures."""
    row = {column: figures[key] for column, key in COUNTER_COLUMNS.items() if key in figures}
    for i, code in enumerate(("1xx", "2xx", "3xx", "4xx", "5xx", "other")):
        row[f"hrsp_{code}"] = figures["http_responses_total"][code]
    if "downtime_seconds_total" in figures:
        row["downtime"] = int(figures["downtime_seconds_total"])
    if figures.get("last_session_seconds"):
        row["lastsess"] = int(now - figures["last_session_seconds"])
    return row


def stat_rows(control) -> list[dict]:
    from proxyd.stats import snapshot
    snap = snapshot(control)
    now = time.time()
    rows = []
    for iid, (frontend, figures) in enumerate(zip(control.config.frontends.values(), snap["frontends"]), 1):
        rows.append({"pxname": frontend.name, "svname": "FRONTEND", "status": "OPEN", "pid": control.info["master_pid"],
                     "iid": iid, "sid": 0, "type": 0, "mode": frontend.mode, "slim": frontend.maxconn,
                     "scur": figures["current_sessions"], **_counters(figures, now)})
    first = len(rows) + 1
    for iid, (backend, figures) in enumerate(zip(control.config.backends.values(), snap["backends"]), first):
        servers = [{**server_row(control, backend, s, iid, sid), **_counters(f, now)}
                   for sid, (s, f) in enumerate(zip(backend.servers, figures["servers"]), 1)]
        up = [r for r in servers if r["status"] in ("UP", "no check")]
        rows += servers
        rows.append({"pxname": backend.name, "svname": "BACKEND", "scur": sum(r["scur"] for r in servers),
                     "status": "UP" if up else "DOWN", "weight": sum(r["weight"] for r in up if r["act"]),
                     "act": sum(r["act"] for r in up), "bck": sum(r["bck"] for r in up),
                     "pid": control.info["master_pid"], "iid": iid, "sid": 0, "type": 1,
                     "mode": backend_mode(control, backend), "algo": backend.balance, **_counters(figures, now)})
    return rows


def show_stat_csv(control) -> str:
    out = io.StringIO()
    out.write("# " + ",".join(STAT_COLUMNS) + "\n")
    writer = csv.writer(out, lineterminator="\n")   # quotes a value with a comma (check_desc)
    for row in stat_rows(control):
        writer.writerow([row.get(c, "") for c in STAT_COLUMNS])
    return out.getvalue()


def show_servers_state(control, only: str | None) -> str:
    """HAProxy's `show servers state` (version 1 of its format), the columns proxyd has."""
    lines = ["1", "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
             "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
             "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port"]
    if only is not None and only not in control.config.backends:
        raise CommandError(f"Can't find backend '{only}'.")
    for be_id, backend in enumerate(control.config.backends.values(), 1):
        if only is not None and backend.name != only:
            continue
        for srv_id, server in enumerate(backend.servers, 1):
            state = control.shared.read_server(control.shared.servers[f"{backend.name}/{server.name}"])
            op = 0 if state.state == DOWN else 2        # HAProxy: 0 stopped, 2 running
            adm = {READY: 0, DRAIN: 8, MAINT: 1}[state.admin]   # HAProxy's SRV_ADMF_* bits
            since = int(time.time() - state.changed_at) if state.changed_at else 0
            health = state.rise if state.state != DOWN else 0
            lines.append(f"{be_id} {backend.name} {srv_id} {server.name} {server.address.host} {op} {adm} "
                         f"{state.weight} {server.weight} {since} {check_status(state) if state.checked else '-'} "
                         f"{STATE_NAMES[state.state]} {health} {1 if state.checked else 0} 0 0 0 - "
                         f"{server.address.port}")
    return "\n".join(lines) + "\n"
