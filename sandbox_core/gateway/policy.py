"""The one policy every model call from a sandbox passes, as tables, and the checks that apply them.

Both ways a sandbox reaches the model (the agent runtime's SDK transport and the loopback model
endpoint that any command can use) arrive as the same ``gateway.request`` call, and
:meth:`GatewayPolicy.check` decides each one before the real key is added:

* **route**: :data:`ROUTES` (method, path, the query keys it takes); everything else is refused;
* **headers**: an allowlist (:data:`HEADERS`, :data:`HEADER_PREFIXES`); ``anthropic-beta``
  keeps only the values in ``model.allowed_betas``; everything else is dropped (credentials,
  ``x-http-method-override``, ``x-original-url``, ``anthropic-*`` routing headers...);
* **body** (a JSON object): only the top-level fields in :data:`BODY_FIELDS` (plus
  ``model.extra_body_fields``); ``mcp_servers`` and ``container`` only when the operator allows
  them; every tool must be a client tool (:data:`CLIENT_TOOL`), server-side tools only when
  allowed; content blocks whose ``source`` makes the provider fetch a URL or open an uploaded
  file only when allowed; the model must match ``model.allowed_models``; ``max_tokens`` is
  required on ``/v1/messages`` and clamped to ``model.max_tokens_limit``.

Why these lines. The key is the operator's: whatever the body asks for is done with it. A field
such as ``mcp_servers`` or a tool such as ``web_fetch_*`` makes the *provider* open connections
the sandbox chooses (the network the sandbox must not have); ``container``, a ``file`` source,
``thread`` or ``diagnostics.previous_message_id`` reach state held under the key, which every
user of the pool shares; ``fallbacks`` would route around the model allowlist. Fields the API
adds later are refused until they are listed, so a new capability fails closed. Client tools
(custom tools, ``bash_*``, ``text_editor_*``, ``computer_*``, ``memory_*``) are run by the caller
inside the sandbox: the provider only names them.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from sandbox_core.config import ModelConfig
from sandbox_core.errors import GatewayError

_MODEL_ID = r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"


@dataclass(frozen=True)
class Route:
    """One endpoint the sandbox may call."""

    method: str
    path: re.Pattern[str]
    queries: frozenset[str] = frozenset()
    """Query keys it takes (each once, with a plain value)."""
    body: str = "none"
    """``messages`` (a Messages request), ``count`` (a token count) or ``none`` (no body)."""


ROUTES: tuple[Route, ...] = (
    Route("POST", re.compile(r"/v1/messages"), frozenset({"beta"}), "messages"),
    Route("POST", re.compile(r"/v1/messages/count_tokens"), frozenset({"beta"}), "count"),
    Route("GET", re.compile(r"/v1/models"), frozenset({"beta", "limit", "after_id", "before_id"})),
    Route("GET", re.compile(rf"/v1/models/{_MODEL_ID}"), frozenset({"beta"})),
)
_QUERY_VALUE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")

HEADERS = frozenset({"content-type", "accept", "anthropic-version", "anthropic-beta"})
"""Request headers passed on (``anthropic-beta`` filtered value by value)."""
HEADER_PREFIXES = ("x-stainless-",)
"""Header name prefixes passed on: the SDK's own telemetry (language, version, retry count...)."""
DEFAULT_VERSION = "2023-06-01"
"""``anthropic-version`` added when a client (``curl``, say) sends none."""
MAX_HEADERS = 64
MAX_HEADER_VALUE = 1024
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]*$")
_HEADER_NAME = re.compile(r"^[a-z0-9-]{1,64}$")

BODY_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature",
    "top_k", "top_p", "tools", "tool_choice", "thinking", "cache_control", "context_management",
    "output_config", "output_format", "service_tier",
})  # fmt: skip
"""Top-level request fields passed on; anything else is refused (unless listed in
``model.extra_body_fields`` or switched on below)."""
GATED_FIELDS = {"mcp_servers": "allow_mcp_servers", "container": "allow_container"}
"""Fields passed only when the operator switches on the named ``model.*`` setting."""
CLIENT_TOOL = re.compile(r"^(custom|(bash|text_editor|computer|memory)_\d{8}|computer_toolset_\d{8})$")
"""Tool ``type`` values the caller runs itself (a tool without a ``type`` is a custom tool).
Every other type (``web_search_*``, ``web_fetch_*``, ``code_execution_*``, ``mcp_toolset``,
``tool_search_tool_*``, ``advisor_*``, ``browser_toolset_*``, any new one) runs at the provider."""
REMOTE_SOURCES = frozenset({"url", "file"})
"""Content-block ``source`` types the provider resolves itself (fetches a URL, opens an uploaded file)."""
REMOTE_BLOCKS = frozenset({"container_upload"})
"""Content-block types that name an uploaded file."""
MAX_DEPTH = 64


def refused(why: str, reason: str = "refused", **data: Any) -> GatewayError:
    return GatewayError(f"refused: {why}", data={"reason": reason, **data})


@dataclass
class Checked:
    """A call that passed the policy: what to forward."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    json: dict[str, Any] | None
    body: bytes
    max_tokens: int = 0
    """The (clamped) ``max_tokens`` of a Messages request, 0 for other routes."""
    notes: list[str] = field(default_factory=list)
    """What the policy changed (dropped headers, a clamp), for the host's log."""
    _changed: bool = False

    def set_max_tokens(self, value: int) -> None:
        if self.json is not None and value != self.max_tokens:
            self.json["max_tokens"] = value
            self.max_tokens = value
            self._changed = True

    def final_body(self) -> bytes:
        """The body to forward: as sent, unless the policy changed a field."""
        if self._changed and self.json is not None:
            self.body = json.dumps(self.json, ensure_ascii=False, separators=(",", ":")).encode()
            self._changed = False
        return self.body


class GatewayPolicy:
    """The policy of one gateway, from its :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._betas = frozenset(config.allowed_betas)
        self._fields = BODY_FIELDS | frozenset(config.extra_body_fields) | frozenset(
            name for name, setting in GATED_FIELDS.items() if getattr(config, setting)
        )

    def check(self, method: str, path: str, query: str, raw_headers: Any, body: bytes) -> Checked:
        """Apply every rule to one call; GatewayError (``data["reason"]``) names the first it breaks."""
        route = self.route(method, path, query)
        headers, notes = self.headers(raw_headers)
        self._defaults(headers)
        if route.body == "none":
            if body:
                raise refused(f"{method} {path} takes no body")
            return Checked(method, path, query, headers, None, b"", notes=notes)
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            raise refused("the request body is not base64 of a JSON object") from None
        if not isinstance(obj, dict):
            raise refused("the request body is not a JSON object")
        checked = Checked(method, path, query, headers, obj, body, notes=notes)
        self.body(route, checked)
        if not any(name == "content-type" for name, _ in headers):
            headers.append(("content-type", "application/json"))
        return checked

    @staticmethod
    def _defaults(headers: list[tuple[str, str]]) -> None:
        """What a plain client (curl) may leave out and the API requires."""
        if not any(name == "anthropic-version" for name, _ in headers):
            headers.append(("anthropic-version", DEFAULT_VERSION))

    def route(self, method: str, path: str, query: str) -> Route:
        method = method.upper()
        matches = [r for r in ROUTES if r.path.fullmatch(path)]
        if not matches:
            allowed = ", ".join(sorted({r.path.pattern.replace(_MODEL_ID, "{model_id}") for r in ROUTES}))
            raise refused(f"path {path!r} is not a Messages API endpoint (allowed: {allowed})", "path")
        route = next((r for r in matches if r.method == method), None)
        if route is None:
            methods = "/".join(sorted({r.method for r in matches}))
            raise refused(f"only {methods} to {path} is allowed, not {method}", "method")
        pairs = parse_qsl(query, keep_blank_values=True) if query else []
        keys = [k for k, _ in pairs]
        if (len(keys) != len(set(keys)) or not set(keys) <= route.queries
                or any(not _QUERY_VALUE.match(v) for _, v in pairs)
                or ("beta" in keys and dict(pairs)["beta"] != "true")):  # fmt: skip
            raise refused(f"query {query!r} is not allowed", "query")
        return route

    def headers(self, raw: Any) -> tuple[list[tuple[str, str]], list[str]]:
        """The allowlisted headers of a call, and the names of those dropped."""
        kept: list[tuple[str, str]] = []
        dropped: list[str] = []
        for pair in raw if isinstance(raw, list) else []:
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                continue
            name, value = str(pair[0]).lower(), str(pair[1])
            if not _HEADER_NAME.match(name) or len(kept) >= MAX_HEADERS:
                dropped.append(name[:64])
                continue
            if name not in HEADERS and not name.startswith(HEADER_PREFIXES):
                dropped.append(name)
                continue
            if len(value) > MAX_HEADER_VALUE or not _HEADER_VALUE.match(value):
                dropped.append(name)
                continue
            if name == "anthropic-beta":
                betas = [b.strip() for b in value.split(",") if b.strip()]
                allowed = [b for b in betas if b in self._betas]
                dropped += [f"anthropic-beta={b[:64]}" for b in betas if b not in self._betas]
                if not allowed:
                    continue
                value = ",".join(allowed)
            if name == "content-type" and not value.lower().startswith("application/json"):
                dropped.append(name)
                continue
            kept.append((name, value))
        return kept, [f"dropped {', '.join(sorted(set(dropped)))}"] if dropped else []

    def body(self, route: Route, call: Checked) -> None:
        assert call.json is not None
        obj = call.json
        for name in obj:
            if name in self._fields:
                continue
            if name in GATED_FIELDS:
                setting = GATED_FIELDS[name]
                raise refused(f"{name!r} is not allowed (the operator can allow it: model.{setting})", name)
            raise refused(f"request field {name!r} is not allowed (the operator can allow it: "
                          "model.extra_body_fields)", "field", field=name[:64])  # fmt: skip
        model = obj.get("model")
        if not isinstance(model, str) or not any(fnmatch.fnmatchcase(model, p) for p in self.config.allowed_models):
            allowed = ", ".join(self.config.allowed_models) or "none"
            raise refused(f"model {str(model)[:80]!r} is not allowed (model.allowed_models: {allowed})", "model")
        self._tools(obj.get("tools"))
        if not self.config.allow_remote_sources:
            _no_remote_sources(obj.get("messages"))
            _no_remote_sources(obj.get("system"))
        if route.body == "messages":
            max_tokens = obj.get("max_tokens")
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise refused("max_tokens must be a positive integer", "max_tokens")
            call.max_tokens = max_tokens
            limit = self.config.max_tokens_limit
            if max_tokens > limit:
                call.set_max_tokens(limit)
                call.notes.append(f"max_tokens {max_tokens} clamped to {limit}")

    def _tools(self, tools: Any) -> None:
        if tools is None:
            return
        if not isinstance(tools, list):
            raise refused("tools must be a list", "tools")
        for tool in tools:
            if not isinstance(tool, dict):
                raise refused("each tool must be an object", "tools")
            kind = tool.get("type", "custom")
            if isinstance(kind, str) and CLIENT_TOOL.match(kind):
                continue
            if not self.config.allow_server_tools:
                raise refused(f"tool type {str(kind)[:64]!r} runs at the provider, not in the sandbox "
                              "(the operator can allow server tools: model.allow_server_tools)", "server_tool")


def _no_remote_sources(value: Any) -> None:
    """Refuse a content block, at any depth, that the provider would resolve by itself."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise refused("the request body is nested too deeply", "body")
        if isinstance(item, list):
            stack.extend((x, depth + 1) for x in item)
        elif isinstance(item, dict):
            source = item.get("source")
            kind = source.get("type") if isinstance(source, dict) else None
            if kind in REMOTE_SOURCES or item.get("type") in REMOTE_BLOCKS:
                what = f"a {kind!r} source" if kind in REMOTE_SOURCES else f"a {item.get('type')!r} block"
                raise refused(f"{what} makes the provider fetch or open it (the operator can allow it: "
                              "model.allow_remote_sources)", "remote_source")
            stack.extend((x, depth + 1) for x in item.values() if isinstance(x, dict | list))
