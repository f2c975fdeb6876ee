"""The control process: health checks and the runtime API, once per host.

The master forks one per generation (after the previous one has exited, so
each server record has one writer at a time) and supervises it like a
worker: a heartbeat in its process slot, respawned with backoff if it dies.
It runs the workers' kind of Loop, never touches client traffic, and keeps
nothing that matters in its own memory: every state it sets is in the
shared records, so a respawned control process goes on where the last one
stopped.  The admin socket is bound by the master (which keeps it across
control processes: connections made meanwhile wait in its backlog).
"""

from __future__ import annotations

import os
import signal
import socket
import time

from proxyd import admin, health, stats
from proxyd.loop import IN, Loop
from proxyd.shared import DOWN, MAINT, READY, STATE_NAMES, UNCHECKED, C


STATS_FINISH = 2.0   # seconds a stopping control process gives the scrapes under way


class Control:
    def __init__(self, config, log, shared, slot: int, admin_sock: socket.socket | None, stats_socks: dict,
                 info: dict):
        self.config = config
        self.log = log
        self.shared = shared
        self.slot = slot
        self.info = info              # master pid, start time, workers, generation: for show info
        self.loop = Loop()
        self.loop.error_hook = self._crashed
        self.loop.idle_hooks.append(log.flush)
        self.stopping = False
        self.checks: list[health.Check] = []
        self.admin_sock = admin_sock
        self.admin_connections: set = set()
        self.stats_socks = list(stats_socks.values())
        self.stats_connections: set = set()
        # This process's own counters: check results and downtime, per
        # server record and per backend (see shared.py, COUNTERS).
        self.server_counts = {record: shared.row(slot, record) for record in shared.servers.values()}
        self.backend_counts = {name: shared.row(slot, shared.proxy_object("backend", name))
                               for name in config.backends}
        self.backend_down: dict[str, bool] = {}   # backend -> had no usable server at the last tick
        self.last_tick = 0.0

    def run(self) -> int:
        self._install_signals()
        self._apply_configured_weights()
        self._start_checks()
        if self.admin_sock is not None:
            self.admin_sock.setblocking(False)
            self.loop.add(self.admin_sock.fileno(), self._accept_admin, IN)
        for sock in self.stats_socks:
            sock.setblocking(False)
            self.loop.add(sock.fileno(), lambda mask, sock=sock: self._accept_stats(sock), IN)
        self.loop.call_at(self.loop.now, self)
        self.log.info(f"control process started (generation {self.info['generation']}): "
                      f"{len(self.checks)} servers checked"
                      f"{', admin socket ' + self.config.global_.admin_socket if self.admin_sock else ''}")
        while not self.stopping:
            self.loop.run_once()
        # A scrape under way when told to stop (a reload) gets its answer;
        # new ones wait in the listener's backlog for the next control process.
        for sock in self.stats_socks:
            self.loop.remove(sock.fileno())
        deadline = self.loop.now + STATS_FINISH
        while self.stats_connections and self.loop.now < deadline:
            self.loop.run_once()
        for check in self.checks:
            if check.sock is not None:
                check.sock.close()
        self.log.flush()
        return 0

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self.loop.add(r, lambda mask: self._on_signals(os.read(r, 64)), IN)

    def _on_signals(self, numbers: bytes) -> None:
        for number in numbers:
            if number == signal.SIGUSR1:
                self.log.reopen()
            else:
                self.stopping = True

    def on_timer(self, when: float) -> None:
        """Once a second: heartbeat; stop if the master is gone."""
        self.shared.beat(self.slot, self.loop.now)
        if os.getppid() != self.info["master_pid"]:
            self.log.warning("master is gone; control process stopping")
            self.stopping = True
        self._count_downtime()
        for connection in [c for c in self.stats_connections if c.expired(self.loop.now)]:
            connection.close()
        self.loop.call_at(self.loop.now + 1.0, self)

    def _count_downtime(self) -> None:
        """Once a second: the time each down server, and each backend with
        no usable server, spent so since the last tick; and a backend's
        transition to no usable server (not one seen at the first tick: that
        is the state the previous control process left, and counted)."""
        now = self.loop.now
        elapsed = int((now - self.last_tick) * 1000) if self.last_tick else 0
        self.last_tick = now
        for backend in self.config.backends.values():
            for server in backend.servers:
                record = self.shared.servers[f"{backend.name}/{server.name}"]
                if elapsed and self.shared.read_server(record).state == DOWN:
                    self.server_counts[record][C.downtime_ms] += elapsed
            down = self.servers_left(backend) == (0, 0)
            if elapsed and down:
                self.backend_counts[backend.name][C.downtime_ms] += elapsed
            if down and self.backend_down.get(backend.name) is False:
                self.backend_counts[backend.name][C.check_up_down] += 1
            self.backend_down[backend.name] = down

    def _crashed(self, owner, exc: BaseException) -> None:
        import traceback
        self.log.error("control process: unexpected error:\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
        close = getattr(owner, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------ servers
    def records(self):
        """(backend, server, record) for every server of the configuration."""
        for backend in self.config.backends.values():
            for server in backend.servers:
                yield backend, server, self.shared.servers[f"{backend.name}/{server.name}"]

    def _apply_configured_weights(self) -> None:
        """A weight changed in the file wins over the one set at run time;
        one unchanged in the file leaves the run-time weight as it was.
        Every record is written here once: one that a killed predecessor
        left in the middle of a write (odd sequence number) is whole again."""
        for backend, server, record in self.records():
            state = self.shared.read_server(record)
            changes = {"checked": 1 if backend.health_check else 0}
            if state.config_weight != server.weight:
                changes.update(weight=server.weight, config_weight=server.weight)
            if not backend.health_check and state.state == DOWN:
                changes["state"] = UNCHECKED   # its checks left the file: nothing says it is down now
            self.shared.write_server(record, **changes)

    def _start_checks(self) -> None:
        for backend in self.config.backends.values():
            if backend.health_check is None:
                continue
            n = len(backend.servers)
            for i, server in enumerate(backend.servers):
                self.checks.append(health.Check(self, backend, server, backend.health_check.interval * i / n))

    def check_result(self, check: health.Check, ok: bool, status: str, info: str, code: int,
                     duration: int) -> None:
        record = check.record
        before = self.shared.read_server(record)
        if before.admin == MAINT:
            return   # put in maintenance while this check ran: its result no longer counts
        state, rise, fall = health.next_state(before.state, before.rise, before.fall, ok, check.config)
        reason = status + (f", code: {code}" if code else "") + (f', info: "{info}"' if info else "")
        changes = dict(state=state, rise=rise, fall=fall, code=code, duration=duration,
                       checked_at=time.time(), reason=reason)
        if STATE_NAMES[state] != STATE_NAMES[before.state]:
            changes["changed_at"] = time.time()
        self.shared.write_server(record, **changes)
        counts = self.server_counts[record]
        if not ok and before.state != DOWN:
            counts[C.check_failures] += 1
        if STATE_NAMES[state] != STATE_NAMES[before.state]:
            if state == DOWN:
                counts[C.check_up_down] += 1
            self._log_transition(check, state, reason, duration)

    def _log_transition(self, check: health.Check, state: int, reason: str, duration: int) -> None:
        active, backup = self.servers_left(check.backend)
        if state == DOWN:
            self.log.warning(f"Server {check.key} is DOWN, reason: {reason}, check duration: {duration}ms. "
                             f"{active} active and {backup} backup servers left.")
            if not active and not backup:
                self.log.error(f"backend {check.backend.name} has no server available!")
        else:
            self.log.notice(f"Server {check.key} is UP, reason: {reason}, check duration: {duration}ms. "
                            f"{active} active and {backup} backup servers online.")

    def servers_left(self, backend) -> tuple[int, int]:
        """(active, backup) servers of BACKEND that can take new sessions."""
        counts = [0, 0]
        for server in backend.servers:
            state = self.shared.read_server(self.shared.servers[f"{backend.name}/{server.name}"])
            if state.state != DOWN and state.admin == READY:
                counts[server.backup] += 1
        return counts[0], counts[1]

    def set_admin(self, backend, server, admin_state: int) -> None:
        """The runtime API: ready, drain or maint."""
        record = self.shared.servers[f"{backend.name}/{server.name}"]
        before = self.shared.read_server(record)
        if before.admin == admin_state:
            return
        changes = {"admin": admin_state, "changed_at": time.time()}
        if before.admin == MAINT and backend.health_check:
            # Its checks were not run in maintenance, so its last state says
            # nothing now: it takes traffic at once, and its next check
            # confirms it or marks it down (as a new server).
            changes.update(state=UNCHECKED, rise=0, fall=0)
        self.shared.write_server(record, **changes)
        self.log.notice(f"Server {backend.name}/{server.name} is {admin.ADMIN_WORDS[admin_state]} "
                        f"(runtime API)")

    def set_weight(self, backend, server, weight: int) -> None:
        record = self.shared.servers[f"{backend.name}/{server.name}"]
        self.shared.write_server(record, weight=weight)
        self.log.notice(f"Server {backend.name}/{server.name} weight set to {weight} (runtime API)")

    # ------------------------------------------------------------ stats listener
    def _accept_stats(self, listener: socket.socket) -> None:
        for _ in range(16):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                return self.log.warning(f"stats listener: accept: {os.strerror(e.errno)}")
            stats.StatsConnection(self, sock)

    # ------------------------------------------------------------ admin socket
    def _accept_admin(self, mask: int) -> None:
        for _ in range(16):
            try:
                sock, _ = self.admin_sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                return self.log.warning(f"admin socket: accept: {os.strerror(e.errno)}")
            admin.AdminConnection(self, sock)
