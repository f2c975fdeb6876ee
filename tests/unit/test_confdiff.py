"""proxyd.confdiff: a Config as plain JSON data (what `show config` serves),
and what a reload from one to another would change, in words."""

import json
import os
import socket
import textwrap

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from proxyd import config
from proxyd.confdiff import config_as_dict, diff

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASE = """
[global]
workers = 4

[defaults]
timeout_connect = "5s"

[frontends.web]
bind = "127.0.0.1:8080"
backend = "app"
timeout_client = "60s"

[backends.app]
servers = [
  { name = "s1", address = "127.0.0.1:8081", weight = 10 },
  { name = "s2", address = "127.0.0.1:8082" },
]
"""


def as_dict(text: str) -> dict:
    return config_as_dict(config.build(tomllib.loads(textwrap.dedent(text))))


def changes(old_text: str, new_text: str) -> list[str]:
    return diff(as_dict(old_text), as_dict(new_text))


def edit(*pairs: str, text: str = BASE) -> str:
    """TEXT with each (old, new) pair of PAIRS replaced, each exactly once."""
    for old, new in zip(pairs[::2], pairs[1::2]):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


# ------------------------------------------------------------ canonical form

def test_every_key_of_every_section_is_there():
    d = as_dict(edit('timeout_client = "60s"', 'mode = "http"\nroutes = [{ host = "a.example", backend = "app" }]',
                     "servers = [", "health_check = { rise = 1 }\nservers = ["))
    assert set(d) == {"global", "frontends", "backends"}
    assert set(d["global"]) == {k.name for k in config.GLOBAL_KEYS}
    assert set(d["frontends"]["web"]) == {k.name for k in config.FRONTEND_KEYS}
    backend = d["backends"]["app"]
    assert set(backend) == {k.name for k in config.BACKEND_KEYS}
    assert list(backend["servers"]) == ["s1", "s2"]
    assert set(backend["servers"]["s1"]) == {k.name for k in config.SERVER_KEYS if k.name != "name"} | {"resolved"}
    assert set(backend["health_check"]) == {k.name for k in config.HEALTH_CHECK_KEYS}
    assert d["frontends"]["web"]["routes"] == [{"host": "a.example", "path_prefix": None, "backend": "app"}]


def test_values_are_the_effective_ones_in_plain_units():
    d = as_dict(edit('timeout_client = "60s"', 'timeout_client = "1.5s"\ntimeout_fin = 0',
                     'timeout_connect = "5s"', 'timeout_connect = "250ms"', text=BASE))
    web, app = d["frontends"]["web"], d["backends"]["app"]
    assert d["global"]["workers"] == 4
    assert web["timeout_client"] == 1.5
    assert web["timeout_fin"] == 0                   # no timeout: 0, as in the file
    assert web["timeout_http_request"] == 1.5        # capped by timeout_client, as proxyd runs it
    assert app["timeout_connect"] == 0.25            # inherited from [defaults]
    assert app["timeout_server"] == 60 and isinstance(app["timeout_server"], int)
    assert web["bind"] == ["127.0.0.1:8080"]
    assert app["servers"]["s1"] == {"address": "127.0.0.1:8081", "weight": 10, "maxconn": 0, "backup": False,
                                    "resolved": ["127.0.0.1:8081"]}
    assert app["send_proxy"] is None and app["health_check"] is None


def test_addresses_are_as_written_with_what_they_resolved_to(monkeypatch):
    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        assert host == "app.example"
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]
    monkeypatch.setattr(config.socket, "getaddrinfo", getaddrinfo)
    d = as_dict(edit('"127.0.0.1:8081"', '"app.example:8081"', 'bind = "127.0.0.1:8080"', 'bind = ":8080"'))
    server = d["backends"]["app"]["servers"]["s1"]
    assert server["address"] == "app.example:8081"
    assert server["resolved"] == ["[2001:db8::1]:8081", "192.0.2.1:8081"]
    assert d["frontends"]["web"]["bind"] == ["0.0.0.0:8080"]


def test_json_round_trip_changes_nothing(tmp_path):
    page = tmp_path / "503.http"
    page.write_text("HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    text = edit('timeout_client = "60s"', f'mode = "http"\nerrorfiles = {{ 503 = "{page}" }}\n'
                'routes = [{ host = "a.example", path_prefix = "/v1/", backend = "app" }]\ntimeout_fin = 0')
    d = as_dict(text)
    assert d["frontends"]["web"]["errorfiles"] == {"503": str(page)}
    served = json.loads(json.dumps(d, allow_nan=False))   # strict JSON: no Infinity
    assert served == d
    assert diff(served, as_dict(text)) == []


def test_the_shipped_example_has_a_canonical_form():
    d = config_as_dict(config.load(os.path.join(REPO, "etc", "proxyd.toml")))
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert diff(d, d) == []


# ---------------------------------------------------------------- the diff

def test_no_change_is_an_empty_list():
    assert changes(BASE, BASE) == []
    # the same settings written differently are no change either
    assert changes(BASE, edit('timeout_client = "60s"', "timeout_client = 60", 'timeout_connect = "5s"', "")) == []


def test_global_key_changed():
    assert changes(BASE, edit("workers = 4", "workers = 2")) == ["global: workers 4 -> 2"]
    assert changes(BASE, edit("workers = 4", 'workers = 4\ngrace = "1.5s"\nsplice = false')) == [
        "global: grace 30 -> 1.5", "global: splice true -> false"]


def test_frontend_keys_changed():
    new = edit('timeout_client = "60s"', 'timeout_client = "30s"\nhalf_close = true',
               'bind = "127.0.0.1:8080"', 'bind = ["127.0.0.1:8080", "[::1]:8080"]')
    assert changes(BASE, new) == [
        "frontend web: bind 127.0.0.1:8080 -> 127.0.0.1:8080, [::1]:8080",
        "frontend web: half_close false -> true",
        "frontend web: timeout_client 60 -> 30",
    ]


def test_a_timeout_set_to_zero_reads_as_zero():
    assert changes(BASE, edit('timeout_client = "60s"', "timeout_client = 0")) == [
        "frontend web: timeout_client 60 -> 0"]


def test_frontend_added_and_removed():
    added = BASE + '\n[frontends.api]\nbind = ["127.0.0.1:9090", "[::1]:9090"]\nbackend = "app"\n'
    assert changes(BASE, added) == ["frontend api added (bind 127.0.0.1:9090, [::1]:9090, backend app)"]
    assert changes(added, BASE) == ["frontend api removed"]


def test_backend_added_and_removed():
    added = BASE + '\n[backends.old]\nservers = [{ name = "o1", address = "127.0.0.1:9001" }]\n'
    assert changes(BASE, added) == ["backend old added (1 server: o1)"]
    assert changes(added, BASE) == ["backend old removed"]


def test_backend_keys_changed():
    new = edit('servers = [', 'balance = "leastconn"\nsend_proxy = "v2"\nretries = 0\nservers = [')
    assert changes(BASE, new) == ["backend app: balance roundrobin -> leastconn",
                                  "backend app: retries 3 -> 0",
                                  "backend app: send_proxy (none) -> v2"]


def test_a_change_in_defaults_shows_where_it_takes_effect():
    new = edit('timeout_connect = "5s"', 'timeout_connect = "2s"') + \
        '\n[backends.api]\nservers = [{ name = "a1", address = "127.0.0.1:9001" }]\n'
    old = BASE + '\n[backends.api]\nservers = [{ name = "a1", address = "127.0.0.1:9001" }]\n'
    assert changes(old, new) == ["backend app: timeout_connect 5 -> 2", "backend api: timeout_connect 5 -> 2"]


def test_health_check_added_changed_removed():
    with_check = edit("servers = [", 'health_check = { interval = "2s", http_path = "/healthz" }\nservers = [')
    assert changes(BASE, with_check) == [
        "backend app: health_check (none) -> {interval 2, timeout 1, rise 2, fall 3, http_path /healthz}"]
    assert changes(with_check, BASE) == [
        "backend app: health_check {interval 2, timeout 1, rise 2, fall 3, http_path /healthz} -> (none)"]
    faster = edit('interval = "2s"', 'interval = "500ms"', '"/healthz"', '"/ready"', text=with_check)
    assert changes(with_check, faster) == ["backend app: health_check.interval 2 -> 0.5",
                                           "backend app: health_check.http_path /healthz -> /ready"]


def test_server_added_with_its_summary():
    new = edit('  { name = "s2", address = "127.0.0.1:8082" },',
               '  { name = "s2", address = "127.0.0.1:8082" },\n'
               '  { name = "s3", address = "127.0.0.1:8083" },\n'
               '  { name = "s4", address = "[::1]:8084", weight = 0, maxconn = 50, backup = true },')
    assert changes(BASE, new) == [
        "backend app: server s3 added (127.0.0.1:8083, weight 1)",
        "backend app: server s4 added ([::1]:8084, weight 0, maxconn 50, backup)",
    ]


def test_server_removed():
    new = edit('  { name = "s2", address = "127.0.0.1:8082" },\n', "")
    assert changes(BASE, new) == ["backend app: server s2 removed"]


def test_server_keys_changed_one_line_each():
    new = edit("weight = 10", "weight = 5, maxconn = 100, backup = true")
    assert changes(BASE, new) == ["backend app: server s1: weight 10 -> 5",
                                  "backend app: server s1: maxconn 0 -> 100",
                                  "backend app: server s1: backup false -> true"]


def test_server_address_changed_says_it_once():
    new = edit('"127.0.0.1:8081"', '"[::1]:8081"')
    assert changes(BASE, new) == ["backend app: server s1: address 127.0.0.1:8081 -> [::1]:8081"]


def test_a_name_that_now_resolves_elsewhere_is_a_change(monkeypatch):
    answers = {"app.example": ["192.0.2.1"]}

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]
    monkeypatch.setattr(config.socket, "getaddrinfo", getaddrinfo)
    text = edit('"127.0.0.1:8081"', '"app.example:8081"')
    old = as_dict(text)
    answers["app.example"] = ["192.0.2.1", "192.0.2.2"]
    assert diff(old, as_dict(text)) == [
        "backend app: server s1: resolved 192.0.2.1:8081 -> 192.0.2.1:8081, 192.0.2.2:8081"]


def test_server_renamed_is_removed_and_added():
    new = edit('name = "s2"', 'name = "s9"')
    assert changes(BASE, new) == ["backend app: server s2 removed",
                                  "backend app: server s9 added (127.0.0.1:8082, weight 1)"]


def test_server_order_changed():
    new = edit('  { name = "s1", address = "127.0.0.1:8081", weight = 10 },\n'
               '  { name = "s2", address = "127.0.0.1:8082" },',
               '  { name = "s2", address = "127.0.0.1:8082" },\n'
               '  { name = "s1", address = "127.0.0.1:8081", weight = 10 },')
    assert changes(BASE, new) == ["backend app: server order s1, s2 -> s2, s1"]


ROUTES = edit('timeout_client = "60s"', 'mode = "http"\nroutes = [\n'
              '  { host = "a.example", backend = "app" },\n'
              '  { path_prefix = "/v1/", backend = "app" },\n'
              ']')


def test_route_added_removed_changed():
    added = edit('  { path_prefix = "/v1/", backend = "app" },',
                 '  { path_prefix = "/v1/", backend = "app" },\n'
                 '  { host = "b.example", path_prefix = "/x/", backend = "app" },', text=ROUTES)
    assert changes(ROUTES, added) == ["frontend web: routes[2] added (host b.example, path_prefix /x/, backend app)"]
    assert changes(added, ROUTES) == ["frontend web: routes[2] removed (host b.example, path_prefix /x/, backend app)"]
    changed = edit('"/v1/"', '"/v2/"', text=ROUTES)
    assert changes(ROUTES, changed) == [
        "frontend web: routes[1]: path_prefix /v1/, backend app -> path_prefix /v2/, backend app"]


def test_route_inserted_first_moves_nothing_else():
    first = edit("routes = [\n", 'routes = [\n  { host = "z.example", backend = "app" },\n', text=ROUTES)
    assert changes(ROUTES, first) == ["frontend web: routes[0] added (host z.example, backend app)"]


def test_routes_from_none():
    assert changes(edit('timeout_client = "60s"', 'mode = "http"'), ROUTES) == [
        "frontend web: routes[0] added (host a.example, backend app)",
        "frontend web: routes[1] added (path_prefix /v1/, backend app)"]


def test_errorfiles_change_by_status(tmp_path):
    page = tmp_path / "503.http"
    page.write_text("HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    http = edit('timeout_client = "60s"', 'mode = "http"')
    new = edit('mode = "http"', f'mode = "http"\nerrorfiles = {{ 503 = "{page}" }}', text=http)
    assert changes(http, new) == [f"frontend web: errorfiles.503 (none) -> {page}"]


def test_everything_at_once_in_a_stable_order():
    old = BASE + '\n[backends.old]\nservers = [{ name = "o1", address = "127.0.0.1:9001" }]\n'
    new = edit("workers = 4", "workers = 2", 'timeout_client = "60s"', 'timeout_client = "30s"',
               "weight = 10", "weight = 5")
    new += '\n[frontends.api]\nbind = "127.0.0.1:9090"\nbackend = "app"\n'
    assert changes(old, new) == [
        "global: workers 4 -> 2",
        "frontend web: timeout_client 60 -> 30",
        "frontend api added (bind 127.0.0.1:9090, backend app)",
        "backend old removed",
        "backend app: server s1: weight 10 -> 5",
    ]


def test_a_side_from_another_version_may_lack_keys():
    """The running proxy may be older or newer: a key only one side has is unset on the other."""
    old, new = as_dict(BASE), as_dict(BASE)
    del old["global"]["max_draining"]
    old["backends"]["app"]["servers"]["s1"]["future_key"] = 1
    assert diff(old, new) == ["global: max_draining (none) -> 2",
                              "backend app: server s1: future_key 1 -> (none)"]
    assert diff({}, new)[:1] == ["global: workers (none) -> 4"]
    assert "frontend web added (bind 127.0.0.1:8080, backend app)" in diff({}, new)


def test_routes_replaced_by_fewer_are_removed_then_added():
    one = edit("routes = [\n  { host = \"a.example\", backend = \"app\" },\n"
               "  { path_prefix = \"/v1/\", backend = \"app\" },\n]",
               "routes = [{ path_prefix = \"/\", backend = \"app\" }]", text=ROUTES)
    assert changes(ROUTES, one) == ["frontend web: routes[0] removed (host a.example, backend app)",
                                    "frontend web: routes[1] removed (path_prefix /v1/, backend app)",
                                    "frontend web: routes[0] added (path_prefix /, backend app)"]
