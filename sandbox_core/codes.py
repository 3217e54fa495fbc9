"""Every JSON-RPC error code used on the host ⇄ worker channel, in one place.

The first five are JSON-RPC 2.0's own; ours live in the implementation-defined
server-error range (-32000 to -32099).
"""

from __future__ import annotations

PARSE_ERROR = -32700
"""The frame is not valid JSON (or not UTF-8)."""
INVALID_REQUEST = -32600
"""Valid JSON, but not a JSON-RPC 2.0 request (includes batches, which we reject)."""
METHOD_NOT_FOUND = -32601
"""The worker has no such method."""
INVALID_PARAMS = -32602
"""The method exists but its params are wrong."""
INTERNAL_ERROR = -32603
"""An unexpected failure inside the handler."""

CANCELLED = -32000
"""The request was cancelled by a ``cancel`` notification."""
TIMEOUT = -32001
"""The request ran past its deadline and was killed."""
WORKER_CRASHED = -32002
"""The worker process died while the request was pending."""
POOL_EXHAUSTED = -32003
"""No worker slot became free within the wait limit."""
ISOLATION_UNAVAILABLE = -32004
"""A layer of the configured isolation profile could not be applied."""
FRAME_TOO_LARGE = -32005
"""A frame exceeded the configured frame-size limit."""
WORKER_START_FAILED = -32006
"""A worker failed to start or to complete its handshake."""
POOL_CLOSED = -32007
"""The orchestrator is shutting down."""
GATEWAY_ERROR = -32008
"""A model call from the sandbox was refused or failed on the host."""
NOT_BOUND = -32009
"""The worker has not been bound to a user and workspace yet."""
LIMIT_EXCEEDED = -32010
"""A configured bound refused the request (too many runs kept, a request body too large)."""
SERVER_SHUTTING_DOWN = -32011
"""The service is shutting down: a run still going when its drain ended was stopped."""
FILE_TRANSFER = -32012
"""A file transfer was refused or failed inside the sandbox (no such path, a symlink in the
way, disk quota exceeded); ``data.reason`` says which."""
