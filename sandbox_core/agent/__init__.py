"""The Claude agent that runs inside a worker, and the offline model the host can answer with.

``runtime`` (``agent.run`` / ``agent.reset``) and ``transport`` run in the sandbox and import
``anthropic`` lazily; ``offline`` runs on the host side and imports nothing heavy. This
module holds only the constants both sides agree on, so importing it costs nothing.
"""

from __future__ import annotations

GATEWAY_HOST = "gateway.sandbox"
"""The placeholder host the SDK inside the worker talks to; the host's gateway replaces it
with the configured API base URL."""
GATEWAY_BASE_URL = f"http://{GATEWAY_HOST}"
PLACEHOLDER_API_KEY = "sandbox-gateway"
"""What the SDK inside the worker sends as its key; the gateway drops it."""
GATEWAY_METHOD = "gateway.request"
"""The worker → host JSON-RPC method that carries one HTTP request."""
