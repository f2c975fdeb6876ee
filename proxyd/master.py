"""The master process: binds, forks workers, then only supervises.

Signals are never handled inside a handler: `signal.set_wakeup_fd` writes
each signal's number to a pipe and the main loop reads them (as gunicorn's
arbiter queues them).  Children are reaped with waitpid(-1, WNOHANG) until
none is left to reap.  A worker that dies is respawned in its slot, at once
the first time, with growing backoff if it keeps dying soon after start.
"""

from __future__ import annotations

import os
import select
import signal
import time
import traceback
from dataclasses import dataclass

from proxyd.config import Config
from proxyd.listeners import Listeners
from proxyd.log import Log
from proxyd.shared import Shared

try:
    from setproctitle import setproctitle
except ImportError:  # titles are a convenience, never a reason not to run
    def setproctitle(title: str) -> None:
        pass

STOP_TIMEOUT = 5.0        # fast stop: workers that take longer are killed
QUICK_DEATH = 10.0        # a worker that dies sooner than this after start "keeps dying"
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
           signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU)


@dataclass
class WorkerProcess:
    pid: int
    slot: int
    generation: int
    started: float
    shared_slot: int


class Master:
    def __init__(self, config: Config, log: Log, listeners: Listeners, title_args: str = ""):
        self.config = config
        self.log = log
        self.listeners = listeners
        self.title_args = title_args
        self.shared = Shared()
        self.generation = 1
        self.count = config.global_.workers
        self.workers: dict[int, WorkerProcess] = {}
        self.respawn_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.stopping = ""          # "", "fast" or "graceful"
        self.stop_deadline = 0.0
        self.pid = os.getpid()

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        setproctitle(f"proxyd: master {self.title_args}".rstrip())
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_fds = (wake_r, wake_w)
        for sig in SIGNALS:
            signal.signal(sig, _no_op)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.log.info(f"master started (pid {self.pid}), {self.count} workers")
        for slot in range(self.count):
            self._spawn(slot)
        while self.workers or not self.stopping:
            select.select([wake_r], [], [], self._sleep_time())
            try:
                numbers = os.read(wake_r, 256)
            except BlockingIOError:
                numbers = b""
            for number in numbers:
                self._on_signal(number)
            self._reap()
            self._respawn_due()
            self._enforce_stop_deadline()
        self.log.info("master exiting")
        return 0

    def _sleep_time(self) -> float:
        deadlines = list(self.respawn_at.values())
        if self.stopping:
            deadlines.append(self.stop_deadline)
        if not deadlines:
            return 1.0
        return min(max(min(deadlines) - time.monotonic(), 0.0), 1.0)

    def _on_signal(self, number: int) -> None:
        if number in (signal.SIGTERM, signal.SIGINT):
            self.stop_fast()
        elif number == signal.SIGQUIT:
            self.stop_graceful()
        elif number == signal.SIGUSR1:
            self.log.reopen()
            self.log.info("log reopened")
            self._signal_workers(signal.SIGUSR1)

    # ------------------------------------------------------------ workers
    def _spawn(self, slot: int) -> None:
        shared_slot = self.shared.allocate(time.monotonic())
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
        self.workers[pid] = WorkerProcess(pid, slot, self.generation, time.monotonic(), shared_slot)

    def _worker_main(self, slot: int, shared_slot: int) -> int:
        """In the child: shed the master's state, drop privileges, run the loop."""
        from proxyd.worker import Worker

        signal.set_wakeup_fd(-1)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for fd in self.wake_fds:
            os.close(fd)
        setproctitle(f"proxyd: worker {slot + 1}/{self.count} gen {self.generation}")
        self.log.set_tag("proxyd")
        mine = self.listeners.for_slot(self.config, slot)
        keep = {id(sock) for _, sock in mine}
        for sock in self.listeners.sockets.values():
            if id(sock) not in keep:
                sock.close()  # another slot's: only the master and that slot keep it
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
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self.shared.release(worker.shared_slot)
            how = describe_exit(status)
            if self.stopping:
                self.log.info(f"worker {worker.slot + 1}/{self.count} (pid {pid}) exited: {how}")
                continue
            self._schedule_respawn(worker, how)

    def _schedule_respawn(self, worker: WorkerProcess, how: str) -> None:
        slot = worker.slot
        if time.monotonic() - worker.started < QUICK_DEATH:
            self.failures[slot] = self.failures.get(slot, 0) + 1
        else:
            self.failures[slot] = 0
        failures = self.failures[slot]
        delay = 0.0 if failures <= 1 else min(BACKOFF_FIRST * 2 ** (failures - 2), BACKOFF_MAX)
        self.log.warning(f"worker {slot + 1}/{self.count} (pid {worker.pid}) died: {how}; "
                         f"respawning in {delay:g}s")
        self.respawn_at[slot] = time.monotonic() + delay

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.respawn_at.items()):
            if when <= now and not self.stopping:
                del self.respawn_at[slot]
                self._spawn(slot)

    def _signal_workers(self, sig: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------ stopping
    def stop_fast(self) -> None:
        """TERM/INT: close listeners, workers end every session now."""
        if self.stopping != "fast":
            self.log.info("fast stop")
            self.stopping = "fast"
            self.stop_deadline = time.monotonic() + STOP_TIMEOUT
            self.respawn_at.clear()
            self.listeners.close_all()
            self._signal_workers(signal.SIGTERM)

    def stop_graceful(self) -> None:
        """QUIT: stop accepting now, let sessions finish within grace."""
        if not self.stopping:
            grace = self.config.global_.grace
            self.log.info(f"graceful stop (grace {grace:g}s)")
            self.stopping = "graceful"
            self.stop_deadline = time.monotonic() + grace + STOP_TIMEOUT
            self.respawn_at.clear()
            # Close our copies first: once the workers close theirs, the sockets
            # are gone and new connections are refused rather than left queued.
            self.listeners.close_all()
            self._signal_workers(signal.SIGQUIT)

    def _enforce_stop_deadline(self) -> None:
        if self.stopping and self.workers and time.monotonic() >= self.stop_deadline:
            self.log.warning(f"killing {len(self.workers)} workers that did not stop in time")
            self._signal_workers(signal.SIGKILL)
            self.stop_deadline = time.monotonic() + STOP_TIMEOUT


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
    if not user and not group:
        return
    import grp
    import pwd

    if os.geteuid() != 0:
        return  # not root: nothing to drop to (the master already runs unprivileged)
    entry = pwd.getpwnam(user) if user else None
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    os.setgroups([])
    os.setgid(gid)
    if entry is not None:
        os.setuid(entry.pw_uid)


def _no_op(signum, frame) -> None:
    """Signals are read from the wake-up fd by the main loop."""
