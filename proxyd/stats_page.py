"""The stats listener's HTML page (GET /), HAProxy's stats page in spirit.

render(snapshot) turns the snapshot that GET /stats serves as JSON into one
self-contained HTML5 document: inline CSS, no script, no external asset, a
<meta http-equiv="refresh"> to reload itself.  A header with the process
and its workers, then a table per frontend (one row) and per backend (a row
per server, coloured by state, and a "Backend" total row).

Every name and value is HTML-escaped (server names come from the config,
check reasons from the servers), and every field is read with a default:
a field missing from the snapshot, or of the wrong type, shows as "-" and
never breaks the page.  Each row carries machine-readable hooks for tests
and scrapers:

    <tr class="server state-up" data-proxy="app" data-server="s1" data-state="UP" ...>
    <tr class="backend state-up" data-proxy="app" data-state="UP">
    <tr class="frontend state-up" data-proxy="web" data-state="UP">
"""

from __future__ import annotations

import html
import math
import time

RESPONSE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")

# State -> (CSS class, label shown).  An UP server without health checks
# shows as "no check", as in HAProxy's page and `show stat`.
STATES = {
    "UP": ("state-up", "UP"),
    "DOWN": ("state-down", "DOWN"),
    "MAINT": ("state-maint", "MAINT"),
    "DRAIN": ("state-drain", "DRAIN"),
    "NOLB": ("state-nolb", "NOLB"),
    "NOCHECK": ("state-nocheck", "no check"),
    "OPEN": ("state-up", "OPEN"),
}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;font-size:11.5px;
 margin:8px 10px;color:#222;background:#fff}
h1{font-size:18px;margin:0 0 2px}
h1 small{font-weight:normal;color:#666;font-size:12px}
h2{font-size:13px;margin:14px 0 3px;padding:3px 6px;background:#3a4f7a;color:#fff;display:inline-block;
 border-radius:3px 3px 0 0}
h2 small{font-weight:normal;opacity:.85}
.top{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}
table{border-collapse:collapse}
td,th{border:1px solid #bbb;padding:1px 2px;white-space:nowrap}
th{background:#dde3ee;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
table.info th{text-align:left;background:#eef1f6}
table.px{margin-bottom:2px}
table.px thead tr.grp th{background:#c9d2e3}
table.px td.name{font-weight:600;text-align:left}
table.px td.addr{color:#444}
table.px td.reason{max-width:10em;overflow:hidden;text-overflow:ellipsis}
td.st{font-weight:700;text-align:center}
tr.server.state-up{background:#c6f3c6} tr.server.state-up td.st{color:#0a6b0a}
tr.server.state-nocheck{background:#e4f2e4} tr.server.state-nocheck td.st{color:#3d6b3d;font-weight:600}
tr.server.state-down{background:#ffa8a8} tr.server.state-down td.st{color:#a00000}
tr.server.state-maint{background:#c3cde8} tr.server.state-maint td.st{color:#233d8a}
tr.server.state-drain{background:#ffd08a} tr.server.state-drain td.st{color:#8a4b00}
tr.server.state-nolb{background:#fff39a} tr.server.state-nolb td.st{color:#6b6000}
tr.backend,tr.frontend{background:#e9edf5;font-weight:600}
tr.backend.state-down td.st,tr.frontend.state-down td.st{background:#ffa8a8;color:#a00000}
tr.backend.state-up td.st,tr.frontend.state-up td.st{background:#c6f3c6;color:#0a6b0a}
tr.backend td.st,tr.frontend td.st{background:#ddd}
.legend{margin:6px 0 0;display:flex;gap:4px;flex-wrap:wrap;align-items:center}
.legend span{padding:1px 6px;border:1px solid #bbb}
.legend .state-up{background:#c6f3c6}.legend .state-nocheck{background:#e4f2e4}
.legend .state-down{background:#ffa8a8}.legend .state-maint{background:#c3cde8}
.legend .state-drain{background:#ffd08a}.legend .state-nolb{background:#fff39a}
nav{margin:6px 0}
nav a{margin-right:8px;color:#3a4f7a}
.bad{color:#b00000;font-weight:700}
.muted{color:#777}
footer{margin-top:12px;color:#777}
"""


# ------------------------------------------------------------- formatting

def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _d(value) -> dict:
    return value if isinstance(value, dict) else {}


def _l(value) -> list:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, (list, tuple)) else []


def _num(value):
    """VALUE as a finite int or float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def count(value) -> str:
    n = _num(value)
    if n is None:
        return "-"
    return str(int(n)) if float(n).is_integer() else f"{n:.1f}"


def size(value) -> str:
    """Bytes humanised (1023 B, 1.5 KiB, 12.3 MiB ...)."""
    n = _num(value)
    if n is None:
        return "-"
    n = int(n)
    if abs(n) < 1024:
        return f"{n} B"
    f = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        f /= 1024
        if abs(f) < 1024 or unit == "PiB":
            return f"{f:.1f} {unit}" if abs(f) < 100 else f"{f:.0f} {unit}"
    return f"{n} B"   # not reached


def duration(seconds) -> str:
    """A duration the way HAProxy shows one: 45s, 3m12s, 2h05m, 4d3h."""
    n = _num(seconds)
    if n is None or n < 0:
        return "-"
    s = int(n)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h}h"


def since(epoch, now: float) -> str:
    """Time elapsed since the epoch time EPOCH ("-" for never, 0 or missing)."""
    n = _num(epoch)
    if not n or n <= 0:
        return "-"
    return duration(max(0.0, now - n))


def millis(seconds) -> str:
    n = _num(seconds)
    if n is None:
        return ""
    return f"{n * 1000:.0f}ms" if n >= 0.0005 or n == 0 else "<1ms"


def cell(text, cls: str = "n", title=None) -> str:
    t = f' title="{esc(title)}"' if title not in (None, "") else ""
    c = f' class="{cls}"' if cls else ""
    return f"<td{c}{t}>{esc(text)}</td>"


def bytes_cell(value) -> str:
    n = _num(value)
    return cell(size(value), title=f"{int(n)} bytes" if n is not None else None)


def count_cell(value, bad: bool = False) -> str:
    n = _num(value)
    cls = "n bad" if bad and n else "n"
    return cell(count(value), cls)


def state_key(status, checked=True) -> str:
    key = str(status).upper() if isinstance(status, str) else "UNKNOWN"
    if key == "NO CHECK" or (key == "UP" and checked is False):
        return "NOCHECK"
    return key


def state_of(status, checked=True) -> tuple[str, str, str]:
    """(data-state, CSS class, label) for a status and checked flag."""
    key = state_key(status, checked)
    data = "UP" if key == "NOCHECK" else (str(status) if isinstance(status, str) and status else "UNKNOWN")
    cls, label = STATES.get(key, ("state-unknown", data))
    return data, cls, label


def responses_cells(entry: dict, http: bool) -> str:
    responses = _d(entry.get("http_responses_total"))
    if not http:
        return "".join(cell("", "n muted") for _ in RESPONSE_CLASSES)
    return "".join(count_cell(responses.get(k, 0 if responses else None), bad=(k == "5xx"))
                   for k in RESPONSE_CLASSES)


# ------------------------------------------------------------------ parts

def header(snapshot: dict, now: float, refresh: float) -> str:
    p = _d(snapshot.get("process"))
    name = p.get("name") or "proxyd"
    version = p.get("version")
    started = _num(p.get("start_time_seconds"))
    started_text = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "-")
    rows = [
        ("Master pid", count(p.get("pid"))),
        ("Node", p.get("node") or "-"),
        ("Uptime", duration(p.get("uptime_seconds"))),
        ("Started", started_text),
        ("Generation", count(p.get("generation"))),
        ("Reloads", count(p.get("reloads"))),
        ("Workers", count(p.get("workers"))),
    ]
    info = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    title = f"{esc(name)}" + (f" <small>version {esc(version)}</small>" if version else "")
    page_time = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    node = p.get("node")
    sub = (f"Statistics report for pid {esc(count(p.get('pid')))}"
           + (f" on {esc(node)}" if node else "") + f", at {esc(page_time)}"
           + (f"; refreshes every {refresh:g} s" if refresh > 0 else ""))
    return (f'<header><h1>{title}</h1><div class="muted">{sub}</div></header>'
            f'<div class="top"><table class="info" id="process"><tbody>{info}</tbody></table>'
            f'{workers_table(snapshot)}</div>')


def workers_table(snapshot: dict) -> str:
    head = ("<thead><tr><th>Worker</th><th>Gen</th><th>Pid</th><th>RSS</th><th>CPU s</th>"
            "<th>Open fds</th></tr></thead>")
    body = []
    for w in _l(snapshot.get("workers")):
        cpu = _num(w.get("cpu_seconds"))
        body.append(f'<tr class="worker" data-worker="{esc(count(w.get("worker")))}">'
                    + count_cell(w.get("worker")) + count_cell(w.get("generation"))
                    + count_cell(w.get("pid")) + bytes_cell(w.get("rss_bytes"))
                    + cell(f"{cpu:.2f}" if cpu is not None else "-")
                    + count_cell(w.get("open_fds")) + "</tr>")
    if not body:
        body.append('<tr><td colspan="6" class="muted">no worker</td></tr>')
    return f'<table class="info" id="workers">{head}<tbody>{"".join(body)}</tbody></table>'


def legend() -> str:
    items = (("state-up", "UP"), ("state-nocheck", "no check (up, not checked)"), ("state-down", "DOWN"),
             ("state-drain", "DRAIN (no new session)"), ("state-maint", "MAINT (maintenance)"),
             ("state-nolb", "NOLB (not load-balanced)"))
    return ('<div class="legend">Server states: '
            + "".join(f'<span class="{c}">{esc(t)}</span>' for c, t in items) + "</div>")


def nav(frontends: list, backends: list) -> str:
    links = [f'<a href="#frontend-{i}">{esc(f.get("name", "?"))}</a>' for i, f in enumerate(frontends)]
    links += [f'<a href="#backend-{i}">{esc(b.get("name", "?"))}</a>' for i, b in enumerate(backends)]
    return f"<nav>{''.join(links)}</nav>" if links else ""


RESPONSE_HEADS = "".join(f"<th>{k if k != 'other' else 'oth'}</th>" for k in RESPONSE_CLASSES)


def frontend_table(i: int, fe: dict) -> str:
    name = fe.get("name", "?")
    mode = fe.get("mode") or "tcp"
    http = mode == "http"
    data, cls, label = state_of(fe.get("status", "UP"))
    head = ('<thead><tr class="grp"><th rowspan="2"></th><th colspan="3">Sessions</th>'
            '<th colspan="2">Bytes</th><th colspan="1">Denied</th><th colspan="2">Errors</th>'
            f'<th colspan="2">Requests</th><th colspan="{len(RESPONSE_CLASSES)}">HTTP responses</th>'
            '<th rowspan="2">Status</th></tr>'
            '<tr><th>Cur</th><th>Limit</th><th>Total</th><th>In</th><th>Out</th><th>Req</th>'
            '<th>Req</th><th>Int</th><th>Total</th><th>Conns</th>' + RESPONSE_HEADS + "</tr></thead>")
    limit = _num(fe.get("limit_sessions"))
    row = (f'<tr class="frontend {cls}" data-proxy="{esc(name)}" data-state="{esc(data)}">'
           + cell("Frontend", "name")
           + count_cell(fe.get("current_sessions")) + cell(count(limit) if limit else "-")
           + count_cell(fe.get("sessions_total"))
           + bytes_cell(fe.get("bytes_in_total")) + bytes_cell(fe.get("bytes_out_total"))
           + count_cell(fe.get("requests_denied_total"), bad=True)
           + count_cell(fe.get("request_errors_total"), bad=True)
           + count_cell(fe.get("internal_errors_total"), bad=True)
           + (count_cell(fe.get("http_requests_total")) if http else cell("", "n muted"))
           + count_cell(fe.get("connections_total"))
           + responses_cells(fe, http)
           + cell(label, "st") + "</tr>")
    return (f'<section class="proxy frontend" id="frontend-{i}" data-proxy="{esc(name)}">'
            f'<h2>{esc(name)} <small>frontend, {esc(mode)}</small></h2>'
            f'<table class="px">{head}<tbody>{row}</tbody></table></section>')


BACKEND_HEAD = (
    '<thead><tr class="grp"><th rowspan="2">Server</th><th rowspan="2">Address</th>'
    '<th colspan="2">Queue</th><th colspan="5">Sessions</th><th colspan="2">Bytes</th>'
    '<th colspan="2">Errors</th><th colspan="2">Warnings</th>'
    f'<th colspan="{len(RESPONSE_CLASSES)}">HTTP responses</th>'
    '<th colspan="10">Server</th></tr>'
    '<tr><th>Cur</th><th>Max</th>'
    '<th>Cur</th><th>Max</th><th>Limit</th><th>Total</th><th>Last</th>'
    '<th>In</th><th>Out</th><th>Conn</th><th>Resp</th><th>Retr</th><th>Redis</th>'
    + RESPONSE_HEADS +
    '<th>Status</th><th>LastChg</th><th>Wght</th><th>Act</th><th>Bck</th>'
    '<th>Check</th><th>Reason</th><th>Chk</th><th>Dwn</th><th>Dwntme</th></tr></thead>')


def check_text(srv: dict) -> tuple[str, str]:
    """(Check cell, its title): "L7OK/200 in 2ms" or "" unchecked."""
    status = srv.get("check_status")
    if srv.get("checked") is False or not status:
        return "-", ""
    code = srv.get("check_code")
    text = str(status) + (f"/{code}" if code not in (None, "", 0) else "")
    took = millis(srv.get("check_duration_seconds"))
    return text + (f" {took}" if took else ""), ""


def server_row(be_name: str, srv: dict, http: bool, now: float) -> str:
    name = srv.get("name", "?")
    checked = srv.get("checked", True)
    data, cls, label = state_of(srv.get("status", "UP"), checked)
    backup = bool(srv.get("backup"))
    limit = _num(srv.get("limit_sessions"))
    check, _ = check_text(srv)
    reason = srv.get("check_reason") or ""
    attrs = (f'class="server {cls}" data-proxy="{esc(be_name)}" data-server="{esc(name)}" '
             f'data-state="{esc(data)}" data-label="{esc(label)}" data-backup="{int(backup)}" '
             f'data-checked="{int(checked is not False)}"')
    return (f"<tr {attrs}>"
            + cell(name, "name") + cell(srv.get("address") or "-", "addr")
            + count_cell(srv.get("current_queue")) + count_cell(srv.get("max_queue"))
            + count_cell(srv.get("current_sessions")) + count_cell(srv.get("max_sessions"))
            + cell(count(limit) if limit else "-") + count_cell(srv.get("sessions_total"))
            + cell(since(srv.get("last_session_seconds"), now))
            + bytes_cell(srv.get("bytes_in_total")) + bytes_cell(srv.get("bytes_out_total"))
            + count_cell(srv.get("connection_errors_total"), bad=True)
            + count_cell(srv.get("response_errors_total"), bad=True)
            + count_cell(srv.get("retry_warnings_total")) + count_cell(srv.get("redispatch_warnings_total"))
            + responses_cells(srv, http)
            + cell(label, "st")
            + cell(since(srv.get("check_last_change_seconds"), now))
            + count_cell(srv.get("weight"))
            + cell("-" if backup else "Y", "") + cell("Y" if backup else "-", "")
            + cell(check, "", title=reason or None)
            + cell(reason, "reason", title=reason or None)
            + count_cell(srv.get("check_failures_total"))
            + count_cell(srv.get("check_up_down_total"))
            + cell(duration(srv.get("downtime_seconds_total")) if checked is not False else "-")
            + "</tr>")


def backend_row(be: dict, http: bool, now: float) -> str:
    name = be.get("name", "?")
    data, cls, label = state_of(be.get("status", "UP"))
    return (f'<tr class="backend {cls}" data-proxy="{esc(name)}" data-state="{esc(data)}">'
            + cell("Backend", "name") + cell(be.get("balance") or "", "addr")
            + count_cell(be.get("current_queue")) + count_cell(be.get("max_queue"))
            + count_cell(be.get("current_sessions")) + count_cell(be.get("max_sessions"))
            + cell("-") + count_cell(be.get("sessions_total"))
            + cell(since(be.get("last_session_seconds"), now))
            + bytes_cell(be.get("bytes_in_total")) + bytes_cell(be.get("bytes_out_total"))
            + count_cell(be.get("connection_errors_total"), bad=True)
            + count_cell(be.get("response_errors_total"), bad=True)
            + count_cell(be.get("retry_warnings_total")) + count_cell(be.get("redispatch_warnings_total"))
            + responses_cells(be, http)
            + cell(label, "st")
            + cell(since(be.get("check_last_change_seconds"), now))
            + count_cell(be.get("weight"))
            + count_cell(be.get("active_servers")) + count_cell(be.get("backup_servers"))
            + cell("", "") + cell("", "") + cell("", "")
            + count_cell(be.get("check_up_down_total"))
            + cell(duration(be.get("downtime_seconds_total")))
            + "</tr>")


def backend_table(i: int, be: dict, now: float) -> str:
    name = be.get("name", "?")
    mode = be.get("mode") or "tcp"
    http = mode == "http"
    rows = [server_row(name, s, http, now) for s in _l(be.get("servers"))]
    rows.append(backend_row(be, http, now))
    balance = be.get("balance")
    sub = f"backend, {esc(mode)}" + (f", {esc(balance)}" if balance else "")
    return (f'<section class="proxy backend" id="backend-{i}" data-proxy="{esc(name)}">'
            f'<h2>{esc(name)} <small>{sub}</small></h2>'
            f'<table class="px">{BACKEND_HEAD}<tbody>{"".join(rows)}</tbody></table></section>')


# ------------------------------------------------------------------- page

def render(snapshot: dict, refresh: float = 5.0) -> bytes:
    """The stats page for SNAPSHOT (the GET /stats JSON), as UTF-8 HTML5."""
    snapshot = _d(snapshot)
    p = _d(snapshot.get("process"))
    start, uptime = _num(p.get("start_time_seconds")), _num(p.get("uptime_seconds"))
    now = start + uptime if start and uptime is not None else time.time()
    refresh = _num(refresh) or 0
    frontends = _l(snapshot.get("frontends"))
    backends = _l(snapshot.get("backends"))
    name = p.get("name") or "proxyd"
    node = p.get("node")
    meta = f'<meta http-equiv="refresh" content="{refresh:g}">' if refresh > 0 else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        meta,
        f"<title>{esc(name)} statistics{(' on ' + esc(node)) if node else ''}</title>",
        f"<style>{CSS}</style></head><body>",
        header(snapshot, now, refresh),
        legend(),
        nav(frontends, backends),
        *(frontend_table(i, fe) for i, fe in enumerate(frontends)),
        *(backend_table(i, be, now) for i, be in enumerate(backends)),
        (f'<footer>{esc(name)} {esc(p.get("version") or "")}: counters summed over all workers and kept '
         'over reloads. The same figures: <a href="/stats">/stats</a> (JSON), '
         '<a href="/metrics">/metrics</a> (Prometheus).</footer>'),
        "</body></html>",
        "",
    ]
    return "\n".join(parts).encode("utf-8")
