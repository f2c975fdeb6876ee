"""Lifecycle of a running proxyd: SIGHUP reloads (by generations, under load,
with broken files, changed backends and frontends, grace, max_draining),
worker heartbeat, TTIN/TTOU, USR1.

Load comes from separate client processes (tests/loadgen.py) so that the
test process's GIL throttles none of them; every session they make is
counted as ok, refused, reset, short, wrong, timeout or other, and every
outcome but ok must stay at zero.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest

from tests.support import (LOCALHOST, alive, connect, connection_refused, echo_close_handler,
                           echo_handler, free_port, greet_handler, listen_count, parse_access_line, recv_all,
                           recv_exactly, tcp_config, to_toml, wait_closed, wait_for)

ERRORS = ("refused", "reset", "short", "wrong", "timeout", "other")


# ------------------------------------------------------------------ helpers

def exchange(client: socket.socket, data: bytes) -> None:
    client.sendall(data)
    assert recv_exactly(client, len(data)) == data


def echo_once(port: int, data: bytes = b"are you there?\n") -> None:
    with connect(port, timeout=15) as client:
        exchange(client, data)


def framed_once(port: int, body: bytes = b"one more session") -> None:
    """One session of the echo_close_handler protocol (as the load clients)."""
    request = len(body).to_bytes(2, "big") + body
    with connect(port, timeout=15) as client:
        client.sendall(request)
        assert recv_all(client) == request


def greeting(port: int) -> bytes:
    with connect(port, timeout=15) as client:
        return recv_all(client)


def log_count(proxy, text: str) -> int:
    return proxy.log_text().count(text)


def wait_log(proxy, text: str, timeout: float = 10.0, count: int = 1) -> None:
    """Wait until TEXT occurs COUNT times in the proxy's log."""
    try:
        wait_for(lambda: log_count(proxy, text) >= count, timeout, repr(text))
    except AssertionError:
        raise AssertionError(f"{text!r} not logged {count} time(s) within {timeout}s; "
                             f"log tail:\n{proxy.log_tail(30)}") from None


def reload(proxy, generation: int, timeout: float = 15.0) -> None:
    """HUP, then wait until generation GENERATION serves (its workers are up
    and the older ones were told to drain)."""
    proxy.signal(signal.SIGHUP)
    wait_log(proxy, f"generation {generation} serving", timeout)


def generations(proxy) -> dict[int, int]:
    """pid -> generation, of the workers alive now."""
    return proxy.worker_generations()


def wait_workers(proxy, predicate, what: str, timeout: float = 10.0) -> dict[int, int]:
    """Wait until PREDICATE(pid -> generation of live workers) holds."""
    state: dict[int, int] = {}

    def check():
        nonlocal state
        state = generations(proxy)
        return predicate(state)

    try:
        wait_for(check, timeout, what)
    except AssertionError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; workers (pid: gen): "
                             f"{state}; log tail:\n{proxy.log_tail(30)}") from None
    return state


def holder(proxy, client: socket.socket) -> psutil.Process:
    """The worker process serving CLIENT's session."""
    return wait_for(lambda: proxy.worker_of(client), 10, "the worker holding the session")


def rewrite(proxy, config) -> None:
    proxy.config_path.write_text(config if isinstance(config, str) else to_toml(config))


def describe_load(result: dict, proxy) -> str:
    other = [line for line in proxy.log_lines() if parse_access_line(line) is None]
    terms: dict[str, int] = {}
    for line in proxy.access_lines():
        terms[line.term] = terms.get(line.term, 0) + 1
    return (f"load: {result['counts']} in {result['sessions']} sessions; failures: {result['samples']}; "
            f"access-line terms: {terms}; proxyd messages (last 40):\n" + "\n".join(other[-40:]))


def assert_no_errors(result: dict, proxy, at_least: int) -> None:
    counts = result["counts"]
    errors = {k: counts.get(k, 0) for k in ERRORS if counts.get(k, 0)}
    assert not errors, f"sessions lost: {errors}\n{describe_load(result, proxy)}"
    assert counts["ok"] >= at_least, f"only {counts['ok']} sessions succeeded\n{describe_load(result, proxy)}"


# ------------------------------------------------------------------ reloads

def test_reloads_under_load_lose_nothing(backend, tcp_proxy, load):
    """4 client processes, short sessions for 10 s, SIGHUP every 0.5 s:
    not one session refused, reset, cut short or garbled."""
    echo = backend(echo_close_handler)
    proxy = tcp_proxy([echo], workers=2)
    master = proxy.pid
    duration = 10.0
    clients = load(proxy.port, duration, processes=4, rate=100)

    start = time.monotonic()
    hups = 0
    while hups < 2 * duration - 1:
        due = start + 0.5 * (hups + 1)
        time.sleep(max(due - time.monotonic(), 0))  # the pacing of the reloads
        proxy.signal(signal.SIGHUP)
        hups += 1
    result = clients.result()

    assert_no_errors(result, proxy, at_least=500)
    assert proxy.running() and proxy.pid == master
    # Every HUP made a generation, and the last one ends up alone.
    last = 1 + hups
    wait_log(proxy, f"generation {last} serving", 15)
    assert log_count(proxy, "reloading ") == hups
    wait_workers(proxy, lambda g: sorted(g.values()) == [last, last],
                 f"only the 2 workers of generation {last} left")
    log = proxy.log_text()
    assert "reload aborted" not in log and "reload failed" not in log, proxy.log_tail(40)
    assert " died" not in log and "killing it" not in log, proxy.log_tail(40)


def test_long_session_survives_reloads(backend, tcp_proxy):
    """A session opened before three reloads keeps relaying across them; its
    worker (generation 1) stays until the session ends, then exits."""
    echo = backend(echo_handler)
    # grace: the default 30 s; the echo server waits for an EOF that is not
    # passed on, so the session ends timeout_fin after the client's close.
    proxy = tcp_proxy([echo], workers=2, frontend={"timeout_fin": "300ms"})
    client = connect(proxy.port, timeout=15)
    exchange(client, b"before any reload\n")
    old = holder(proxy, client)
    assert generations(proxy)[old.pid] == 1
    sent = len(b"before any reload\n")

    for generation in (2, 3, 4):
        reload(proxy, generation)
        for i in range(3):
            data = b"gen %d round %d " % (generation, i) + b"x" * 20000 + b"\n"
            exchange(client, data)
            sent += len(data)
        # The idle old workers go; the one holding the session stays.
        wait_workers(proxy, lambda g: g.get(old.pid) == 1 and len(g) == 3
                     and sorted(g.values()) == [1, generation, generation],
                     f"generation {generation} up, only the session's old worker left beside it")

    assert alive(old)
    client.close()  # the session ends by itself...
    wait_for(lambda: not alive(old), 10, "the old worker to exit once its session ended")
    # ...and it was whole: every byte went up and came back.
    rec = echo.wait_done(1)[0]
    assert (rec.received, rec.sent) == (sent, sent)
    line = [a for a in proxy.wait_access_lines(1) if a.pid == old.pid]
    assert len(line) == 1 and (line[0].term, line[0].fin) == ("--", "client"), [a.raw for a in proxy.access_lines()]
    assert (line[0].up, line[0].down) == (sent, sent), line[0].raw


BROKEN = {
    "toml-syntax": ("[frontends.fe\nbind = \n", "invalid TOML"),
    "unknown-backend": (None, "frontends.fe.backend: no backend named 'nosuch'"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_reload_keeps_running_config(kind, backend, proxyd):
    """A reload with an invalid file is refused and logged with the file and
    key path; the same master and the same workers keep serving the old
    configuration, and a later valid reload still works."""
    alpha = backend(greet_handler, name="alpha")
    port = free_port()
    good = tcp_config(port, [alpha])
    proxy = proxyd(good)
    master = proxy.pid
    before = generations(proxy)
    assert greeting(port) == b"alpha"

    text, expected = BROKEN[kind]
    if text is None:
        broken = tcp_config(port, [alpha])
        broken["frontends"]["fe"]["backend"] = "nosuch"
        text = to_toml(broken)
    rewrite(proxy, text)
    proxy.signal(signal.SIGHUP)

    wait_log(proxy, "reload failed, keeping the running configuration:")
    failure = [line for line in proxy.log_lines() if "reload failed" in line]
    assert len(failure) == 1 and str(proxy.config_path) in failure[0] and expected in failure[0], failure
    for i in range(6):
        assert greeting(port) == b"alpha"
    assert proxy.running() and proxy.pid == master
    assert generations(proxy) == before, "the workers should be the same processes, still generation 1"
    assert "reloading " not in proxy.log_text()

    # The master is still able to reload.
    rewrite(proxy, good)
    reload(proxy, 2)
    wait_workers(proxy, lambda g: sorted(g.values()) == [2, 2], "generation 2 alone")
    assert greeting(port) == b"alpha"


def test_reload_changes_backend_address(backend, tcp_proxy):
    """After a reload that moves the server to another address, new sessions
    go to the new address."""
    alpha = backend(greet_handler, name="alpha")
    beta = backend(greet_handler, name="beta")
    proxy = tcp_proxy([alpha], workers=2)
    config = tcp_config(proxy.port, [alpha])
    for _ in range(4):
        assert greeting(proxy.port) == b"alpha"

    config["backends"]["be"]["servers"][0]["address"] = beta.address
    rewrite(proxy, config)
    reload(proxy, 2)
    wait_workers(proxy, lambda g: sorted(g.values()) == [2, 2], "generation 1 gone, generation 2 alone")
    seen_by_alpha = len(alpha.connections())

    replies = [greeting(proxy.port) for _ in range(10)]
    assert replies == [b"beta"] * 10
    assert len(alpha.connections()) == seen_by_alpha
    assert len(beta.connections()) == 10


def test_reload_adds_and_removes_frontend(backend, tcp_proxy):
    """A frontend added by a reload listens and relays; once a reload removes
    it, its port refuses connections and nobody holds it any more."""
    alpha = backend(greet_handler, name="alpha")
    proxy = tcp_proxy([alpha], workers=2)
    config = tcp_config(proxy.port, [alpha])
    new_port = free_port()
    assert connection_refused(new_port)

    config["frontends"]["fe2"] = {"bind": [f"{LOCALHOST}:{new_port}"], "backend": "be"}
    rewrite(proxy, config)
    reload(proxy, 2)
    assert listen_count(new_port) >= 1
    for _ in range(4):
        assert greeting(new_port) == b"alpha"
        assert greeting(proxy.port) == b"alpha"

    del config["frontends"]["fe2"]
    rewrite(proxy, config)
    reload(proxy, 3)
    wait_for(lambda: connection_refused(new_port), 10, f"port {new_port} to refuse connections")
    wait_for(lambda: listen_count(new_port) == 0, 10, f"no LISTEN socket on {new_port}")
    # Nobody holds the port: a plain bind, without SO_REUSEPORT, gets it.
    # (SO_REUSEADDR only lets it share with TIME_WAIT leftovers, never with a listener.)
    with socket.socket() as mine:
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        mine.bind((LOCALHOST, new_port))
        mine.listen(1)
    # The frontend that stayed was never interrupted.
    assert greeting(proxy.port) == b"alpha"


def test_old_workers_gone_within_grace(backend, tcp_proxy):
    """grace = 2s: a session held open across a reload still works at first;
    its old worker ends it when grace runs out and exits."""
    grace = 2.0
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo], workers=2, global_={"grace": "2s"})
    client = connect(proxy.port, timeout=15)
    exchange(client, b"before the reload\n")
    old_workers = proxy.workers()
    old = holder(proxy, client)

    reload(proxy, 2)
    exchange(client, b"during the grace period\n")

    # Upper bound only: the worker checks its deadline once a second.
    wait_for(lambda: not any(alive(w) for w in old_workers), grace + 4,
             f"generation 1 workers (held session on pid {old.pid}) to exit within grace + 4 s")
    assert wait_closed(client, 5) in ("eof", "reset"), "the held session should have been cut"
    client.close()
    wait_log(proxy, "grace expired with 1 sessions open")
    assert sorted(generations(proxy).values()) == [2, 2]
    echo_once(proxy.port)


def test_quick_reloads_do_not_pile_up_generations(backend, proxyd):
    """max_draining = 1, grace 60 s: each old generation holds a session;
    past one draining generation, the oldest is stopped at once."""
    echo = backend(echo_handler)
    port = free_port()
    proxy = proxyd(tcp_config(port, [echo], workers=2, global_={"max_draining": 1, "grace": "60s"}))

    def old_generations(current: int) -> set[int]:
        return {g for g in generations(proxy).values() if g != current}

    first = connect(port, timeout=15)
    exchange(first, b"on generation 1\n")
    w1 = holder(proxy, first)

    reload(proxy, 2)
    wait_workers(proxy, lambda g: sorted(g.values()) == [1, 2, 2] and w1.pid in g,
                 "generation 1's idle worker gone, its busy one draining")
    wait_log(proxy, "gen 1 draining 1 sessions")  # w1 no longer accepts
    second = connect(port, timeout=15)
    exchange(second, b"on generation 2\n")
    w2 = holder(proxy, second)
    assert generations(proxy)[w2.pid] == 2
    exchange(first, b"one draining generation is within the limit\n")
    assert alive(w1)

    reload(proxy, 3)
    # Two old generations would be draining: the oldest (1) is stopped now.
    wait_for(lambda: not alive(w1), 10, "generation 1 stopped at once (max_draining = 1)")
    assert wait_closed(first, 5) in ("eof", "reset")
    wait_log(proxy, "stopping generation 1 now")
    wait_workers(proxy, lambda g: len(old_generations(3)) <= 1, "at most 1 old generation alive")
    exchange(second, b"generation 2 drains on\n")
    assert alive(w2)

    reload(proxy, 4)
    wait_for(lambda: not alive(w2), 10, "generation 2 stopped at once (max_draining = 1)")
    assert wait_closed(second, 5) in ("eof", "reset")
    wait_log(proxy, "stopping generation 2 now")
    wait_workers(proxy, lambda g: sorted(g.values()) == [4, 4], "generation 4 alone")
    first.close()
    second.close()
    echo_once(port)


# ------------------------------------------------------------ TTIN / TTOU

def test_ttin_ttou_under_load_lose_nothing(backend, tcp_proxy, load):
    """Under load: TTIN, TTIN, TTOU, TTOU, TTOU about a second apart; the
    worker count follows (2, 3, 4, 3, 2, 1) and no session is lost."""
    echo = backend(echo_close_handler)
    proxy = tcp_proxy([echo], workers=2)
    clients = load(proxy.port, 20.0, processes=4, rate=100)  # finished early below
    steps = [(signal.SIGTTIN, "TTIN", 3), (signal.SIGTTIN, "TTIN", 4),
             (signal.SIGTTOU, "TTOU", 3), (signal.SIGTTOU, "TTOU", 2), (signal.SIGTTOU, "TTOU", 1)]
    try:
        due = time.monotonic() + 0.5
        for sig, name, count in steps:
            time.sleep(max(due - time.monotonic(), 0))  # pacing: a second or so per step
            proxy.signal(sig)
            due = time.monotonic() + 1.0
            wait_log(proxy, f"{name}: now {count} workers")
            slots = wait_workers(proxy, lambda g: len(g) == count, f"{count} workers after {name}")
            assert sorted(proxy.worker_slots().values()) == list(range(1, count + 1)), slots
        time.sleep(max(due - time.monotonic(), 0))  # a last second of load on one worker
    finally:
        clients.finish()
    result = clients.result()

    assert_no_errors(result, proxy, at_least=200)
    assert len(proxy.workers()) == 1
    framed_once(proxy.port)


def test_ttou_keeps_the_last_worker(backend, tcp_proxy):
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo], workers=1)
    before = proxy.worker_pids()
    assert len(before) == 1

    proxy.signal(signal.SIGTTOU)

    wait_log(proxy, "TTOU ignored")
    for i in range(4):
        echo_once(proxy.port, b"still here %d\n" % i)
    assert proxy.worker_pids() == before
    assert "TTOU: now" not in proxy.log_text()


# ------------------------------------------------------------ heartbeat

def test_stopped_worker_is_replaced(backend, tcp_proxy):
    """worker_timeout = 2s: a SIGSTOPped worker is killed and replaced in its
    slot; sessions that queued on its socket meanwhile are served by the
    replacement."""
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo], workers=2, global_={"worker_timeout": "2s"})
    slots = proxy.worker_slots()
    victim_pid = next(pid for pid, slot in slots.items() if slot == 2)
    victim = psutil.Process(victim_pid)
    os.kill(victim_pid, signal.SIGSTOP)
    clients = []
    try:
        # Opened while the worker is stopped: about half of them wait in its queue.
        for i in range(16):
            client = connect(proxy.port, timeout=15)
            clients.append(client)
            client.sendall(b"queued %d\n" % i)

        def replaced():
            now = proxy.worker_slots()
            return now if sorted(now.values()) == [1, 2] and victim_pid not in now else None

        now = wait_for(replaced, 15, "a new worker in slot 2")
        assert not alive(victim), "the stopped worker should have been killed"
        wait_log(proxy, f"(pid {victim_pid}) has not answered for")
        for i, client in enumerate(clients):
            assert recv_exactly(client, len(b"queued %d\n" % i)) == b"queued %d\n" % i
        new_pid = next(pid for pid, slot in now.items() if slot == 2)
        # Some of those had queued on the stopped worker's socket: its
        # replacement took them from the same kernel queue.
        held = [getattr(proxy.worker_of(client), "pid", None) for client in clients]
        assert held.count(new_pid) >= 1, f"sessions by worker pid: {held}; new worker {new_pid}"
        assert set(held) <= set(now), held
    finally:
        for client in clients:
            client.close()
        if alive(victim):
            os.kill(victim_pid, signal.SIGCONT)  # let the fixture's TERM reach it

    assert new_pid != victim_pid
    for i in range(10):
        echo_once(proxy.port, b"after the replacement %d\n" % i)


# ------------------------------------------------------------------ USR1

def test_usr1_reopens_log_file(backend, tcp_proxy, tmp_path):
    """log = a file: after logrotate moves it away and sends USR1, the master
    and the workers write to a new file at the original path."""
    logfile = tmp_path / "proxyd-file.log"
    rotated = tmp_path / "proxyd-file.log.1"
    echo = backend(echo_handler)
    proxy = tcp_proxy([echo], workers=2, global_={"log": str(logfile)}, frontend={"timeout_fin": "300ms"})

    def access_lines(path):
        return [a for a in map(parse_access_line, path.read_text().splitlines()) if a]

    for i in range(2):
        echo_once(proxy.port)
    wait_for(lambda: len(access_lines(logfile)) == 2, 10, "2 access lines in the log file")
    os.rename(logfile, rotated)

    proxy.signal(signal.SIGUSR1)

    wait_for(lambda: logfile.exists() and "log reopened" in logfile.read_text(), 10,
             "the master to log into a new file at the original path")
    processes = [proxy.master] + proxy.workers()

    def reopened():
        paths = []
        for proc in processes:
            try:
                paths.append({f.path for f in proc.open_files()})
            except psutil.NoSuchProcess:
                return False
        return all(str(logfile) in p and str(rotated) not in p for p in paths)

    wait_for(reopened, 10, "master and workers to hold the new log file, not the rotated one")
    rotated_size = rotated.stat().st_size
    for i in range(6):
        echo_once(proxy.port, b"after USR1 %d\n" % i)
    wait_for(lambda: len(access_lines(logfile)) == 6, 10, "6 access lines in the new log file")
    assert rotated.stat().st_size == rotated_size, "nothing more should go to the rotated file"
    assert len(access_lines(rotated)) == 2
    assert set(proxy.worker_pids()) == {p.pid for p in processes[1:]}


def test_reloads_changing_worker_count_lose_nothing(backend, tcp_proxy, load):
    """Reloads that change `workers` (3 -> 1 -> 2 -> 4 -> 2) under load: the
    sockets of slots that go away are kept, drained by the remaining workers
    and steered away from, so nothing queued on them is reset."""
    echo = backend(echo_close_handler)
    proxy = tcp_proxy([echo], workers=3)
    config = tcp_config(proxy.port, [echo], workers=3)
    clients = load(proxy.port, 7.0, processes=4, rate=100)
    counts = (1, 2, 4, 2)
    for generation, count in enumerate(counts, start=2):
        time.sleep(1.2)  # the pacing of the reloads
        config["global"]["workers"] = count
        rewrite(proxy, config)
        reload(proxy, generation)
    result = clients.result()
    assert_no_errors(result, proxy, at_least=300)
    last = 1 + len(counts)
    wait_workers(proxy, lambda g: sorted(g.values()) == [last] * counts[-1],
                 f"only the {counts[-1]} workers of generation {last} left")
