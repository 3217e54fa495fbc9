"""Who is calling the service, and what they may do.

* TCP: every request carries ``Authorization: Bearer TOKEN``. Tokens come from the file
  named by ``service.tokens_file`` (never from a command line); each maps to a user id
  and a role. The file may hold the token itself or only its SHA-256.
* Unix socket: the peer's uid (SO_PEERCRED) maps to a user: the login name of that uid.
  root, the server's own uid and ``service.operator_uids`` are operators.

The user id of a run always comes from these credentials, never from a request body.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sandbox_core.errors import ConfigError
from sandbox_core.names import validate_user_id

Role = Literal["user", "operator"]
UNIX_PEER = "unix-peer"
"""Marker in an ASGI scope's ``client`` for a Unix-socket peer: ``(UNIX_PEER, uid)``."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    user_id: str
    role: Role

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


def _digest(token: str) -> str:
    import hashlib  # libcrypto: only the service digests tokens, never a client

    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """Bearer tokens by SHA-256 digest (so lookups never compare secrets directly)."""

    def __init__(self, entries: dict[str, Principal] | None = None) -> None:
        self._by_digest = dict(entries or {})

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        """Load ``[[token]]`` tables with ``token`` or ``sha256``, ``user``, ``role``."""
        import tomllib

        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("service.tokens_file", f"cannot read {path}: {exc}") from None
        if path.stat().st_mode & 0o077:
            raise ConfigError("service.tokens_file", f"{path} must not be readable by group or others (chmod 600)")
        entries: dict[str, Principal] = {}
        for i, item in enumerate(data.get("token", [])):
            where = f"service.tokens_file[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(where, "must be a table")
            role = item.get("role", "user")
            if role not in ("user", "operator"):
                raise ConfigError(where, f"role must be user or operator, got {role!r}")
            user = item.get("user")
            if not isinstance(user, str):
                raise ConfigError(where, "needs a user")
            validate_user_id(user)
            if isinstance(item.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", item["sha256"]):
                digest = item["sha256"]
            elif isinstance(item.get("token"), str) and len(item["token"]) >= 16:
                digest = _digest(item["token"])
            else:
                raise ConfigError(where, "needs a token of at least 16 characters or a sha256 hex digest")
            entries[digest] = Principal(user, role)
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        return self._by_digest.get(_digest(token))


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def principal_for_uid(uid: int, operator_uids: tuple[str, ...] = ()) -> Principal:
    """The principal of a Unix-socket peer: its login name; root/own uid/listed are operators."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid{uid}"
    name = re.sub(r"[^A-Za-z0-9_.@-]", "_", name)
    if not re.match(r"^[A-Za-z0-9]", name):
        name = f"uid{uid}"
    operator = uid == 0 or uid == os.getuid() or str(uid) in operator_uids
    return Principal(name[:64], "operator" if operator else "user")
