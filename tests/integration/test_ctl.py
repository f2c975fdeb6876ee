"""`proxyd ctl` and `proxyd -c FILE --check --diff`, against a real proxyd.

ctl sends one runtime-API command and prints the answer; --check --diff
asks the running proxyd for its configuration (`show config`) and prints
what a reload of FILE would change, without changing anything.
"""

from __future__ import annotations

import copy

from tests import support
from tests.support import free_port, run_proxyd, wait_for


def base_config(tmp_path, echo) -> dict:
    config = support.tcp_config(free_port(), [echo, echo], workers=2,
                                global_={"admin_socket": str(tmp_path / "admin.sock")})
    config["backends"]["be"]["servers"][1]["weight"] = 3
    return config


def test_ctl_sends_a_command_and_prints_the_answer(tmp_path, backend, proxyd):
    echo = backend(support.echo_handler)
    config = base_config(tmp_path, echo)
    p = proxyd(config)
    path = config["global"]["admin_socket"]
    done = run_proxyd("ctl", "-s", path, "show", "info")
    assert done.returncode == 0, done.stderr
    assert f"Pid: {p.pid}\n" in done.stdout and "Name: proxyd\n" in done.stdout
    # -c FILE: the socket its admin_socket names
    done = run_proxyd("ctl", "-c", str(p.config_path), "set", "weight", "be/s1", "7")
    assert done.returncode == 0 and done.stdout == "", (done.stdout, done.stderr)
    state = run_proxyd("ctl", "-s", path, "show", "servers", "state").stdout.splitlines()
    s1 = next(line.split() for line in state if line.split()[3:4] == ["s1"])
    assert s1[7] == "7", state   # srv_uweight
    done = run_proxyd("ctl", "-s", path, "no", "such", "command")
    assert done.returncode == 0 and done.stdout.startswith("Unknown command: 'no such command'"), done.stdout


def test_ctl_says_why_when_no_socket_answers(tmp_path):
    missing = run_proxyd("ctl", "-s", str(tmp_path / "none.sock"), "show", "info")
    assert missing.returncode == 1 and "no such file" in missing.stderr, missing.stderr
    stale = tmp_path / "stale.sock"
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()   # bound, never listening: a socket file nobody serves
    refused = run_proxyd("ctl", "-s", str(stale), "show", "info")
    assert refused.returncode == 1 and "refused" in refused.stderr, refused.stderr


def test_check_diff_prints_each_kind_of_change_and_changes_nothing(tmp_path, backend, proxyd):
    echo = backend(support.echo_handler)
    config = base_config(tmp_path, echo)
    config["backends"]["old"] = {"servers": [{"name": "o1", "address": echo.address}]}
    p = proxyd(config)
    before = run_proxyd("ctl", "-c", str(p.config_path), "show", "config").stdout

    new = copy.deepcopy(config)
    new["global"]["workers"] = 3
    new["frontends"]["fe"]["timeout_client"] = "30s"
    servers = new["backends"]["be"]["servers"]
    servers[1]["weight"] = 5                                    # a server changed
    servers.append({"name": "s3", "address": echo.address})     # a server added
    del new["backends"]["old"]                                  # a backend removed
    new["backends"]["extra"] = {"servers": [{"name": "x1", "address": echo.address}]}   # and added
    new_file = support.write_config(tmp_path, new, "new.toml")
    done = run_proxyd("-c", str(new_file), "--check", "--diff")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("configuration is valid")
    expected = ["global: workers 2 -> 3", "frontend fe: timeout_client 60 -> 30", "backend be: server s2: weight 3 -> 5",
                "backend old removed"]
    for line in expected:
        assert line in lines, done.stdout
    assert any(line.startswith("backend be: server s3 added") for line in lines), done.stdout
    assert any(line.startswith("backend extra added") for line in lines), done.stdout

    # Nothing changed in the running proxyd: same config, same workers, same answer.
    assert run_proxyd("ctl", "-c", str(p.config_path), "show", "config").stdout == before
    assert "Generation: 1\n" in run_proxyd("ctl", "-c", str(p.config_path), "show", "info").stdout

    same = run_proxyd("-c", str(p.config_path), "--check", "--diff")
    assert same.returncode == 0 and "no change from the running configuration" in same.stdout, same.stdout


def test_check_diff_needs_an_admin_socket(tmp_path, backend):
    echo = backend(support.echo_handler)
    config = support.tcp_config(free_port(), [echo])
    path = support.write_config(tmp_path, config, "plain.toml")
    done = run_proxyd("-c", str(path), "--check", "--diff")
    assert done.returncode == 1 and "admin_socket is not set" in done.stderr, done.stderr
    config["global"]["admin_socket"] = str(tmp_path / "nobody.sock")
    path = support.write_config(tmp_path, config, "nobody.toml")
    done = run_proxyd("-c", str(path), "--check", "--diff")
    assert done.returncode == 1 and "no such file" in done.stderr, done.stderr


def test_admin_socket_mode_is_applied_and_the_socket_removed_on_exit(tmp_path, backend, proxyd):
    import os
    import stat
    echo = backend(support.echo_handler)
    config = base_config(tmp_path, echo)
    config["global"]["admin_socket_mode"] = "0660"
    p = proxyd(config)
    path = config["global"]["admin_socket"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    p.stop()
    wait_for(lambda: not os.path.exists(path), 10, "the admin socket removed at exit")
