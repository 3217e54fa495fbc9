"""The egress policy as data: which names may be reached, which addresses never.

A destination passes two stages. By **name** (before any resolution): ``network.mode``, then
``network.deny`` (wins), then ``network.allow``, then the user's own list in
``network.users`` (a narrowing: both must allow it). By **address** (after the host resolved
the name, and for IP literals): an address in :data:`BLOCKED_NETWORKS`, or any other address
that is not globally routable, is refused unless ``network.allow_private`` lists it. An IP
literal is reached only when ``network.allow_private`` lists it (whatever ``allow`` says) and
no user or request list narrows the policy (those lists name hosts only).

Wildcards: ``*.github.com`` matches every name *below* ``github.com`` (``api.github.com``,
``a.b.github.com``), not ``github.com`` itself (write both when both are meant), and never
``github.com.evil.example`` or ``evilgithub.com``: a match is a whole-label suffix. ``*``
matches every name. ``NAME:PORT`` restricts the port; without one, any port matches.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from sandbox_core.config import NetworkPolicy, parse_cidr
from sandbox_core.errors import ConfigError
from sandbox_core.names import HOST_PATTERN, is_ip_literal, parse_host_entry

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Reason = Literal[
    "allowed", "mode_none", "bad_name", "denied", "not_allowed", "not_allowed_for_user",
    "not_allowed_for_request", "ip_literal",
    "private_address", "unresolvable", "connect_failed", "max_connections", "max_bytes", "bad_request",
]  # fmt: skip

BLOCKED_NETWORKS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "'this network'"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.169.254/32", "the cloud metadata address"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b::/96", "NAT64 (it embeds an IPv4 address)"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo (it embeds an IPv4 address)"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4 (it embeds an IPv4 address)"),
    ("fd00:ec2::254/128", "the cloud metadata address"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)
"""Addresses a sandbox never reaches unless ``network.allow_private`` lists them; first match
names the kind. Anything else that is not globally routable is refused too."""
_BLOCKED = tuple((ipaddress.ip_network(cidr), kind) for cidr, kind in BLOCKED_NETWORKS)


def blocked_kind(address: Address) -> str | None:
    """What kind of non-public address ``address`` is, or None for a public one."""
    for network, kind in _BLOCKED:
        if address.version == network.version and address in network:
            return kind
    return None if address.is_global else "not globally routable"


def normal_address(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Rule:
    """One ``allow``/``deny`` entry: a name pattern and an optional port."""

    entry: str
    name: str
    port: int | None

    @classmethod
    def parse(cls, entry: str) -> Rule:
        name, port = parse_host_entry(entry)
        return cls(entry, name, port)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.name == "*":
            return True
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])  # ".github.com": whole labels, never the suffix itself
        return host == self.name


    def covers(self, other: Rule) -> bool:
        """Whether every destination ``other`` matches is one this rule matches too."""
        if self.port is not None and other.port != self.port:
            return False
        if self.name == "*":
            return True
        if other.name == "*":
            return False
        if self.name.startswith("*."):
            return other.name.endswith(self.name[1:])  # "a.github.com" and "*.a.github.com" under "*.github.com"
        return other.name == self.name


def check_narrowing(net: NetworkPolicy, user: str | None, entries: tuple[str, ...] | None) -> None:
    """A request's network list must be a subset of what ``user`` may reach, or ConfigError naming
    the first entry that is not (``data["entry"]``): a request narrows the policy, never widens it."""
    if not entries:
        return
    for entry in entries:
        rule = Rule.parse(entry)
        if net.mode != "allowlist":
            widen = "this sandbox has no network access (network.mode = none)"
        elif not any(allowed.covers(rule) for allowed in map(Rule.parse, net.allow)):
            widen = f"it is not within network.allow [{', '.join(net.allow)}]"
        elif user is not None and user in net.users and not any(
            allowed.covers(rule) for allowed in map(Rule.parse, net.users[user])
        ):
            widen = f"it is not within network.users.{user} [{', '.join(net.users[user])}]"
        else:
            continue
        error = ConfigError("network.allow", f"the request's entry {entry!r} would widen the network policy: "
                            f"{widen}; a request may only narrow it")  # fmt: skip
        error.data["entry"] = entry
        raise error


@dataclass(frozen=True)
class Decision:
    """What the host answers one ``egress.open``: allowed, or refused with a reason and a message."""

    allowed: bool
    reason: Reason
    message: str = ""
    status: int = 403
    """HTTP status the proxy answers with: 403 refused by policy, 502 could not connect."""

    @classmethod
    def refuse(cls, reason: Reason, message: str, status: int = 403) -> Decision:
        return cls(False, reason, message, status)


ALLOWED = Decision(True, "allowed")


@dataclass(frozen=True)
class Policy:
    """One user's effective policy, built from ``network`` settings (never widened by a request)."""

    mode: str
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    narrow: tuple[Rule, ...] | None
    user: str | None
    request: tuple[Rule, ...] | None
    hosts: dict[str, Address]
    private: tuple[Network, ...]

    @classmethod
    def for_user(cls, net: NetworkPolicy, user: str | None, request: tuple[str, ...] | None = None) -> Policy:
        """``user``'s policy; ``request`` is a request's own narrowing (both only ever narrow)."""
        narrow = net.users.get(user) if user is not None else None
        return cls(
            request=tuple(map(Rule.parse, request)) if request is not None else None,
            mode=net.mode,
            allow=tuple(map(Rule.parse, net.allow)),
            deny=tuple(map(Rule.parse, net.deny)),
            narrow=tuple(map(Rule.parse, narrow)) if narrow is not None else None,
            user=user,
            hosts={parse_host_entry(k)[0]: ipaddress.ip_address(v) for k, v in net.hosts.items()},
            private=tuple(map(parse_cidr, net.allow_private)),
        )

    def describe(self) -> str:
        """The policy in one line, for a denial's body and the host log."""
        parts = [f"network.mode = {self.mode}"]
        if self.mode != "none":
            parts.append(f"network.allow = [{', '.join(r.entry for r in self.allow)}]")
            if self.deny:
                parts.append(f"network.deny = [{', '.join(r.entry for r in self.deny)}]")
            if self.narrow is not None:
                parts.append(f"network.users.{self.user} = [{', '.join(r.entry for r in self.narrow)}]")
            if self.request is not None:
                parts.append(f"request network = [{', '.join(r.entry for r in self.request)}]")
            parts.append(f"network.allow_private = [{', '.join(map(str, self.private))}]")
        return "; ".join(parts)

    def check_name(self, host: str, port: int) -> Decision:
        """The name stage (``host`` already normalised by :func:`normal_host`)."""
        if self.mode != "allowlist":
            return Decision.refuse("mode_none", "this sandbox has no network access (network.mode = none)")
        where = f"{host}:{port}"
        if is_ip_literal(host):
            address = normal_address(ipaddress.ip_address(host))
            if self.narrow is not None or self.request is not None:  # their lists hold names only
                return Decision.refuse("ip_literal", f"{where} is an IP address, and this user's or request's "
                                       "network list names hosts only")  # fmt: skip
            if self.private_allowed(address):
                return ALLOWED
            why = f"{where} is an IP address, and network.allow_private does not list it"
            return Decision.refuse("ip_literal", why)
        if len(host) > 253 or not HOST_PATTERN.match(host) or host.startswith("*"):
            return Decision.refuse("bad_name", f"{host!r} is not a host name")
        for rule in self.deny:
            if rule.matches(host, port):
                return Decision.refuse("denied", f"{where} matches network.deny entry {rule.entry!r}")
        if not any(rule.matches(host, port) for rule in self.allow):
            return Decision.refuse("not_allowed", f"{where} is not in network.allow")
        if self.narrow is not None and not any(rule.matches(host, port) for rule in self.narrow):
            return Decision.refuse("not_allowed_for_user", f"{where} is not in network.users.{self.user}")
        if self.request is not None and not any(rule.matches(host, port) for rule in self.request):
            return Decision.refuse("not_allowed_for_request", f"{where} is not in this request's network list")
        return ALLOWED

    def private_allowed(self, address: Address) -> bool:
        return any(address.version == net.version and address in net for net in self.private)

    def check_address(self, host: str, address: Address) -> Decision:
        """The address stage: a resolved (or literal) address may be connected to."""
        address = normal_address(address)
        kind = blocked_kind(address)
        if kind is None or self.private_allowed(address):
            return ALLOWED
        return Decision.refuse(
            "private_address", f"{host} resolves to {address} ({kind}), and network.allow_private does not list it"
        )


def normal_host(host: str) -> str:
    """A name as the policy compares it: lower case, no trailing dot, no IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.endswith(".") and host != ".":
        host = host[:-1]
    return host
