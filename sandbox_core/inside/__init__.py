"""Everything that runs inside the sandbox, where an attacker may control it once started.

The launcher starts :mod:`boot` by name (:data:`sandbox_core.shared.WORKER_ENTRY`);
nothing on the host imports this package, and it imports only the shared wire (config,
errors, protocol, codes, events, requests, shared, kernel, process_tree). Contracts in
``pyproject.toml`` enforce both. Its modules, by job:

- :mod:`boot` and :mod:`handshake`: the worker's entry, which answers the handshake with
  blocking reads before asyncio is imported;
- :mod:`worker_main`: the JSON-RPC loop (``IPCHandler``) and the methods it serves;
- :mod:`channel`: the worker's end of the control pipe and the request context;
- :mod:`runner`: one command, its output streamed as events;
- :mod:`confine`, :mod:`identity`, :mod:`landlock`: the confinement steps the worker
  applies to itself during ``initialize`` and ``bind``;
- :mod:`probes`: the audit's probes;
- :mod:`agent`: the Claude agent (SDK tool runner, tools, the transport to the gateway).

This package imports nothing eagerly, so the worker pays only for what it uses.
"""
