"""Running proxyd as a daemon: -D and -p, the LSB init script
(scripts/proxyd.init) and the systemd unit (etc/proxyd.service).

Every daemon here is a real `python -m proxyd -c CONFIG -D -p PIDFILE` on a
temporary config and pidfile, serving a real backend on 127.0.0.1.  The
`daemons` fixture stops every master it can find for the test's configs, by
the pid in the pidfile or, should the pidfile be missing, by the pid of the
process titled `proxyd: master -c CONFIG`, and then any worker left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests import support
from tests.support import (REPO, START_TIMEOUT, STOP_TIMEOUT, alive, connect, connection_refused,
                           echo_handler, listen_count, recv_exactly, stays, wait_for)

INIT = REPO / "scripts" / "proxyd.init"
UNIT = REPO / "etc" / "proxyd.service"
PROXYD_CMD = f"{sys.executable} -m proxyd"
WORKER = re.compile(r"^proxyd: worker (\d+)/(\d+) gen (\d+)$")
INVALID = ("backends.be.servers[0].address", "10.0.0.1")


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()).strip()  # setproctitle pads with blanks
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def read_pid(pidfile: Path) -> int:
    try:
        return int(pidfile.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def gone(pid: int) -> bool:
    try:
        return not alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


def echo_once(port: int, data: bytes = b"are you there?\n") -> None:
    with connect(port) as client:
        client.sendall(data)
        assert recv_exactly(client, len(data)) == data


class listening_elsewhere:
    """A plain listening socket on 127.0.0.1:PORT (no SO_REUSEPORT), as
    another program would hold it, for the duration of the block."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.bind((support.LOCALHOST, port))
        self.sock.listen(8)

    def __enter__(self):
        return self.sock

    def __exit__(self, *exc):
        self.sock.close()


# ------------------------------------------------------------------ fixture

class Daemons:
    """What a test started: configs and pidfiles, and every proxyd process
    seen, so that teardown can stop each one by its pid."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.configs: list[Path] = []
        self.pidfiles: list[Path] = []
        self.seen: dict[int, psutil.Process] = {}
        self.count = 0

    # ------------------------------------------------------------ set-up
    def setup(self, backend_address: str, workers: int = 2, **global_) -> "Instance":
        """A config (log to a file: -D sends stderr to /dev/null) and a pidfile path."""
        self.count += 1
        port = support.free_port()
        log = self.tmp_path / f"proxyd{self.count}.log"
        config = support.tcp_config(port, [backend_address], workers=workers,
                                    global_={"log": str(log), **global_})
        path = support.write_config(self.tmp_path, config, f"proxyd{self.count}.toml")
        pidfile = self.tmp_path / f"proxyd{self.count}.pid"
        self.configs.append(path)
        self.pidfiles.append(pidfile)
        return Instance(self, path, pidfile, log, port, workers, config)

    # ---------------------------------------------------------- tracking
    def remember(self, procs) -> None:
        for proc in procs:
            self.seen.setdefault(proc.pid, proc)

    def masters(self) -> list[psutil.Process]:
        found = {}
        for pidfile in self.pidfiles:
            pid = read_pid(pidfile)
            if pid > 0:
                try:
                    proc = psutil.Process(pid)
                    if title(proc).startswith("proxyd: master"):
                        found[pid] = proc
                except psutil.NoSuchProcess:
                    pass
        wanted = {f"proxyd: master -c {c}" for c in self.configs}
        for proc in psutil.process_iter():
            if title(proc) in wanted:
                found.setdefault(proc.pid, proc)
        return list(found.values())

    def cleanup(self) -> list[str]:
        """Stop every master (TERM, then KILL), then any worker left; return
        a description of what had to be stopped."""
        stopped = []
        for master in self.masters():
            try:
                self.remember(master.children())
                stopped.append(f"master {master.pid}: {title(master)!r}")
                master.terminate()
                master.wait(STOP_TIMEOUT)
            except psutil.TimeoutExpired:
                master.kill()
            except psutil.NoSuchProcess:
                pass
        for proc in self.seen.values():
            if alive(proc):
                stopped.append(f"process {proc.pid}: {title(proc)!r}")
                try:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT)
                except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                    pass
        return stopped


class Instance:
    """One configuration, pidfile and log: what one daemon runs on."""

    def __init__(self, daemons: Daemons, config: Path, pidfile: Path, log: Path, port: int,
                 workers: int, config_dict: dict):
        self.daemons = daemons
        self.config = config
        self.pidfile = pidfile
        self.log = log
        self.port = port
        self.nworkers = workers
        self.config_dict = config_dict

    # ---------------------------------------------------------- commands
    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """`python -m proxyd ARGS`, run from a directory that is not / (the
        daemon must change to / itself)."""
        return subprocess.run([sys.executable, "-m", "proxyd", *args], capture_output=True, text=True,
                              cwd=self.daemons.tmp_path, env=python_env(), timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def daemonize(self) -> subprocess.CompletedProcess:
        return self.run("-c", str(self.config), "-D", "-p", str(self.pidfile))

    def daemonize_as_a_shell_would(self) -> int:
        """`proxyd -c CONFIG -D -p PIDFILE` waited for as a shell or systemd
        waits: until the process it started exits, not until every holder of
        its stdout has closed it (output goes to a file here, not a pipe)."""
        with open(self.daemons.tmp_path / "terminal.out", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "proxyd", "-c", str(self.config), "-D",
                                     "-p", str(self.pidfile)], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, cwd=self.daemons.tmp_path, env=python_env())
            return proc.wait(60)

    def init(self, action: str, timeout: float = 90.0, **env) -> subprocess.CompletedProcess:
        """Run scripts/proxyd.init ACTION with PROXYD, CONFIG and PIDFILE for this instance."""
        full = python_env()
        full.update(PROXYD=PROXYD_CMD, CONFIG=str(self.config), PIDFILE=str(self.pidfile),
                    PROXYD_DEFAULTS=str(self.daemons.tmp_path / "no-such-defaults-file"))
        full.update(env)
        return subprocess.run([str(INIT), action], capture_output=True, text=True, env=full,
                              cwd=self.daemons.tmp_path, timeout=timeout, stdin=subprocess.DEVNULL)

    def break_config(self) -> None:
        broken = support.tcp_config(self.port, [INVALID[1]], workers=self.nworkers,
                                    global_=self.config_dict["global"])
        support.write_config(self.config.parent, broken, self.config.name)

    def restore_config(self) -> None:
        support.write_config(self.config.parent, self.config_dict, self.config.name)

    # ---------------------------------------------------------- processes
    def master(self) -> psutil.Process | None:
        pid = read_pid(self.pidfile)
        if pid <= 0:
            return None
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return None
        return proc if alive(proc) else None

    def workers(self, master: psutil.Process) -> dict[int, tuple[int, int, int]]:
        """pid -> (slot, count, generation) of the master's live workers."""
        try:
            children = master.children()
        except psutil.NoSuchProcess:
            return {}
        self.daemons.remember(children)
        found = {}
        for child in children:
            m = WORKER.match(title(child))
            if m and alive(child):
                found[child.pid] = tuple(int(g) for g in m.groups())
        return found

    def wait_ready(self, timeout: float = START_TIMEOUT) -> psutil.Process:
        """Wait for a live master in the pidfile, its workers and the listener."""
        deadline = time.monotonic() + timeout
        while True:
            master = self.master()
            workers = self.workers(master) if master else {}
            listening = listen_count(self.port) >= 1
            if master and len(workers) == self.nworkers and listening:
                return master
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"daemon not ready after {timeout}s: pidfile {read_pid(self.pidfile) or 'missing'}, "
                    f"master {master and master.pid}, workers {workers}, listening {listening}; "
                    f"log:\n{self.log_tail()}")
            time.sleep(0.02)

    def wait_generation(self, master: psutil.Process, generation: int, timeout: float = START_TIMEOUT):
        """Wait until the master's workers are exactly NWORKERS, all of GENERATION."""
        def settled():
            workers = self.workers(master)
            if len(workers) == self.nworkers and all(g == generation for _, _, g in workers.values()):
                return workers
            return None
        try:
            return wait_for(settled, timeout, f"{self.nworkers} workers of generation {generation}")
        except AssertionError as e:
            raise AssertionError(f"{e}; now {self.workers(master)}; log:\n{self.log_tail()}") from None

    def wait_stopped(self, master: psutil.Process, workers, timeout: float = STOP_TIMEOUT) -> None:
        wait_for(lambda: gone(master.pid), timeout, f"master {master.pid} to exit")
        wait_for(lambda: all(gone(pid) for pid in workers), timeout, f"workers {sorted(workers)} to exit")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture
def daemons(request, tmp_path):
    d = Daemons(tmp_path)
    yield d
    stopped = d.cleanup()
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    if failed:
        for log in sorted(tmp_path.glob("proxyd*.log")):
            print(f"---- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    if stopped:
        print("---- stopped at teardown: " + "; ".join(stopped))


@pytest.fixture
def instance(daemons, backend):
    """A config on a fresh port in front of an echo backend, with a pidfile path."""
    echo = backend(echo_handler)
    return daemons.setup(echo.address)


# ---------------------------------------------------------------- -D and -p

def test_daemon_detaches_and_serves(instance):
    started = time.monotonic()
    result = instance.daemonize()
    took = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    # Logging to a file: nothing to say on the terminal.  And the command
    # returned at all: the daemon let go of the pipes on its stdout/stderr.
    assert result.stdout == "" and result.stderr == ""
    assert took < START_TIMEOUT
    master = instance.wait_ready()
    pid = master.pid

    assert read_pid(instance.pidfile) == pid
    assert title(master) == f"proxyd: master -c {instance.config}"
    # Not the test's child, nor in its session or process group.
    assert master.ppid() != os.getpid()
    assert os.getsid(pid) != os.getsid(0)
    assert os.getpgid(pid) != os.getpgid(0)
    # Double fork: setsid() in the first child made a new session (and group);
    # the second fork leaves a process that is not its leader, so it can never
    # acquire a controlling terminal again.
    assert os.getsid(pid) == os.getpgid(pid)
    assert os.getsid(pid) != pid
    assert master.terminal() is None
    with open(f"/proc/{pid}/stat") as f:
        tty_nr = int(f.read().rsplit(")", 1)[1].split()[4])
    assert tty_nr == 0
    assert master.cwd() == "/"
    with open(f"/proc/{pid}/status") as f:
        umask = re.search(r"^Umask:\s*(\d+)$", f.read(), re.M)
    assert umask and umask.group(1) == "0022"
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null", f"fd {fd}"
    # The pidfile is written with the umask the daemon set: 0644.
    assert instance.pidfile.stat().st_mode & 0o777 == 0o644

    for i in range(10):
        echo_once(instance.port, b"daemon %d\n" % i)


def test_pidfile_is_written_before_the_command_returns(instance):
    """`proxyd -D -p PIDFILE && kill -HUP $(cat PIDFILE)` must work: the
    process that returns to the shell (or to systemd, Type=forking) exits only
    once the pidfile names the daemon (daemon(7): "the original process ...
    must be able to rely on that this exit() happens after initialization is
    complete").  Eight starts, so that a lucky race does not hide the flaw."""
    for attempt in range(8):
        assert instance.daemonize_as_a_shell_would() == 0
        pid_at_return = read_pid(instance.pidfile)
        master = instance.wait_ready()
        workers = instance.workers(master)
        assert pid_at_return == master.pid, (
            f"attempt {attempt + 1}: `proxyd -D -p` returned before writing its pidfile "
            f"(it held {pid_at_return or 'nothing'}; the master is {master.pid})")
        master.terminate()
        instance.wait_stopped(master, workers)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_pidfile_is_renamed_into_place_before_the_first_process_exits(instance):
    """The same property, seen without luck: under `strace -f`, the rename
    that puts the pidfile in place comes before the exit of the process the
    shell started.  (strace follows the daemon too, so it returns when the
    daemon has been stopped.)"""
    trace = instance.daemons.tmp_path / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=execve,exit_group,rename,renameat,renameat2", "-o", str(trace),
         sys.executable, "-m", "proxyd", "-c", str(instance.config), "-D", "-p", str(instance.pidfile)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=instance.daemons.tmp_path, env=python_env())
    try:
        master = instance.wait_ready()
        workers = instance.workers(master)
        master.terminate()
        instance.wait_stopped(master, workers)
        _, err = tracer.communicate(timeout=STOP_TIMEOUT)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.communicate(timeout=STOP_TIMEOUT)
    lines = trace.read_text().splitlines()
    first = re.match(r"^(\d+)\s+execve\(", lines[0])
    assert first, f"strace output starts with {lines[0]!r}"
    original = first.group(1)
    exits = [i for i, line in enumerate(lines) if re.match(rf"^{original}\s+exit_group\(", line)]
    renames = [i for i, line in enumerate(lines)
               if re.match(r"^\d+\s+rename(at2?)?\(", line) and f'"{instance.pidfile}"' in line]
    assert exits and renames, f"strace saw exits {exits} and renames {renames}:\n" + "\n".join(lines[-30:])
    assert renames[0] < exits[0], (
        f"the process started as `proxyd -D` (pid {original}) exited before the daemon put the "
        f"pidfile in place:\n{lines[exits[0]]}\n...\n{lines[renames[0]]}")


def test_second_start_with_live_pidfile_refuses(instance):
    assert instance.daemonize().returncode == 0
    master = instance.wait_ready()
    workers = instance.workers(master)

    again = instance.daemonize()

    assert again.returncode == 1
    assert f"proxyd: already running (pid {master.pid}, from {instance.pidfile})" in again.stderr
    assert read_pid(instance.pidfile) == master.pid
    assert alive(master) and set(instance.workers(master)) == set(workers)
    echo_once(instance.port)
    # Without -D it refuses the same way.
    foreground = instance.run("-c", str(instance.config), "-p", str(instance.pidfile))
    assert foreground.returncode == 1
    assert f"already running (pid {master.pid}" in foreground.stderr


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(STOP_TIMEOUT)
    assert gone(proc.pid)
    return proc.pid


def test_stale_pidfile_is_taken_over(instance):
    stale = dead_pid()
    instance.pidfile.write_text(f"{stale}\n")

    result = instance.daemonize()

    assert result.returncode == 0, result.stderr
    master = instance.wait_ready()
    assert master.pid != stale and read_pid(instance.pidfile) == master.pid
    echo_once(instance.port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT], ids=lambda s: s.name)
def test_stop_removes_pidfile(instance, sig):
    assert instance.daemonize().returncode == 0
    master = instance.wait_ready()
    workers = instance.workers(master)
    echo_once(instance.port)

    os.kill(master.pid, sig)

    instance.wait_stopped(master, workers)
    assert not instance.pidfile.exists()
    assert connection_refused(instance.port)
    assert "master exiting" in instance.log_tail()


def test_bind_error_shows_on_the_terminal(instance):
    """-D binds before it forks: an address in use is reported with exit 1,
    and no daemon or pidfile is left."""
    with listening_elsewhere(instance.port):
        result = instance.daemonize()
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{instance.port}" in result.stderr
    assert not instance.pidfile.exists()
    assert instance.daemons.masters() == []


def test_stderr_log_with_daemon_warns(daemons, backend):
    echo = backend(echo_handler)
    inst = daemons.setup(echo.address, log="stderr")
    result = inst.daemonize()
    assert result.returncode == 0
    assert 'with -D, log = "stderr" goes to /dev/null' in result.stderr
    inst.wait_ready()


# --------------------------------------------------------------- init script

def test_init_script_is_posix_sh_with_lsb_header():
    text = INIT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert os.access(INIT, os.X_OK)
    header = re.search(r"^### BEGIN INIT INFO\n(.*?)^### END INIT INFO$", text, re.M | re.S)
    assert header, "no LSB header block"
    for field in ("Provides", "Required-Start", "Required-Stop", "Default-Start", "Default-Stop",
                  "Short-Description"):
        assert re.search(rf"^# {field}:\s+\S", header.group(1), re.M), field
    for shell in ("sh", "dash", "bash", "busybox"):
        path = shutil.which(shell)
        if path:
            args = [path, "sh", "-n", str(INIT)] if shell == "busybox" else [path, "-n", str(INIT)]
            result = subprocess.run(args, capture_output=True, text=True, timeout=30)
            assert result.returncode == 0 and not result.stderr, f"{shell} -n: {result.stderr}"
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-s", "sh", str(INIT)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout


def test_init_script_usage(instance):
    result = instance.init("frobnicate")
    assert result.returncode == 2
    assert "Usage:" in result.stderr and "reload" in result.stderr


def test_init_script_lifecycle(instance):
    # Nothing runs yet.
    status = instance.init("status")
    assert status.returncode == 3, status
    assert "not running" in status.stdout

    check = instance.init("configtest")
    assert check.returncode == 0, check.stderr
    assert f"proxyd: {instance.config}: configuration is valid" in check.stdout

    # start: returns once the pidfile names a live master.
    start = instance.init("start")
    assert start.returncode == 0, start.stderr
    pid = read_pid(instance.pidfile)
    assert pid > 0 and f"started (pid {pid})" in start.stdout
    status = instance.init("status")
    assert status.returncode == 0 and f"running (pid {pid})" in status.stdout
    master = instance.wait_ready()
    assert master.pid == pid
    first = instance.workers(master)
    assert {g for _, _, g in first.values()} == {1}
    echo_once(instance.port, b"after start\n")

    # start again: already running, nothing changes.
    again = instance.init("start")
    assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout
    assert read_pid(instance.pidfile) == pid and set(instance.workers(master)) == set(first)

    # reload: a new generation of workers, same master, traffic served.
    reload = instance.init("reload")
    assert reload.returncode == 0, reload.stderr
    second = instance.wait_generation(master, 2)
    assert not set(second) & set(first)
    assert sorted(s for s, _, _ in second.values()) == [1, 2]
    wait_for(lambda: all(gone(p) for p in first), STOP_TIMEOUT, "generation 1 to exit")
    assert read_pid(instance.pidfile) == pid and alive(master)
    for i in range(5):
        echo_once(instance.port, b"after reload %d\n" % i)

    # force-reload is the same as reload.
    force = instance.init("force-reload")
    assert force.returncode == 0, force.stderr
    third = instance.wait_generation(master, 3)
    echo_once(instance.port, b"after force-reload\n")

    # stop: the master and its workers go, and so does the pidfile.
    stop = instance.init("stop")
    assert stop.returncode == 0, stop.stderr
    assert f"stopped (pid {pid})" in stop.stdout
    assert gone(pid), "stop returned while the master still runs"
    instance.wait_stopped(master, third)
    assert not instance.pidfile.exists()
    assert connection_refused(instance.port)
    status = instance.init("status")
    assert status.returncode == 3 and "not running" in status.stdout

    # stop when stopped: success (LSB), nothing to do.
    stop = instance.init("stop")
    assert stop.returncode == 0 and "not running" in stop.stdout


def test_init_script_refuses_an_invalid_config(instance):
    assert instance.init("start").returncode == 0
    master = instance.wait_ready()
    workers = instance.workers(master)

    instance.break_config()

    check = instance.init("configtest")
    assert check.returncode == 1
    assert INVALID[0] in check.stderr
    for action in ("reload", "force-reload", "restart"):
        result = instance.init(action)
        assert result.returncode == 6, f"{action}: {result}"
        assert INVALID[0] in result.stderr, f"{action}: {result.stderr}"
        assert "invalid" in result.stderr
    # Nothing was signalled: same master, same workers, still serving.
    assert stays(lambda: alive(master) and set(instance.workers(master)) == set(workers), 1.5)
    assert read_pid(instance.pidfile) == master.pid
    assert "reloading" not in instance.log_tail(200)
    echo_once(instance.port, b"still the old config\n")

    # Once fixed, restart replaces the master.
    instance.restore_config()
    restart = instance.init("restart")
    assert restart.returncode == 0, restart.stderr
    assert gone(master.pid)
    new = instance.wait_ready()
    assert new.pid != master.pid and read_pid(instance.pidfile) == new.pid
    echo_once(instance.port, b"after restart\n")


def test_init_script_start_refuses_an_invalid_config(instance):
    instance.break_config()
    result = instance.init("start")
    assert result.returncode == 6
    assert INVALID[0] in result.stderr
    assert not instance.pidfile.exists()
    assert instance.daemons.masters() == []
    assert instance.init("status").returncode == 3


def test_init_script_start_reports_a_bind_error(instance):
    with listening_elsewhere(instance.port):
        result = instance.init("start")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{instance.port}" in result.stderr
    assert not instance.pidfile.exists()
    assert instance.daemons.masters() == []


def test_init_script_stale_pidfile(instance):
    instance.pidfile.write_text(f"{dead_pid()}\n")
    status = instance.init("status")
    assert status.returncode == 1, status
    assert "not running" in status.stdout
    reload = instance.init("reload")
    assert reload.returncode == 7 and "not running" in reload.stderr

    start = instance.init("start")
    assert start.returncode == 0, start.stderr
    master = instance.wait_ready()
    assert instance.init("status").returncode == 0
    echo_once(instance.port)
    assert instance.init("stop").returncode == 0
    assert gone(master.pid)


def test_init_script_pidfile_of_another_program(instance):
    """A pidfile naming a live process that is not proxyd (a recycled pid):
    the script neither reports it running nor signals it."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        instance.pidfile.write_text(f"{other.pid}\n")
        assert instance.init("status").returncode == 1
        assert instance.init("stop").returncode == 0
        assert instance.init("reload").returncode == 7
        assert other.poll() is None, "the init script signalled a process that is not proxyd"
    finally:
        other.kill()
        other.wait(STOP_TIMEOUT)


def test_init_script_graceful_stop(instance):
    assert instance.init("start").returncode == 0
    master = instance.wait_ready()
    workers = instance.workers(master)
    client = connect(instance.port)
    client.sendall(b"before\n")
    assert recv_exactly(client, 7) == b"before\n"

    env = python_env()
    env.update(PROXYD=PROXYD_CMD, CONFIG=str(instance.config), PIDFILE=str(instance.pidfile),
               PROXYD_DEFAULTS="/nonexistent")
    stopper = subprocess.Popen([str(INIT), "graceful-stop"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: listen_count(instance.port) == 0, STOP_TIMEOUT, "listeners to close")
        assert connection_refused(instance.port)
        # The open session goes on; the script waits for it.
        for i in range(3):
            client.sendall(b"during %d\n" % i)
            assert recv_exactly(client, 9) == b"during %d\n" % i
        assert stopper.poll() is None and alive(master)
        client.close()
        out, err = stopper.communicate(timeout=30)
    finally:
        client.close()
        if stopper.poll() is None:
            stopper.kill()
            stopper.communicate(timeout=STOP_TIMEOUT)
    assert stopper.returncode == 0, err
    assert f"stopped (pid {master.pid})" in out
    instance.wait_stopped(master, workers)
    assert not instance.pidfile.exists()


# ---------------------------------------------------------------- systemd

def unit_lines() -> list[tuple[str, str]]:
    pairs = []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def test_systemd_unit_is_consistent():
    pairs = unit_lines()
    values = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    assert values["Type"] == ["forking"]
    pidfile = values["PIDFile"][0]
    (start,) = values["ExecStart"]
    (pre,) = values["ExecStartPre"]
    assert start.split()[1:] == ["-c", "/etc/proxyd/proxyd.toml", "-D", "-p", pidfile]
    assert pre.split()[1:] == ["-c", "/etc/proxyd/proxyd.toml", "--check"]
    assert values["ExecReload"][0].split()[1:] == ["-c", "/etc/proxyd/proxyd.toml", "--check"]
    assert values["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert len({v.split()[0] for v in [start, pre, values["ExecReload"][0]]}) == 1
    assert values["Restart"] == ["on-failure"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    """systemd-analyze verify, with the proxyd command pointed at a wrapper
    that exists here and MANPATH at the man pages of the tree (so that
    Documentation= is checked too)."""
    binary = unit_lines_value("ExecStart").split()[0]
    wrapper = make_wrapper(tmp_path)
    (tmp_path / "proxyd.service").write_text(UNIT.read_text().replace(binary, str(wrapper)))
    for section, page in (("man8", "proxyd.8"), ("man5", "proxyd.toml.5")):
        (tmp_path / "man" / section).mkdir(parents=True)
        (tmp_path / "man" / section / page).symlink_to(REPO / "man" / page)
    env = dict(os.environ, MANPATH=str(tmp_path / "man"), SYSTEMD_LOG_LEVEL="notice")
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "proxyd.service")],
                            capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def unit_lines_value(key: str) -> str:
    return next(v for k, v in unit_lines() if k == key)


def make_wrapper(directory: Path) -> Path:
    """An executable `proxyd` that runs this tree's proxyd with this Python."""
    wrapper = directory / "bin" / "proxyd"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH='{REPO}' exec '{sys.executable}' -m proxyd \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def test_systemd_unit_commands_work(instance):
    """The unit's own command lines, run as systemd would run them (with the
    binary, config and pidfile paths pointed at this test's): check, start,
    reload, and KillSignal to $MAINPID."""
    binary = unit_lines_value("ExecStart").split()[0]
    pidfile = unit_lines_value("PIDFile")
    wrapper = make_wrapper(instance.daemons.tmp_path)

    def command(line: str, mainpid: int = 0) -> list[str]:
        line = (line.replace(binary, str(wrapper)).replace("/etc/proxyd/proxyd.toml", str(instance.config))
                .replace(pidfile, str(instance.pidfile)).replace("$MAINPID", str(mainpid)))
        return line.split()

    def run(line: str, mainpid: int = 0) -> subprocess.CompletedProcess:
        return subprocess.run(command(line, mainpid), capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, cwd=instance.daemons.tmp_path)

    pairs = unit_lines()
    for key in ("ExecStartPre", "ExecStart"):
        result = run(unit_lines_value(key))
        assert result.returncode == 0, f"{key}: {result.stderr}"
    master = instance.wait_ready()
    first = instance.workers(master)
    echo_once(instance.port)

    for key, line in pairs:
        if key == "ExecReload":
            result = run(line, master.pid)
            assert result.returncode == 0, f"{line}: {result.stderr}"
    instance.wait_generation(master, 2)
    wait_for(lambda: all(gone(p) for p in first), STOP_TIMEOUT, "generation 1 to exit")
    echo_once(instance.port)

    # An invalid file: the first ExecReload line fails, so systemd never sends the HUP.
    instance.break_config()
    first_reload = next(v for k, v in pairs if k == "ExecReload")
    assert run(first_reload, master.pid).returncode == 1
    instance.restore_config()

    workers = instance.workers(master)
    kill_signal = getattr(signal, unit_lines_value("KillSignal"))
    os.kill(master.pid, kill_signal)
    instance.wait_stopped(master, workers)
    assert not instance.pidfile.exists()
