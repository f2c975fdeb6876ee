"""Server addresses by host name: resolved with the system resolver when the
file is loaded, every address kept in the resolver's order, each once;
listening addresses stay IP literals."""

import socket
import textwrap

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from proxyd import config
from proxyd.config import Address, ConfigError


def build(text: str) -> config.Config:
    return config.build(tomllib.loads(textwrap.dedent(text)))


def servers_file(*addresses: str) -> str:
    servers = ",\n".join(f'  {{ name = "s{i}", address = "{a}" }}' for i, a in enumerate(addresses))
    return f'[frontends.web]\nbind = "127.0.0.1:8080"\nbackend = "app"\n\n[backends.app]\nservers = [\n{servers}\n]\n'


def info(family, host, port, *rest):
    """One getaddrinfo() entry."""
    return (family, socket.SOCK_STREAM, 6, "", (host, port, *rest))


@pytest.fixture
def resolver(monkeypatch):
    """resolver({name: [entries] or an exception}) answers getaddrinfo as told,
    and records what was asked."""
    asked = []

    def install(answers: dict):
        def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
            asked.append((host, port, type))
            answer = answers[host]
            if isinstance(answer, Exception):
                raise answer
            return [(f, t, p, c, (sa[0], port, *sa[2:])) for f, t, p, c, sa in answer]
        monkeypatch.setattr(config.socket, "getaddrinfo", getaddrinfo)
        return asked

    return install


# ------------------------------------------------------------ the real resolver

def test_localhost_resolves_through_the_system_resolver():
    server = build(servers_file("localhost:8081")).backends["app"].servers[0]
    expected = []
    for family, _, _, _, sockaddr in socket.getaddrinfo("localhost", 8081, type=socket.SOCK_STREAM):
        entry = (int(family), tuple(sockaddr[:2]))
        if entry not in expected:
            expected.append(entry)
    assert list(server.address.resolved) == expected
    first_family, (first_host, _) = expected[0]
    address = server.address
    assert (address.host, address.port, address.family) == (first_host, 8081, first_family)
    assert address.sockaddr == (first_host, 8081)
    assert address.name == "localhost"
    assert address.written == "localhost:8081"
    assert str(address) == (f"[{first_host}]:8081" if first_family == socket.AF_INET6 else f"{first_host}:8081")


def test_a_name_that_does_not_resolve_is_an_error_naming_the_key():
    with pytest.raises(ConfigError) as e:
        build(servers_file("127.0.0.1:8081", "nosuch.invalid:80"))
    assert e.value.path == "backends.app.servers[1].address"
    assert e.value.message.startswith('cannot resolve "nosuch.invalid": ')


# -------------------------------------------------------- what is kept of a name

def test_every_address_is_kept_in_the_resolvers_order_each_once(resolver):
    asked = resolver({"app.example": [
        info(socket.AF_INET6, "2001:db8::2", 0, 0, 0),
        info(socket.AF_INET, "192.0.2.1", 0),
        info(socket.AF_INET6, "2001:db8::2", 0, 0, 0),   # once per protocol, say
        info(socket.AF_INET, "192.0.2.7", 0),
        info(socket.AF_INET, "192.0.2.1", 0),
    ]})
    address = build(servers_file("app.example:8080")).backends["app"].servers[0].address
    assert address.resolved == ((socket.AF_INET6, ("2001:db8::2", 8080)),
                                (socket.AF_INET, ("192.0.2.1", 8080)),
                                (socket.AF_INET, ("192.0.2.7", 8080)))
    assert (address.host, address.port, address.family) == ("2001:db8::2", 8080, socket.AF_INET6)
    assert address.sockaddr == ("2001:db8::2", 8080)
    assert str(address) == "[2001:db8::2]:8080"
    assert (address.name, address.written) == ("app.example", "app.example:8080")
    assert asked == [("app.example", 8080, socket.SOCK_STREAM)]


def test_a_scoped_ipv6_address_keeps_its_scope(resolver):
    resolver({"router.lan": [info(socket.AF_INET6, "fe80::1", 0, 0, 3)]})
    address = Address.resolve("router.lan:80", "x")
    assert address.resolved == ((socket.AF_INET6, ("fe80::1", 80, 0, 3)),)
    assert address.sockaddr == ("fe80::1", 80, 0, 3)


def test_families_other_than_ip_are_left_out(resolver):
    resolver({"odd.example": [(socket.AF_UNIX, socket.SOCK_STREAM, 0, "", ("/x", 0)),
                              info(socket.AF_INET, "192.0.2.3", 0)]})
    assert Address.resolve("odd.example:80", "x").resolved == ((socket.AF_INET, ("192.0.2.3", 80)),)


def test_a_resolver_error_is_a_config_error_with_its_reason(resolver):
    resolver({"nosuch.invalid": socket.gaierror(socket.EAI_NONAME, "Name or service not known")})
    with pytest.raises(ConfigError) as e:
        build(servers_file("127.0.0.1:8081", "nosuch.invalid:80"))
    assert str(e.value) == ('backends.app.servers[1].address: cannot resolve "nosuch.invalid": '
                            "Name or service not known")


def test_each_load_resolves_again(resolver, tmp_path):
    """A reload calls config.load: a name that moved is followed."""
    path = tmp_path / "proxyd.toml"
    path.write_text(servers_file("app.example:80"))
    resolver({"app.example": [info(socket.AF_INET, "192.0.2.1", 0)]})
    first = config.load(str(path)).backends["app"].servers[0].address
    resolver({"app.example": [info(socket.AF_INET, "192.0.2.9", 0)]})
    second = config.load(str(path)).backends["app"].servers[0].address
    assert (first.host, second.host) == ("192.0.2.1", "192.0.2.9")
    assert first != second


# ------------------------------------------------------------------ literals

@pytest.mark.parametrize("raw,family,sockaddr", [
    ("127.0.0.1:80", socket.AF_INET, ("127.0.0.1", 80)),
    ("[::1]:8080", socket.AF_INET6, ("::1", 8080)),
    ("[2001:DB8:0::1]:1", socket.AF_INET6, ("2001:db8::1", 1)),
    (":80", socket.AF_INET, ("0.0.0.0", 80)),
])
def test_an_ip_literal_resolves_to_itself_only(resolver, raw, family, sockaddr):
    asked = resolver({})
    address = Address.resolve(raw, "x")
    assert address.resolved == ((family, sockaddr),)
    assert address == Address.parse(raw, "x") == Address(sockaddr[0], sockaddr[1], family)
    assert (address.name, address.sockaddr) == ("", sockaddr)
    assert address.written == str(address)
    assert asked == []  # the resolver is not asked about literals


@pytest.mark.parametrize("raw", [
    "10.0.0.1", "localhost", "localhost:", "localhost:0", "localhost:65536", "localhost:http",
    "256.0.0.1:80", "10.0.0:80", "1.2.3.4.5:80", "my host:80", "-bad.example:80", "bad-.example:80",
    "a..b:80", ".example:80", "[localhost]:80", "::1:80", "[10.0.0.1]:80", "h\u00e9.example:80",
    "x" * 64 + ".example:80", ("a." * 127) + "ab:80", "", 8080, None,
])
def test_bad_server_addresses(resolver, raw):
    asked = resolver({})
    with pytest.raises(ConfigError) as e:
        Address.resolve(raw, "backends.app.servers[0].address")
    assert e.value.path == "backends.app.servers[0].address"
    assert '"IPv4:port", "[IPv6]:port" or "name:port"' in e.value.message
    assert asked == []


@pytest.mark.parametrize("name", ["db", "db.example", "DB.Example.COM", "db.example.", "_srv.example",
                                  "a-b.c_d.example", "1db.example", "x" * 63, "host1"])
def test_host_names_that_are_asked_about(resolver, name):
    asked = resolver({name: [info(socket.AF_INET, "192.0.2.1", 0)]})
    assert Address.resolve(f"{name}:80", "x").name == name
    assert asked == [(name, 80, socket.SOCK_STREAM)]


def test_bind_takes_no_names(resolver):
    asked = resolver({})
    with pytest.raises(ConfigError) as e:
        build(servers_file("127.0.0.1:1").replace('bind = "127.0.0.1:8080"', 'bind = "localhost:8080"'))
    assert e.value.path == "frontends.web.bind[0]"
    assert "'localhost' is not an IP address" in e.value.message
    assert asked == []


def test_syslog_targets_take_no_names():
    with pytest.raises(ConfigError):
        build('[global]\nlog = "syslog:localhost:514"\n' + servers_file("127.0.0.1:1"))


# ------------------------------------------------------------------ the table

def test_server_key_docs():
    keys = {k.name: k for k in config.SERVER_KEYS}
    assert keys["address"].doc == '"IPv4:port", "[IPv6]:port" or "name:port"'
    assert keys["maxconn"].doc == "concurrent connections from all workers together, 0 = no limit"
