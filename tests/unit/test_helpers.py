"""The test helpers themselves: the TOML writer and the access-line parser
(tests/support.py), checked against tomllib and man/proxyd.8."""

from __future__ import annotations

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from tests.support import parse_access_line, tcp_config, to_toml


def test_to_toml_round_trips_a_config():
    config = tcp_config(8080, ["127.0.0.1:9001", ("b", "[::1]:9002"), {"name": "c", "address": "127.0.0.1:9003",
                                                                      "weight": 3, "backup": True}],
                        workers=1, global_={"grace": "1s", "splice": False},
                        defaults={"timeout_connect": 0.25, "retries": 0},
                        frontend={"half_close": True, "name with space": 'q"uote'},
                        backend={"health_check": {"interval": "2s", "http_path": "/healthz"}})
    assert tomllib.loads(to_toml(config)) == config


def test_parse_access_line_contract_examples():
    """The tcplog layout of man/proxyd.8, "TCP access log"."""
    line = parse_access_line("2026-01-02T03:04:05.678Z proxyd[4242]: 127.0.0.1:50000 [02/Jan/2026:03:04:05.558] "
                             "web app/s1 0/3/120 5000 -- 2/1/1/4/0 0/0 up=10 fin=server")
    assert line is not None
    assert (line.pid, line.client, line.date, line.frontend, line.backend, line.server) == \
        (4242, "127.0.0.1:50000", "02/Jan/2026:03:04:05.558", "web", "app", "s1")
    assert (line.Tw, line.Tc, line.Tt, line.up, line.down, line.term, line.fin, line.err) == \
        (0, 3, 120, 10, 5000, "--", "server", None)
    assert (line.ac, line.fc, line.bc, line.sc, line.rc, line.sq, line.bq) == (2, 1, 1, 4, 0, 0, 0)

    refused = parse_access_line("2026-01-02T03:04:05.678Z proxyd[1]: [::1]:50001 [02/Jan/2026:03:04:05.676] "
                                "web app/s1 0/-1/2 0 SC 1/1/0/0/1 0/3 up=0 err=ECONNREFUSED")
    assert refused is not None
    assert (refused.client, refused.server, refused.Tw, refused.Tc, refused.term, refused.fin, refused.err) == \
        ("[::1]:50001", "s1", 0, -1, "SC", None, "ECONNREFUSED")
    assert (refused.rc, refused.bq) == (1, 3)

    nosrv = parse_access_line("2026-01-02T03:04:05.678Z proxyd[1]: 127.0.0.1:50002 [02/Jan/2026:03:04:05.677] "
                              "web app/<NOSRV> -1/-1/0 0 SC 1/1/0/0/0 0/0 up=0 err=no_server")
    assert nosrv is not None
    assert (nosrv.server, nosrv.Tw, nosrv.Tc, nosrv.term, nosrv.err) == ("<NOSRV>", -1, -1, "SC", "no_server")
    # The old layout, and a line whose fields are out of place, are not access lines.
    assert parse_access_line("2026-01-02T03:04:05.678Z proxyd[4242]: 127.0.0.1:50000 web app/s1 "
                             "Tc=3 Tt=120 up=10 down=5000 term=SD") is None
    assert parse_access_line("2026-01-02T03:04:05.678Z proxyd[1]: 127.0.0.1:1 [02/Jan/2026:03:04:05.677] "
                             "web app/s1 0/0/0 0 -- 1/1/0/0/0 up=0") is None


def test_parse_access_line_ignores_other_messages():
    assert parse_access_line("2026-01-02T03:04:05.678Z proxyd[1]: worker 1/2 gen 1 started") is None
    assert parse_access_line("not a log line at all") is None
