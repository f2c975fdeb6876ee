"""What a reload would change: a loaded Config as plain data, and the
difference between two of them in words.

`config_as_dict` is the canonical form: the running proxy serves it as JSON
(`show config` on the admin socket) and `proxyd -c FILE --check --diff`
compares it with FILE's, through `diff`.  Both sides may come from different
versions of proxyd, so `diff` takes keys missing on one side as unset.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from proxyd.config import Address, BackendConfig, Config, FrontendConfig

INFINITY = float("inf")


# ------------------------------------------------------------ canonical form

def config_as_dict(config: Config) -> dict:
    """Every key's effective value, JSON-serialisable: frontends and
    backends by name, servers by name inside their backend, routes as a list,
    durations in seconds (0 = no timeout, as in the file), addresses as
    written in the file (a server's resolved addresses beside them)."""
    return {
        "global": _plain_fields(config.global_),
        "frontends": {name: _frontend(fe) for name, fe in config.frontends.items()},
        "backends": {name: _backend(be) for name, be in config.backends.items()},
    }


def _frontend(fe: FrontendConfig) -> dict:
    return _plain_fields(fe, skip=("name",))


def _backend(be: BackendConfig) -> dict:
    values = _plain_fields(be, skip=("name", "servers"))
    values["servers"] = {server.name: _server(server) for server in be.servers}
    return values


def _server(server) -> dict:
    values = _plain_fields(server, skip=("name",))
    # a reload looks names up again: what they stand for is part of the config
    values["resolved"] = [_sockaddr_text(family, sockaddr) for family, sockaddr in server.address.resolved]
    return values


def _plain_fields(obj: Any, skip: tuple[str, ...] = ()) -> dict:
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}


def _plain(value: Any) -> Any:
    """VALUE as JSON has it: the same after a json.dumps / json.loads round trip."""
    if isinstance(value, Address):
        return value.written
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):  # every float of a Config is a duration in seconds
        if value == INFINITY:
            return 0  # "no timeout", written 0 in the file
        return int(value) if value.is_integer() else value
    if dataclasses.is_dataclass(value):
        return _plain_fields(value)
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}  # JSON keys are strings
    raise TypeError(f"no canonical form for {value!r}")


def _sockaddr_text(family: int, sockaddr: tuple) -> str:
    return str(Address(sockaddr[0], sockaddr[1], family))


# ----------------------------------------------------------------- the diff

def diff(old: dict, new: dict) -> list[str]:
    """What a reload from OLD to NEW (both from config_as_dict) would change,
    one line each; [] when nothing would."""
    lines = [f"global: {change}" for change in _key_changes(old.get("global", {}), new.get("global", {}))]
    lines += _sections("frontend", old.get("frontends", {}), new.get("frontends", {}),
                       _frontend_summary, _frontend_changes)
    lines += _sections("backend", old.get("backends", {}), new.get("backends", {}),
                       _backend_summary, _backend_changes)
    return lines


def _sections(kind: str, old: dict, new: dict, summary, changes) -> list[str]:
    """Removed, then added or changed, each in its file's order."""
    lines = [f"{kind} {name} removed" for name in old if name not in new]
    for name, table in new.items():
        if name not in old:
            lines.append(f"{kind} {name} added ({summary(table)})")
        else:
            lines += [f"{kind} {name}: {change}" for change in changes(old[name], table)]
    return lines


def _frontend_summary(fe: dict) -> str:
    return f"bind {_show(fe.get('bind'))}, backend {_show(fe.get('backend'))}"


def _backend_summary(be: dict) -> str:
    servers = be.get("servers", {})
    return f"{len(servers)} server{'' if len(servers) == 1 else 's'}: {', '.join(servers) or '(none)'}"


def _frontend_changes(old: dict, new: dict) -> list[str]:
    lines = _key_changes(old, new, skip=("routes",))
    return lines + _route_changes(old.get("routes", []), new.get("routes", []))


def _backend_changes(old: dict, new: dict) -> list[str]:
    lines = _key_changes(old, new, skip=("servers",))
    return lines + _server_changes(old.get("servers", {}), new.get("servers", {}))


def _server_changes(old: dict, new: dict) -> list[str]:
    lines = [f"server {name} removed" for name in old if name not in new]
    for name, server in new.items():
        if name not in old:
            lines.append(f"server {name} added ({_server_summary(server)})")
            continue
        # a new address has new resolved addresses: saying so twice is noise
        skip = ("resolved",) if old[name].get("address") != server.get("address") else ()
        lines += [f"server {name}: {change}" for change in _key_changes(old[name], server, skip=skip)]
    kept_old = [name for name in old if name in new]
    kept_new = [name for name in new if name in old]
    if kept_old != kept_new:  # balance = "first" takes them in order
        lines.append(f"server order {', '.join(kept_old)} -> {', '.join(kept_new)}")
    return lines


def _server_summary(server: dict) -> str:
    parts = [_show(server.get("address")), f"weight {_show(server.get('weight'))}"]
    if server.get("maxconn"):
        parts.append(f"maxconn {server['maxconn']}")
    if server.get("backup"):
        parts.append("backup")
    return ", ".join(parts)


def _route_changes(old: list, new: list) -> list[str]:
    """Routes are tried in order: inserted, removed and replaced ones by position."""
    before, after = [_route_text(r) for r in old], [_route_text(r) for r in new]
    lines = []
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "replace" and i2 - i1 == j2 - j1:
            lines += [f"routes[{j}]: {before[i]} -> {after[j]}" for i, j in zip(range(i1, i2), range(j1, j2))]
            continue
        if op in ("delete", "replace"):
            lines += [f"routes[{i}] removed ({before[i]})" for i in range(i1, i2)]
        if op in ("insert", "replace"):
            lines += [f"routes[{j}] added ({after[j]})" for j in range(j1, j2)]
    return lines


def _route_text(route: dict) -> str:
    """"host a.example, path_prefix /v1/, backend api": the keys it sets."""
    return ", ".join(f"{key} {_show(value)}" for key, value in route.items() if value is not None)


def _key_changes(old: dict, new: dict, skip: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """"key old -> new" for each key whose value differs; tables key by key."""
    lines = []
    for key in [*old, *(k for k in new if k not in old)]:
        if key in skip:
            continue
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            lines += _key_changes(before, after, prefix=f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key} {_show(before)} -> {_show(after)}")
    return lines


def _show(value: Any) -> str:
    """VALUE as a user reads it: TOML's words, seconds without ".0"."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, list):
        return ", ".join(_show(item) for item in value) or "(none)"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} {_show(item)}" for key, item in value.items()) + "}"
    return str(value)
