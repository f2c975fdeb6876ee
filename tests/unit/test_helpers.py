"""The test helpers themselves: the TOML writer and the access-line parser
(tests/support.py), checked against tomllib and docs/CONTRACT.md."""

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
    line = parse_access_line("2026-01-02T03:04:05.678Z proxyd[4242]: 127.0.0.1:50000 web app/s1 "
                             "Tc=3 Tt=120 up=10 down=5000 term=SD")
    assert line is not None
    assert (line.pid, line.client, line.frontend, line.backend, line.server) == \
        (4242, "127.0.0.1:50000", "web", "app", "s1")
    assert (line.Tc, line.Tt, line.up, line.down, line.term, line.err) == (3, 120, 10, 5000, "SD", None)

    refused = parse_access_line("2026-01-02T03:04:05.678Z proxyd[1]: [::1]:50001 web app/- "
                                "Tc=-1 Tt=2 up=0 down=0 term=SC err=ECONNREFUSED")
    assert refused is not None
    assert (refused.client, refused.server, refused.Tc, refused.term, refused.err) == \
        ("[::1]:50001", "-", -1, "SC", "ECONNREFUSED")


def test_parse_access_line_ignores_other_messages():
    assert parse_access_line("2026-01-02T03:04:05.678Z proxyd[1]: worker 1/2 gen 1 started") is None
    assert parse_access_line("not a log line at all") is None
