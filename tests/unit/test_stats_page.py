"""The stats page (proxyd.stats_page.render) on hand-made snapshots.

Each document is parsed with html.parser: well-formed (every element
closed in order), self-contained (no script or asset from elsewhere), every
server with its row and the right data-state and colour class, every name
escaped however hostile, and a snapshot with fields missing, or of the
wrong type, still renders.
"""

from __future__ import annotations

import copy
import re
from html.parser import HTMLParser

import pytest

from proxyd import stats_page

NOW = 1_700_000_000.0
HOSTILE = '<b>&"x\'</b>'
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Doc(HTMLParser):
    """A parsed page: its elements (tag, attrs, text) and whether it nests properly."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.elements: list[dict] = []
        self.errors: list[str] = []
        self.doctype = None
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {[t for t, _ in self.stack]}")

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": [], "parent": self.stack[-1][1] if self.stack else None}
        self.elements.append(element)
        if tag not in VOID:
            self.stack.append((tag, element))

    def handle_startendtag(self, tag, attrs):
        self.elements.append({"tag": tag, "attrs": dict(attrs), "text": [], "parent": None})

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1][0] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        for _, element in self.stack:
            element["text"].append(data)

    def find(self, tag=None, **attrs) -> list[dict]:
        out = []
        for e in self.elements:
            if tag and e["tag"] != tag:
                continue
            if all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(e)
        return out


def text(element) -> str:
    return "".join(element["text"])


def cells(doc: Doc, row: dict) -> list[str]:
    return [text(e) for e in doc.elements if e["tag"] == "td" and e["parent"] is row]


def classes(element) -> set[str]:
    return set(element["attrs"].get("class", "").split())


def server(name, status="UP", **kw) -> dict:
    s = {"name": name, "address": "127.0.0.1:8081", "status": status, "admin": "ready", "checked": True,
         "weight": 1, "backup": False, "limit_sessions": 0, "current_sessions": 1, "sessions_total": 50,
         "bytes_in_total": 1536, "bytes_out_total": 5 * 1024 * 1024, "current_queue": 0, "max_queue": 2,
         "connection_errors_total": 0, "response_errors_total": 0, "retry_warnings_total": 0,
         "redispatch_warnings_total": 0, "internal_errors_total": 0,
         "http_responses_total": {"1xx": 0, "2xx": 45, "3xx": 0, "4xx": 5, "5xx": 0, "other": 0},
         "last_session_seconds": NOW - 2, "check_status": "L7OK", "check_code": 200,
         "check_duration_seconds": 0.002, "check_reason": "Layer7 check passed: HTTP status 200",
         "check_failures_total": 0, "check_up_down_total": 0, "downtime_seconds_total": 0.0,
         "check_last_change_seconds": NOW - 192}
    s.update(kw)
    return s


def snapshot() -> dict:
    return {
        "process": {"name": "proxyd", "version": "0.1.0", "pid": 123, "node": "lb1", "start_time_seconds": NOW - 100,
                    "uptime_seconds": 100.0, "generation": 3, "reloads": 2, "workers": 2},
        "workers": [{"worker": 1, "generation": 3, "pid": 456, "rss_bytes": 20 << 20, "cpu_seconds": 1.25,
                     "open_fds": 17},
                    {"worker": 2, "generation": 3, "pid": 457, "rss_bytes": 21 << 20, "cpu_seconds": 1.5,
                     "open_fds": 18}],
        "frontends": [{"name": "web", "mode": "http", "status": "UP", "current_sessions": 3, "limit_sessions": 10000,
                       "sessions_total": 100, "connections_total": 100, "bytes_in_total": 1, "bytes_out_total": 2,
                       "requests_denied_total": 0, "request_errors_total": 0, "internal_errors_total": 0,
                       "http_requests_total": 120,
                       "http_responses_total": {"1xx": 0, "2xx": 100, "3xx": 0, "4xx": 20, "5xx": 0, "other": 0}},
                      {"name": HOSTILE, "mode": "tcp", "status": "UP", "sessions_total": 7}],
        "backends": [
            {"name": "app", "mode": "http", "balance": "roundrobin", "status": "UP", "weight": 2,
             "active_servers": 2, "backup_servers": 1, "current_sessions": 1, "sessions_total": 100,
             "bytes_in_total": 1, "bytes_out_total": 2, "current_queue": 0, "max_queue": 0,
             "http_responses_total": {"2xx": 100}, "check_last_change_seconds": NOW - 60,
             "servers": [server("s1"),
                         server("s2", "DOWN", check_status="L4CON", check_code=None,
                                check_reason="Layer4 connection problem: Connection refused",
                                downtime_seconds_total=75.0, check_up_down_total=1),
                         server("s3", "MAINT", admin="maint"),
                         server("s4", "DRAIN", admin="drain"),
                         server("s5", "NOLB", weight=0),
                         server("b1", "UP", backup=True)]},
            {"name": HOSTILE, "mode": "tcp", "balance": "leastconn", "status": "UP",
             "servers": [server(HOSTILE, "UP", checked=False, check_status="", check_reason=""),
                         server("u2", "DRAIN", checked=False, check_status=""),
                         server("r<script>alert(1)</script>", "DOWN",
                                check_reason='HTTP status 503 <"&">', check_status="L7STS", check_code=503)]},
            {"name": "nobody", "status": "DOWN", "servers": []},
        ],
    }


EXPECTED = {  # (backend, server) -> (data-state, colour class, label in the Status cell)
    ("app", "s1"): ("UP", "state-up", "UP"),
    ("app", "s2"): ("DOWN", "state-down", "DOWN"),
    ("app", "s3"): ("MAINT", "state-maint", "MAINT"),
    ("app", "s4"): ("DRAIN", "state-drain", "DRAIN"),
    ("app", "s5"): ("NOLB", "state-nolb", "NOLB"),
    ("app", "b1"): ("UP", "state-up", "UP"),
    (HOSTILE, HOSTILE): ("UP", "state-nocheck", "no check"),
    (HOSTILE, "u2"): ("DRAIN", "state-drain", "DRAIN"),
    (HOSTILE, "r<script>alert(1)</script>"): ("DOWN", "state-down", "DOWN"),
}


def render(snap, **kw) -> tuple[str, Doc]:
    page = stats_page.render(snap, **kw)
    assert isinstance(page, bytes)
    html = page.decode("utf-8")
    doc = Doc(html)
    assert not doc.errors, doc.errors
    return html, doc


def assert_self_contained(html: str, doc: Doc) -> None:
    assert not doc.find("script") and not doc.find("iframe") and not doc.find("img") and not doc.find("link")
    for e in doc.elements:
        for name, value in e["attrs"].items():
            if name in ("src", "href", "action", "srcset", "data"):
                assert not re.match(r"\s*(https?:|//|data:|javascript:)", value or "", re.IGNORECASE), (e["tag"], name, value)
            assert not name.startswith("on"), (e["tag"], name)
    assert not re.search(r"url\(|@import|https?://", html, re.IGNORECASE)


def test_a_whole_page_every_server_in_its_state():
    html, doc = render(snapshot())
    assert doc.doctype.lower() == "doctype html"
    assert doc.find("html")[0]["attrs"].get("lang") == "en"
    assert doc.find("meta", charset="utf-8")
    assert doc.find("meta", http_equiv="refresh", content="5")
    assert "proxyd" in text(doc.find("title")[0])
    assert_self_contained(html, doc)

    rows = [e for e in doc.find("tr") if "server" in classes(e)]
    got = {(r["attrs"]["data-proxy"], r["attrs"]["data-server"]): r for r in rows}
    assert set(got) == set(EXPECTED)
    for key, (state, colour, label) in EXPECTED.items():
        row = got[key]
        assert row["attrs"]["data-state"] == state, key
        assert colour in classes(row), (key, classes(row))
        status = [e for e in doc.elements if e["parent"] is row and e["tag"] == "td" and "st" in classes(e)]
        assert [text(e) for e in status] == [label], key
        assert cells(doc, row)[0] == key[1]   # the name, unescaped back by the parser: shown as written

    # a server's figures, in their columns
    s1 = cells(doc, got[("app", "s1")])
    assert "127.0.0.1:8081" in s1 and "50" in s1 and "L7OK/200 2ms" in s1 and "3m12s" in s1
    assert "1.5 KiB" in s1 and "5.0 MiB" in s1
    assert [e["attrs"].get("title") for e in doc.elements
            if e["parent"] is got[("app", "s1")] and text(e) == "5.0 MiB"] == [f"{5 << 20} bytes"]
    s2 = cells(doc, got[("app", "s2")])
    assert "L4CON" in " ".join(s2) and "1m15s" in s2 and "Layer4 connection problem: Connection refused" in s2
    assert got[("app", "b1")]["attrs"]["data-backup"] == "1" and cells(doc, got[("app", "b1")]).count("Y") == 1
    assert got[(HOSTILE, HOSTILE)]["attrs"]["data-checked"] == "0"

    # a Backend total row per backend, one frontend row per frontend, in order
    backends = [e for e in doc.find("tr") if "backend" in classes(e)]
    assert [(b["attrs"]["data-proxy"], b["attrs"]["data-state"]) for b in backends] == [
        ("app", "UP"), (HOSTILE, "UP"), ("nobody", "DOWN")]
    assert cells(doc, backends[0])[0] == "Backend" and "state-down" in classes(backends[2])
    frontends = [e for e in doc.find("tr") if "frontend" in classes(e)]
    assert [f["attrs"]["data-proxy"] for f in frontends] == ["web", HOSTILE]
    web = cells(doc, frontends[0])
    assert web[:4] == ["Frontend", "3", "10000", "100"] and "120" in web and "20" in web

    # the header and the workers
    info = {text(th): text(td) for th in doc.find("th") for td in doc.find("td")
            if th["parent"] is td["parent"] and th["parent"]["parent"]["parent"] is doc.find("table", id="process")[0]}
    assert info["Master pid"] == "123" and info["Uptime"] == "1m40s" and info["Generation"] == "3"
    assert info["Reloads"] == "2" and info["Workers"] == "2" and info["Node"] == "lb1"
    workers = [e for e in doc.find("tr") if "worker" in classes(e)]
    assert [cells(doc, w) for w in workers] == [["1", "3", "456", "20.0 MiB", "1.25", "17"],
                                               ["2", "3", "457", "21.0 MiB", "1.50", "18"]]


def test_nothing_unescaped():
    """A hostile name or reason never becomes markup: no element but the
    page's own, and its text shows up escaped in the source."""
    html, doc = render(snapshot())
    assert {e["tag"] for e in doc.elements} <= {
        "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "small", "div", "table",
        "thead", "tbody", "tr", "th", "td", "span", "nav", "a", "section", "footer"}
    assert "<script>" not in html and "<b>" not in html
    assert "&lt;b&gt;&amp;&quot;x&#x27;&lt;/b&gt;" in html
    assert "HTTP status 503 &lt;&quot;&amp;&quot;&gt;" in html
    # the reason is both the text and the title of its cell, exactly as given
    row = next(e for e in doc.find("tr") if e["attrs"].get("data-server") == "r<script>alert(1)</script>")
    reasons = [e for e in doc.elements if e["parent"] is row and "reason" in classes(e)]
    assert [(text(e), e["attrs"]["title"]) for e in reasons] == [('HTTP status 503 <"&">',) * 2]


@pytest.mark.parametrize("field", ["process", "workers", "frontends", "backends"])
def test_a_missing_part(field):
    snap = snapshot()
    del snap[field]
    html, doc = render(snap)
    assert_self_contained(html, doc)


def test_missing_and_wrong_fields_never_crash():
    # nothing at all
    for snap in ({}, {"process": None, "workers": None, "frontends": None, "backends": None},
                 {"frontends": [{}], "backends": [{}], "workers": [{}], "process": {}},
                 {"backends": [{"name": "x", "servers": [{}, {"name": "y"}, None, "junk"]}], "frontends": ["junk"]}):
        html, doc = render(snap)
        assert_self_contained(html, doc)
    # every field of every server taken away, one at a time
    base = snapshot()
    for key in list(base["backends"][0]["servers"][1]):
        snap = copy.deepcopy(base)
        del snap["backends"][0]["servers"][1][key]
        render(snap)
    # every field of the backend, the frontend and the process
    for part, pick in (("backends", lambda s: s["backends"][0]), ("frontends", lambda s: s["frontends"][0]),
                       ("process", lambda s: s["process"]), ("workers", lambda s: s["workers"][0])):
        for key in list(pick(base)):
            snap = copy.deepcopy(base)
            del pick(snap)[key]
            render(snap)
    # wrong types and odd values everywhere
    odd = copy.deepcopy(base)
    srv = odd["backends"][0]["servers"][0]
    srv.update(weight="heavy", sessions_total=None, bytes_in_total=float("nan"), bytes_out_total=float("inf"),
               check_last_change_seconds="yesterday", downtime_seconds_total=-5, http_responses_total=[1, 2],
               status=None, checked=None, backup="yes", check_code=0, check_duration_seconds="fast")
    odd["process"].update(uptime_seconds="long", pid=None, start_time_seconds=None)
    odd["workers"][0].update(cpu_seconds="x", rss_bytes=None)
    html, doc = render(odd)
    row = next(e for e in doc.find("tr") if e["attrs"].get("data-server") == "s1")
    assert row["attrs"]["data-state"] == "UNKNOWN"


def test_a_server_without_status_is_up_and_unchecked_up_is_no_check():
    snap = {"backends": [{"name": "b", "servers": [{"name": "a"}, {"name": "c", "checked": False}]}]}
    _, doc = render(snap)
    rows = {e["attrs"]["data-server"]: e for e in doc.find("tr") if "server" in classes(e)}
    assert rows["a"]["attrs"]["data-state"] == "UP" and "state-up" in classes(rows["a"])
    assert rows["c"]["attrs"]["data-state"] == "UP" and "state-nocheck" in classes(rows["c"])


def test_refresh():
    _, doc = render(snapshot(), refresh=2.5)
    assert doc.find("meta", http_equiv="refresh", content="2.5")
    _, doc = render(snapshot(), refresh=0)
    assert not doc.find("meta", http_equiv="refresh")


@pytest.mark.parametrize("seconds,shown", [(0, "0s"), (59.9, "59s"), (192, "3m12s"), (3600, "1h00m"),
                                           (3723, "1h02m"), (86400 * 2 + 3600 * 5, "2d5h"), (-1, "-"),
                                           (None, "-")])
def test_durations(seconds, shown):
    assert stats_page.duration(seconds) == shown


@pytest.mark.parametrize("n,shown", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                     (5 << 20, "5.0 MiB"), (300 << 30, "300 GiB"), (None, "-"), ("x", "-")])
def test_sizes(n, shown):
    assert stats_page.size(n) == shown


def test_times_since_are_from_the_snapshot():
    """Last change and last session count from the snapshot's own time
    (start + uptime), so a page of an old snapshot stays consistent."""
    snap = snapshot()
    snap["process"]["start_time_seconds"] = 100_000.0
    snap["process"]["uptime_seconds"] = 500.0
    snap["backends"][0]["servers"][0]["check_last_change_seconds"] = 100_500.0 - 3723
    snap["backends"][0]["servers"][0]["last_session_seconds"] = 0   # never
    _, doc = render(snap)
    row = next(e for e in doc.find("tr") if e["attrs"].get("data-server") == "s1")
    values = cells(doc, row)
    assert "1h02m" in values and values[8] == "-"
