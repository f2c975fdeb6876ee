"""A worker process: one epoll loop that accepts, connects and relays.

Forked by the master with the listening sockets of its slot.  It never
blocks: accept in bounded batches, non-blocking connects, splice through
pooled pipes.  TERM/INT stop it at once (server sockets reset); QUIT makes it
stop accepting and finish its sessions, up to `grace`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import socket
import termios
import traceback
from collections import deque

from proxyd.balance import Balancer
from proxyd.config import BackendConfig, Config, FrontendConfig
from proxyd.log import Log
from proxyd.shared import C
from proxyd.loop import EDGE, IN, Loop
from proxyd.http.session import HttpSession
from proxyd.tcp import INF, CopyPump, Pump, TcpSession, ioctl_int

ACCEPT_BATCH = 64          # connections accepted per wake-up, per listener
PIPE_POOL_KEEP = 256       # idle pipes kept for reuse (2 fds each)
BUFFER_SIZE = 64 * 1024    # copying fallback only
FD_HEADROOM = 2           # fds kept free for the sessions already accepted (their server sockets)
FD_HYSTERESIS = 8         # an episode at the fd limit ends once this many fds more are free
PAUSE_ON_EMFILE = 0.5      # seconds to stop accepting when out of fds
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20        # fewer, larger splices: about 35% less CPU per GiB than 64 KiB pipes


class PipePool:
    """Pipes for splice, reused across sessions; a session holds one only while moving bytes."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = PIPE_POOL_KEEP):
        self.size = size
        self.keep = keep
        self.free: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.size:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
            except OSError:
                # Over fs.pipe-max-size or the user's pipe-user-pages-soft (an
                # unprivileged worker): the default size works, only slower.
                self.size = 0
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        """Take a pipe back; only one the kernel says is empty is ever reused.

        Whatever a session's own count says, FIONREAD on the read end decides:
        a byte left in a pooled pipe would be spliced into the next session.
        """
        if len(self.free) < self.keep and not ioctl_int(pipe[0], termios.FIONREAD):
            self.free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])


class BufferPool:
    """Buffers for the copying fallback, same contract as PipePool."""

    def __init__(self, keep: int = PIPE_POOL_KEEP):
        self.keep = keep
        self.free: list[bytearray] = []

    def get(self) -> bytearray:
        return self.free.pop() if self.free else bytearray(BUFFER_SIZE)

    def put(self, buffer: bytearray) -> None:
        if len(self.free) < self.keep:
            self.free.append(buffer)

    discard = put


class Backend:
    """A backend as one worker sees it: its balancer, and its queue of
    sessions waiting for a server slot (every usable server at its maxconn).

    The queue is FIFO per worker; the bound itself is global (shared.py's
    slot pipes).  A slot freed here is offered to the queue at once; one
    freed by another worker wakes this one through the slot pipes, which
    the loop watches only while something waits."""

    def __init__(self, config: BackendConfig, shared, slot: int, worker_number: int, loop: Loop):
        self.name = config.name
        self.config = config
        self.loop = loop
        self.counts = shared.row(slot, shared.proxy_object("backend", config.name))
        self.balancer = Balancer(config, shared, slot, worker_number, self._slot_freed, self.counts)
        self.queue: deque = deque()
        self.watched = [s.slots.r for s in self.balancer.servers if s.slots is not None]
        self.watching = False

    @property
    def active(self) -> int:
        """This worker's sessions (http: requests) on one of its servers."""
        return self.counts[C.current_sessions]

    def wait(self, session, front: bool = False) -> None:
        if front:
            self.queue.appendleft(session)
        else:
            self.queue.append(session)
        self._queue_changed()
        if not self.watching:
            self.watching = True
            # Edge-triggered: woken by each slot given back, not by the
            # slots a down server has free (level-triggered would spin).
            for fd in self.watched:
                self.loop.add(fd, self._pipe_ready, EDGE)

    def leave(self, session) -> None:
        try:
            self.queue.remove(session)
        except ValueError:
            pass   # being retried right now (taken off the queue)
        self._unwatch_if_empty()

    def _slot_freed(self) -> None:
        if self.queue:
            self.loop.soon(self.offer_slots)

    def _pipe_ready(self, mask: int) -> None:
        self.offer_slots()

    def offer_slots(self) -> None:
        """Queued sessions try again, oldest first, until one has to wait again."""
        while self.queue:
            session = self.queue.popleft()
            session.slot_free()
            if self.queue and self.queue[0] is session:
                break   # no slot for it after all: it is first again, and waits
        self._unwatch_if_empty()

    def _queue_changed(self) -> None:
        counts, length = self.counts, len(self.queue)
        counts[C.current_queue] = length
        if length > counts[C.max_queue]:
            counts[C.max_queue] = length

    def _unwatch_if_empty(self) -> None:
        self._queue_changed()
        if self.watching and not self.queue:
            self.watching = False
            for fd in self.watched:
                self.loop.remove(fd)


class Frontend:
    def __init__(self, config: FrontendConfig, backend: Backend, log: Log, counts):
        self.name = config.name
        self.config = config
        self.backend = backend
        self.counts = counts    # this worker's row of counters for it (shared.C)
        self.listeners: list[Listener] = []
        self.active = 0
        self.session = HttpSession if config.mode == "http" else TcpSession
        self.errorfiles: dict[int, tuple[int, int, int]] = {}
        for status, path in config.errorfiles.items():
            try:
                self.errorfiles[status] = sealed_copy(path)
            except OSError as e:
                log.warning(f"frontends.{config.name}.errorfiles.{status}: cannot open {path}: "
                            f"{e.strerror}; the built-in page is used")


def sealed_copy(path: str) -> tuple[int, int, int]:
    """(fd, size, head size) of a sealed in-memory copy of PATH, for sendfile
    (the head alone answers a HEAD request).

    Error pages are read once, when the worker loads its configuration (as
    HAProxy does): a file truncated or rewritten in place afterwards changes
    nothing, and a sealed memfd cannot shrink under a sendfile either.
    """
    with open(path, "rb") as f:
        data = f.read()
    fd = os.memfd_create("proxyd-errorfile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    head_end = data.find(b"\r\n\r\n")
    return fd, len(data), head_end + 4 if head_end >= 0 else len(data)


class Listener:
    """A listening socket of this worker's slot; level-triggered, paused when full."""

    def __init__(self, worker: "Worker", frontend: Frontend, sock: socket.socket):
        self.worker = worker
        self.frontend = frontend
        self.sock = sock
        self.fd = sock.fileno()
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.worker.loop.add(self.fd, self.on_ready, IN)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.worker.loop.remove(self.fd)

    def on_ready(self, mask: int) -> None:
        self.worker.accept(self)


class Worker:
    def __init__(self, config: Config, sockets: list[tuple[str, socket.socket]], log: Log,
                 number: int, count: int, generation: int, master_pid: int, shared=None,
                 shared_slot: int = -1):
        self.config = config
        self.log = log
        self.number = number
        self.count = count
        self.generation = generation
        self.master_pid = master_pid
        self.shared = shared
        self.shared_slot = shared_slot
        self.loop = Loop()
        self.loop.error_hook = self._session_crashed
        self.loop.idle_hooks.append(log.flush)
        self.splice = config.global_.splice and hasattr(os, "splice")
        self.pipes = PipePool() if self.splice else BufferPool()
        self.maxconn = config.global_.maxconn
        self.active = 0
        self.sessions: set = set()
        self.stopping = False
        self.stop_deadline = 0.0
        self.paused_until = 0.0
        self.fd_ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1 - FD_HEADROOM
        self.starved: dict[str, list] = {}  # "fds" | "ports" -> [since, failures]: one episode each
        self.backends = {name: Backend(b, shared, shared_slot, number, self.loop)
                         for name, b in config.backends.items()}
        self.frontends = {name: Frontend(f, self.backends[f.backend], log,
                                         shared.row(shared_slot, shared.proxy_object("frontend", name)))
                          for name, f in config.frontends.items()}
        self.listeners = [Listener(self, self.frontends[name], sock) for name, sock in sockets]
        for listener in self.listeners:
            listener.frontend.listeners.append(listener)

    # ------------------------------------------------------------ running
    def run(self) -> int:
        self._install_signals()
        for listener in self.listeners:
            listener.resume()
        self.loop.call_at(self.loop.now, self)  # first heartbeat now
        self.log.info(f"worker {self.number}/{self.count} gen {self.generation} started, "
                      f"{len(self.listeners)} listening sockets, "
                      f"relaying with {'splice' if self.splice else 'copy'}")
        while not (self.stopping and not self.sessions):
            self.loop.run_once()
        self.log.info(f"worker {self.number}/{self.count} gen {self.generation} exiting")
        self.log.flush()
        return 0

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(sig, _no_op)
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)  # the master's business
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self.loop.add(r, lambda mask: self._on_signals(os.read(r, 64)), IN)

    def _on_signals(self, numbers: bytes) -> None:
        for number in numbers:
            if number in (signal.SIGTERM, signal.SIGINT):
                self.stop()
            elif number == signal.SIGQUIT:
                self.drain(self.config.global_.grace)
            elif number == signal.SIGUSR1:
                self.log.reopen()

    def on_timer(self, when: float) -> None:
        """Once a second: heartbeat for the master; stop if the master is gone."""
        if self.shared is not None:
            self.shared.beat(self.shared_slot, self.loop.now)
        if os.getppid() != self.master_pid:
            self.log.warning("master is gone; stopping")
            return self.stop()
        if self.paused_until and self.loop.now >= self.paused_until:
            self.paused_until = 0.0
            self._resume_accepting()
        if "fds" in self.starved and self._fds_in_use() < self.fd_ceiling - FD_HYSTERESIS:
            self.resources_back("fds")  # no client came since the fds came back to say so
        for backend in self.backends.values():
            if backend.queue:   # a server that came up or got a weight has slots no pipe event announced
                backend.offer_slots()
        if self.stopping and self.loop.now >= self.stop_deadline:
            self.log.warning(f"grace expired with {len(self.sessions)} sessions open; closing them")
            return self.stop()
        self.loop.call_at(self.loop.now + 1.0, self)

    # ------------------------------------------------------------ stopping
    def _close_listeners(self, accept_queued: bool) -> None:
        for listener in self.listeners:
            if accept_queued:
                self._accept_queued(listener)
            listener.pause()
            listener.sock.close()
        self.listeners = []
        for frontend in self.frontends.values():
            frontend.listeners = []

    def _accept_queued(self, listener: Listener) -> None:
        """Take what already waits in the backlog before letting go of a socket:
        on a graceful stop, ours may be the last reference to it."""
        for _ in range(1000 // ACCEPT_BATCH):
            if self.accept(listener):
                return

    def drain(self, grace: float) -> None:
        """Stop accepting; the loop ends when the last session has."""
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = self.loop.now + grace
            # Open sessions finish as they would; an idle keep-alive client
            # keeps its connection until its keep-alive timeout (closing it
            # now races the request it may be sending), and the answer to its
            # next request says Connection: close.
            self._close_listeners(accept_queued=True)
            self.log.info(f"worker {self.number}/{self.count} gen {self.generation} draining "
                          f"{len(self.sessions)} sessions (grace {grace:g}s)")

    def stop(self) -> None:
        """Fast stop: every session ends now, server sockets reset."""
        self.stopping = True
        self.stop_deadline = self.loop.now
        self._close_listeners(accept_queued=False)
        for session in list(self.sessions):
            session.kill()

    # ------------------------------------------------------------ accepting
    def accept(self, listener: Listener) -> bool:
        """Accept a batch; True once nothing more can be taken now."""
        frontend = listener.frontend
        limit = frontend.config.maxconn
        for _ in range(ACCEPT_BATCH):
            if self.active >= self.maxconn or frontend.active >= limit:
                # Leave the rest in the kernel backlog until a session ends.
                for each in (self.listeners if self.active >= self.maxconn else frontend.listeners):
                    each.pause()
                return True
            try:
                sock, peer = listener.sock.accept()
            except BlockingIOError:
                return True
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.out_of_resources("fds", "accept", e.errno)
                    return True
                continue  # ECONNABORTED and the like: that one client is gone
            sock.setblocking(False)
            # The kernel hands out the lowest free fd: one this high says the
            # limit is near.  This session may still have its server socket;
            # the next clients wait in the backlog rather than be refused.
            if sock.fileno() >= self.fd_ceiling or "fds" in self.starved:
                self._check_fd_limit()
            frontend.session(self, frontend, sock, peer)
            if self.paused_until:
                return True
        return False

    def out_of_resources(self, kind: str, where: str, err: int, until_a_session_ends: bool = False) -> None:
        """Out of fds (or kernel memory), or of source ports: one log line when
        the episode starts, one when it ends (resources_back), never a busy
        loop.  Out of fds, accepting pauses (clients wait in the backlog): for
        PAUSE_ON_EMFILE (the fds may be the system's, freed by others), or
        until one of our sessions ends and frees its own."""
        episode = self.starved.get(kind)
        if episode is None:
            self.starved[kind] = [self.loop.now, 1]
            then = ("sessions that cannot connect are closed (tcp RC, http 503)" if kind == "ports" else
                    "accepting paused until a session ends" if until_a_session_ends else
                    f"accepting paused, retried every {PAUSE_ON_EMFILE}s")
            self.log.error(f"{where}: {os.strerror(err)} ({self.active} sessions open); {then}")
        else:
            episode[1] += 1
        if kind == "fds":
            for listener in self.listeners:
                listener.pause()
            self.paused_until = INF if until_a_session_ends else self.loop.now + PAUSE_ON_EMFILE

    def _check_fd_limit(self) -> None:
        """After an accept near the fd limit, or during an episode at it.

        Outside an episode the new fd's number is enough (the kernel hands out
        the lowest free one); during one, only a count of the open fds says
        whether a few sessions' worth came back or just the one that ended.
        """
        in_use = self._fds_in_use()
        if in_use >= self.fd_ceiling:
            self.out_of_resources("fds", "accept", errno.EMFILE, until_a_session_ends=True)
        elif in_use < self.fd_ceiling - FD_HYSTERESIS:
            self.resources_back("fds")

    def _fds_in_use(self) -> int:
        try:
            return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
        except OSError:  # not even one fd left to list them with
            return self.fd_ceiling

    def resources_back(self, kind: str) -> None:
        """An fd well below the limit was accepted or seen free on the
        once-a-second timer ("fds"), a server connection could be made
        ("ports"): that episode is over."""
        episode = self.starved.pop(kind, None)
        if episode is not None:
            what = "accepting" if kind == "fds" else "connecting"
            self.log.notice(f"{what} again after {self.loop.now - episode[0]:.1f}s ({episode[1]} failures)")

    def _resume_accepting(self) -> None:
        if self.stopping or self.paused_until or self.active >= self.maxconn:
            return
        for listener in self.listeners:
            if listener.frontend.active < listener.frontend.config.maxconn:
                listener.resume()

    def session_opened(self, session) -> None:
        self.sessions.add(session)
        self.active += 1
        frontend = session.frontend
        frontend.active += 1
        counts = frontend.counts
        counts[C.sessions] += 1
        counts[C.current_sessions] = frontend.active

    def new_pump(self, src, dst) -> Pump:
        """A one-way relay: splice through a pooled pipe, or the copying fallback."""
        return Pump(src, dst, self.pipes) if self.splice else CopyPump(src, dst, self.pipes)

    def session_handed_over(self, old, new) -> None:
        self.sessions.discard(old)
        self.sessions.add(new)

    def session_closed(self, session) -> None:
        self.sessions.discard(session)
        self.active -= 1
        frontend = session.frontend
        frontend.active -= 1
        frontend.counts[C.current_sessions] = frontend.active
        if self.paused_until and "fds" in self.starved:
            self.paused_until = 0.0  # paused at the fd limit: this session's fds are free now
            self._resume_accepting()
        elif self.active == self.maxconn - 1 or frontend.active == frontend.config.maxconn - 1:
            self._resume_accepting()

    def _session_crashed(self, owner, exc: BaseException) -> None:
        """An unexpected error: end that one session, log it, carry on."""
        self.log.error("unexpected error, session closed:\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        crash = getattr(owner, "crash", None)
        if crash is not None:
            try:
                crash()
            except Exception as e:  # the session is beyond saving; keep the worker
                self.log.error(f"closing the failed session failed too: {e!r}")


def _no_op(signum, frame) -> None:
    """Signals are read from the wake-up fd in the loop, never handled here."""
