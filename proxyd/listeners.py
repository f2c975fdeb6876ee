"""Listening sockets: one SO_REUSEPORT socket per (address, worker slot).

The kernel spreads new connections evenly across the sockets of a reuseport
group, with no thundering herd; one socket shared by every worker would
spread nothing.  The master creates and keeps every socket, so a worker that
replaces another in the same slot accepts from the very same kernel queue and
nothing waiting there is lost.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

from proxyd.config import Address, Config

BACKLOG = 65535  # the kernel caps it at net.core.somaxconn
SO_ATTACH_REUSEPORT_CBPF = 51


class BindError(Exception):
    pass


def open_listener(address: Address) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            # "[::]:80" means IPv6 only, so that "0.0.0.0:80" may be bound beside it.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit TCP_NODELAY: one setsockopt saved per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address.sockaddr)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def check_free(address: Address) -> None:
    """Refuse an address someone else already listens on.

    SO_REUSEPORT would let us join another process's group (a second proxyd,
    say) and silently take half its traffic; a probe bound without it fails
    with EADDRINUSE instead.
    """
    probe = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address.sockaddr)
    finally:
        probe.close()


class Listeners:
    def __init__(self):
        self.sockets: dict[tuple[Address, int], socket.socket] = {}

    def bind(self, config: Config, slots: int) -> None:
        """Open every (address, slot) socket CONFIG needs that is not open yet."""
        opened = []
        try:
            for frontend in config.frontends.values():
                for i, address in enumerate(frontend.bind):
                    owned = any(a == address for a, _ in self.sockets)
                    for slot in range(slots):
                        if (address, slot) in self.sockets:
                            continue
                        try:
                            if not owned:
                                check_free(address)
                                owned = True
                            sock = open_listener(address)
                        except OSError as e:
                            reason = e.strerror or errno.errorcode.get(e.errno, str(e))
                            raise BindError(f"frontends.{frontend.name}.bind[{i}]: "
                                            f"cannot listen on {address}: {reason}") from None
                        self.sockets[(address, slot)] = sock
                        opened.append((address, slot))
        except BindError:
            for key in opened:
                self.sockets.pop(key).close()
            raise

    def for_slot(self, config: Config, slot: int, slots: int) -> list[tuple[str, socket.socket]]:
        """The sockets worker SLOT (of SLOTS) accepts from: its own, and any
        left over from a time there were more workers (slot j >= SLOTS goes to
        j % SLOTS), so that what is queued there is still accepted."""
        return [(frontend.name, sock)
                for frontend in config.frontends.values() for address in frontend.bind
                for (a, j), sock in self.sockets.items()
                if a == address and (j == slot or (j >= slots and j % slots == slot))]

    def steer(self, slots: int) -> None:
        """New connections go only to the sockets of slots 0..SLOTS-1.

        Closing a listening socket resets the connections queued on it
        (unless net.ipv4.tcp_migrate_req is on), so when there are fewer
        workers than sockets the extra sockets are kept open, drained by the
        remaining workers, and taken out of the kernel's choice with a
        classic BPF program on the reuseport group: "random % SLOTS" picks an
        index in the group, and our indices are the slots because a group's
        sockets are numbered in the order they listen and we close none of
        an address's sockets but all of them at once.
        """
        for (address, slot), sock in self.sockets.items():
            if slot == 0:
                attach_steering(sock, slots)

    def close_unused(self, config: Config) -> None:
        """Close every socket of an address CONFIG no longer binds."""
        wanted = {address for frontend in config.frontends.values() for address in frontend.bind}
        for key in [key for key in self.sockets if key[0] not in wanted]:
            self.sockets.pop(key).close()

    def close_all(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


def attach_steering(sock: socket.socket, slots: int) -> None:
    ld_random = struct.pack("HBBI", 0x20, 0, 0, (-0x1000 + 56) & 0xFFFFFFFF)  # A = prandom_u32()
    mod_slots = struct.pack("HBBI", 0x94, 0, 0, slots)                         # A %= slots
    ret_a = struct.pack("HBBI", 0x16, 0, 0, 0)                                 # return A
    program = ctypes.create_string_buffer(ld_random + mod_slots + ret_a)
    fprog = struct.pack("HxxxxxxQ", 3, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
