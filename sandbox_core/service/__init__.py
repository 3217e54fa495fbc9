"""``sandbox serve``: one orchestrator behind a versioned HTTP API with SSE streams.

Modules: ``auth`` (who is calling: bearer tokens on TCP, SO_PEERCRED on the Unix socket),
``runs`` (the registry of runs, their event buffers and owners), ``app`` (the Starlette
routes), ``server`` (uvicorn on a 0600 Unix socket or a TCP port, signal handling and
drain), ``client`` (the HTTP client the CLI uses in client mode).
"""
