"""Host side of confinement: how one worker process is launched and what walls it gets.

:mod:`spec` holds what every profile shares (the environment from the allowlist, rlimits,
the worker's argv) and the portable ``process`` profile; :mod:`strict` builds the bubblewrap
sandbox with :mod:`seccomp` and :mod:`cgroups`; :mod:`launch` picks the profile and prepares
the user's workspace. The steps the worker applies to itself live on the other side of the
boundary, in :mod:`sandbox_core.inside.confine`. This package imports nothing eagerly.
"""
