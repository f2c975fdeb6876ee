"""`proxyd ctl`: one runtime-API command to the admin socket, its answer printed.

Also the client side of `proxyd -c FILE --check --diff`, which asks the
running proxyd for its configuration with `show config`.
"""

from __future__ import annotations

import argparse
import socket
import sys

TIMEOUT = 10.0


class CtlError(Exception):
    """The admin socket could not be asked (missing, refused, timed out)."""


def ask(path: str, command: str) -> str:
    """Send COMMAND to the admin socket at PATH; its whole answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except FileNotFoundError:
        raise CtlError(f"admin socket {path}: no such file (is proxyd running with admin_socket set?)") from None
    except ConnectionRefusedError:
        raise CtlError(f"admin socket {path}: connection refused (proxyd is not running?)") from None
    except socket.timeout:
        raise CtlError(f"admin socket {path}: no answer within {TIMEOUT:g}s") from None
    except OSError as e:
        raise CtlError(f"admin socket {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    return b"".join(chunks).decode(errors="replace")


def socket_of(config_path: str) -> str:
    """The admin_socket the configuration file names."""
    from proxyd import config as config_module
    config = config_module.load(config_path)
    if not config.global_.admin_socket:
        raise CtlError(f"{config_path}: global.admin_socket is not set: no runtime API to talk to")
    return config.global_.admin_socket


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="proxyd ctl", description="send one runtime-API command")
    parser.add_argument("-s", dest="socket", metavar="SOCKET", help="the admin socket (default: the one FILE names)")
    parser.add_argument("-c", dest="config", metavar="FILE", default="/etc/proxyd/proxyd.toml",
                        help="configuration whose admin_socket to use when -s is not given")
    parser.add_argument("command", nargs="+", metavar="WORD", help='the command, e.g. "show stat"')
    args = parser.parse_args(argv)
    from proxyd.config import ConfigError
    try:
        path = args.socket or socket_of(args.config)
        answer = ask(path, " ".join(args.command))
    except (CtlError, ConfigError) as e:
        print(f"proxyd ctl: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(answer)
    return 0
