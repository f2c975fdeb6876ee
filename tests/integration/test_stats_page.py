"""The stats page (GET / on stats_bind) in a real browser, against a real proxyd.

proxyd runs with a stats listener and an admin socket; backend "app" has
health-checked servers in every state an operator meets: s1 up, s2 stopped
(its check marks it DOWN), s3 disabled over the admin socket with
`proxyd ctl` (MAINT), s4 drained (DRAIN), b1 a backup (UP); backend "db" has
an unchecked server ("no check").  Once /stats says the checks have
settled, headless Chromium loads the page: the DOM it renders must show
every configured server with its true state, and its screenshot must be a
real PNG.  Skipped when chromium is not installed (.ci/run installs it).

scripts/stats-screenshot sets the same scene to make docs/stats-page.png.
"""

# ruff: noqa: F811 (the fixtures imported from tests.control_fixtures are test arguments)
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
from html.parser import HTMLParser

import pytest

from tests.control_fixtures import admin_path, proxyd, servers  # noqa: F401 (fixtures)
from tests.support import LOCALHOST, free_port, http_hello, run_proxyd, tcp_hello

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
WINDOW = (1400, 900)
# A timeout well over the interval: a refused connect fails at once, but a
# check that a loaded box makes slow never marks a live server down.
CHECK = {"interval": "100ms", "timeout": "1s", "fall": 1, "rise": 1, "http_path": "/healthz"}
# backend/server -> (data-state, colour class) once the scene has settled
EXPECTED = {
    ("app", "s1"): ("UP", "state-up"),
    ("app", "s2"): ("DOWN", "state-down"),
    ("app", "s3"): ("MAINT", "state-maint"),
    ("app", "s4"): ("DRAIN", "state-drain"),
    ("app", "b1"): ("UP", "state-up"),
    ("db", "d1"): ("UP", "state-nocheck"),
}


# ------------------------------------------------------------------ the scene

def scene_config(app_servers, db_server, admin: str, stats_port: int, workers: int = 2) -> dict:
    """Frontends web (http) -> app and tcp -> db, a stats listener on
    STATS_PORT, the admin socket at ADMIN."""
    entries = [{"name": s.name, "address": s.address, **({"backup": True} if s.name.startswith("b") else {})}
               for s in app_servers]
    return {
        "global": {"workers": workers, "admin_socket": admin, "stats_bind": f"{LOCALHOST}:{stats_port}"},
        "frontends": {
            "web": {"bind": [f"{LOCALHOST}:{free_port()}"], "mode": "http", "backend": "app"},
            "tcp": {"bind": [f"{LOCALHOST}:{free_port()}"], "backend": "db"},
        },
        "backends": {
            "app": {"servers": entries, "health_check": dict(CHECK)},
            "db": {"servers": [{"name": db_server.name, "address": db_server.address}], "balance": "leastconn"},
        },
    }


def port_of(cfg: dict, frontend: str) -> int:
    return int(cfg["frontends"][frontend]["bind"][0].rsplit(":", 1)[1])


def set_scene(cfg: dict, admin: str, by_name: dict) -> None:
    """Some traffic, then s2 stopped, s3 disabled and s4 drained."""
    web, tcp = port_of(cfg, "web"), port_of(cfg, "tcp")
    for i in range(12):
        status, _ = http_hello(web, f"/page/{i}")
        assert status == 200, status
    for i in range(3):
        assert tcp_hello(tcp, b"hello %d" % i) == "d1"
    by_name["s2"].stop_listening()
    for command in (("disable", "server", "app/s3"), ("set", "server", "app/s4", "state", "drain")):
        done = run_proxyd("ctl", "-s", admin, *command)
        assert done.returncode == 0 and done.stdout.strip() == "", (command, done.stdout, done.stderr)
    # A few requests more, after the changes (s1 takes them; s2's may fail over).
    for i in range(6):
        http_hello(web, f"/after/{i}")


def get(url: str, timeout: float = 5.0) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.status, answer.headers.get("Content-Type", ""), answer.read()


def stats_states(stats_url: str) -> dict:
    """(backend, server) -> status, from GET /stats ({} while the listener is not there)."""
    try:
        _, _, body = get(stats_url + "/stats")
    except OSError:
        return {}
    snap = json.loads(body)
    return {(b.get("name"), s.get("name")): s.get("status") for b in snap.get("backends", [])
            for s in b.get("servers", [])}


def wait_settled(stats_url: str, timeout: float = 20.0) -> dict:
    """Polls /stats until every server has its expected state."""
    want = {key: state for key, (state, _) in EXPECTED.items()}
    deadline = time.monotonic() + timeout
    while True:
        got = stats_states(stats_url)
        if got == want:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"/stats did not settle within {timeout}s: {got} (want {want})")
        time.sleep(0.05)


# --------------------------------------------------------------- the browser

def chromium(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Headless Chromium with ARGS, with a throwaway profile."""
    with tempfile.TemporaryDirectory(prefix="pxchrome-") as profile:
        return subprocess.run(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--disable-extensions",
             f"--user-data-dir={profile}", *args],
            check=False, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
            env={**os.environ, "HOME": profile})


def dump_dom(url: str) -> str:
    done = chromium("--dump-dom", url)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


def screenshot(url: str, path, window=WINDOW) -> bytes:
    done = chromium(f"--screenshot={path}", f"--window-size={window[0]},{window[1]}", url)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    with open(path, "rb") as f:
        return f.read()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything else."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR", data[8:32]
    return struct.unpack(">II", data[16:24])


class Rows(HTMLParser):
    """The rows of a rendered page that carry data-proxy: their attributes
    and the text of their cells."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.rows: list[dict] = []
        self.row: dict | None = None
        self.cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-proxy" in attrs:
            self.row = {"attrs": attrs, "classes": set(attrs.get("class", "").split()), "cells": [], "cls": []}
            self.rows.append(self.row)
        elif tag == "td" and self.row is not None:
            self.cell = []
            self.row["cells"].append(self.cell)
            self.row["cls"].append(set((attrs.get("class") or "").split()))

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None
        if tag in ("td", "tr"):
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.rows if kind in r["classes"]]


def cell_texts(row: dict) -> list[str]:
    return ["".join(c).strip() for c in row["cells"]]


def status_cell(row: dict) -> str:
    return next("".join(c).strip() for c, cls in zip(row["cells"], row["cls"]) if "st" in cls)


# ----------------------------------------------------------------- the test

@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_stats_page_in_chromium(proxyd, servers, admin_path, tmp_path):
    app = servers("s1", "s2", "s3", "s4", "b1")
    (db,) = servers("d1")
    stats_port = free_port()
    cfg = scene_config(app, db, admin_path, stats_port)
    proxyd(cfg)
    url = f"http://{LOCALHOST}:{stats_port}"
    set_scene(cfg, admin_path, {s.name: s for s in app})
    wait_settled(url)

    # The page as served: HTML, self-contained.
    status, ctype, body = get(url + "/")
    assert status == 200 and ctype.startswith("text/html"), (status, ctype)
    assert b'http-equiv="refresh"' in body and b"<script" not in body and b"src=" not in body

    # The page as Chromium renders it (again if a check changed a state
    # between /stats and the page, until the deadline).
    want = {key: (state, colour, "no check" if colour == "state-nocheck" else state)
            for key, (state, colour) in EXPECTED.items()}
    deadline = time.monotonic() + 30
    while True:
        page = Rows(dump_dom(url + "/"))
        rows = {(r["attrs"]["data-proxy"], r["attrs"]["data-server"]): r for r in page.of("server")}
        shown = {key: (r["attrs"]["data-state"], next((c for c in r["classes"] if c.startswith("state-")), None),
                       status_cell(r)) for key, r in rows.items()}
        if shown == want or time.monotonic() > deadline:
            break
        wait_settled(url)
    assert shown == want
    for (backend, name), r in rows.items():
        texts = cell_texts(r)
        assert texts[0] == name and texts[1] == next(s.address for s in [*app, db] if s.name == name)
    assert "L4CON" in " ".join(cell_texts(rows[("app", "s2")]))
    assert [r["attrs"]["data-proxy"] for r in page.of("backend")] == ["app", "db"]
    assert [r["attrs"]["data-proxy"] for r in page.of("frontend")] == ["web", "tcp"]
    assert all(r["attrs"]["data-state"] == "UP" for r in page.of("backend"))

    # Its screenshot: a real PNG of the window's size, not a blank one.
    data = screenshot(url + "/", tmp_path / "stats-page.png")
    assert png_size(data) == WINDOW
    assert len(data) > 30_000, len(data)
