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
from dataclasses import fields as dataclass_fields
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

    @property
    def errors(self) -> list[ConfigError]:
        """The problems this error stands for: itself (see ConfigErrors)."""
        return [self]


class ConfigErrors(ConfigError):
    """Every independent problem found in one file, in file order.

    str() is one line per problem.  path, message and filename are the first
    problem's, so that a caller written for one ConfigError still works.
    """

    def __init__(self, errors: list[ConfigError], filename: str = ""):
        unique = {}
        for error in errors:
            # a bad value in [defaults] is met once per section that inherits it
            unique.setdefault((error.path, error.message), error)
        self._errors = list(unique.values())
        for error in self._errors:
            error.filename = filename or error.filename
        first = self._errors[0]
        super().__init__(first.path, first.message, first.filename)

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self._errors)

    @property
    def errors(self) -> list[ConfigError]:
        return self._errors


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


def file_mode(raw: Any, path: str) -> str:
    """An octal permission string such as "0600" or "660" (int(value, 8) to use it)."""
    if not isinstance(raw, str) or not re.fullmatch(r"0?[0-7]{3}", raw):
        raise ConfigError(path, f'expected an octal mode such as "0600", got {raw!r}')
    return raw


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
    addresses = _parse_each(Address.parse, [(item, f"{path}[{i}]") for i, item in enumerate(items)])
    errors = [ConfigError(f"{path}[{i}]", f"{addr} is listed twice")
              for i, addr in enumerate(addresses) if addr in addresses[:i]]
    if errors:
        raise ConfigErrors(errors)
    return tuple(addresses)


def optional_bind_list(raw: Any, path: str) -> tuple[Address, ...]:
    """As bind_list, where an empty list means none."""
    return () if raw in ((), []) else bind_list(raw, path)


def _parse_each(parse: Callable[[Any, str], Any], items: list[tuple[Any, str]]) -> list:
    """parse(raw, path) for every item; one bad item does not hide the next."""
    values, errors = [], []
    for raw, path in items:
        try:
            values.append(parse(raw, path))
        except ConfigError as e:
            errors.extend(e.errors)
    if errors:
        raise ConfigErrors(errors)
    return values


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
    items = [((status, filename), f"{path}.{status}") for status, filename in raw.items()]
    return dict(_parse_each(_errorfile, items))


def _errorfile(item: tuple[str, Any], path: str) -> tuple[int, str]:
    status, filename = item
    if not status.isdigit() or not 400 <= int(status) <= 599:
        raise ConfigError(path, "expected an HTTP status code from 400 to 599")
    filename = text(filename, path)
    if not os.path.isfile(filename):
        raise ConfigError(path, f"no such file: {filename}")
    return int(status), os.path.abspath(filename)  # a daemon runs from /


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
    Key("syslog_format", choice("rfc3164", "rfc5424"), "rfc3164", "framing of syslog messages "
        "(log = \"syslog...\")"),
    Key("admin_socket", optional_text, None, "unix socket path for the runtime API"),
    Key("admin_socket_mode", file_mode, "0600", 'permissions of the admin socket, an octal string ("0600")'),
    Key("stats_bind", optional_bind_list, (), "addresses of the stats listener: /metrics (Prometheus), /stats (JSON), "
        "/ (HTML)"),
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
    Key("interval", duration_at_least(0.01), 2.0, "time between checks"),
    Key("timeout", duration_at_least(0.001), 1.0, "time a check may take"),
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
    syslog_format: str
    admin_socket: str | None
    admin_socket_mode: str
    stats_bind: tuple[Address, ...]
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
    """Read, parse and validate FILE; raise ConfigErrors naming every problem
    (file, key path, what is wrong) in file order."""
    try:
        with open(filename, "rb") as f:
            source = f.read().decode()
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror}", filename) from None
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise ConfigError("", f"not UTF-8 text (TOML must be): line {line} has byte {e.object[e.start]:#04x}",
                          filename) from None
    try:
        raw = tomllib.loads(source)
    except tomllib.TOMLDecodeError as e:
        # nothing below makes sense on a half-read file: this is the only error
        raise ConfigError("", f"invalid TOML: {e}", filename) from None
    return _build_or_raise(raw, filename, source)


def build(raw: dict, filename: str = "") -> Config:
    """A Config from a parsed TOML table; raise ConfigErrors naming every problem."""
    return _build_or_raise(raw, filename, "")


def _build_or_raise(raw: dict, filename: str, source: str) -> Config:
    builder = _Builder()
    config = builder.config(raw, filename)
    if builder.errors:
        raise ConfigErrors(_in_file_order(builder.errors, raw, source), filename)
    return config


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


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean \"{close[0]}\"?)" if close else ""


def _given(key: Key, raw: dict, defaults: dict | None) -> bool:
    """Whether RAW sets KEY or inherits it from DEFAULTS."""
    return key.name in raw or (defaults is not None and key.inheritable and key.name in defaults)


def _key_value(key: Key, raw: dict, path: str, defaults: dict | None) -> Any:
    """KEY's typed value: RAW's, else inherited from DEFAULTS, else KEY's default."""
    if key.name in raw:
        value, where = raw[key.name], f"{path}.{key.name}"
    elif defaults is not None and key.inheritable and key.name in defaults:
        value, where = defaults[key.name], f"defaults.{key.name}"
    elif key.default is REQUIRED:
        raise ConfigError(f"{path}.{key.name}", "missing (this key is required)")
    else:
        return key.default if key.default is None or not key.parse else key.parse(key.default, path)
    return key.parse(value, where) if key.parse else value


INVALID = object()  # a value that failed its check; the error is already recorded


class _Builder:
    """Turns the TOML dictionary into a Config, recording every independent
    error on the way instead of stopping at the first: a value that fails
    is left out, and only what depends on it goes unchecked.  Each method
    returns its typed object, or INVALID when some part of it failed."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.backend_names: set[str] | None = None  # None: [backends] unreadable, references unchecked
        self.bound: dict[Address, str] = {}         # listening address -> who has it ("frontend 'web'", "stats_bind")

    def attempt(self, check: Callable, *args) -> Any:
        """check(*args), or INVALID once its error is recorded."""
        try:
            return check(*args)
        except ConfigError as e:
            self.errors.extend(e.errors)
            return INVALID

    def fail(self, path: str, message: str) -> None:
        self.errors.append(ConfigError(path, message))

    def table(self, raw: Any, path: str) -> dict | None:
        value = self.attempt(_table, raw, path)
        return None if value is INVALID else value

    def check_keys(self, raw: dict, known, path: str) -> set[str]:
        """Record each unknown key of RAW; return the known keys they were hinted at."""
        hinted = set()
        for key in raw:
            if key not in known:
                hint = difflib.get_close_matches(key, list(known), n=1)
                hinted.update(hint)
                self.fail(f"{path}.{key}" if path else key, f"unknown key{_did_you_mean(key, known)}")
        return hinted

    def section(self, raw: dict, keys: tuple[Key, ...], path: str, defaults: dict | None = None) -> dict:
        """Typed values of KEYS from RAW; a key whose value fails is left out."""
        return self.values(raw, keys, path, defaults, self.check_keys(raw, [k.name for k in keys], path))

    def values(self, raw: dict, keys: tuple[Key, ...], path: str, defaults: dict | None, hinted: set[str]) -> dict:
        values = {}
        for key in keys:
            if key.name in hinted and key.default is REQUIRED and not _given(key, raw, defaults):
                continue  # "missing" would repeat the misspelling's own error
            value = self.attempt(_key_value, key, raw, path, defaults)
            if value is not INVALID:
                values[key.name] = value
        return values

    @staticmethod
    def complete(kind: type, values: dict, **fixed) -> Any:
        """kind(**values, **fixed), or INVALID when a value is missing or failed."""
        wanted = {f.name for f in dataclass_fields(kind)} - set(fixed)
        if set(values) != wanted or any(v is INVALID for v in values.values()):
            return INVALID
        return kind(**values, **fixed)

    # ------------------------------------------------------------ the file
    def config(self, raw: dict, filename: str) -> Config | None:
        self.check_keys(raw, ("global", "defaults", "frontends", "backends"), "")
        defaults = self.defaults(raw.get("defaults", {}))
        global_ = self.complete(GlobalConfig, self.global_table(raw.get("global", {})))
        backend_tables = self.named_tables(raw, "backends")
        frontend_tables = self.named_tables(raw, "frontends")
        if defaults is None:
            return None  # what every frontend and backend inherits is unknown
        if backend_tables is not None:
            self.backend_names = set(raw["backends"]) if "backends" in raw else set()
        backends = {n: self.backend(n, t, defaults) for n, t in (backend_tables or {}).items()}
        frontends = {n: self.frontend(n, t, defaults) for n, t in (frontend_tables or {}).items()}
        if frontend_tables is not None and not raw.get("frontends"):
            self.fail("frontends", "at least one frontend is needed")
        if self.errors:
            return None
        return Config(filename, global_, frontends, backends, _warnings(raw, defaults))

    def global_table(self, raw: Any) -> dict:
        table = self.table(raw, "global")
        values = {} if table is None else self.section(table, GLOBAL_KEYS, "global")
        for addr in values.get("stats_bind", ()):
            self.bound[addr] = "stats_bind"
        return values

    def defaults(self, raw: Any) -> dict | None:
        """[defaults], each value checked once here, whether inherited or not."""
        table = self.table(raw, "defaults")
        if table is None:
            return None
        inheritable = {k.name: k for k in FRONTEND_KEYS + BACKEND_KEYS if k.inheritable}
        self.check_keys(table, inheritable, "defaults")
        for key_name, value in table.items():
            key = inheritable.get(key_name)
            if key and key.parse:
                self.attempt(key.parse, value, f"defaults.{key_name}")
        if table.get("health_check") is not None:
            self.health_check(table["health_check"], "defaults.health_check")
        return table

    def named_tables(self, raw: dict, section: str) -> dict | None:
        """{name: table} of [SECTION.NAME] tables, None if SECTION is not a table."""
        tables = self.table(raw.get(section, {}), section)
        if tables is None:
            return None
        readable = {}
        for table_name, value in tables.items():
            self.attempt(name, table_name, f"{section}.{table_name}")
            table = self.table(value, f"{section}.{table_name}")
            if table is not None:
                readable[table_name] = table
        return readable

    def check_reference(self, backend: Any, path: str) -> None:
        if self.backend_names is not None and isinstance(backend, str) and backend not in self.backend_names:
            self.fail(path, f"no backend named {backend!r}{_did_you_mean(backend, self.backend_names)}")

    # ------------------------------------------------------------ frontends
    def frontend(self, fe_name: str, raw: dict, defaults: dict) -> FrontendConfig:
        path = f"frontends.{fe_name}"
        values = self.section(raw, FRONTEND_KEYS, path, defaults)
        self.check_reference(values.get("backend"), f"{path}.backend")
        self.claim_binds(fe_name, values.get("bind", ()))
        if "routes" in values:
            values["routes"] = self.routes(values["routes"], values.get("mode"), f"{path}.routes")
        _cap_http_timeouts(values, raw, defaults)
        return self.complete(FrontendConfig, values, name=fe_name)

    def claim_binds(self, fe_name: str, addresses: tuple[Address, ...]) -> None:
        for i, addr in enumerate(addresses):
            if addr in self.bound:
                self.fail(f"frontends.{fe_name}.bind[{i}]", f"{addr} is already bound by {self.bound[addr]}")
            else:
                self.bound[addr] = f"frontend {fe_name!r}"

    def routes(self, raw: Any, mode: str | None, path: str) -> tuple[Route, ...]:
        if not isinstance(raw, (list, tuple)):
            self.fail(path, f"expected a list of tables, got {raw!r}")
            return INVALID
        if raw and mode not in (None, "http"):  # None: mode itself is wrong, already said
            self.fail(path, "routes need mode = \"http\"")
        routes = tuple(self.route(r, f"{path}[{i}]") for i, r in enumerate(raw))
        return INVALID if any(r is INVALID for r in routes) else routes

    def route(self, raw: Any, path: str) -> Route:
        table = self.table(raw, path)
        if table is None:
            return INVALID
        hinted = self.check_keys(table, [k.name for k in ROUTE_KEYS], path)
        values = self.values(table, ROUTE_KEYS, path, None, hinted)
        self.check_reference(values.get("backend"), f"{path}.backend")
        if not {"host", "path_prefix"} & (set(table) | hinted):
            self.fail(path, "a route needs host, path_prefix or both")
            return INVALID
        return self.complete(Route, values)

    # ------------------------------------------------------------- backends
    def backend(self, be_name: str, raw: dict, defaults: dict) -> BackendConfig:
        path = f"backends.{be_name}"
        values = self.section(raw, BACKEND_KEYS, path, defaults)
        if "servers" in values:
            values["servers"] = self.servers(values["servers"], f"{path}.servers")
        if values.get("health_check") is not None:
            where = f"{path}.health_check" if "health_check" in raw else "defaults.health_check"
            values["health_check"] = self.health_check(values["health_check"], where)
        return self.complete(BackendConfig, values, name=be_name)

    def servers(self, raw: Any, path: str) -> tuple[ServerConfig, ...]:
        if not isinstance(raw, list) or not raw:
            self.fail(path, "expected a non-empty list of servers")
            return INVALID
        servers, seen = [], set()
        for i, item in enumerate(raw):
            table = self.table(item, f"{path}[{i}]")
            values = {} if table is None else self.section(table, SERVER_KEYS, f"{path}[{i}]")
            server_name = values.get("name")
            if server_name in seen:
                self.fail(f"{path}[{i}].name", f"server name {server_name!r} is used twice")
            elif server_name is not None:
                seen.add(server_name)
            servers.append(self.complete(ServerConfig, values))
        return INVALID if any(s is INVALID for s in servers) else tuple(servers)

    def health_check(self, raw: Any, path: str) -> HealthCheck:
        table = self.table(raw, path)
        if table is None:
            return INVALID
        return self.complete(HealthCheck, self.section(table, HEALTH_CHECK_KEYS, path))


def _cap_http_timeouts(values: dict, raw: dict, defaults: dict) -> None:
    """Unset, timeout_http_request and timeout_http_keep_alive fall back to
    timeout_client when it is shorter (as HAProxy's fall back to `timeout
    client`): a user who sets timeout_client = "1s" sees a silent client
    closed after a second."""
    if "timeout_client" not in values:
        return
    for key in ("timeout_http_request", "timeout_http_keep_alive"):
        if key in values and key not in raw and key not in defaults:
            values[key] = min(values[key], values["timeout_client"])


# ------------------------------------------------------------ file order

def _in_file_order(errors: list[ConfigError], raw: dict, source: str) -> list[ConfigError]:
    """ERRORS sorted as their keys come in the file.

    tomllib keeps each table's keys in file order but gathers [frontends.a],
    [frontends.b] under one "frontends" even when [backends.x] sits between
    them; the line of the nearest table header (when SOURCE is known)
    restores that order.
    """
    order = _key_order(raw)
    headers = _header_lines(source, order)

    def position(error: ConfigError) -> tuple[int, int]:
        prefixes = list(_path_prefixes(error.path))
        known = next(p for p in prefixes if p in order)
        header = next((headers[p] for p in prefixes if p in headers), 0)
        return header, order[known]

    return sorted(errors, key=position)  # stable: errors of one key keep their order


def _key_order(raw: dict) -> dict[str, int]:
    """{key path: rank} for every key of RAW, paths spelt as errors spell them."""
    order: dict[str, int] = {}

    def walk(value: Any, path: str) -> None:
        order.setdefault(path, len(order))
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")

    walk(raw, "")
    return order


_PATH_TAIL = re.compile(r"(\.[^.\[]*|\[\d+\])$")


def _path_prefixes(path: str):
    """"a.b[1].c", "a.b[1]", "a.b", "a", "": the path, then each parent."""
    while path:
        yield path
        path = _PATH_TAIL.sub("", path) if _PATH_TAIL.search(path) else ""
    yield ""


_HEADER = re.compile(r"^\s*(\[\[?[^\[\]]+\]\]?)\s*(?:#.*)?$")


def _header_lines(source: str, order: dict[str, int]) -> dict[str, int]:
    """{table path: line} of each "[table]" and "[[array.of.tables]]" header."""
    lines: dict[str, int] = {}
    arrays: dict[str, int] = {}
    for number, line in enumerate(source.splitlines(), 1):
        m = _HEADER.match(line)
        if not m:
            continue
        try:
            table = tomllib.loads(m.group(1))
        except tomllib.TOMLDecodeError:
            continue  # looked like a header but is not one (inside a multi-line string, say)
        path = _only_path(table)
        if m.group(1).startswith("[["):
            arrays[path] = arrays.get(path, -1) + 1
            path = f"{path}[{arrays[path]}]"
        if path in order:
            lines.setdefault(path, number)
    return lines


def _only_path(table: dict) -> str:
    """"a.b" for {"a": {"b": {}}}, the one path a header line parses to."""
    parts = []
    while isinstance(table, (dict, list)) and table:
        if isinstance(table, list):
            table = table[0]
            continue
        (key, table), = table.items()
        parts.append(key)
    return ".".join(parts)
