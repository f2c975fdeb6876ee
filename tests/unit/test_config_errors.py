"""Every independent problem of a file at once (ConfigErrors), in file order;
where one error makes the checks after it meaningless, only that one."""

import textwrap

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from proxyd import cli, config
from proxyd.config import ConfigError, ConfigErrors

THREE_MISTAKES = """
[global]
worker = 2

[frontends.web]
bind = "127.0.0.1:8080"
backend = "app"
timeout_client = "5 parsecs"

[backends.app]
servers = [
  { name = "s1", address = "127.0.0.1:9001" },
  { name = "s2", address = "10.0.0.1" },
]
"""


def errors_of(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        config.build(tomllib.loads(textwrap.dedent(text)))
    return [(e.path, e.message) for e in info.value.errors]


def load_errors(tmp_path, text: str) -> ConfigError:
    path = tmp_path / "proxyd.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    return info.value


def paths_of(text: str) -> list[str]:
    return [path for path, _ in errors_of(text)]


# ---------------------------------------------------------------- the class

def test_three_mistakes_are_named_at_once(tmp_path):
    e = load_errors(tmp_path, THREE_MISTAKES)
    path = tmp_path / "proxyd.toml"
    assert isinstance(e, ConfigErrors) and isinstance(e, ConfigError)
    assert str(e).splitlines() == [
        f'{path}: global.worker: unknown key (did you mean "workers"?)',
        (f'{path}: frontends.web.timeout_client: expected a duration like "250ms", "5s" or "2m", '
         "got '5 parsecs'"),
        (f'{path}: backends.app.servers[1].address: expected "IPv4:port", "[IPv6]:port" or "name:port", '
         "got '10.0.0.1'"),
    ]
    assert [x.filename for x in e.errors] == [str(path)] * 3


def test_path_and_message_are_the_first_problems():
    """So that code written for one ConfigError still reads something true."""
    with pytest.raises(ConfigError) as info:
        config.build(tomllib.loads(THREE_MISTAKES))
    e = info.value
    assert (e.path, e.message) == ("global.worker", 'unknown key (did you mean "workers"?)')
    assert e.filename == ""


def test_a_single_problem_reads_as_before(tmp_path):
    e = load_errors(tmp_path, THREE_MISTAKES.replace("worker = 2", "workers = 2")
                    .replace('"5 parsecs"', '"5s"'))
    assert len(e.errors) == 1
    assert str(e) == str(e.errors[0])
    assert "\n" not in str(e)


def test_a_plain_config_error_stands_for_itself():
    e = ConfigError("global.x", "wrong", "f.toml")
    assert e.errors == [e]


def test_the_same_problem_is_named_once():
    e = ConfigErrors([ConfigError("a", "bad"), ConfigError("b", "bad"), ConfigError("a", "bad")], "f")
    assert str(e) == "f: a: bad\nf: b: bad"


# ---------------------------------------------------------- what is collected

def test_a_bad_default_inherited_by_two_backends_is_named_once():
    text = """
        [defaults]
        timeout_connect = "soon"
        [frontends.web]
        bind = ":8080"
        backend = "a"
        [backends.a]
        servers = [{ name = "s1", address = "127.0.0.1:1" }]
        [backends.b]
        servers = [{ name = "s1", address = "127.0.0.1:2" }]
    """
    assert paths_of(text) == ["defaults.timeout_connect"]


def test_a_bad_default_is_named_even_where_every_section_overrides_it():
    text = """
        [defaults]
        retries = -1
        [frontends.web]
        bind = ":8080"
        backend = "a"
        [backends.a]
        retries = 2
        servers = [{ name = "s1", address = "127.0.0.1:1" }]
    """
    assert paths_of(text) == ["defaults.retries"]


def test_bad_health_check_in_defaults_is_named_once():
    text = """
        [defaults]
        health_check = { interval = "x", rise = 0 }
        [frontends.web]
        bind = ":8080"
        backend = "a"
        [backends.a]
        servers = [{ name = "s1", address = "127.0.0.1:1" }]
        [backends.b]
        servers = [{ name = "s1", address = "127.0.0.1:2" }]
    """
    assert paths_of(text) == ["defaults.health_check.interval", "defaults.health_check.rise"]


def test_a_misspelt_required_key_is_not_also_missing():
    text = """
        [frontends.web]
        bind = ":8080"
        bakend = "app"
        [backends.app]
        servers = [{ name = "s1", adress = "127.0.0.1:1" }]
    """
    assert errors_of(text) == [("frontends.web.bakend", 'unknown key (did you mean "backend"?)'),
                               ("backends.app.servers[0].adress", 'unknown key (did you mean "address"?)')]


def test_a_route_with_a_misspelt_match_is_not_also_without_one():
    text = """
        [frontends.web]
        bind = ":8080"
        mode = "http"
        backend = "app"
        routes = [{ hots = "a.example", backend = "app" }]
        [backends.app]
        servers = [{ name = "s1", address = "127.0.0.1:1" }]
    """
    assert paths_of(text) == ["frontends.web.routes[0].hots"]


def test_every_bad_value_of_every_section():
    text = """
        [global]
        workers = 0
        grace = "long"
        [frontends.web]
        bind = ["127.0.0.1:80", "nowhere", "[::1]"]
        backend = "app"
        maxconn = 0
        mode = "http"
        routes = [{ path_prefix = "x", backend = "app" }, { host = "b.example", backend = "nope" }]
        errorfiles = { 200 = "/etc/hostname", 503 = "/nonexistent" }
        [backends.app]
        balance = "roundrobbin"
        health_check = { fall = 0 }
        servers = [
          { name = "s1", address = "10.0.0.1:80", weight = 999 },
          { name = "s1", address = "10.0.0.2" },
          { name = "s 3", address = "10.0.0.3:80" },
        ]
    """
    assert paths_of(text) == [
        "global.workers", "global.grace",
        "frontends.web.bind[1]", "frontends.web.bind[2]",
        "frontends.web.maxconn",
        "frontends.web.routes[0].path_prefix", "frontends.web.routes[1].backend",
        "frontends.web.errorfiles.200", "frontends.web.errorfiles.503",
        "backends.app.balance",
        "backends.app.health_check.fall",
        "backends.app.servers[0].weight",
        "backends.app.servers[1].name", "backends.app.servers[1].address",
        "backends.app.servers[2].name",
    ]


def test_references_duplicates_and_values_together():
    text = """
        [frontends.a]
        bind = ["127.0.0.1:80", "127.0.0.1:80"]
        backend = "nope"
        timeout_client = "x"
        [frontends.b]
        bind = ":80"
        backend = "app"
        routes = [{ path_prefix = "/", backend = "app" }]
        [frontends.c]
        bind = "0.0.0.0:80"
        backend = "app"
        [backends.app]
        servers = [{ name = "s1", address = "127.0.0.1:1" }]
    """
    assert errors_of(text) == [
        ("frontends.a.bind[1]", "127.0.0.1:80 is listed twice"),
        ("frontends.a.backend", "no backend named 'nope'"),
        ("frontends.a.timeout_client", "expected a duration like \"250ms\", \"5s\" or \"2m\", got 'x'"),
        ("frontends.b.routes", 'routes need mode = "http"'),
        ("frontends.c.bind[0]", "0.0.0.0:80 is already bound by frontend 'b'"),
    ]


def test_a_backend_with_errors_of_its_own_can_still_be_referred_to():
    text = """
        [frontends.web]
        bind = ":8080"
        backend = "app"
        [backends.app]
        retries = "many"
        servers = []
    """
    assert paths_of(text) == ["backends.app.retries", "backends.app.servers"]


# ------------------------------------------------------- where checks stop

def test_invalid_toml_is_the_only_error(tmp_path):
    e = load_errors(tmp_path, THREE_MISTAKES.replace("worker = 2", "worker = = 2"))
    assert len(e.errors) == 1
    assert e.message.startswith("invalid TOML")


def test_a_file_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[global]\nlog = "/var/log/caf\xe9.log"\n')
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value) == f"{path}: not UTF-8 text (TOML must be): line 2 has byte 0xe9"


@pytest.mark.parametrize("section", ["frontends", "backends", "global"])
def test_a_section_that_is_not_a_table_stops_its_own_checks(section):
    text = THREE_MISTAKES.replace("worker = 2", "workers = 2").replace('"5 parsecs"', '"5s"')
    text = text.replace('"10.0.0.1"', '"10.0.0.1:80"')
    raw = tomllib.loads(text)
    raw[section] = "oops"
    with pytest.raises(ConfigErrors) as info:
        config.build(raw)
    # no "no backend named", no "at least one frontend": consequences, not mistakes
    assert [(e.path, e.message) for e in info.value.errors] == [(section, "expected a table, got 'oops'")]


def test_defaults_that_is_not_a_table_stops_the_sections_that_inherit():
    text = """
        defaults = 5
        [global]
        worker = 1
        [frontends.web]
        bind = "nowhere"
        backend = "app"
        [backends.app]
        servers = [{ name = "s1", address = "127.0.0.1:1" }]
    """
    assert paths_of(text) == ["defaults", "global.worker"]


def test_a_table_that_is_not_a_table_is_still_a_backend_by_name():
    text = """
        [frontends.web]
        bind = ":8080"
        backend = "app"
        [backends]
        app = 5
    """
    assert errors_of(text) == [("backends.app", "expected a table, got 5")]


# ------------------------------------------------------------- file order

def test_errors_come_in_file_order_even_across_interleaved_tables(tmp_path):
    e = load_errors(tmp_path, """
        [frontends.a]
        bind = ":8080"
        backend = "app"
        x = 1
        [backends.app]
        y = 2
        servers = [{ name = "s1", address = "127.0.0.1:1" }]
        [frontends.b]
        bind = ":8081"
        backend = "app"
        z = 3
        [defaults]
        w = 4
        [global]
        v = 5
    """)
    assert [x.path for x in e.errors] == ["frontends.a.x", "backends.app.y", "frontends.b.z", "defaults.w", "global.v"]


def test_arrays_of_tables_keep_their_order(tmp_path):
    e = load_errors(tmp_path, """
        [frontends.web]
        bind = ":8080"
        backend = "app"
        [[backends.app.servers]]
        name = "s1"
        address = "nowhere"
        [backends.other]
        retries = -1
        servers = [{ name = "o", address = "127.0.0.1:1" }]
        [[backends.app.servers]]
        name = "s2"
        weight = -1
        address = "127.0.0.1:2"
        [backends.app.health_check]
        rise = 0
    """)
    assert [x.path for x in e.errors] == ["backends.app.servers[0].address", "backends.other.retries",
                                          "backends.app.servers[1].weight", "backends.app.health_check.rise"]


def test_quoted_table_names_keep_their_order(tmp_path):
    e = load_errors(tmp_path, """
        [frontends."web.v2"]   # a comment
        bind = ":8080"
        backend = "app.v2"
        x = 1
        [backends."app.v2"]
        y = 2
        servers = [{ name = "s1", address = "127.0.0.1:1" }]
        [frontends.other]
        bind = ":8081"
        backend = "app.v2"
        z = 3
    """)
    assert [x.path for x in e.errors] == ["frontends.web.v2.x", "backends.app.v2.y", "frontends.other.z"]


# ------------------------------------------------------------- user, group

def test_missing_user_and_group_are_both_named():
    cfg = config.build(tomllib.loads('[global]\nuser = "no-such-user-x"\ngroup = "no-such-group-x"\n'
                                     '[frontends.web]\nbind = ":80"\nbackend = "app"\n'
                                     '[backends.app]\nservers = [{ name = "s1", address = "127.0.0.1:1" }]\n'),
                       "f.toml")
    with pytest.raises(ConfigErrors) as info:
        cli.check_accounts(cfg)
    assert str(info.value).splitlines() == ["f.toml: global.user: no such user 'no-such-user-x'",
                                            "f.toml: global.group: no such group 'no-such-group-x'"]
