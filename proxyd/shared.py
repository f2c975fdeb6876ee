"""Memory shared by the master and its workers: an anonymous mmap made before fork.

One fixed-size record per worker process, written only by that worker and
read by the master (heartbeat).  No locks: each record has one writer, and a
torn read of a float is harmless for a liveness check done once a second.
"""

from __future__ import annotations

import mmap
import struct

RECORD = struct.Struct("=qd")   # pid, last heartbeat (time.monotonic(), same clock in all processes)
RECORDS = 1024                  # worker processes alive at once, all generations together


class Shared:
    def __init__(self, records: int = RECORDS):
        self.records = records
        self.memory = mmap.mmap(-1, RECORD.size * records)
        self.free = list(range(records - 1, -1, -1))

    # master side
    def allocate(self, now: float) -> int:
        index = self.free.pop()
        RECORD.pack_into(self.memory, index * RECORD.size, 0, now)
        return index

    def release(self, index: int) -> None:
        self.free.append(index)

    def heartbeat(self, index: int) -> float:
        return RECORD.unpack_from(self.memory, index * RECORD.size)[1]

    # worker side
    def beat(self, index: int, now: float, pid: int = 0) -> None:
        RECORD.pack_into(self.memory, index * RECORD.size, pid, now)
