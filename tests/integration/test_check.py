"""`proxyd -c FILE --check`: exit 0 and a message on valid files, exit 1 with
the file and the TOML key path on invalid ones; a running proxy is not touched."""

from __future__ import annotations

import pytest

from tests.support import REPO, connect, free_port, echo_handler, recv_exactly, run_proxyd, tcp_config, write_config

GOOD = """
[global]
workers = 1

[frontends.web]
bind = ["127.0.0.1:18080"]
backend = "app"

[backends.app]
servers = [
  { name = "s1", address = "127.0.0.1:18081" },
  { name = "s2", address = "127.0.0.1:18082" },
]
"""

GOOD_FULL = """
[global]
workers = "auto"
maxconn = 5
grace = "1s"
log = "stderr"
log_level = "debug"
splice = false

[defaults]
mode = "tcp"
timeout_connect = "250ms"
timeout_client = 60
timeout_server = "2m"
retries = 0

[frontends.a]
bind = "127.0.0.1:18090"
backend = "one"
half_close = true
timeout_fin = "1.5s"

[frontends.b]
bind = ["127.0.0.1:18091", "[::1]:18091"]
backend = "two"

[backends.one]
balance = "leastconn"
servers = [{ name = "s1", address = "127.0.0.1:18092", weight = 3, maxconn = 10 }]

[backends.two]
balance = "first"
health_check = { interval = "1s", timeout = "500ms", rise = 1, fall = 2 }
servers = [
  { name = "a", address = "[::1]:18093" },
  { name = "b", address = "127.0.0.1:18094", backup = true },
]
"""


def check(tmp_path, text: str, name: str = "proxyd.toml"):
    path = write_config(tmp_path, text, name)
    return path, run_proxyd("-c", str(path), "--check")


def test_check_example_config():
    path = REPO / "etc" / "proxyd.toml"
    result = run_proxyd("-c", str(path), "--check")
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    assert str(path) in result.stdout


@pytest.mark.parametrize("text", [GOOD, GOOD_FULL], ids=["minimal", "many-keys"])
def test_check_good_configs(tmp_path, text):
    path, result = check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"proxyd: {path}: configuration is valid"


BAD = {
    "unknown-key": (GOOD.replace('backend = "app"', 'bakend = "app"'),
                    "frontends.web.bakend", ["did you mean", "backend"]),
    "bad-server-address": (GOOD.replace('"127.0.0.1:18082"', '"10.0.0.1"'),
                           "backends.app.servers[1].address", ["10.0.0.1"]),
    "unknown-backend": (GOOD.replace('backend = "app"', 'backend = "nope"'),
                        "frontends.web.backend", ["nope"]),
    "bad-duration": (GOOD.replace('backend = "app"', 'backend = "app"\ntimeout_client = "5 parsecs"'),
                     "frontends.web.timeout_client", ["5 parsecs"]),
    "bad-duration-in-defaults": (GOOD + '\n[defaults]\ntimeout_connect = "soon"\n',
                                 "defaults.timeout_connect", ["soon"]),
    "missing-required": (GOOD.replace('bind = ["127.0.0.1:18080"]\n', ""), "frontends.web.bind", ["missing"]),
    "toml-syntax": (GOOD.replace('workers = 1', 'workers = = 1'), None, []),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_check_bad_configs(tmp_path, case):
    text, key_path, words = BAD[case]
    path, result = check(tmp_path, text)
    assert result.returncode == 1, (result.stdout, result.stderr)
    message = result.stderr.strip()
    assert message.startswith(f"proxyd: {path}: "), message
    if key_path:
        assert f": {key_path}: " in message, message
    for word in words:
        assert word in message, message
    assert "Traceback" not in result.stderr
    assert "configuration is valid" not in result.stdout


def test_check_missing_file(tmp_path):
    path = tmp_path / "nowhere.toml"
    result = run_proxyd("-c", str(path), "--check")
    assert result.returncode == 1
    assert result.stderr.startswith(f"proxyd: {path}: "), result.stderr
    assert "Traceback" not in result.stderr


def test_check_leaves_running_proxy_alone(tmp_path, backend, tcp_proxy):
    """--check validates only: run against the running proxy's own file (its
    ports are in use) and against a broken file, the proxy keeps its pids,
    keeps serving, and logs nothing about it."""
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo])
    pids = proxy.worker_pids()
    log_before = proxy.log_lines()

    own = run_proxyd("-c", str(proxy.config_path), "--check")
    bad_text = proxy.config_path.read_text().replace("[frontends.fe]", "[frontends.fe]\nbindd = 1")
    _, bad = check(tmp_path, bad_text, "broken.toml")

    assert own.returncode == 0, own.stderr
    assert bad.returncode == 1
    assert "frontends.fe.bindd" in bad.stderr
    assert proxy.running()
    assert proxy.worker_pids() == pids
    assert proxy.log_lines() == log_before
    with connect(proxy.port) as client:
        client.sendall(b"still here\n")
        assert recv_exactly(client, 11) == b"still here\n"


def test_invalid_config_does_not_start(proxyd):
    port = free_port()
    config = tcp_config(port, ["127.0.0.1:1"], frontend={"timeout_client": "forever"})
    p = proxyd(config, wait=False)
    assert p.wait_exit(15) == 1
    assert "frontends.fe.timeout_client" in p.log_text()
    assert p.workers() == []


THREE_MISTAKES = (GOOD.replace("workers = 1", "worker = 1")
                  .replace('backend = "app"', 'backend = "app"\ntimeout_client = "5 parsecs"')
                  .replace('"127.0.0.1:18082"', '"10.0.0.1"'))


def test_check_names_every_problem_at_once(tmp_path):
    """A misspelt key, a bad duration and a bad address: one run, three lines,
    in the order of the file, each with the file and the key path."""
    path, result = check(tmp_path, THREE_MISTAKES)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [
        f'proxyd: {path}: global.worker: unknown key (did you mean "workers"?)',
        (f'proxyd: {path}: frontends.web.timeout_client: expected a duration like "250ms", "5s" or "2m", '
         "got '5 parsecs'"),
        (f'proxyd: {path}: backends.app.servers[1].address: expected "IPv4:port", "[IPv6]:port" or '
         "\"name:port\", got '10.0.0.1'"),
    ]
    assert result.stdout == ""


def test_start_names_every_problem_and_does_not_start(proxyd):
    p = proxyd(THREE_MISTAKES, wait=False)
    assert p.wait_exit(15) == 1
    log = p.log_text()
    for key_path in ("global.worker", "frontends.web.timeout_client", "backends.app.servers[1].address"):
        assert f": {key_path}: " in log, log
    assert p.workers() == []


def test_check_accepts_server_names(tmp_path):
    path, result = check(tmp_path, GOOD.replace('"127.0.0.1:18082"', '"localhost:18082"'))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"proxyd: {path}: configuration is valid"


def test_check_refuses_a_name_that_does_not_resolve(tmp_path):
    path, result = check(tmp_path, GOOD.replace('"127.0.0.1:18082"', '"nosuch.invalid:18082"'))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f'proxyd: {path}: backends.app.servers[1].address: cannot resolve "nosuch.invalid": '), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_check_refuses_a_name_to_listen_on(tmp_path):
    path, result = check(tmp_path, GOOD.replace('bind = ["127.0.0.1:18080"]', 'bind = ["localhost:18080"]'))
    assert result.returncode == 1
    assert result.stderr.startswith(f"proxyd: {path}: frontends.web.bind[0]: 'localhost' is not an IP address")
