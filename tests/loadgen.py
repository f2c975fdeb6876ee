"""A load client for the integration tests, run as its own process so that
the test process's GIL does not throttle it:

    python -m tests.loadgen PORT DURATION [--seed N] [--rate R] [--timeout T]

For DURATION seconds it opens short sessions to 127.0.0.1:PORT, one after
the other: connect, send a small request (random bytes, 16 to 512 of them),
read the reply until EOF, close.  A request is a 2-byte big-endian length
and that many bytes; the server is expected to echo the whole request and
then close (see support.echo_close_handler).  Every session is counted
in exactly one outcome:

    ok        the reply was the request, byte for byte, then EOF
    refused   ECONNREFUSED on connect
    reset     ECONNRESET / EPIPE / ECONNABORTED at any point
    short     EOF before the whole request came back
    wrong     bytes differ from the request, or more bytes than sent
    timeout   connect, send or recv took longer than TIMEOUT
    other     any other OSError (errno name kept in the samples)

At most RATE sessions a second are started (0: as fast as they complete).
SIGTERM ends the run early, once the session under way is over.
Prints one JSON object on stdout at the end: the counts, the number of
sessions, and up to 10 samples of failures with their time offsets.
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import signal
import socket
import sys
import time

OUTCOMES = ("ok", "refused", "reset", "short", "wrong", "timeout", "other")
RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}


def session(port: int, request: bytes, timeout: float) -> tuple[str, str]:
    """One session; (outcome, detail)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionRefusedError:
        return "refused", "connect"
    except socket.timeout:
        return "timeout", "connect"
    except OSError as e:
        return _classify(e, "connect")
    try:
        try:
            sock.sendall(request)
        except socket.timeout:
            return "timeout", "send"
        except OSError as e:
            return _classify(e, "send")
        reply = bytearray()
        while len(reply) <= len(request):
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return "timeout", f"recv after {len(reply)} bytes"
            except OSError as e:
                return _classify(e, f"recv after {len(reply)} bytes")
            if not data:
                break
            reply += data
        if len(reply) < len(request):
            return ("short" if request.startswith(bytes(reply)) else "wrong"), \
                f"{len(reply)} of {len(request)} bytes, then EOF"
        if bytes(reply) != request:
            return "wrong", f"{len(reply)} bytes for a {len(request)}-byte request"
        return "ok", ""
    finally:
        sock.close()


def _classify(e: OSError, where: str) -> tuple[str, str]:
    name = errno.errorcode.get(e.errno, str(e.errno))
    if e.errno == errno.ECONNREFUSED:
        return "refused", f"{where}: {name}"
    if e.errno in RESET_ERRNOS:
        return "reset", f"{where}: {name}"
    return "other", f"{where}: {name}"


class Stop:
    requested = False

    @classmethod
    def request(cls, signum, frame) -> None:
        cls.requested = True


def run(port: int, duration: float, seed: int, rate: float, timeout: float) -> dict:
    rng = random.Random(seed)
    counts = dict.fromkeys(OUTCOMES, 0)
    samples: list[str] = []
    start = time.monotonic()
    end = start + duration
    n = 0
    while True:
        now = time.monotonic()
        if now >= end or Stop.requested:
            break
        if rate:
            due = start + n / rate
            if due > now:
                time.sleep(min(due - now, end - now))  # pacing of the load, not a wait for a result
                continue
        body = rng.randbytes(rng.randint(16, 512))
        request = len(body).to_bytes(2, "big") + body
        outcome, detail = session(port, request, timeout)
        counts[outcome] += 1
        n += 1
        if outcome != "ok" and len(samples) < 10:
            samples.append(f"t={time.monotonic() - start:.3f}s {outcome}: {detail}")
    return {"counts": counts, "sessions": n, "samples": samples,
            "elapsed": round(time.monotonic() - start, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="loadgen")
    parser.add_argument("port", type=int)
    parser.add_argument("duration", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, Stop.request)
    result = run(args.port, args.duration, args.seed, args.rate, args.timeout)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
