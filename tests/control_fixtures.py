"""Fixtures shared by the tests of the control process (health checks, the
runtime API): a short admin-socket path, proxyd with its control processes
ended at teardown, and health-checked servers."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.support import CheckedServer, control_processes


@pytest.fixture
def admin_path():
    """A short path for the admin socket (a unix socket path has 108 bytes at most)."""
    directory = tempfile.mkdtemp(prefix="pxc-", dir="/tmp")
    yield os.path.join(directory, "admin.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def proxyd(proxyd):
    """conftest's proxyd, with the control processes alive at the end put
    among the processes its cleanup ends (a stuck one outlives its master)."""
    started = []

    def start(*args, **kw):
        started.append(proxyd(*args, **kw))
        return started[-1]

    yield start
    for p in started:
        control_processes(p)


@pytest.fixture
def servers():
    """servers(*names) -> CheckedServers, closed at teardown."""
    started: list[CheckedServer] = []

    def make(*names: str) -> list[CheckedServer]:
        made = [CheckedServer(name) for name in names]
        started.extend(made)
        return made

    yield make
    for s in reversed(started):
        s.close()
