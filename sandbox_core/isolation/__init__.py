"""How a worker process is confined: host-side launch specs and in-worker layers.

Host side: :func:`launch_spec` turns a config into the argv, environment and plan of
one worker for the configured profile (``process`` here, ``strict`` in ``strict.py``).
Worker side: :mod:`inside` applies the plan's in-process layers during ``initialize``.
"""

from __future__ import annotations

from sandbox_core.isolation.launch import LaunchSpec, launch_spec, worker_env

__all__ = ["LaunchSpec", "launch_spec", "worker_env"]
