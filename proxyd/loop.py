"""The worker's event loop: raw epoll, an fd -> handler dict, a timer heap.

Sockets are registered edge-triggered once for everything they will ever
want (in, out, hang-up), so interest never changes on the data path and no
epoll_ctl is spent per transition; handlers remember readiness themselves and
act until EAGAIN.  Work cut short by a fairness budget is queued with soon()
and runs before the loop sleeps again.

Timers are a heap of (deadline, seq, owner): owners keep their own notion of
their current deadline and re-arm if the entry that fired is stale, so a
deadline that moves later (activity on a session) costs nothing.
"""

from __future__ import annotations

import heapq
import select
import time
import weakref

EDGE = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
IN = select.EPOLLIN
OUT = select.EPOLLOUT
TROUBLE = select.EPOLLERR | select.EPOLLHUP
MAX_EVENTS = 256
MAX_SLEEP = 1.0  # wake at least once a second: heartbeat, parent check


class Loop:
    def __init__(self):
        self.epoll = select.epoll()
        self.handlers: dict[int, object] = {}
        self.timers: list = []
        self.seq = 0
        self.ready: list = []
        self.closed: set[int] = set()
        self.now = time.monotonic()
        self.running = True
        self.idle_hooks: list = []  # called after each batch (e.g. log flush)
        self.error_hook = None      # (owner, exception): an unexpected error in a handler

    # ---------------------------------------------------------------- fds
    def add(self, fd: int, handler, events: int = EDGE) -> None:
        """Watch FD; HANDLER(events) is called when it is ready."""
        self.handlers[fd] = handler
        self.epoll.register(fd, events)

    def rebind(self, fd: int, handler) -> None:
        """Events of FD go to HANDLER from now on (the socket changed owner)."""
        self.handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stop watching FD before it is closed (or handed elsewhere)."""
        if self.handlers.pop(fd, None) is not None:
            self.closed.add(fd)
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    def forget(self, fd: int) -> None:
        """FD is about to be closed: closing removes it from epoll by itself."""
        if self.handlers.pop(fd, None) is not None:
            self.closed.add(fd)

    # ---------------------------------------------------------------- time
    def call_at(self, when: float, owner) -> None:
        """Call OWNER.on_timer() at WHEN (monotonic seconds) unless it ignores it.

        The heap holds a weak reference: a session that has ended is freed at
        once, not kept (with its buffers) until its last deadline comes up.
        """
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, weakref.ref(owner)))

    def soon(self, callback) -> None:
        """Run CALLBACK() after the current batch, before sleeping."""
        self.ready.append(callback)

    # ---------------------------------------------------------------- running
    def run_once(self) -> None:
        if self.ready:
            timeout = 0.0
        elif self.timers:
            timeout = min(max(self.timers[0][0] - time.monotonic(), 0.0), MAX_SLEEP)
        else:
            timeout = MAX_SLEEP
        try:
            events = self.epoll.poll(timeout, MAX_EVENTS)
        except InterruptedError:
            events = ()
        self.now = now = time.monotonic()
        handlers = self.handlers
        closed = self.closed
        # Only what is closed while this batch is dispatched makes its events
        # stale: an fd closed before the poll (by a timer, a soon() callback)
        # and reused since reports for its new socket, and with edge-triggered
        # epoll a skipped first event would never come again.
        closed.clear()
        for fd, mask in events:
            # An fd closed earlier in this batch may already be reused by a new
            # socket: its events in this batch are stale, skip them.
            if fd in closed:
                continue
            handler = handlers.get(fd)
            if handler is not None:
                try:
                    handler(mask)
                except Exception as exc:
                    self.error_hook(getattr(handler, "__self__", None), exc)
        if self.ready:
            ready, self.ready = self.ready, []
            for callback in ready:
                try:
                    callback()
                except Exception as exc:
                    self.error_hook(getattr(callback, "__self__", None), exc)
        timers = self.timers
        while timers and timers[0][0] <= now:
            when, _, ref = heapq.heappop(timers)
            owner = ref()
            if owner is None:
                continue
            try:
                owner.on_timer(when)
            except Exception as exc:
                self.error_hook(owner, exc)
        for hook in self.idle_hooks:
            hook()

    def close(self) -> None:
        self.epoll.close()
