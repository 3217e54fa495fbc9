"""sandbox_core: run AI agents and commands in process-isolated sandbox workers.

Public names are imported lazily so that a worker process (which imports
``sandbox_core.inside.worker_main``) pays only for what it uses.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a worker boots faster)
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ProcessSandboxConfig": "sandbox_core.config",
    "load_config": "sandbox_core.config",
    "Event": "sandbox_core.events",
    "SandboxOrchestrator": "sandbox_core.orchestrator",
    "ExecRequest": "sandbox_core.requests",
    "AgentRequest": "sandbox_core.requests",
    "RequestResult": "sandbox_core.requests",
    "SandboxWorker": "sandbox_core.worker",
    "WorkerState": "sandbox_core.worker",
    "SandboxError": "sandbox_core.errors",
    "ConfigError": "sandbox_core.errors",
    "ProtocolError": "sandbox_core.errors",
    "IsolationUnavailable": "sandbox_core.errors",
    "WorkerStartError": "sandbox_core.errors",
    "CircuitOpen": "sandbox_core.errors",
    "WorkerCrashed": "sandbox_core.errors",
    "RequestTimeout": "sandbox_core.errors",
    "RequestCancelled": "sandbox_core.errors",
    "PoolExhausted": "sandbox_core.errors",
    "PoolClosed": "sandbox_core.errors",
    "GatewayError": "sandbox_core.errors",
    "RemoteError": "sandbox_core.errors",
}
__all__ = [
    "AgentRequest",
    "CircuitOpen",
    "ConfigError",
    "Event",
    "ExecRequest",
    "GatewayError",
    "IsolationUnavailable",
    "PoolClosed",
    "PoolExhausted",
    "ProcessSandboxConfig",
    "ProtocolError",
    "RemoteError",
    "RequestCancelled",
    "RequestResult",
    "RequestTimeout",
    "SandboxError",
    "SandboxOrchestrator",
    "SandboxWorker",
    "WorkerCrashed",
    "WorkerStartError",
    "WorkerState",
    "__version__",
    "load_config",
]

if TYPE_CHECKING:
    from sandbox_core.config import ProcessSandboxConfig, load_config
    from sandbox_core.errors import (
        CircuitOpen,
        ConfigError,
        GatewayError,
        IsolationUnavailable,
        PoolClosed,
        PoolExhausted,
        ProtocolError,
        RemoteError,
        RequestCancelled,
        RequestTimeout,
        SandboxError,
        WorkerCrashed,
        WorkerStartError,
    )
    from sandbox_core.events import Event
    from sandbox_core.orchestrator import SandboxOrchestrator
    from sandbox_core.requests import AgentRequest, ExecRequest, RequestResult
    from sandbox_core.worker import SandboxWorker, WorkerState


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox_core' has no attribute {name!r}")
    # __import__, not importlib.import_module: importlib (and the warnings module it loads) is
    # ~1 ms of every worker's boot, which imports this package before anything else
    return getattr(__import__(module, fromlist=[name]), name)
