"""Checks of the names that settings and requests carry: user ids and host entries.

Kept apart from :mod:`sandbox_core.config` so that a request (and a client of the service)
can check them without building the config's classes.
"""

from __future__ import annotations

import re

from sandbox_core.errors import ConfigError

_USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
HOST_PATTERN = re.compile(rf"^(\*|(\*\.)?{_LABEL}(\.{_LABEL})*)$")
"""A host name (lower case, labels of letters, digits, ``-``, ``_``), ``*.SUFFIX`` or ``*``."""


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """``NAME[:PORT]`` as (name, port or None), or ValueError saying what is wrong."""
    if not isinstance(entry, str) or entry != entry.strip() or not entry:
        raise ValueError(f"{entry!r} is not a host name")
    name, sep, port_text = entry.lower().rpartition(":") if ":" in entry else (entry.lower(), "", "")
    port: int | None = None
    if sep:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{entry!r}: the port must be 1-65535")
        port = int(port_text)
    name = name.rstrip(".") if name != "." else name
    if is_ip_literal(name.strip("[]")):
        raise ValueError(f"{entry!r} is an IP address: addresses are allowed by network.allow_private")
    if len(name) > 253 or not HOST_PATTERN.match(name):
        raise ValueError(f"{entry!r} is not a host name, '*.SUFFIX' or '*' (with an optional ':PORT')")
    return name, port


def is_ip_literal(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address."""
    import ipaddress  # here: a client checking its request's host names rarely meets one

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def validate_user_id(user_id: str) -> str:
    """A user id names exactly one directory below the workspace root, or ConfigError."""
    if not isinstance(user_id, str) or not _USER_ID.match(user_id) or user_id in {".", ".."}:
        raise ConfigError(
            "user_id",
            f"{user_id!r} is not a valid user id (letters, digits, '_', '.', '@', '-'; "
            "1-64 chars; must not start with a symbol)",
        )
    return user_id
