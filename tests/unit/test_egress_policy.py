"""The egress policy as data, in memory: config validation, name matching, address tables."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from sandbox_core.config import NetworkPolicy, ProcessSandboxConfig, load_config
from sandbox_core.egress.policy import BLOCKED_NETWORKS, Policy, Rule, blocked_kind, check_narrowing, normal_host
from sandbox_core.errors import ConfigError
from sandbox_core.requests import ExecRequest


def strict(**network: Any) -> ProcessSandboxConfig:
    return ProcessSandboxConfig(profile="strict", workspace_root=Path("/tmp/ws"), network=NetworkPolicy(**network))


@pytest.mark.parametrize(
    ("field", "network", "names"),
    [
        ("network.allow", {"allow": ("pypi.org", "bad name")}, "'bad name'"),
        ("network.allow", {"allow": ("*github.com",)}, "'*github.com'"),
        ("network.allow", {"allow": ("pypi.org:0",)}, "'pypi.org:0'"),
        ("network.allow", {"allow": ("10.0.0.1",)}, "allowed by network.allow_private"),
        ("network.deny", {"deny": ("a..b",)}, "'a..b'"),
        ("network.hosts", {"hosts": {"registry.test": "not-an-address"}}, "'not-an-address'"),
        ("network.hosts", {"hosts": {"*.test": "127.0.0.1"}}, "'*.test'"),
        ("network.allow_private", {"allow_private": ("127.0.0.1/8",)}, "'127.0.0.1/8'"),
        ("network.allow_private", {"allow_private": ("localhost",)}, "'localhost'"),
        ("network.users", {"users": {"../x": ("pypi.org",)}}, "'../x'"),
        ("network.users.bob", {"users": {"bob": ("no way",)}}, "'no way'"),
        ("network.mode", {"mode": "open"}, "'open'"),
        ("network.max_connections", {"max_connections": 0}, "0"),
    ],
)
def test_bad_entries_are_config_errors_naming_them(field: str, network: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError) as info:
        strict(**network)
    assert info.value.field == field and names in info.value.message


def test_the_network_section_loads_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'workspace_root = "/tmp/ws"\n[network]\nmode = "allowlist"\nallow = ["pypi.org", "*.github.com:443"]\n'
        'hosts = { "registry.test" = "127.0.0.1" }\nallow_private = ["127.0.0.1/32"]\n'
        '[network.users]\nbob = ["pypi.org"]\n'
    )
    net = load_config(path, environ={}).config.network
    assert net.mode == "allowlist" and net.allow == ("pypi.org", "*.github.com:443")
    assert net.hosts == {"registry.test": "127.0.0.1"} and net.users == {"bob": ("pypi.org",)}


def test_allowlist_with_the_process_profile_fails_closed() -> None:
    with pytest.raises(ConfigError, match="needs the strict profile"):
        ProcessSandboxConfig(profile="process", network=NetworkPolicy(mode="allowlist"))


@pytest.mark.parametrize(
    ("entry", "host", "port", "matches"),
    [
        ("*.github.com", "api.github.com", 443, True),
        ("*.github.com", "a.b.github.com", 443, True),
        ("*.github.com", "github.com", 443, False),
        ("*.github.com", "github.com.evil.example", 443, False),
        ("*.github.com", "evilgithub.com", 443, False),
        ("registry.npmjs.org:443", "registry.npmjs.org", 443, True),
        ("registry.npmjs.org:443", "registry.npmjs.org", 80, False),
        ("pypi.org", "pypi.org", 8080, True),
        ("pypi.org", "pypi.org.evil.example", 443, False),
        ("*", "anything.example", 1, True),
    ],
)
def test_wildcards_match_whole_labels(entry: str, host: str, port: int, matches: bool) -> None:
    assert Rule.parse(entry).matches(host, port) is matches


def test_names_are_compared_normalised() -> None:
    assert normal_host("PyPI.org.") == "pypi.org" and normal_host("[::1]") == "::1"


def test_deny_wins_then_allow_then_user_then_request() -> None:
    net = NetworkPolicy(mode="allowlist", allow=("*.github.com", "pypi.org"), deny=("gist.github.com",),
                        users={"bob": ("pypi.org",)})  # fmt: skip
    alice, bob = Policy.for_user(net, "alice"), Policy.for_user(net, "bob")
    assert alice.check_name("api.github.com", 443).allowed
    assert alice.check_name("gist.github.com", 443).reason == "denied"
    assert alice.check_name("example.org", 443).reason == "not_allowed"
    assert bob.check_name("api.github.com", 443).reason == "not_allowed_for_user"
    assert bob.check_name("pypi.org", 443).allowed
    narrowed = Policy.for_user(net, "alice", ("pypi.org", "example.org"))
    assert narrowed.check_name("api.github.com", 443).reason == "not_allowed_for_request"
    assert narrowed.check_name("example.org", 443).reason == "not_allowed"  # a request never widens
    off = Policy.for_user(NetworkPolicy(), "alice")
    assert off.check_name("pypi.org", 443).message == "this sandbox has no network access (network.mode = none)"


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
        ("192.168.1.1", "private"), ("169.254.169.254", "the cloud metadata address"),
        ("169.254.1.1", "link-local"), ("100.64.0.1", "carrier-grade NAT"), ("224.0.0.1", "multicast"),
        ("0.0.0.0", "'this network'"), ("192.0.2.1", "documentation (TEST-NET-1)"), ("::1", "loopback"),
        ("fe80::1", "link-local"), ("fd00:ec2::254", "the cloud metadata address"),
        ("fc00::1", "unique local (private)"),
        ("ff02::1", "multicast"), ("8.8.8.8", None), ("2606:4700::1111", None),
    ],
)  # fmt: skip
def test_the_blocked_address_table(address: str, kind: str | None) -> None:
    assert blocked_kind(ipaddress.ip_address(address)) == kind


def test_mapped_addresses_and_allow_private() -> None:
    net = NetworkPolicy(mode="allowlist", allow=("*",), allow_private=("127.0.0.1/32",))
    policy = Policy.for_user(net, None)
    assert policy.check_address("x", ipaddress.ip_address("::ffff:127.0.0.1")).allowed
    assert policy.check_address("x", ipaddress.ip_address("::ffff:10.0.0.1")).reason == "private_address"
    assert policy.check_address("x", ipaddress.ip_address("127.0.0.2")).reason == "private_address"
    assert policy.check_name("127.0.0.1", 80).allowed and policy.check_name("127.0.0.2", 80).reason == "ip_literal"
    assert all(ipaddress.ip_network(cidr) for cidr, _kind in BLOCKED_NETWORKS)


def test_a_request_network_entry_is_checked() -> None:
    with pytest.raises(ValueError, match="not a host name"):
        ExecRequest(shell="true", network=("no way",))


def test_a_plain_request_is_sent_on_in_origin_form_naming_its_own_host() -> None:
    from sandbox_core.inside.proxy import BadRequest, parse_head

    head = (b"GET http://registry.test:8080/simple/six/?x=1 HTTP/1.1\r\nHost: evil.example\r\n"
            b"Proxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n")  # fmt: skip
    request = parse_head(head)
    assert (request.connect, request.host, request.port) == (False, "registry.test", 8080)
    assert request.head == (b"GET /simple/six/?x=1 HTTP/1.1\r\nHost: registry.test:8080\r\nAccept: */*\r\n"
                            b"Connection: close\r\n\r\n")  # fmt: skip
    connect = parse_head(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n")
    assert (connect.connect, connect.host, connect.port) == (True, "::1", 443)
    for bad in (b"GET /relative HTTP/1.1\r\n\r\n", b"GET https://x/ HTTP/1.1\r\n\r\n",
                b"CONNECT host HTTP/1.1\r\n\r\n", b"GARBAGE\r\n\r\n"):  # fmt: skip
        with pytest.raises(BadRequest):
            parse_head(bad)


@pytest.mark.parametrize(
    ("outer", "inner", "covered"),
    [
        ("*.github.com", "api.github.com", True),
        ("*.github.com", "*.api.github.com", True),
        ("*.github.com", "*.github.com", True),
        ("*.github.com", "github.com", False),
        ("*.github.com", "github.com.evil.example", False),
        ("*", "*.anything.example", True),
        ("pypi.org", "*", False),
        ("pypi.org", "pypi.org:443", True),
        ("pypi.org:443", "pypi.org", False),
        ("pypi.org:443", "pypi.org:80", False),
        ("pypi.org", "*.pypi.org", False),
    ],
)
def test_a_rule_covers_only_what_it_would_allow_itself(outer: str, inner: str, covered: bool) -> None:
    assert Rule.parse(outer).covers(Rule.parse(inner)) is covered


def test_a_request_narrowing_must_be_a_subset_of_the_users_policy() -> None:
    net = NetworkPolicy(mode="allowlist", allow=("pypi.org", "*.github.com"), users={"bob": ("pypi.org",)})
    check_narrowing(net, "alice", ("pypi.org:443", "api.github.com"))
    check_narrowing(net, "alice", ())
    check_narrowing(net, "alice", None)
    for user, entry, why in [("alice", "github.com", "not within network.allow [pypi.org, *.github.com]"),
                             ("bob", "api.github.com", "not within network.users.bob [pypi.org]")]:
        with pytest.raises(ConfigError) as info:
            check_narrowing(net, user, ("pypi.org", entry))
        assert info.value.field == "network.allow" and info.value.data["entry"] == entry and why in info.value.message
    with pytest.raises(ConfigError, match=r"network\.mode = none"):
        check_narrowing(NetworkPolicy(), "alice", ("pypi.org",))
    check_narrowing(NetworkPolicy(), "alice", ())  # "no network" narrows anything
