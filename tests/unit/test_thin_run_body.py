"""The thin ``sandbox run`` (:mod:`cli.service_run`) sends the body the full command sends.

The full command builds an :class:`~sandbox_core.requests.AgentRequest` and
:func:`cli.remote.request_body` writes it; the thin path writes the body directly, without
loading either. Every option the fast parser passes on is checked against that.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from cli.main import fast_command
from cli.remote import request_body
from cli.service_run import agent_body
from sandbox_core.requests import AgentRequest

ARGV: list[list[str]] = [
    ["run", "hi"],
    ["run", "--conversation", "c1", "hi"],
    ["run", "--model", "claude-x", "--max-turns", "3", "--system", "be brief", "--timeout", "2.5", "hi"],
    ["run", "--network", "none", "hi"],
    ["run", "--allow", "pypi.org", "--allow", "*.github.com:443", "--conversation", "c2", "hi"],
]


def _full(arguments: dict[str, Any], conversation_id: str) -> dict[str, Any]:
    """The body of the full command's request in client mode (only what was asked for explicitly)."""
    conversation = arguments.get("conversation")
    request = AgentRequest(prompt=arguments["prompt"], system=arguments.get("system"), model=arguments.get("model"),
                           max_turns=arguments.get("max_turns"), max_tokens=None,
                           conversation_id=conversation or conversation_id, resume=conversation is not None,
                           timeout=arguments.get("timeout"), network=arguments.get("network"))  # fmt: skip
    kind, body = request_body(request)
    assert kind == "agent"
    return body


@pytest.mark.parametrize("argv", ARGV, ids=range(len(ARGV)))
def test_the_thin_body_is_the_full_commands(argv: list[str]) -> None:
    _, name, arguments = fast_command(argv)
    assert name == "run"
    thin = agent_body(arguments["prompt"], arguments)
    assert thin == _full(arguments, thin["conversation_id"])
    assert list(thin) == list(_full(arguments, thin["conversation_id"]))  # the same JSON, key for key
    if "conversation" not in arguments:
        assert re.fullmatch(r"run-[0-9a-f]{8}", thin["conversation_id"])  # a new one each run, as the full command's
