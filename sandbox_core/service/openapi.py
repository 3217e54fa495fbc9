"""The OpenAPI 3.1 description of the service's HTTP API (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

_SSE = {
    "description": "Server-sent events: one event per sandbox event (id = sequence number, "
    "event = type, data = JSON); `: keep-alive` comments while idle. A run keeps at most "
    "service.max_buffered_events events and service.run_buffer_mb MiB of them for re-attaching; "
    "the oldest output beyond is dropped and one `gap` event (data: GapEvent) stands for all of "
    "it, at the id of the newest event dropped. A stream re-attaching at a dropped id, or one "
    "that fell behind, gets the `gap` event, then what follows.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
_401 = {"description": "missing or wrong credentials"}
_403 = {"description": "the caller's role may not do this"}
_404 = {"description": "no such run (or not the caller's), or it was released (service.run_ttl "
        "seconds after it finished, or to make room under service.max_runs_per_user)"}
_413 = {"description": "the request body is over service.max_body_mb (refused while it is read)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LimitError"}}}}
_429 = {"description": "the caller keeps service.max_runs_per_user runs and all are still running",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LimitError"}}}}


_400 = {"description": "a bad query parameter (a duration, a number)"}
_QUERY = {
    "user": ({"type": "string"}, "only this user's rows (operators; a user always sees their own)"),
    "kind": ({"type": "string"}, "only entries of this kind"),
    "since": ({"type": "string"}, "only rows newer than this age: 90, 90s, 15m, 1h, 2d"),
    "after": ({"type": "integer"}, "only entries after this id (for following the journal)"),
    "limit": ({"type": "integer", "maximum": 1000}, "at most this many rows"),
}


def _record_query(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "required": False, "schema": _QUERY[n][0], "description": _QUERY[n][1]}
            for n in names]  # fmt: skip


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _run_responses() -> dict[str, Any]:
    """What starting a run can answer."""
    return {"200": _SSE, "400": {"description": "bad body"}, "401": _401, "413": _413, "429": _429,
            "503": {"description": "draining"}}


_FILE_PARAMS = [
    {"name": "path", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "relative to the workspace (default '.')"},
    {"name": "user", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "another user's workspace (operators only)"},
]


def openapi_schema() -> dict[str, Any]:
    obj = {"type": "object"}
    run_id = [{"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "sandbox service", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "AgentRun": {
                    "type": "object",
                    "required": ["prompt"],
                    "properties": {
                        "prompt": {"type": "string"},
                        "system": {"type": "string"},
                        "model": {"type": "string"},
                        "max_turns": {"type": "integer"},
                        "max_tokens": {"type": "integer"},
                        "tools": {"type": "array", "items": {"type": "string"}},
                        "conversation_id": {"type": "string"},
                        "resume": {"type": "boolean", "description": "continue conversation_id from the record "
                                   "(`@last`: the caller's latest) when the worker does not hold it"},
                        "timeout": {"type": "number"},
                        "network": {"$ref": "#/components/schemas/Network"},
                    },
                },
                "Network": {
                    "description": "Narrow the network policy for this run (never widen it): no network at all, or "
                                   "only these network.allow-style entries, each within what the caller may reach "
                                   "(else 400 naming the entry in `entry`).",
                    "oneOf": [
                        {"type": "object", "required": ["mode"], "additionalProperties": False,
                         "properties": {"mode": {"enum": ["none"]}}},
                        {"type": "object", "required": ["allow"], "additionalProperties": False,
                         "properties": {"allow": {"type": "array", "items": {"type": "string",
                                                                             "description": "HOST[:PORT]"}}}},
                    ],
                },
                "ExecRun": {
                    "type": "object",
                    "properties": {
                        "argv": {"type": "array", "items": {"type": "string"}},
                        "shell": {"type": "string"},
                        "stdin": {"type": "string", "description": "stdin as UTF-8 text"},
                        "stdin_b64": {"type": "string", "format": "byte", "description": "stdin as base64 bytes"},
                        "stdin_stream": {"type": "boolean",
                                         "description": "stdin follows in POST /v1/runs/{run_id}/stdin"},
                        "timeout": {"type": "number"},
                        "network": {"$ref": "#/components/schemas/Network"},
                    },
                },
                "StopWorkers": {
                    "type": "object",
                    "properties": {
                        "worker_ids": {"type": "array", "items": {"type": "string"}},
                        "user_id": {"type": "string"},
                        "all": {"type": "boolean"},
                    },
                },
                "OutputEvent": {
                    "description": "data of the `stdout`/`stderr` SSE events: one chunk of the command's output "
                                   "as exactly one of `data` (the chunk is UTF-8 text) or `b64` (its bytes, "
                                   "base64); the chunks joined are the output byte for byte",
                    "type": "object",
                    "properties": {
                        "data": {"type": "string"},
                        "b64": {"type": "string", "format": "byte"},
                        "tool_use_id": {"type": "string", "description": "the agent's bash call it came from"},
                    },
                },
                "GapEvent": {
                    "description": "data of the `gap` SSE event: totals the run's buffer dropped so far",
                    "type": "object",
                    "required": ["dropped_events", "dropped_bytes"],
                    "properties": {
                        "dropped_events": {"type": "integer", "minimum": 1},
                        "dropped_bytes": {"type": "integer", "minimum": 1,
                                          "description": "sum of the dropped events' JSON sizes"},
                    },
                },
                "LimitError": {
                    "type": "object",
                    "required": ["error", "setting", "limit"],
                    "properties": {
                        "error": {"type": "string"},
                        "setting": {"type": "string", "description": "the setting that refused the request"},
                        "limit": {"type": "integer", "description": "its value (bytes for service.max_body_mb)"},
                    },
                },
                "Launch": {"type": "object", "properties": {"count": {"type": "integer", "minimum": 1},
                                                            "user_id": {"type": "string"}}},
                "TerminalOpen": {
                    "description": "the first (text) message on WS /v1/terminal; without argv or shell the "
                                   "program is the login shell (bash if present, else sh) in /workspace",
                    "type": "object",
                    "properties": {
                        "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        "shell": {"type": "string", "description": "run as /bin/sh -c SHELL"},
                        "rows": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 24},
                        "cols": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 80},
                        "term": {"type": "string", "pattern": "^[A-Za-z0-9._+-]{1,64}$",
                                 "description": "TERM for the program (default xterm)"},
                        "timeout": {"type": "number", "exclusiveMinimum": 0,
                                    "description": "seconds before the session is ended (default request_timeout)"},
                        "stdin": {"type": "boolean", "default": True, "description": "false: keys are not sent"},
                        "network": {"$ref": "#/components/schemas/Network"},
                        "user_id": {"type": "string", "description": "refused (close 4403) unless it is the "
                                                                     "caller's own: the user comes from the "
                                                                     "credentials"},
                    },
                },
                "TerminalControl": {
                    "description": "later text messages from the client (binary messages are keys)",
                    "oneOf": [
                        {"type": "object", "required": ["type", "rows", "cols"],
                         "properties": {"type": {"const": "resize"}, "rows": {"type": "integer"},
                                        "cols": {"type": "integer"}}},
                        {"type": "object", "required": ["type"], "properties": {"type": {"const": "eof"}}},
                    ],
                },
                "TerminalEnd": {
                    "description": "the service's last (text) message before it closes the socket (1000); "
                                   "binary messages before it are the terminal's output",
                    "oneOf": [
                        {"type": "object", "required": ["type", "exit_code"],
                         "properties": {"type": {"const": "exit"}, "exit_code": {"type": "integer"},
                                        "signal": {"type": "integer"}, "duration_s": {"type": "number"},
                                        "worker_id": {"type": "string"}}},
                        {"type": "object", "required": ["type", "error"],
                         "properties": {"type": {"const": "error"},
                                        "error": {"type": "object", "description": "JSON-RPC error object "
                                                  "(code, message, data): timeout, worker crash, ..."}}},
                    ],
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/health": {"get": {"security": [], "responses": {"200": _json(obj)}}},
            "/v1/runs/agent": {"post": {"requestBody": _body("AgentRun"), "responses": _run_responses()}},
            "/v1/runs/exec": {"post": {"requestBody": _body("ExecRun"), "responses": _run_responses()}},
            "/v1/runs": {"get": {
                "description": "Runs in memory and, from the durable record, finished ones (`recorded: true`, "
                               "after a restart too): a user's own; an operator's, all or `?user=`.",
                "parameters": _record_query("user", "since", "limit"),
                "responses": {"200": _json(obj), "400": _400, "401": _401}}},
            "/v1/journal": {"get": {
                "description": "The record's journal (exec, agent, tool, model, egress, crash, limit, auth, "
                               "terminal, files), oldest first after `?after=ID`: a user's own entries; an "
                               "operator's, all or `?user=`. 404 when record.enabled is off.",
                "parameters": _record_query("user", "kind", "since", "after", "limit"),
                "responses": {"200": _json(obj), "400": _400, "401": _401, "404": _404}}},
            "/v1/runs/{run_id}": {"get": {"parameters": run_id,
                                          "responses": {"200": _json(obj), "401": _401, "404": _404}}},
            "/v1/runs/{run_id}/events": {"get": {"parameters": [*run_id, {
                "name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer"}}],
                "responses": {"200": _SSE, "401": _401, "404": _404}}},
            "/v1/runs/{run_id}/stdin": {"post": {
                "parameters": run_id,
                "description": "The streamed stdin of an exec started with stdin_stream: true, read only as "
                               "fast as the command takes it; exempt from service.max_body_mb.",
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "responses": {"200": _json(obj), "401": _401, "404": _404,
                              "409": {"description": "the run takes no stdin stream, or already has one"}}}},
            "/v1/runs/{run_id}/cancel": {"post": {"parameters": run_id,
                                                  "responses": {"200": _json(obj), "401": _401, "404": _404}}},
            "/v1/terminal": {"get": {
                "summary": "WebSocket: an interactive terminal (a pty inside the caller's own sandbox)",
                "description": "Upgrade to a WebSocket. The client sends TerminalOpen (text), then keys as "
                               "binary messages and TerminalControl (text); the service sends the terminal's "
                               "bytes as binary messages and, at the end, TerminalEnd (text), then closes "
                               "(1000). The session lives as long as the socket (a client that goes away ends "
                               "it, the program is killed); there is nothing another user can attach to. "
                               "Close codes: 4400 a bad message, 4403 another user's sandbox named, 1012 the "
                               "service shutting down. It holds one of the user's workers busy and ends at "
                               "its timeout (request_timeout by default). Messages are at most 1 MiB.",
                "parameters": [{"name": "Upgrade", "in": "header", "required": True,
                                "schema": {"const": "websocket"}}],
                "responses": {"101": {"description": "switching protocols: the terminal session",
                                      "content": {"application/json": {"schema": {"oneOf": [
                                          {"$ref": "#/components/schemas/TerminalOpen"},
                                          {"$ref": "#/components/schemas/TerminalControl"},
                                          {"$ref": "#/components/schemas/TerminalEnd"}]}}}},
                              "401": _401, "503": {"description": "draining"}}}},
            "/v1/files": {
                "get": {"parameters": _FILE_PARAMS, "description": "A tar stream of path (list=1: its entries, "
                        "stat=1: its stat), made inside the user's sandbox.",
                        "responses": {"200": {"description": "a tar stream", "content": {"application/x-tar": {
                            "schema": {"type": "string", "format": "binary"}}}},
                            "401": _401, "403": _403, "404": _404, "413": _413}},
                "put": {"parameters": _FILE_PARAMS, "description": "Unpack the tar body into directory path "
                        "inside the user's sandbox; bounded by limits.transfer_mb, not service.max_body_mb.",
                        "requestBody": {"required": True, "content": {"application/x-tar": {
                            "schema": {"type": "string", "format": "binary"}}}},
                        "responses": {"200": _json(obj), "401": _401, "403": _403, "413": _413,
                                      "409": {"description": "refused (a symlink in the way, a bad name)"},
                                      "507": {"description": "the workspace's disk quota is full"}}},
                "delete": {"parameters": _FILE_PARAMS,
                           "responses": {"200": _json(obj), "401": _401, "403": _403, "404": _404}},
            },
            "/v1/stats": {"get": {"responses": {"200": _json(obj), "401": _401, "403": _403}}},
            "/v1/workers": {"get": {"responses": {"200": _json(obj), "401": _401, "403": _403}}},
            "/v1/workers/launch": {"post": {"requestBody": _body("Launch"),
                                            "responses": {"200": _json(obj), "401": _401, "403": _403,
                                                          "413": _413}}},
            "/v1/workers/stop": {"post": {"requestBody": _body("StopWorkers"),
                                          "responses": {"200": _json(obj), "401": _401, "403": _403,
                                                        "413": _413}}},
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               "401": _401, "403": _403}}},
        },
    }
