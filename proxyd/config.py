"""Configuration: TOML in, frozen typed objects out, validated once.

Every key is declared once in the tables below (name, parser, default, one
line of meaning).  Those tables drive validation, defaults, `[defaults]`
inheritance and the test that `man/proxyd.toml.5` documents every key.  No
other module ever sees the raw TOML dictionary.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib


class ConfigError(Exception):
    """A configuration problem, naming the file and the TOML key path."""

    def __init__(self, path: str, message: str, filename: str = ""):
        self.path = path
        self.message = message
        self.filename = filename
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.filename}: " if self.filename else ""
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"


# ---------------------------------------------------------------- value parsers
# Each parser takes (raw value, key path) and returns the typed value or raises
# ConfigError.  They are plain functions so the key tables can name them.

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(raw: Any, path: str) -> float:
    """"250ms", "5s", "2m", "1h" or a number of seconds -> seconds (float)."""
    if isinstance(raw, bool):
        raise ConfigError(path, f"expected a duration like \"5s\", got {raw!r}")
    if isinstance(raw, (int, float)):
        seconds = float(raw)
    elif isinstance(raw, str) and (m := _DURATION.match(raw)):
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ConfigError(path, f"expected a duration like \"250ms\", \"5s\" or \"2m\", got {raw!r}")
    if not 0 <= seconds < float("inf"):  # also refuses TOML's nan and inf
        raise ConfigError(path, f"a duration must be a finite number of seconds, 0 or more, got {raw!r}")
    return seconds


def timeout(raw: Any, path: str) -> float:
    """A duration where 0 means "no timeout", as HAProxy users read it."""
    seconds = duration(raw, path)
    return seconds if seconds else float("inf")


def duration_at_least(minimum: float) -> Callable[[Any, str], float]:
    def parse(raw: Any, path: str) -> float:
        seconds = duration(raw, path)
        if seconds < minimum:
            raise ConfigError(path, f"must be at least {minimum:g}s, got {raw!r}")
        return seconds
    return parse


def boolean(raw: Any, path: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(path, f"expected true or false, got {raw!r}")
    return raw


def text(raw: Any, path: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(path, f"expected a non-empty string, got {raw!r}")
    return raw


def optional_text(raw: Any, path: str) -> str | None:
    return text(raw, path)


def integer(low: int, high: int) -> Callable[[Any, str], int]:
    def parse(raw: Any, path: str) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(path, f"expected an integer, got {raw!r}")
        if not low <= raw <= high:
            raise ConfigError(path, f"must be between {low} and {high}, got {raw}")
        return raw
    parse.__doc__ = f"integer {low}..{high}"
    return parse


def choice(*allowed: str) -> Callable[[Any, str], str]:
    def parse(raw: Any, path: str) -> str:
        if raw not in allowed:
            hint = _did_you_mean(raw, allowed) if isinstance(raw, str) else ""
            listed = ", ".join(f'"{a}"' for a in allowed)
            raise ConfigError(path, f"expected one of {listed}, got {raw!r}{hint}")
        return raw
    return parse


def workers(raw: Any, path: str) -> int:
    if raw == "auto":
        return os.cpu_count() or 1
    return integer(1, 256)(raw, path)


LOG_LEVELS = ("debug", "info", "notice", "warning", "err")


def log_target(raw: Any, path: str) -> str:
    value = text(raw, path)
    if value in ("stderr", "syslog") or value.startswith(("/", "syslog:")):
        if value.startswith("syslog:") and not value[7:]:
            raise ConfigError(path, "expected \"syslog\", \"syslog:/dev/log\" or \"syslog:HOST:PORT\"")
        if value.startswith("syslog:") and not value[7:].startswith("/"):
            Address.parse(value[7:].removeprefix("tcp@"), path)
        return value
    if value.startswith("syslog"):
        raise ConfigError(path, f"unknown log target {value!r}")
    raise ConfigError(path, f"expected \"stderr\", \"syslog\", \"syslog:/dev/log\", "
                            f"\"syslog:HOST:PORT\" or an absolute file path, got {value!r}")


LITERAL_FORMS = '"IPv4:port" or "[IPv6]:port"'
SERVER_FORMS = '"IPv4:port", "[IPv6]:port" or "name:port"'

# A host name as resolvers take it: dot-separated labels of letters, digits,
# "-" and "_" (found in /etc/hosts and service names), an optional final dot.
# A last label of digits only makes it a malformed IPv4 address, not a name.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$)(?:{_LABEL}\.)*(?!\d+\.?$){_LABEL}\.?$")


@dataclass(frozen=True)
class Address:
    """Where to listen or connect: "127.0.0.1:80", "[::1]:80", ":80" (all
    IPv4), and for servers also "name:port".

    host, port, family, sockaddr and str() are the first address.  resolved
    is every (family, sockaddr) the address stands for, in the resolver's
    order: an IP literal stands for itself only, a name for every address it
    had when the file was loaded.  name is the host name as written, "" for
    a literal.
    """

    host: str
    port: int
    family: int  # socket.AF_INET or socket.AF_INET6
    resolved: tuple[tuple[int, tuple], ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if not self.resolved:
            object.__setattr__(self, "resolved", ((self.family, (self.host, self.port)),))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"

    @property
    def sockaddr(self) -> tuple:
        return self.resolved[0][1]

    @property
    def written(self) -> str:
        """The address as the file gave it: "localhost:8081" for a name."""
        return f"{self.name}:{self.port}" if self.name else str(self)

    @classmethod
    def parse(cls, raw: Any, path: str, forms: str = LITERAL_FORMS) -> "Address":
        """An IP literal and a port (listening addresses never take names)."""
        host, port, bracketed = _split_host_port(raw, path, forms)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(path, f"{host!r} is not an IP address (expected {forms}, got {raw!r})") from None
        if bracketed != (ip.version == 6):
            raise ConfigError(path, f"expected {forms}, got {raw!r}")
        return cls(str(ip), port, socket.AF_INET6 if ip.version == 6 else socket.AF_INET)

    @classmethod
    def resolve(cls, raw: Any, path: str) -> "Address":
        """A server address: an IP literal, or a host name looked up now."""
        host, port, bracketed = _split_host_port(raw, path, SERVER_FORMS)
        if bracketed or _is_ip(host):
            return cls.parse(raw, path, SERVER_FORMS)
        if not _HOST_NAME.match(host):
            raise ConfigError(path, f"{host!r} is not an IP address or a host name "
                                    f"(expected {SERVER_FORMS}, got {raw!r})")
        resolved = _resolve(host, port, path)
        family, sockaddr = resolved[0]
        return cls(sockaddr[0], port, family, resolved, host)


def _split_host_port(raw: Any, path: str, forms: str) -> tuple[str, int, bool]:
    """(host, port, bracketed) of "host:port" or "[host]:port"; ":port" is 0.0.0.0."""
    if not isinstance(raw, str):
        raise ConfigError(path, f"expected {forms}, got {raw!r}")
    bracketed = raw.startswith("[")
    if bracketed:
        host, sep, port = raw[1:].partition("]:")
    else:
        host, sep, port = raw.rpartition(":")
        host = host or "0.0.0.0"
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(path, f"expected {forms}, got {raw!r}")
    return host, int(port), bracketed


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int, path: str) -> tuple[tuple[int, tuple], ...]:
    """Every address of HOST from the system resolver (/etc/hosts, DNS), in
    its order (RFC 6724, as connect() should try them), each once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(path, f'cannot resolve "{host}": {e.strerror}') from None
    resolved = {}
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            resolved.setdefault((int(family), _plain_sockaddr(sockaddr)), None)
    if not resolved:
        raise ConfigError(path, f'cannot resolve "{host}": no IPv4 or IPv6 address')
    return tuple(resolved)


def _plain_sockaddr(sockaddr: tuple) -> tuple:
    """(host, port), as a literal's; an IPv6 flow label or scope is kept only when set."""
    return tuple(sockaddr) if len(sockaddr) == 4 and (sockaddr[2] or sockaddr[3]) else tuple(sockaddr[:2])


def server_address(raw: Any, path: str) -> Address:
    return Address.resolve(raw, path)


def bind_list(raw: Any, path: str) -> tuple[Address, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise ConfigError(path, f"expected an address or a non-empty list of addresses, got {raw!r}")
    addresses = tuple(Address.parse(item, f"{path}[{i}]") for i, item in enumerate(items))
    for i, addr in enumerate(addresses):
        if addr in addresses[:i]:
            raise ConfigError(f"{path}[{i}]", f"{addr} is listed twice")
    return addresses


def send_proxy(raw: Any, path: str) -> str | None:
    """false, true (= "v1"), "v1" or "v2"."""
    if raw is False:
        return None
    if raw is True:
        return "v1"
    return choice("v1", "v2")(raw, path)


_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


def name(raw: Any, path: str) -> str:
    if not isinstance(raw, str) or not _NAME.match(raw):
        raise ConfigError(path, f"expected a name of letters, digits and _.:-, got {raw!r}")
    return raw


def path_prefix(raw: Any, path: str) -> str:
    value = text(raw, path)
    if not value.startswith("/"):
        raise ConfigError(path, f"a path prefix starts with \"/\", got {raw!r}")
    return value


def host_name(raw: Any, path: str) -> str:
    return text(raw, path).lower()


def errorfiles(raw: Any, path: str) -> dict[int, str]:
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a table of status = \"file\", got {raw!r}")
    files = {}
    for status, filename in raw.items():
        key = f"{path}.{status}"
        if not status.isdigit() or not 400 <= int(status) <= 599:
            raise ConfigError(key, "expected an HTTP status code from 400 to 599")
        filename = text(filename, key)
        if not os.path.isfile(filename):
            raise ConfigError(key, f"no such file: {filename}")
        files[int(status)] = os.path.abspath(filename)  # a daemon runs from /
    return files


# ------------------------------------------------------------------ key tables

REQUIRED = object()


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[Any, str], Any]
    default: Any
    doc: str
    inheritable: bool = True  # may be set in [defaults]


GLOBAL_KEYS = (
    Key("workers", workers, "auto", 'number of worker processes, or "auto" for one per CPU'),
    Key("user", optional_text, None, "user the workers run as (the master keeps root)"),
    Key("group", optional_text, None, "group the workers run as"),
    Key("pidfile", optional_text, None, "file the master's pid is written to"),
    Key("maxconn", integer(1, 1_000_000), 10000,
        "client connections per worker; beyond it new ones wait in the kernel backlog"),
    Key("grace", duration, 30.0, "how long old workers may drain on reload or graceful stop"),
    Key("log", log_target, "stderr", 'where logs go: "stderr", "syslog", "syslog:/dev/log", '
        '"syslog:HOST:PORT" (UDP), "syslog:tcp@HOST:PORT" or a file path'),
    Key("log_level", choice(*LOG_LEVELS), "info", "least severe message logged; access logs are info"),
    Key("admin_socket", optional_text, None, "unix socket path for the runtime API"),
    Key("splice", boolean, True, "relay with os.splice (zero-copy); false copies through Python"),
    Key("worker_timeout", duration_at_least(2.0), 10.0, "a worker silent this long (no heartbeat) is killed and replaced"),
    Key("ulimit_n", integer(0, 1 << 24), 0, "open files allowed to each worker (RLIMIT_NOFILE), "
        "0 = the hard limit"),
    Key("max_draining", integer(1, 100), 2,
        "old generations allowed to drain at once; a reload beyond it stops the oldest now"),
)

FRONTEND_KEYS = (
    Key("bind", bind_list, REQUIRED, "addresses to listen on", inheritable=False),
    Key("mode", choice("tcp", "http"), "tcp", '"tcp" relays bytes; "http" parses HTTP/1.x'),
    Key("backend", name, REQUIRED, "backend used when no route matches"),
    Key("maxconn", integer(1, 1_000_000), 10000, "client connections per worker for this frontend"),
    Key("half_close", boolean, False, "tcp mode: pass each FIN on instead of ending at the client's"),
    Key("timeout_client", timeout, 60.0, "inactivity allowed on the client side"),
    Key("timeout_fin", timeout, 5.0, "inactivity allowed once one side has closed"),
    Key("timeout_http_request", timeout, 10.0, "http mode: time to receive a complete request head "
        "(unset: at most timeout_client)"),
    Key("timeout_http_keep_alive", timeout, 10.0, "http mode: idle time allowed between requests "
        "(unset: at most timeout_client)"),
    Key("max_header_size", integer(256, 1 << 20), 16384, "http mode: largest request head (431 beyond)"),
    Key("max_request_line", integer(64, 1 << 20), 8192, "http mode: longest request line (414 beyond)"),
    Key("max_body_size", integer(0, 1 << 62), 0, "http mode: largest request body, 0 = no limit (413)"),
    Key("errorfiles", errorfiles, {}, "http mode: status code = file sent instead of the built-in page"),
    Key("routes", None, (), "http mode: ordered list of routes, first match wins", inheritable=False),
)

BACKEND_KEYS = (
    Key("servers", None, REQUIRED, "the servers of this backend", inheritable=False),
    Key("balance", choice("roundrobin", "leastconn", "source", "random", "first"), "roundrobin",
        "how a server is chosen"),
    Key("timeout_connect", timeout, 5.0, "time allowed to connect to a server"),
    Key("timeout_server", timeout, 60.0, "inactivity allowed on the server side"),
    Key("timeout_queue", timeout, 5.0, "time a connection may wait for a server under maxconn"),
    Key("retries", integer(0, 100), 3, "connection attempts after the first, each on another server"),
    Key("http_reuse", boolean, False, "http mode: pool keep-alive server connections (false = RST after "
        "each response)"),
    Key("forwardfor", boolean, True, "http mode: add X-Forwarded-For and X-Forwarded-Proto"),
    Key("send_proxy", send_proxy, None, 'PROXY protocol to servers: false, "v1" or "v2"'),
    Key("health_check", None, None, "active health checks (table, see below)"),
)

SERVER_KEYS = (
    Key("name", name, REQUIRED, "server name, unique in its backend"),
    Key("address", server_address, REQUIRED, '"IPv4:port", "[IPv6]:port" or "name:port"'),
    Key("weight", integer(0, 256), 1, "share of new connections; 0 = none unless all others are 0"),
    Key("maxconn", integer(0, 1_000_000), 0,
        "concurrent connections from all workers together, 0 = no limit"),
    Key("backup", boolean, False, "used only when no non-backup server is available"),
)

HEALTH_CHECK_KEYS = (
    Key("interval", duration, 2.0, "time between checks"),
    Key("timeout", duration, 1.0, "time a check may take"),
    Key("rise", integer(1, 1000), 2, "consecutive successes to mark a server up"),
    Key("fall", integer(1, 1000), 3, "consecutive failures to mark a server down"),
    Key("http_path", path_prefix, None, "GET this path and expect 2xx/3xx; unset = TCP connect check"),
)

ROUTE_KEYS = (
    Key("host", host_name, None, "Host header to match, without port, case-insensitive"),
    Key("path_prefix", path_prefix, None, "path prefix to match"),
    Key("backend", name, REQUIRED, "backend for requests that match"),
)

SECTIONS = {
    "global": GLOBAL_KEYS,
    "frontends.NAME": FRONTEND_KEYS,
    "backends.NAME": BACKEND_KEYS,
    "backends.NAME.servers[]": SERVER_KEYS,
    "backends.NAME.health_check": HEALTH_CHECK_KEYS,
    "frontends.NAME.routes[]": ROUTE_KEYS,
}


# ----------------------------------------------------------- typed config objects

@dataclass(frozen=True)
class GlobalConfig:
    workers: int
    user: str | None
    group: str | None
    pidfile: str | None
    maxconn: int
    grace: float
    log: str
    log_level: str
    admin_socket: str | None
    splice: bool
    worker_timeout: float
    ulimit_n: int
    max_draining: int


@dataclass(frozen=True)
class Route:
    host: str | None
    path_prefix: str | None
    backend: str


@dataclass(frozen=True)
class FrontendConfig:
    name: str
    bind: tuple[Address, ...]
    mode: str
    backend: str
    maxconn: int
    half_close: bool
    timeout_client: float
    timeout_fin: float
    timeout_http_request: float
    timeout_http_keep_alive: float
    max_header_size: int
    max_request_line: int
    max_body_size: int
    errorfiles: dict
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class ServerConfig:
    name: str
    address: Address
    weight: int
    maxconn: int
    backup: bool


@dataclass(frozen=True)
class HealthCheck:
    interval: float
    timeout: float
    rise: int
    fall: int
    http_path: str | None


@dataclass(frozen=True)
class BackendConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    balance: str
    timeout_connect: float
    timeout_server: float
    timeout_queue: float
    retries: int
    http_reuse: bool
    forwardfor: bool
    send_proxy: str | None
    health_check: HealthCheck | None


@dataclass(frozen=True)
class Config:
    filename: str
    global_: GlobalConfig
    frontends: dict[str, FrontendConfig] = field(default_factory=dict)
    backends: dict[str, BackendConfig] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()   # valid but risky settings, said by --check and at (re)load


# ---------------------------------------------------------------------- loading

def load(filename: str) -> Config:
    """Read, parse and validate FILE; raise ConfigError naming the key path."""
    try:
        with open(filename, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror}", filename) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"invalid TOML: {e}", filename) from None
    try:
        return build(raw, filename)
    except ConfigError as e:
        e.filename = filename
        raise


def build(raw: dict, filename: str = "") -> Config:
    _check_keys(raw, {"global", "defaults", "frontends", "backends"}, "")
    defaults = _table(raw.get("defaults", {}), "defaults")
    inheritable = {k.name: k for k in FRONTEND_KEYS + BACKEND_KEYS if k.inheritable}
    _check_keys(defaults, inheritable, "defaults")

    global_ = GlobalConfig(**_section(_table(raw.get("global", {}), "global"), GLOBAL_KEYS, "global"))
    backends = {n: _backend(n, b, defaults) for n, b in _named_tables(raw, "backends").items()}
    frontends = {n: _frontend(n, f, defaults) for n, f in _named_tables(raw, "frontends").items()}
    if not frontends:
        raise ConfigError("frontends", "at least one frontend is needed")
    _check_references(frontends, backends)
    _check_binds(frontends)
    return Config(filename, global_, frontends, backends, _warnings(raw, defaults))


def _warnings(raw: dict, defaults: dict) -> tuple[str, ...]:
    """Every timeout set to 0 (no timeout), by the key path that set it."""
    tables = [("defaults", defaults)] + [(f"{section}.{table_name}", table)
                                         for section in ("frontends", "backends")
                                         for table_name, table in raw.get(section, {}).items()]
    return tuple(f"{path}.{key} = 0: no timeout; a peer that goes silent holds its connection for ever"
                 for path, table in tables for key, value in table.items()
                 if key.startswith("timeout_") and timeout(value, path) == float("inf"))


def _table(raw: Any, path: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a table, got {raw!r}")
    return raw


def _named_tables(raw: dict, section: str) -> dict:
    tables = _table(raw.get(section, {}), section)
    for table_name, value in tables.items():
        name(table_name, f"{section}.{table_name}")
        _table(value, f"{section}.{table_name}")
    return tables


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean \"{close[0]}\"?)" if close else ""


def _check_keys(raw: dict, known, path: str) -> None:
    for key in raw:
        if key not in known:
            where = f"{path}.{key}" if path else key
            raise ConfigError(where, f"unknown key{_did_you_mean(key, known)}")


def _section(raw: dict, keys: tuple[Key, ...], path: str, defaults: dict | None = None) -> dict:
    """Typed values for KEYS from RAW, falling back to DEFAULTS then each key's default."""
    _check_keys(raw, {k.name for k in keys}, path)
    values = {}
    for key in keys:
        if key.name in raw:
            value, where = raw[key.name], f"{path}.{key.name}"
        elif defaults is not None and key.inheritable and key.name in defaults:
            value, where = defaults[key.name], f"defaults.{key.name}"
        elif key.default is REQUIRED:
            raise ConfigError(f"{path}.{key.name}", "missing (this key is required)")
        else:
            values[key.name] = key.default if key.default is None or not key.parse else key.parse(key.default, path)
            continue
        values[key.name] = key.parse(value, where) if key.parse else value
    return values


def _frontend(fe_name: str, raw: dict, defaults: dict) -> FrontendConfig:
    path = f"frontends.{fe_name}"
    values = _section(raw, FRONTEND_KEYS, path, defaults)
    routes = values["routes"]
    if not isinstance(routes, (list, tuple)):
        raise ConfigError(f"{path}.routes", f"expected a list of tables, got {routes!r}")
    if routes and values["mode"] != "http":
        raise ConfigError(f"{path}.routes", "routes need mode = \"http\"")
    values["routes"] = tuple(_route(r, f"{path}.routes[{i}]") for i, r in enumerate(routes))
    for key in ("timeout_http_request", "timeout_http_keep_alive"):
        # Unset, they fall back to timeout_client when it is shorter (as
        # HAProxy's fall back to `timeout client`): a user who sets
        # timeout_client = "1s" sees a silent client closed after a second.
        if key not in raw and key not in defaults:
            values[key] = min(values[key], values["timeout_client"])
    return FrontendConfig(name=fe_name, **values)


def _route(raw: Any, path: str) -> Route:
    values = _section(_table(raw, path), ROUTE_KEYS, path)
    if values["host"] is None and values["path_prefix"] is None:
        raise ConfigError(path, "a route needs host, path_prefix or both")
    return Route(**values)


def _backend(be_name: str, raw: dict, defaults: dict) -> BackendConfig:
    path = f"backends.{be_name}"
    values = _section(raw, BACKEND_KEYS, path, defaults)
    servers = values["servers"]
    if not isinstance(servers, list) or not servers:
        raise ConfigError(f"{path}.servers", "expected a non-empty list of servers")
    values["servers"] = tuple(_server(s, f"{path}.servers[{i}]") for i, s in enumerate(servers))
    seen = set()
    for i, server in enumerate(values["servers"]):
        if server.name in seen:
            raise ConfigError(f"{path}.servers[{i}].name", f"server name {server.name!r} is used twice")
        seen.add(server.name)
    check = values["health_check"]
    if check is not None:
        where = f"{path}.health_check" if "health_check" in raw else "defaults.health_check"
        values["health_check"] = HealthCheck(**_section(_table(check, where), HEALTH_CHECK_KEYS, where))
    return BackendConfig(name=be_name, **values)


def _server(raw: Any, path: str) -> ServerConfig:
    return ServerConfig(**_section(_table(raw, path), SERVER_KEYS, path))


def _check_references(frontends: dict, backends: dict) -> None:
    for fe in frontends.values():
        wanted = [(f"frontends.{fe.name}.backend", fe.backend)]
        wanted += [(f"frontends.{fe.name}.routes[{i}].backend", r.backend) for i, r in enumerate(fe.routes)]
        for path, backend in wanted:
            if backend not in backends:
                raise ConfigError(path, f"no backend named {backend!r}{_did_you_mean(backend, backends)}")


def _check_binds(frontends: dict) -> None:
    owner = {}
    for fe in frontends.values():
        for i, addr in enumerate(fe.bind):
            if addr in owner:
                raise ConfigError(f"frontends.{fe.name}.bind[{i}]",
                                  f"{addr} is already bound by frontend {owner[addr]!r}")
            owner[addr] = fe.name
