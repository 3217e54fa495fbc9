"""How a worker process is confined: host-side launch specs and in-worker layers.

Host side: :mod:`launch` turns a config into the argv, environment and plan of one
worker for the configured profile (``process`` there, ``strict`` in :mod:`strict`).
Worker side: :mod:`inside` applies the plan's in-process layers during ``initialize``.
This package imports nothing eagerly, so the worker pays only for what it uses.
"""
