"""Server addresses by host name: resolved by the system resolver (/etc/hosts,
DNS) when the configuration is loaded, with real traffic through them."""

from __future__ import annotations

import hashlib
import socket

import pytest

from tests import support
from tests.support import IO_TIMEOUT, free_port


def loopback_name_from_etc_hosts() -> str | None:
    """A name other than localhost that /etc/hosts maps to 127.0.0.1."""
    try:
        with open("/etc/hosts") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if fields and fields[0] == "127.0.0.1":
                    for name in fields[1:]:
                        if name != "localhost" and "." not in name.rstrip("."):
                            return name
    except OSError:
        pass
    return None


def digest_handler(conn, rec, backend) -> None:
    """Read a 4-byte length and that many bytes; answer their SHA-256; close."""
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    rec.feed(data)
    conn.sendall(hashlib.sha256(data[4:]).digest())


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection((support.LOCALHOST, port), timeout=IO_TIMEOUT) as c:
        c.sendall(len(payload).to_bytes(4, "big") + payload)
        chunks = []
        while data := c.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("name", ["localhost", "etc-hosts"])
def test_a_server_named_by_host_name_carries_traffic(name, backend, proxyd):
    host = "localhost" if name == "localhost" else loopback_name_from_etc_hosts()
    if host is None:
        pytest.skip("no name besides localhost for 127.0.0.1 in /etc/hosts")
    server = backend(digest_handler)
    config = support.tcp_config(free_port(), [{"name": "s1", "address": f"{host}:{server.port}"}], workers=2)
    p = proxyd(config)
    for i in range(20):
        payload = hashlib.sha256(b"%d" % i).digest() * (100 + i)
        assert exchange(p.port, payload) == hashlib.sha256(payload).digest()
    assert len(server.records) == 20
