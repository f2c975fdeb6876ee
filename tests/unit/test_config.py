"""proxyd.config: TOML in, frozen typed objects out, errors with key paths."""

import dataclasses
import os
import textwrap

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from proxyd import config
from proxyd.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MINIMAL = """
[frontends.web]
bind = "127.0.0.1:8080"
backend = "app"

[backends.app]
servers = [{ name = "s1", address = "127.0.0.1:9001" }]
"""


def build(text: str) -> config.Config:
    return config.build(tomllib.loads(textwrap.dedent(text)))


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(text)
    return info.value


def with_backend(body: str) -> str:
    """A valid file whose backend "app" has BODY (TOML lines) before its servers."""
    return f"""
[frontends.web]
bind = "127.0.0.1:8080"
backend = "app"

[backends.app]
{textwrap.dedent(body)}
servers = [{{ name = "s1", address = "127.0.0.1:9001" }}]
"""


def with_frontend(body: str) -> str:
    """A valid file whose frontend "web" has BODY (TOML lines)."""
    return f"""
[frontends.web]
bind = "127.0.0.1:8080"
backend = "app"
{textwrap.dedent(body)}

[backends.app]
servers = [{{ name = "s1", address = "127.0.0.1:9001" }}]

[backends.api]
servers = [{{ name = "a1", address = "127.0.0.1:9002" }}]
"""


# ------------------------------------------------------------------- defaults

def _expected(key):
    return os.cpu_count() if key.name == "workers" else key.default


def test_global_defaults_applied():
    g = build(MINIMAL).global_
    for key in config.GLOBAL_KEYS:
        assert getattr(g, key.name) == _expected(key), key.name


def test_frontend_defaults_applied():
    fe = build(MINIMAL).frontends["web"]
    for key in config.FRONTEND_KEYS:
        if key.default is not config.REQUIRED:
            assert getattr(fe, key.name) == key.default, key.name
    assert fe.mode == "tcp" and fe.half_close is False and fe.routes == ()


def test_backend_defaults_applied():
    be = build(MINIMAL).backends["app"]
    for key in config.BACKEND_KEYS:
        if key.default is not config.REQUIRED:
            assert getattr(be, key.name) == key.default, key.name
    assert be.health_check is None and be.send_proxy is None and be.http_reuse is False


def test_server_defaults_applied():
    server = build(MINIMAL).backends["app"].servers[0]
    assert (server.weight, server.maxconn, server.backup) == (1, 0, False)
    assert server.address == config.Address("127.0.0.1", 9001, 2)


def test_health_check_defaults_applied():
    check = build(with_backend("health_check = {}")).backends["app"].health_check
    assert check == config.HealthCheck(interval=2.0, timeout=1.0, rise=2, fall=3, http_path=None)


def test_every_default_passes_its_own_parser():
    """A default that its parser would reject (or change) is a bug in the table."""
    for table, keys in config.SECTIONS.items():
        for key in keys:
            if key.parse and key.default not in (None, config.REQUIRED):
                parsed = key.parse(key.default, f"{table}.{key.name}")
                if key.name != "workers":
                    assert parsed == key.default, f"{table}.{key.name}"


def test_frontends_do_not_share_mutable_defaults():
    cfg = build("""
        [frontends.a]
        bind = ":8080"
        backend = "app"
        [frontends.b]
        bind = ":8081"
        backend = "app"
        [backends.app]
        servers = [{ name = "s1", address = "127.0.0.1:9001" }]
    """)
    assert cfg.frontends["a"].errorfiles is not cfg.frontends["b"].errorfiles


def test_config_is_frozen():
    cfg = build(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.global_.workers = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backends["app"].servers[0].weight = 3


# -------------------------------------------------------------------- workers

@pytest.mark.parametrize("raw,expected", [('"auto"', os.cpu_count()), ("1", 1), ("4", 4), ("256", 256)])
def test_workers(raw, expected):
    assert build(f"[global]\nworkers = {raw}\n" + MINIMAL).global_.workers == expected


def test_workers_default_is_one_per_cpu():
    workers = build(MINIMAL).global_.workers
    assert isinstance(workers, int) and workers == (os.cpu_count() or 1)


@pytest.mark.parametrize("raw", ["0", "257", "-1", '"four"', '"AUTO"', "2.0", "true", '"4"'])
def test_bad_workers(raw):
    e = error(f"[global]\nworkers = {raw}\n" + MINIMAL)
    assert e.path == "global.workers"


# ------------------------------------------------------- [defaults] inheritance

def test_defaults_are_inherited():
    cfg = build("""
        [defaults]
        mode = "http"
        timeout_connect = "2s"
        timeout_client = "90s"
        half_close = true
        retries = 7
        balance = "leastconn"
        maxconn = 123
        [frontends.web]
        bind = ":8080"
        backend = "app"
        [backends.app]
        servers = [{ name = "s1", address = "127.0.0.1:9001", maxconn = 9 }]
    """)
    fe, be = cfg.frontends["web"], cfg.backends["app"]
    assert (fe.mode, fe.timeout_client, fe.half_close, fe.maxconn) == ("http", 90.0, True, 123)
    assert (be.timeout_connect, be.retries, be.balance) == (2.0, 7, "leastconn")
    # maxconn in [defaults] is the frontends' only: not [global]'s, not the servers'
    assert cfg.global_.maxconn == 10000
    assert be.servers[0].maxconn == 9


def test_own_value_overrides_defaults():
    cfg = build("""
        [defaults]
        timeout_connect = "2s"
        timeout_client = "90s"
        [frontends.web]
        bind = ":8080"
        backend = "app"
        timeout_client = "1s"
        [frontends.other]
        bind = ":8081"
        backend = "app"
        [backends.app]
        timeout_connect = "250ms"
        servers = [{ name = "s1", address = "127.0.0.1:9001" }]
    """)
    assert cfg.frontends["web"].timeout_client == 1.0
    assert cfg.frontends["other"].timeout_client == 90.0
    assert cfg.backends["app"].timeout_connect == 0.25


def test_backend_may_come_from_defaults():
    cfg = build("""
        [defaults]
        backend = "app"
        [frontends.web]
        bind = ":8080"
        [backends.app]
        servers = [{ name = "s1", address = "127.0.0.1:9001" }]
    """)
    assert cfg.frontends["web"].backend == "app"


def test_health_check_is_inherited_whole_not_merged():
    cfg = build("""
        [defaults]
        health_check = { interval = "5s", rise = 9 }
        [frontends.web]
        bind = ":8080"
        backend = "app"
        [backends.app]
        servers = [{ name = "s1", address = "127.0.0.1:9001" }]
        [backends.own]
        health_check = { http_path = "/healthz" }
        servers = [{ name = "s1", address = "127.0.0.1:9002" }]
    """)
    assert cfg.backends["app"].health_check.interval == 5.0
    assert cfg.backends["app"].health_check.rise == 9
    own = cfg.backends["own"].health_check
    assert (own.http_path, own.interval, own.rise) == ("/healthz", 2.0, 2)


def test_bad_value_in_defaults_is_reported_in_defaults():
    e = error('[defaults]\ntimeout_connect = "soon"\n' + MINIMAL)
    assert e.path == "defaults.timeout_connect"
    e = error('[defaults]\nhealth_check = { interval = "x" }\n' + MINIMAL)
    assert e.path == "defaults.health_check.interval"


@pytest.mark.parametrize("key,value", [("bind", '":80"'), ("servers", "[]"), ("routes", "[]"),
                                       ("workers", "2"), ("grace", '"1s"'), ("weight", "3")])
def test_keys_that_cannot_be_inherited_are_errors_in_defaults(key, value):
    e = error(f"[defaults]\n{key} = {value}\n" + MINIMAL)
    assert e.path == f"defaults.{key}"
    assert "unknown key" in e.message


def test_unknown_key_in_defaults_has_a_hint():
    e = error('[defaults]\ntimeout_conect = "1s"\n' + MINIMAL)
    assert e.path == "defaults.timeout_conect"
    assert 'did you mean "timeout_connect"?' in e.message


# ------------------------------------------------------------------ durations

@pytest.mark.parametrize("raw,seconds", [
    ("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), ("0s", 0.0),
    ("7", 7.0), (5, 5.0), (0.25, 0.25), (0, 0.0), ("30s", 30.0),
])
def test_durations(raw, seconds):
    assert config.duration(raw, "x") == seconds


@pytest.mark.parametrize("raw", [
    "5x", "", "s", "-1s", -1, -0.5, "5 seconds", "1e3", ".5s", "5S", "1m30s", True, False, None, [5], {"s": 5},
])
def test_bad_durations(raw):
    with pytest.raises(ConfigError) as info:
        config.duration(raw, "frontends.web.timeout_client")
    assert info.value.path == "frontends.web.timeout_client"
    assert repr(raw) in info.value.message


@pytest.mark.parametrize("raw", [float("nan"), float("inf")])
def test_non_finite_durations_are_rejected(raw):
    with pytest.raises(ConfigError):
        config.duration(raw, "x")


def test_duration_in_a_file_names_its_key():
    e = error(with_backend('timeout_connect = "soon"'))
    assert e.path == "backends.app.timeout_connect"
    assert str(e) == ('backends.app.timeout_connect: expected a duration like "250ms", "5s" or "2m", '
                      "got 'soon'")


def test_duration_from_toml_numbers():
    cfg = build(with_backend("timeout_connect = 3\ntimeout_server = 0.5"))
    assert cfg.backends["app"].timeout_connect == 3.0
    assert cfg.backends["app"].timeout_server == 0.5


# ------------------------------------------------------------------ addresses

@pytest.mark.parametrize("raw,host,port,family,text", [
    ("127.0.0.1:80", "127.0.0.1", 80, 2, "127.0.0.1:80"),
    ("0.0.0.0:65535", "0.0.0.0", 65535, 2, "0.0.0.0:65535"),
    (":80", "0.0.0.0", 80, 2, "0.0.0.0:80"),
    ("[::1]:8080", "::1", 8080, 10, "[::1]:8080"),
    ("[::]:443", "::", 443, 10, "[::]:443"),
    ("[2001:DB8:0::1]:1", "2001:db8::1", 1, 10, "[2001:db8::1]:1"),
    ("10.0.0.1:080", "10.0.0.1", 80, 2, "10.0.0.1:80"),
])
def test_addresses(raw, host, port, family, text):
    addr = config.Address.parse(raw, "x")
    assert (addr.host, addr.port, addr.family) == (host, port, family)
    assert str(addr) == text
    assert addr.sockaddr == (host, port)


@pytest.mark.parametrize("raw", [
    "10.0.0.1", "10.0.0.1:", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:http", "10.0.0.1:+80", "10.0.0.1:-1",
    "localhost:80", "example.com:80", "256.0.0.1:80", " 10.0.0.1:80", "::1:80", "[10.0.0.1]:80", "[::1]",
    "[::1]80", "[::1:80", "", ":", 8080, None, ["10.0.0.1:80"],
])
def test_bad_addresses(raw):
    with pytest.raises(ConfigError) as info:
        config.Address.parse(raw, "backends.app.servers[0].address")
    assert info.value.path == "backends.app.servers[0].address"
    assert 'expected "IPv4:port" or "[IPv6]:port"' in info.value.message


@pytest.mark.parametrize("raw", ["10.0.0.1:\u00b2", "10.0.0.1:\u0668\u0660"])
def test_ports_are_ascii_digits(raw):
    with pytest.raises(ConfigError):
        config.Address.parse(raw, "x")


def test_bad_server_address_error_names_the_key_path():
    e = error("""
        [frontends.web]
        bind = ":8080"
        backend = "app"
        [backends.app]
        servers = [
          { name = "s1", address = "10.0.0.1:80" },
          { name = "s2", address = "10.0.0.1" },
        ]
    """)
    assert e.path == "backends.app.servers[1].address"
    assert str(e) == ("backends.app.servers[1].address: "
                      "expected \"IPv4:port\", \"[IPv6]:port\" or \"name:port\", got '10.0.0.1'")


def test_load_error_carries_file_and_key_path(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(MINIMAL.replace('"127.0.0.1:9001"', '"10.0.0.1"'))
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    # the message `proxyd --check` prints after "proxyd: " (docs/CONTRACT.md)
    assert str(info.value) == (f"{path}: backends.app.servers[0].address: "
                               "expected \"IPv4:port\", \"[IPv6]:port\" or \"name:port\", got '10.0.0.1'")
    assert info.value.filename == str(path)


def test_bind_accepts_one_address_or_a_list():
    assert [str(a) for a in build(MINIMAL).frontends["web"].bind] == ["127.0.0.1:8080"]
    cfg = build(with_frontend("").replace('bind = "127.0.0.1:8080"', 'bind = ["127.0.0.1:8080", "[::1]:8080"]'))
    assert [str(a) for a in cfg.frontends["web"].bind] == ["127.0.0.1:8080", "[::1]:8080"]


@pytest.mark.parametrize("bind,path", [("[]", "frontends.web.bind"), ("80", "frontends.web.bind"),
                                       ('["127.0.0.1:1", "x"]', "frontends.web.bind[1]")])
def test_bad_bind(bind, path):
    e = error(MINIMAL.replace('bind = "127.0.0.1:8080"', f"bind = {bind}"))
    assert e.path == path


# ----------------------------------------------------------- unknown keys, hints

@pytest.mark.parametrize("text,path,hint", [
    ('[frontend.web]\nbind = ":1"\n' + MINIMAL, "frontend", "frontends"),
    ("[global]\nworker = 2\n" + MINIMAL, "global.worker", "workers"),
    (with_frontend("half_clsoe = true"), "frontends.web.half_clsoe", "half_close"),
    (with_backend("ballance = 'first'"), "backends.app.ballance", "balance"),
    (with_backend("health_check = { intervall = '1s' }"), "backends.app.health_check.intervall", "interval"),
    (MINIMAL.replace('address = "127.0.0.1:9001"', 'adress = "127.0.0.1:9001"'),
     "backends.app.servers[0].adress", "address"),
    (with_frontend('mode = "http"\nroutes = [{ path_prefx = "/a/", backend = "api" }]'),
     "frontends.web.routes[0].path_prefx", "path_prefix"),
])
def test_unknown_key_with_hint(text, path, hint):
    e = error(text)
    assert e.path == path
    assert e.message == f'unknown key (did you mean "{hint}"?)'


def test_unknown_key_without_anything_close():
    e = error(with_backend("zzz = 1"))
    assert (e.path, e.message) == ("backends.app.zzz", "unknown key")


def test_bad_choice_has_a_hint():
    e = error(with_backend('balance = "roundrobbin"'))
    assert e.path == "backends.app.balance"
    assert 'did you mean "roundrobin"?' in e.message


# ---------------------------------------------------------- references, duplicates

def test_unknown_backend_in_frontend():
    e = error(MINIMAL.replace('backend = "app"', 'backend = "ap"'))
    assert e.path == "frontends.web.backend"
    assert e.message == "no backend named 'ap' (did you mean \"app\"?)"


def test_unknown_backend_in_route():
    e = error(with_frontend("""
        mode = "http"
        routes = [
          { host = "a.example", backend = "api" },
          { path_prefix = "/x/", backend = "nope" },
        ]
    """))
    assert e.path == "frontends.web.routes[1].backend"
    assert "no backend named 'nope'" in e.message


def test_no_backends_at_all():
    e = error('[frontends.web]\nbind = ":80"\nbackend = "app"\n')
    assert e.path == "frontends.web.backend"


def test_at_least_one_frontend():
    e = error('[backends.app]\nservers = [{ name = "s1", address = "127.0.0.1:1" }]\n')
    assert e.path == "frontends"


def test_duplicate_server_names():
    e = error("""
        [frontends.web]
        bind = ":8080"
        backend = "app"
        [backends.app]
        servers = [
          { name = "s1", address = "10.0.0.1:80" },
          { name = "s2", address = "10.0.0.2:80" },
          { name = "s1", address = "10.0.0.3:80" },
        ]
    """)
    assert e.path == "backends.app.servers[2].name"
    assert "'s1' is used twice" in e.message


def test_same_server_name_in_two_backends_is_fine():
    cfg = build(with_frontend("").replace('"a1"', '"s1"'))
    assert cfg.backends["api"].servers[0].name == cfg.backends["app"].servers[0].name == "s1"


def test_duplicate_bind_across_frontends():
    e = error("""
        [frontends.a]
        bind = ["127.0.0.1:8080", "0.0.0.0:8081"]
        backend = "app"
        [frontends.b]
        bind = ["[::1]:8081", ":8081"]
        backend = "app"
        [backends.app]
        servers = [{ name = "s1", address = "127.0.0.1:9001" }]
    """)
    assert e.path == "frontends.b.bind[1]"  # ":8081" is "0.0.0.0:8081"
    assert e.message == "0.0.0.0:8081 is already bound by frontend 'a'"


def test_duplicate_bind_within_a_frontend():
    e = error(MINIMAL.replace('bind = "127.0.0.1:8080"', 'bind = ["127.0.0.1:8080", "127.0.0.1:8080"]'))
    assert e.path == "frontends.web.bind[1]"
    assert "listed twice" in e.message


# --------------------------------------------------------------------- routes

def test_routes_need_http_mode():
    e = error(with_frontend('routes = [{ path_prefix = "/a/", backend = "api" }]'))
    assert e.path == "frontends.web.routes"
    assert "http" in e.message


def test_routes_in_http_mode_including_mode_from_defaults():
    text = with_frontend("""
        routes = [
          { host = "API.Example.com", path_prefix = "/v1/", backend = "api" },
          { path_prefix = "/", backend = "app" },
          { host = "b.example", backend = "api" },
        ]
    """)
    cfg = build('[defaults]\nmode = "http"\n' + text)
    routes = cfg.frontends["web"].routes
    assert routes == (config.Route("api.example.com", "/v1/", "api"), config.Route(None, "/", "app"),
                      config.Route("b.example", None, "api"))


def test_route_needs_host_or_path_prefix():
    e = error(with_frontend('mode = "http"\nroutes = [{ backend = "api" }]'))
    assert e.path == "frontends.web.routes[0]"


@pytest.mark.parametrize("route,path", [
    ('{ path_prefix = "api/", backend = "api" }', "frontends.web.routes[0].path_prefix"),
    ('{ host = "", backend = "api" }', "frontends.web.routes[0].host"),
    ('{ host = "a.example" }', "frontends.web.routes[0].backend"),
    ('"api"', "frontends.web.routes[0]"),
])
def test_bad_routes(route, path):
    e = error(with_frontend(f'mode = "http"\nroutes = [{route}]'))
    assert e.path == path


def test_routes_must_be_a_list():
    e = error(with_frontend('mode = "http"\nroutes = { backend = "api" }'))
    assert e.path == "frontends.web.routes"


# ------------------------------------------------------------ required, types

@pytest.mark.parametrize("text,path", [
    (MINIMAL.replace('bind = "127.0.0.1:8080"\n', ""), "frontends.web.bind"),
    (MINIMAL.replace('backend = "app"\n', ""), "frontends.web.backend"),
    (MINIMAL.replace('servers = [{ name = "s1", address = "127.0.0.1:9001" }]', ""), "backends.app.servers"),
    (MINIMAL.replace('name = "s1", ', ""), "backends.app.servers[0].name"),
    (MINIMAL.replace(', address = "127.0.0.1:9001"', ""), "backends.app.servers[0].address"),
])
def test_required_keys(text, path):
    e = error(text)
    assert (e.path, e.message) == (path, "missing (this key is required)")


@pytest.mark.parametrize("body,path", [
    ("servers = []", "backends.app.servers"),
    ('servers = "s1"', "backends.app.servers"),
    ('servers = ["10.0.0.1:80"]', "backends.app.servers[0]"),
])
def test_bad_servers(body, path):
    text = MINIMAL.replace('servers = [{ name = "s1", address = "127.0.0.1:9001" }]', body)
    assert error(text).path == path


@pytest.mark.parametrize("frontend_line,path", [
    ('half_close = "yes"', "frontends.web.half_close"),
    ("maxconn = 0", "frontends.web.maxconn"),
    ("maxconn = true", "frontends.web.maxconn"),
    ("max_header_size = 100", "frontends.web.max_header_size"),
    ('mode = "udp"', "frontends.web.mode"),
])
def test_bad_frontend_values(frontend_line, path):
    assert error(with_frontend(frontend_line)).path == path


@pytest.mark.parametrize("server,path", [
    ('name = "s1", address = "10.0.0.1:80", weight = 257', "backends.app.servers[0].weight"),
    ('name = "s1", address = "10.0.0.1:80", weight = -1', "backends.app.servers[0].weight"),
    ('name = "s1", address = "10.0.0.1:80", maxconn = 1.5', "backends.app.servers[0].maxconn"),
    ('name = "s1", address = "10.0.0.1:80", backup = 1', "backends.app.servers[0].backup"),
    ('name = "s 1", address = "10.0.0.1:80"', "backends.app.servers[0].name"),
    ('name = 1, address = "10.0.0.1:80"', "backends.app.servers[0].name"),
])
def test_bad_server_values(server, path):
    text = MINIMAL.replace('{ name = "s1", address = "127.0.0.1:9001" }', f"{{ {server} }}")
    assert error(text).path == path


def test_table_names_are_checked():
    e = error(MINIMAL.replace("[backends.app]", '[backends."a b"]').replace('backend = "app"', 'backend = "a b"'))
    # the frontend's `backend = "a b"` is a bad name in its own right, but not an unknown backend
    assert [(x.path, x.message.split(",")[0]) for x in e.errors] == [
        ("frontends.web.backend", "expected a name of letters"),
        ("backends.a b", "expected a name of letters")]


@pytest.mark.parametrize("raw,expected", [(False, None), (True, "v1"), ("v1", "v1"), ("v2", "v2")])
def test_send_proxy(raw, expected):
    value = str(raw).lower() if isinstance(raw, bool) else f'"{raw}"'
    assert build(with_backend(f"send_proxy = {value}")).backends["app"].send_proxy == expected


def test_bad_send_proxy():
    assert error(with_backend('send_proxy = "v3"')).path == "backends.app.send_proxy"


@pytest.mark.parametrize("target", ["stderr", "syslog", "syslog:/dev/log", "syslog:127.0.0.1:514",
                                    "syslog:[::1]:514", "/var/log/proxyd.log"])
def test_log_targets(target):
    assert build(f'[global]\nlog = "{target}"\n' + MINIMAL).global_.log == target


@pytest.mark.parametrize("target", ["syslog:", "syslog:loghost", "syslog:loghost:514", "proxyd.log", "",
                                    "syslogd", "syslog/dev/log"])
def test_bad_log_targets(target):
    assert error(f'[global]\nlog = "{target}"\n' + MINIMAL).path == "global.log"


def test_errorfiles(tmp_path):
    page = tmp_path / "503.http"
    page.write_text("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    cfg = build(with_frontend(f'mode = "http"\nerrorfiles = {{ 503 = "{page}" }}'))
    assert cfg.frontends["web"].errorfiles == {503: str(page)}


@pytest.mark.parametrize("table,path", [
    ('{ 503 = "/nonexistent/503.http" }', "frontends.web.errorfiles.503"),
    ('{ 200 = "/etc/hostname" }', "frontends.web.errorfiles.200"),
    ('{ oops = "/etc/hostname" }', "frontends.web.errorfiles.oops"),
    ('"/etc/hostname"', "frontends.web.errorfiles"),
])
def test_bad_errorfiles(table, path):
    assert error(with_frontend(f"errorfiles = {table}")).path == path


# ------------------------------------------------------------------- loading

def test_shipped_example_loads():
    cfg = config.load(os.path.join(REPO, "etc", "proxyd.toml"))
    assert cfg.global_.workers == 2
    web = cfg.frontends["web"]
    assert [str(a) for a in web.bind] == ["127.0.0.1:8080"]
    assert (web.mode, web.backend, web.half_close) == ("tcp", "demo", False)
    demo = cfg.backends["demo"]
    assert [s.name for s in demo.servers] == ["s1", "s2"]
    assert demo.timeout_connect == 5.0 and demo.retries == 3


def test_load_missing_file(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        config.load(missing)
    assert str(info.value).startswith(f"{missing}: cannot read")


def test_load_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[global\nworkers = 2\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value).startswith(f"{path}: invalid TOML")


def test_load_keeps_the_filename(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(MINIMAL)
    assert config.load(str(path)).filename == str(path)
