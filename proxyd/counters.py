"""What the data path counts, into the process's own block of shared memory.

Each frontend, backend and server object of a worker holds `counts`, its
row of this process's counter block (shared.Shared.row, indexed by
shared.C).  A worker only ever adds to its own rows, so no store is shared
with another writer; readers sum the blocks (shared.Shared.totals).

Counting is done once per session (tcp) or per request (http), when it
ends, from the facts the access line is made of: a few integer additions
in shared memory, no call into the kernel.  Sessions count as HAProxy
counts them: a frontend counts client connections (on accept, in the
worker), a backend and a server count sessions in tcp mode and requests in
http mode; a server counts the one it served (the last one tried).
"""

from __future__ import annotations

import time

from proxyd.shared import C

# term codes (HAProxy's first character) of a request that failed on the client's side
REQUEST_FAILED = frozenset("PcC")


def exchange_ended(frontend, backend, tried: list, connected: bool, up: int, down: int, term: str,
                   err: str, status: int = -2) -> None:
    """One tcp session or http request is over: count it.  STATUS is the
    http status sent to the client (-1: none could be; -2: tcp mode)."""
    f = frontend.counts
    f[C.bytes_in] += up
    f[C.bytes_out] += down
    if status != -2:
        f[C.http_requests] += 1
        f[_status_index(status)] += 1
        if term[1:2] == "R" and term[:1] in REQUEST_FAILED:
            f[C.request_errors] += 1
    if err == "internal_error":
        f[C.internal_errors] += 1
    if backend is None:
        return   # refused before it was routed
    now = int(time.time())
    b = backend.counts
    b[C.sessions] += 1
    b[C.bytes_in] += up
    b[C.bytes_out] += down
    b[C.last_session] = now
    if status != -2:
        b[C.http_requests] += 1
        b[_status_index(status)] += 1
    if err == "internal_error":
        b[C.internal_errors] += 1
    if tried:
        failed = tried[:-1] if connected else tried
        b[C.connection_errors] += len(failed)
        for server in failed:
            server.counts[C.connection_errors] += 1
        # A retry is counted on the server that failed; a redispatch when
        # it went to another server (proxyd's retries do whenever they can).
        for before, after in zip(tried, tried[1:]):
            before.counts[C.retries] += 1
            b[C.retries] += 1
            if before is not after:
                before.counts[C.redispatches] += 1
                b[C.redispatches] += 1
    if not connected:
        return
    s = tried[-1].counts
    s[C.sessions] += 1
    s[C.bytes_in] += up
    s[C.bytes_out] += down
    s[C.last_session] = now
    if status != -2:
        s[_status_index(status)] += 1
    if _server_failed(term, err, status == -2):
        b[C.response_errors] += 1
        s[C.response_errors] += 1


def _server_failed(term: str, err: str, tcp: bool) -> bool:
    """The server aborted or went silent once connected.  In tcp mode proxyd
    marks every end by a FIN with who sent it (SD: the server), an abort
    only by its error; a timeout_fin after the server's FIN is the client's."""
    if term[:1] == "s":
        return True
    if term[:1] != "S":
        return False
    return not tcp or bool(err) and err != "timeout_fin"


def _status_index(status: int) -> int:
    """The counter of STATUS's class: 1xx..5xx, or other (none sent, or out of range)."""
    return C.http_1xx + status // 100 - 1 if 100 <= status <= 599 else C.http_other
