"""The Claude agent inside the worker: ``runtime`` (``agent.run``), ``tools`` and ``transport``.

All three import ``anthropic`` (loaded on the first ``agent.*`` request, never by a worker
that only runs ``exec``); the model calls leave the sandbox only through ``transport``,
over the control pipe to the host's gateway.
"""
