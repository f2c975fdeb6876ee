"""Command line: proxyd -c FILE [-D] [-p PIDFILE] [--check [--diff]] | ctl ... | --version."""

from __future__ import annotations

import argparse
import os
import resource
import sys

from proxyd import __version__, config as config_module
from proxyd.listeners import BindError, Listeners
from proxyd.log import Log


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="proxyd", description="TCP and HTTP/1.1 reverse proxy")
    parser.add_argument("-c", dest="config", metavar="FILE", help="configuration file (TOML)")
    parser.add_argument("-D", dest="daemon", action="store_true", help="run in the background")
    parser.add_argument("-p", dest="pidfile", metavar="PIDFILE", help="write the master's pid here")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--diff", action="store_true",
                        help="with --check: also print what a reload of FILE would change in the running proxyd")
    parser.add_argument("--version", action="version", version=f"proxyd {__version__}")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("-c FILE is required")
    if args.diff and not args.check:
        parser.error("--diff goes with --check")
    return args


def fail(message: str) -> int:
    """Say MESSAGE on stderr, each line (one per problem) after "proxyd: "."""
    for line in message.splitlines() or [""]:
        print(f"proxyd: {line}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ctl"]:
        from proxyd import ctl
        return ctl.main(argv[1:])
    args = parse_args(argv)
    # Absolute paths: a daemon runs from /, and a reload re-reads the same file.
    args.config = os.path.abspath(args.config)
    try:
        config = config_module.load(args.config)
        check_accounts(config)
    except config_module.ConfigError as e:
        return fail(str(e))
    for warning in config.warnings:
        print(f"proxyd: {args.config}: warning: {warning}", file=sys.stderr)
    if args.check:
        print(f"proxyd: {args.config}: configuration is valid")
        return show_diff(config) if args.diff else 0
    pidfile = args.pidfile or config.global_.pidfile
    pidfile = pidfile and os.path.abspath(pidfile)
    try:
        log = Log(config.global_.log, config.global_.log_level, syslog_format=config.global_.syslog_format)
    except OSError as e:
        return fail(f"{args.config}: global.log: cannot open {config.global_.log}: {e.strerror or e}")
    if pidfile:
        running = running_pid(pidfile)
        if running:
            return fail(f"already running (pid {running}, from {pidfile})")
    raise_fd_limit()
    listeners = Listeners()
    try:
        listeners.bind(config, config.global_.workers)
    except BindError as e:
        return fail(f"{args.config}: {e}")
    ready = None
    if args.daemon:
        if config.global_.log == "stderr":
            print("proxyd: note: with -D, log = \"stderr\" goes to /dev/null; "
                  "set global.log to a file or syslog", file=sys.stderr)
        ready = daemonize()
        log.set_tag("proxyd")
        log.reopen()
    if pidfile:
        try:
            write_pidfile(pidfile)
        except OSError as e:
            message = f"cannot write pidfile {pidfile}: {e.strerror}"
            if ready is not None:
                os.write(ready, message.encode())
            return fail(message)
    if ready is not None:
        os.close(ready)  # the waiting parent exits 0: the pidfile is there
    from proxyd.master import Master
    from proxyd.shared import SharedFull

    try:
        try:
            master = Master(config, log, listeners, args.config)
        except SharedFull as e:
            return fail(f"{args.config}: {e}")
        return master.run()
    finally:
        if pidfile and os.getpid() == read_pid(pidfile):
            os.unlink(pidfile)


def show_diff(config) -> int:
    """--check --diff: what a reload of this file would change, compared with
    the configuration the running proxyd reports (`show config` on its admin
    socket, the one this file names)."""
    import json

    from proxyd import confdiff, ctl
    path = config.global_.admin_socket
    if not path:
        return fail("--diff: global.admin_socket is not set in this file: no running proxyd to compare with")
    try:
        running = json.loads(ctl.ask(path, "show config"))
    except ctl.CtlError as e:
        return fail(f"--diff: {e}")
    except ValueError:
        return fail(f"--diff: admin socket {path}: the answer to `show config` is not JSON")
    changes = confdiff.diff(running, json.loads(json.dumps(confdiff.config_as_dict(config))))
    for line in changes:
        print(line)
    if not changes:
        print("no change from the running configuration")
    return 0


def check_accounts(config) -> None:
    """user/group must exist now, not fail later in every worker."""
    import grp
    import pwd

    errors = []
    if config.global_.user:
        try:
            pwd.getpwnam(config.global_.user)
        except KeyError:
            errors.append(config_module.ConfigError("global.user", f"no such user {config.global_.user!r}"))
    if config.global_.group:
        try:
            grp.getgrnam(config.global_.group)
        except KeyError:
            errors.append(config_module.ConfigError("global.group", f"no such group {config.global_.group!r}"))
    if errors:
        raise config_module.ConfigErrors(errors, config.filename)


def read_pid(pidfile: str) -> int:
    try:
        with open(pidfile) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def running_pid(pidfile: str) -> int:
    """The pid in PIDFILE if that process is alive, else 0 (a stale file is taken over)."""
    pid = read_pid(pidfile)
    if pid <= 0 or pid == os.getpid():
        return 0
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return 0   # no such process
    # A pid recycled by another program is not "proxyd already running": a
    # master has set its title, or (just started) still runs proxyd's command.
    args = cmdline.split(b"\0")
    if args[0].startswith(b"proxyd: master"):
        return pid
    return pid if any(arg == b"proxyd" or arg.endswith(b"/proxyd") for arg in args[:3]) else 0


def write_pidfile(pidfile: str) -> None:
    """Written atomically: a reader never sees an empty or half-written file."""
    tmp = f"{pidfile}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, pidfile)


def daemonize() -> int:
    """Double fork, new session, umask 022, cwd /, stdio to /dev/null.

    The command returns only once the daemon is ready (pidfile written), as
    daemon(7) asks, so `proxyd -D -p F && kill -HUP $(cat F)` works: the
    first process waits on a pipe and exits 1 with whatever error the daemon
    writes there, 0 when it is closed empty.  Returns the pipe's write end.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    if os.fork():
        os.close(write_end)
        message = b""
        while chunk := os.read(read_end, 4096):
            message += chunk
        if message:
            print(f"proxyd: {message.decode(errors='replace')}", file=sys.stderr)
        os._exit(1 if message else 0)
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.umask(0o022)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return write_end


def raise_fd_limit() -> None:
    """Every client connection costs two fds: take all the kernel allows us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
