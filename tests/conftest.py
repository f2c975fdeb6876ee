"""Fixtures: reserved ports, real backends, real proxyd processes.

Every fixture cleans up what it started: backends are closed (threads joined
with a bound), proxyd masters get TERM then KILL by pid, and any worker left
behind is killed by its pid.  When a test fails, the tail of each proxyd log
is printed in the test's report.
"""

from __future__ import annotations

import socket

import pytest

from tests import support
from tests.http_support import HTTPBackend, fill_backlog, http_config
from tests.support import Backend, Proxyd
from tests.tagged import tagged_backend  # noqa: F401 (a fixture for every test module)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def _failed(request) -> bool:
    return any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
               for when in ("setup", "call"))


@pytest.fixture
def reserve_port():
    """reserve_port() -> int: a port held (bound, never listening) until the
    test ends, so connecting to it is refused: "a closed port" for a server
    that refuses, which no other test can take meanwhile."""
    held = []

    def reserve() -> int:
        port, sock = support.reserve_port()
        held.append(sock)
        return port

    yield reserve
    for sock in held:
        sock.close()


@pytest.fixture
def backend():
    """backend(handler, name="backend") -> a running Backend, closed at teardown."""
    started: list[Backend] = []

    def make(handler, name: str = "backend", **kw) -> Backend:
        b = Backend(handler, name=name, **kw)
        started.append(b)
        return b

    yield make
    for b in reversed(started):
        b.close()


@pytest.fixture
def proxyd(request, tmp_path):
    """proxyd(config, ports=None, workers=None, wait=True, extra_args=()) -> a running Proxyd.

    CONFIG is a dict (written as TOML) or TOML text.  Unless WAIT is false,
    waits until every frontend port LISTENs and `workers` workers exist
    (both taken from a dict config when not given).
    """
    started: list[Proxyd] = []

    def start(config, ports=None, workers=None, wait=True, extra_args=()) -> Proxyd:
        n = len(started)
        cfg = support.write_config(tmp_path, config, f"proxyd{n}.toml")
        p = Proxyd(cfg, tmp_path / f"proxyd{n}.log", extra_args)
        if isinstance(config, dict):
            if ports is None:
                ports = [int(addr.rsplit(":", 1)[1]) for fe in config["frontends"].values()
                         for addr in ([fe["bind"]] if isinstance(fe["bind"], str) else fe["bind"])]
            if workers is None:
                workers = config.get("global", {}).get("workers", 2)
        p.ports = list(ports or [])
        p.port = p.ports[0] if p.ports else None
        started.append(p)
        p.start()
        if wait:
            p.wait_ready(p.ports, workers if workers is not None else 2)
        return p

    yield start
    failed = _failed(request)
    for p in reversed(started):
        code = p.stop()
        if failed:
            print(f"---- proxyd {p.config_path.name} (exit {code}) log tail:\n{p.log_tail(60)}")


@pytest.fixture
def tcp_proxy(proxyd):
    """tcp_proxy(servers, **tcp_config_kw) -> a running Proxyd with one tcp
    frontend (p.port, name "fe") and one backend (name "be") on SERVERS."""

    def start(servers, **kw) -> Proxyd:
        # Not reserve_port(): proxyd refuses, rightly, to join a reuseport
        # group that another process has bound (listeners.check_free).
        return proxyd(support.tcp_config(support.free_port(), servers, **kw))

    return start


@pytest.fixture
def load():
    """load(port, duration, processes=4, rate=0, timeout=10) -> started
    support.Load client processes; any still running at teardown are killed."""
    started: list[support.Load] = []

    def start(port: int, duration: float, **kw) -> support.Load:
        clients = support.Load(port, duration, **kw)
        started.append(clients)
        return clients.start()

    yield start
    for clients in started:
        clients.stop()


@pytest.fixture
def http_backend():
    """http_backend(reply=None, name="http", **kw) -> a running HTTPBackend,
    closed at teardown."""
    started: list[HTTPBackend] = []

    def make(reply=None, name: str = "http", **kw) -> HTTPBackend:
        b = HTTPBackend(reply, name=name, **kw)
        started.append(b)
        return b

    yield make
    for b in reversed(started):
        b.close()


@pytest.fixture
def http_proxy(proxyd):
    """http_proxy(backends, splice=True, **http_config_kw) -> a running Proxyd
    with one http frontend "fe" (p.port).  BACKENDS: a list of servers
    (backend "app"), or a dict as http_config takes it."""

    def start(backends, splice: bool = True, **kw) -> Proxyd:
        if not isinstance(backends, dict):
            backends = {"app": list(backends)}
        kw["global_"] = {"splice": splice, **kw.get("global_", {})}
        return proxyd(http_config(support.free_port(), backends, **kw))

    return start


@pytest.fixture
def full_backlog():
    """The address of a listen(0) socket that never accepts, its queue
    filled: the kernel drops further SYNs, so a connect to it hangs until
    it times out (a black-holed server, without root or a namespace)."""
    listener = socket.socket()
    listener.bind((support.LOCALHOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = fill_backlog(port)
    try:
        yield f"{support.LOCALHOST}:{port}"
    finally:
        for s in held:
            s.close()
        listener.close()
