"""Names both sides of the trust boundary agree on: methods, entry points, placeholders.

The host and the code inside the sandbox never import each other (import-linter contracts
in ``pyproject.toml``); what they must agree on lives here, in a leaf that imports only
the standard library, so importing it costs nothing on either side.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Iterator

WORKER_ENTRY = "sandbox_core.inside.boot"
"""The module the launcher starts inside the sandbox (named, never imported, by the host): it
answers the handshake, then hands over to :mod:`sandbox_core.inside.worker_main`."""
PROBE_COMMAND_ENTRY = "sandbox_core.inside.probes"
FILES_ENTRY = "sandbox_core.inside.files"
"""The inside half of the files crossing, run as a command in the user's worker."""
"""The module ``audit-env`` runs as a command inside the sandbox (its ``command_main``)."""

HOST_CHUNK = "host.chunk"
"""The host → worker notification carrying one streamed chunk of a host call."""

GATEWAY_HOST = "gateway.sandbox"
"""The placeholder host the SDK inside the worker talks to; the host's gateway replaces it
with the configured API base URL."""
GATEWAY_BASE_URL = f"http://{GATEWAY_HOST}"
PLACEHOLDER_API_KEY = "sandbox-gateway"
"""What the SDK inside the worker sends as its key; the gateway drops it."""
GATEWAY_METHOD = "gateway.request"
"""The worker → host JSON-RPC method that carries one HTTP request."""

PRELOAD_METHOD = "preload"
"""The host → worker request asking an idle worker to load the agent now (``{"mode": "agent"}``)."""
PRELOADED = "worker.preloaded"
"""The worker → host notification that its preload ended: ``{"state": "ready"|"failed", ...}``."""

EGRESS_PROXY_PORT = 3128
"""The port of the network proxy on the strict sandbox's own loopback (127.0.0.1)."""
EGRESS_OPEN = "egress.open"
EGRESS_HANDOFF = struct.Struct(">Q")
"""A record on the egress socketpair: the connection id, with the client's socket attached (SCM_RIGHTS)."""
"""The worker → host JSON-RPC method asking for one outbound connection (the host decides)."""
NO_PROXY = "localhost,127.0.0.1,::1"
"""Names commands reach directly, never through the proxy (the sandbox's own loopback)."""


def proxy_environment(port: int = EGRESS_PROXY_PORT) -> dict[str, str]:
    """The variables every command of a strict sandbox gets: its proxy, in both spellings."""
    url = f"http://127.0.0.1:{port}"
    env: dict[str, str] = {}
    for name, value in (("HTTP_PROXY", url), ("HTTPS_PROXY", url), ("ALL_PROXY", url), ("NO_PROXY", NO_PROXY)):
        env[name] = env[name.lower()] = value
    return env


CANARY_PREFIX = "sbx-canary-"
CANARY_RE = re.compile(rb"sbx-canary-[0-9a-f]{32}")
"""The public shape of every audit canary: the prefix and 32 random hex digits."""
STATIC_PROBES = (
    "worker_fds", "worker_env", "caps", "proc_scan", "files", "write_outside", "symlink_escape",
    "hardlink_escape", "host_tcp", "host_unix", "outbound", "ptrace", "userns", "setuid",
    "other_workspace", "protected", "host_paths", "model_endpoint", "egress",
)  # fmt: skip
"""Probes of the first ``audit.probe`` request, in order (fds first: nothing else is open yet)."""
LIMIT_PROBES = ("fork_bomb", "memory_hog")
MEMORY_HOG_SECONDS = 30.0
"""How long the audit's memory hog goes on allocating before it gives up (and the check fails:
nothing stopped it). Near the limit the kernel reclaims the cgroup's page cache before it kills,
and on a loaded machine that outlasted the 15 s the hog had: in one fresh-clone CI run it reached
976 MB of a 1024 MB limit at 65 MB/s and was never stopped, where it is killed in a second or two
on a quiet one. The probe's own wait and the audit's request timeout are derived from it."""


def sha256_hex(data: bytes | str) -> str:
    """The hex SHA-256 of ``data`` (text is UTF-8): how canaries are named across the pipe."""
    import hashlib  # only here: the worker imports this module to serve, and hashlib costs ~5 ms

    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@contextlib.contextmanager
def unix_address(path: str) -> Iterator[str]:
    """``path`` as a usable AF_UNIX address: a path over the 107-byte limit goes through
    ``/proc/self/fd/N/`` of its directory (abstract names, starting with NUL, pass as they are)."""
    if path.startswith("\0") or len(os.fsencode(path)) < 108:
        yield path
        return
    dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"
    finally:
        os.close(dirfd)

MODEL_ENDPOINT_HOST = "127.0.0.1"
MODEL_ENDPOINT_PORT = 8765
"""The loopback port of the model endpoint inside a strict sandbox (its own network namespace,
so no other tenant shares it): commands get ``ANTHROPIC_BASE_URL`` pointing here."""
MODEL_ENDPOINT_URL = f"http://{MODEL_ENDPOINT_HOST}:{MODEL_ENDPOINT_PORT}"
