"""The master process: binds, forks workers, then only supervises.

Signals are never handled inside a handler: `signal.set_wakeup_fd` writes
each signal's number to a pipe and the main loop reads them (as gunicorn's
arbiter queues them).  Children are reaped with waitpid(-1, WNOHANG) until
none is left to reap.

Workers belong to a *generation*, one per configuration the master has
loaded.  A reload (HUP) forks a new generation on the new configuration
beside the old one; the old one is told to drain (QUIT) only once every new
worker has reported in, so something always accepts.  Listening sockets
live in the master for as long as their address is configured, and every
worker of a slot, old or new, accepts from the very same kernel socket:
nothing queued is dropped by a reload or a respawn.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import time
import traceback
from dataclasses import dataclass

from proxyd import config as config_module
from proxyd.control import Control
from proxyd.listeners import BindError, Listeners, check_free, open_listener
from proxyd.log import Log
from proxyd.shared import READY, Shared, SharedFull
from proxyd.worker import Worker

try:
    from setproctitle import setproctitle
except ImportError:  # titles are a convenience, never a reason not to run
    def setproctitle(title: str) -> None:
        pass

STOP_TIMEOUT = 5.0        # workers that overrun a stop by this much are killed
QUICK_DEATH = 10.0        # a worker that dies sooner than this after start "keeps dying"
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
RETIRE_SETTLE = 1.0       # TTOU: the retiring worker accepts this long after steering
MAX_WORKERS = 256
SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
           signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU)


@dataclass
class WorkerProcess:
    pid: int
    slot: int
    generation: int
    started: float
    shared_slot: int
    ready: bool = False
    draining: bool = False
    deadline: float = 0.0     # draining: killed if still alive then
    retire_at: float = 0.0    # TTOU: told to drain then


class Master:
    def __init__(self, config, log: Log, listeners: Listeners, config_path: str):
        self.config = config
        self.log = log
        self.listeners = listeners
        self.config_path = config_path
        self.shared = Shared()
        self.generation = 1         # the generation serving (or about to)
        self.last_generation = 1
        self.count = config.global_.workers
        self.workers: dict[int, WorkerProcess] = {}
        self.respawn_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.previous = None        # (config, count, generation) while a reload is pending
        self.stopping = ""          # "", "fast" or "graceful"
        self.pid = os.getpid()
        self.started = time.time()
        self.control: WorkerProcess | None = None   # the control process (checks, runtime API)
        self.control_wanted = True  # one should run (a reload waits for the old one to exit first)
        self.control_respawn_at = 0.0
        self.control_failures = 0
        self.admin = AdminSocket(log)
        self.stats = StatsSockets(log)
        self.reloads = 0
        self._assign_servers(config, self.generation)

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        setproctitle(f"proxyd: master -c {self.config_path}")
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_fds = (wake_r, wake_w)
        for sig in SIGNALS:
            signal.signal(sig, _no_op)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.log.info(f"master started (pid {self.pid}), {self.count} workers")
        self.admin.bind(self.config.global_.admin_socket, self.config.global_.admin_socket_mode)
        self.stats.bind(self.config.global_.stats_bind)
        self._publish()
        for slot in range(self.count):
            self._spawn(slot)
        self._control_due()
        while self.workers or self.control or not self.stopping:
            select.select([wake_r], [], [], self._sleep_time())
            try:
                numbers = os.read(wake_r, 256)
            except BlockingIOError:
                numbers = b""
            for number in numbers:
                self._on_signal(number)
            self._reap()
            self._check_workers()
            self._respawn_due()
            self._control_due()
            self.shared.collect_debts()
        self.admin.close()
        self.stats.close()
        self.log.info("master exiting")
        return 0

    def _sleep_time(self) -> float:
        deadlines = list(self.respawn_at.values()) + [w.retire_at for w in self.workers.values()
                                                      if w.retire_at]
        if self.previous or self.stopping:
            return 0.05  # waiting for workers to report in or to go
        return min([1.0] + [max(d - time.monotonic(), 0.0) for d in deadlines])

    def _on_signal(self, number: int) -> None:
        if number in (signal.SIGTERM, signal.SIGINT):
            self.stop_fast()
        elif number == signal.SIGQUIT:
            self.stop_graceful()
        elif self.stopping:
            return
        elif number == signal.SIGHUP:
            self.reload()
        elif number == signal.SIGUSR1:
            self.log.reopen()
            self.log.info("log reopened")
            self._signal([*self.workers.values(), *([self.control] if self.control else [])], signal.SIGUSR1)
        elif number == signal.SIGTTIN:
            self.add_worker()
        elif number == signal.SIGTTOU:
            self.remove_worker()

    # ------------------------------------------------------------ workers
    def _spawn(self, slot: int) -> None:
        try:
            shared_slot = self.shared.allocate(0.0)
        except SharedFull as e:
            self.log.error(f"cannot start worker {slot + 1}: {e}; retrying in {BACKOFF_MAX:g}s")
            self.respawn_at[slot] = time.monotonic() + BACKOFF_MAX
            return
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self._worker_main(slot, shared_slot)
            except BaseException:
                self.log.error(f"worker {slot + 1}/{self.count} failed:\n{traceback.format_exc().rstrip()}")
            finally:
                self.log.flush()
                os._exit(code)
        self.shared.started(shared_slot, pid, self.generation, slot + 1)
        self.workers[pid] = WorkerProcess(pid, slot, self.generation, time.monotonic(), shared_slot)

    def _shed_master_state(self) -> None:
        """In a child: the master's signal handling and wake-up pipe are not its own."""
        signal.set_wakeup_fd(-1)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for fd in self.wake_fds:
            os.close(fd)

    def _worker_main(self, slot: int, shared_slot: int) -> int:
        """In the child: shed the master's state, drop privileges, run the loop."""
        self._shed_master_state()
        self.admin.close_in_child()
        self.stats.close()
        setproctitle(f"proxyd: worker {slot + 1}/{self.count} gen {self.generation}")
        self.log.set_tag("proxyd")
        mine = self.listeners.for_slot(self.config, slot, self.count)
        keep = {id(sock) for _, sock in mine}
        for sock in self.listeners.sockets.values():
            if id(sock) not in keep:
                sock.close()  # others' sockets: only the master and their slots keep them
        limit_files(self.config.global_.ulimit_n)
        drop_privileges(self.config.global_.user, self.config.global_.group)
        worker = Worker(self.config, mine, self.log, slot + 1, self.count, self.generation,
                        self.pid, self.shared, shared_slot)
        return worker.run()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.control is not None and pid == self.control.pid:
                self._control_exited(status)
                continue
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self.shared.release(worker.shared_slot)
            self._free_unused_records()
            how = describe_exit(status)
            name = f"worker {worker.slot + 1} gen {worker.generation} (pid {pid})"
            if worker.draining or self.stopping:
                self.log.info(f"{name} exited: {how}")
            elif self.previous and worker.generation == self.generation and not worker.ready:
                self._abort_reload(f"{name} died at start-up: {how}")
            elif worker.generation == self.generation and worker.slot < self.count:
                self._schedule_respawn(worker, f"{name} died: {how}")
            else:
                self.log.info(f"{name} exited: {how}")

    def _schedule_respawn(self, worker: WorkerProcess, what: str) -> None:
        slot = worker.slot
        if time.monotonic() - worker.started < QUICK_DEATH:
            self.failures[slot] = self.failures.get(slot, 0) + 1
        else:
            self.failures[slot] = 0
        failures = self.failures[slot]
        delay = 0.0 if failures <= 1 else min(BACKOFF_FIRST * 2 ** (failures - 2), BACKOFF_MAX)
        self.log.warning(f"{what}; respawning in {delay:g}s")
        self.respawn_at[slot] = time.monotonic() + delay

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.respawn_at.items()):
            if when <= now:
                del self.respawn_at[slot]
                if not self.stopping and slot < self.count:
                    self._spawn(slot)

    def _check_workers(self) -> None:
        """Heartbeats, readiness of a new generation, retirements, overdue drains."""
        now = time.monotonic()
        timeout = self.config.global_.worker_timeout
        for worker in list(self.workers.values()):
            beat = self.shared.heartbeat(worker.shared_slot)
            worker.ready = worker.ready or beat > 0
            last_sign = beat if beat > 0 else worker.started
            if now - last_sign > timeout:
                self.log.error(f"worker {worker.slot + 1} gen {worker.generation} (pid {worker.pid}) "
                               f"has not answered for {now - last_sign:.1f}s; killing it")
                self._signal([worker], signal.SIGKILL)
            elif worker.draining and worker.deadline and now > worker.deadline:
                self.log.warning(f"worker {worker.slot + 1} gen {worker.generation} (pid {worker.pid}) "
                                 f"overran its stop; killing it")
                self._signal([worker], signal.SIGKILL)
                worker.deadline = 0.0
            elif worker.retire_at and now >= worker.retire_at:
                worker.retire_at = 0.0
                self._drain([worker])
        control = self.control
        if control is not None and not control.draining:
            beat = self.shared.heartbeat(control.shared_slot)
            if now - (beat if beat > 0 else control.started) > timeout:
                self.log.error(f"control process (pid {control.pid}) has not answered for "
                               f"{now - (beat if beat > 0 else control.started):.1f}s; killing it")
                self._signal([control], signal.SIGKILL)
        elif control is not None and control.deadline and now > control.deadline:
            self.log.warning(f"control process (pid {control.pid}) overran its stop; killing it")
            self._signal([control], signal.SIGKILL)
            control.deadline = 0.0
        if self.previous and all(w.ready for w in self.workers.values() if w.generation == self.generation):
            self._promote()

    def _signal(self, workers, sig: int) -> None:
        for worker in list(workers):
            try:
                os.kill(worker.pid, sig)
            except ProcessLookupError:
                pass

    def _drain(self, workers) -> None:
        grace = self.config.global_.grace
        for worker in workers:
            worker.draining = True
            worker.deadline = time.monotonic() + grace + STOP_TIMEOUT
        self._signal(workers, signal.SIGQUIT)

    # ------------------------------------------------------------ shared server records
    def _assign_servers(self, config, generation: int) -> None:
        """Records for CONFIG's servers before GENERATION is forked (see shared.py)."""
        servers = {f"{b.name}/{s.name}": s for b in config.backends.values() for s in b.servers}
        self.shared.assign({key: s.maxconn for key, s in servers.items()}, generation,
                           lambda key: (READY, servers[key].weight))
        self.shared.assign_proxies([*(f"frontend/{name}" for name in config.frontends),
                                    *(f"backend/{name}" for name in config.backends)], generation)

    def _publish(self) -> None:
        """What the stats and show info say of the master, in shared memory."""
        self.shared.write_process(self.pid, self.started, self.reloads, self.generation, self.count)

    def _free_unused_records(self) -> None:
        generations = [w.generation for w in self.workers.values()]
        if self.control is not None:
            generations.append(self.control.generation)
        self.shared.free_retired(min(generations, default=self.last_generation + 1))

    # ------------------------------------------------------------ the control process
    def _control_due(self) -> None:
        """Start the control process when one is wanted, none runs, and its
        backoff (if it keeps dying) has passed."""
        if (self.control is None and self.control_wanted and not self.stopping
                and time.monotonic() >= self.control_respawn_at):
            self._spawn_control()

    def _spawn_control(self) -> None:
        try:
            shared_slot = self.shared.allocate(0.0)
        except SharedFull as e:
            self.log.error(f"cannot start the control process: {e}; retrying in {BACKOFF_MAX:g}s")
            self.control_respawn_at = time.monotonic() + BACKOFF_MAX
            return
        info = {"master_pid": self.pid, "started": self.started, "workers": self.count,
                "generation": self.generation}
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._shed_master_state()
                setproctitle(f"proxyd: control gen {self.generation}")
                self.log.set_tag("proxyd")
                self.admin.path = None   # the master's to unlink, never this process's
                for sock in self.listeners.sockets.values():
                    sock.close()
                drop_privileges(self.config.global_.user, self.config.global_.group)
                code = Control(self.config, self.log, self.shared, shared_slot, self.admin.sock,
                               self.stats.socks, info).run()
            except BaseException:
                self.log.error(f"control process failed:\n{traceback.format_exc().rstrip()}")
            finally:
                self.log.flush()
                os._exit(code)
        self.shared.started(shared_slot, pid, self.generation, 0)
        self.control = WorkerProcess(pid, -1, self.generation, time.monotonic(), shared_slot)

    def _control_exited(self, status: int) -> None:
        control, self.control = self.control, None
        self.shared.release(control.shared_slot)
        how = describe_exit(status)
        if control.draining or self.stopping:
            self.log.info(f"control process (pid {control.pid}) exited: {how}")
        else:
            quick = time.monotonic() - control.started < QUICK_DEATH
            self.control_failures = self.control_failures + 1 if quick else 0
            delay = 0.0 if self.control_failures <= 1 else \
                min(BACKOFF_FIRST * 2 ** (self.control_failures - 2), BACKOFF_MAX)
            self.control_respawn_at = time.monotonic() + delay
            self.log.warning(f"control process (pid {control.pid}) died: {how}; respawning in {delay:g}s")
        self._free_unused_records()

    def _restart_control(self) -> None:
        """A new configuration: the old control process stops, and the new one
        starts once it has exited (one writer per record at any time)."""
        self.control_wanted = True
        self.control_failures = 0
        self.control_respawn_at = 0.0
        self._stop_control()

    def _stop_control(self) -> None:
        if self.control is not None and not self.control.draining:
            self.control.draining = True
            self.control.deadline = time.monotonic() + STOP_TIMEOUT
            self._signal([self.control], signal.SIGTERM)

    # ------------------------------------------------------------ reload
    def reload(self) -> None:
        """HUP: a new generation on the new file; the old one drains once it is up."""
        try:
            new = config_module.load(self.config_path)
            from proxyd.cli import check_accounts
            check_accounts(new)
        except config_module.ConfigError as e:
            for problem in e.errors:
                self.log.error(f"reload failed, keeping the running configuration: {problem}")
            return
        for warning in new.warnings:
            self.log.warning(warning)
        if self.previous:
            self._promote()  # the reload before this one is still starting: let it win
        count = new.global_.workers
        try:
            self.listeners.bind(new, count)
        except BindError as e:
            return self.log.error(f"reload failed, keeping the running configuration: {e}")
        try:
            self._assign_servers(new, self.last_generation + 1)
        except SharedFull as e:
            self._assign_servers(self.config, self.last_generation + 1)
            self.listeners.close_unused(self.config)
            return self.log.error(f"reload failed, keeping the running configuration: {e}")
        self.previous = (self.config, self.count, self.generation)
        self.config, self.count = new, count
        self.last_generation += 1
        self.generation = self.last_generation
        self.respawn_at.clear()
        self.failures.clear()
        self.admin.bind(new.global_.admin_socket, new.global_.admin_socket_mode)
        self.stats.bind(new.global_.stats_bind)
        self.reloads += 1
        self._publish()
        self._restart_control()
        self.log.info(f"reloading {self.config_path}: generation {self.generation}, {count} workers")
        for slot in range(count):
            self._spawn(slot)

    def _promote(self) -> None:
        """Every new worker has reported in: the older generations drain."""
        self.previous = None
        old = [w for w in self.workers.values() if w.generation != self.generation and not w.draining]
        self._drain(old)
        self.listeners.steer(self.count)
        # Removed addresses: our copies go now, the old workers' as they drain,
        # and the port is free once the last of them has let go.
        self.listeners.close_unused(self.config)
        self.log.info(f"generation {self.generation} serving; {len(old)} old workers draining")
        self._limit_draining_generations()

    def _abort_reload(self, reason: str) -> None:
        config, count, generation = self.previous
        self.log.error(f"reload aborted: {reason}; generation {generation} keeps serving")
        failed = [w for w in self.workers.values() if w.generation == self.generation]
        for worker in failed:
            worker.draining = True
            worker.deadline = time.monotonic() + STOP_TIMEOUT
        self._signal(failed, signal.SIGTERM)
        self.previous = None
        aborted = self.generation
        self.config, self.count, self.generation = config, count, generation
        self.listeners.close_unused(config)
        self._assign_servers(config, aborted + 1)   # the aborted generation's records go once it has
        self.admin.bind(config.global_.admin_socket, config.global_.admin_socket_mode)
        self.stats.bind(config.global_.stats_bind)
        self._publish()
        self._restart_control()

    def _limit_draining_generations(self) -> None:
        """Reloads in quick succession: past max_draining old generations, stop the oldest."""
        limit = self.config.global_.max_draining
        draining = sorted({w.generation for w in self.workers.values()
                           if w.draining and w.generation != self.generation})
        for generation in draining[:max(len(draining) - limit, 0)]:
            victims = [w for w in self.workers.values() if w.generation == generation]
            self.log.warning(f"{len(draining)} generations draining (max_draining = {limit}): "
                             f"stopping generation {generation} now")
            for worker in victims:
                worker.deadline = time.monotonic() + STOP_TIMEOUT
            self._signal(victims, signal.SIGTERM)

    # ------------------------------------------------------------ TTIN / TTOU
    def add_worker(self) -> None:
        if self.previous or self.count >= MAX_WORKERS:
            return self.log.warning("TTIN ignored: a reload is in progress or the limit is reached")
        try:
            self.listeners.bind(self.config, self.count + 1)
        except BindError as e:
            return self.log.error(f"TTIN: {e}")
        self.count += 1
        self.listeners.steer(self.count)
        self._spawn(self.count - 1)
        self._publish()
        self.log.info(f"TTIN: now {self.count} workers")

    def remove_worker(self) -> None:
        if self.previous or self.count <= 1:
            return self.log.warning("TTOU ignored: a reload is in progress or one worker is left")
        self.count -= 1
        # Steer new connections away from the slot first, and let its worker
        # accept what is already queued there before it drains.
        self.listeners.steer(self.count)
        self.respawn_at.pop(self.count, None)
        for worker in self.workers.values():
            if worker.slot == self.count and worker.generation == self.generation and not worker.draining:
                worker.retire_at = time.monotonic() + RETIRE_SETTLE
        self._publish()
        self.log.info(f"TTOU: now {self.count} workers")

    # ------------------------------------------------------------ stopping
    def stop_fast(self) -> None:
        """TERM/INT: close listeners, workers end every session now."""
        if self.stopping != "fast":
            self.log.info("fast stop")
            self.stopping = "fast"
            self.respawn_at.clear()
            self.listeners.close_all()
            for worker in self.workers.values():
                worker.draining = True
                worker.deadline = time.monotonic() + STOP_TIMEOUT
            self._signal(self.workers.values(), signal.SIGTERM)
            self._stop_control()

    def stop_graceful(self) -> None:
        """QUIT: stop accepting now, let sessions finish within grace."""
        if not self.stopping:
            self.log.info(f"graceful stop (grace {self.config.global_.grace:g}s)")
            self.stopping = "graceful"
            self.respawn_at.clear()
            # Close our copies first: once the workers close theirs, the sockets
            # are gone and new connections are refused rather than left queued.
            self.listeners.close_all()
            self._drain([w for w in self.workers.values() if not w.draining])
            self._stop_control()


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {sig} ({name})"
    return f"exit code {os.WEXITSTATUS(status)}"


def drop_privileges(user: str | None, group: str | None) -> None:
    """Workers run as user/group; the master keeps root to bind again on reload."""
    if not (user or group) or os.geteuid() != 0:
        return
    import grp
    import pwd

    entry = pwd.getpwnam(user) if user else None
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    os.setgroups([])
    os.setgid(gid)
    if entry is not None:
        os.setuid(entry.pw_uid)


def limit_files(ulimit_n: int) -> None:
    """A worker's RLIMIT_NOFILE: ulimit_n, else the hard limit (the master has raised it)."""
    if ulimit_n:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if os.geteuid() != 0:
            ulimit_n = min(ulimit_n, hard)  # only root may raise a hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (ulimit_n, ulimit_n))


def _no_op(signum, frame) -> None:
    """Signals are read from the wake-up fd by the main loop."""


class AdminSocket:
    """The runtime API's listening unix socket, bound and kept by the master
    (so it survives control processes), served by the control process."""

    def __init__(self, log: Log):
        self.log = log
        self.path: str | None = None
        self.sock = None

    def bind(self, path: str | None, mode: str) -> None:
        """Bind PATH (a reload that changes it moves the socket; one that
        keeps it keeps the very same socket, with MODE applied again)."""
        if path is not None and path == self.path:
            os.chmod(path, int(mode, 8))
            return
        self.close()
        if path is None:
            return
        import socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.exists(path) and not _socket_alive(path):
                os.unlink(path)    # left by a proxyd that did not exit cleanly
            old_umask = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            os.chmod(path, int(mode, 8))
            sock.listen(64)
        except OSError as e:
            sock.close()
            return self.log.error(f"admin socket {path}: {e.strerror}; the runtime API is not available")
        self.sock, self.path = sock, path

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.sock, self.path = None, None

    def close_in_child(self) -> None:
        """A worker has no business with it (and must not unlink it)."""
        if self.sock is not None:
            self.sock.close()


class StatsSockets:
    """The stats listener's sockets (stats_bind), bound and kept by the
    master as the admin socket is: a scrape while the control process
    restarts waits in the backlog.  A reload keeps an unchanged address's
    very socket."""

    def __init__(self, log: Log):
        self.log = log
        self.socks: dict = {}   # Address -> listening socket

    def bind(self, addresses) -> None:
        for address in [a for a in self.socks if a not in addresses]:
            self.socks.pop(address).close()
        for address in addresses:
            if address in self.socks:
                continue
            try:
                check_free(address)
                self.socks[address] = open_listener(address)
            except OSError as e:
                self.log.error(f"stats_bind {address}: {e.strerror}; the stats listener is not available there")

    def close(self) -> None:
        """At exit, or in a worker (which has no business with them)."""
        for sock in self.socks.values():
            sock.close()
        self.socks = {}


def _socket_alive(path: str) -> bool:
    import socket
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
