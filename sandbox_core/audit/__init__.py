"""``sandbox audit-env``: prove what the sandbox hides, in four steps with a file each.

:mod:`plant` puts canaries and listeners on the host, in trees it makes and removes through
descriptors only (:mod:`tree`); :mod:`run` starts a real worker and
runs the probes (:mod:`sandbox_core.inside.probes`, by name) inside it; :mod:`judge` turns
the observations into one verdict per check; :mod:`report` holds the checks and the report.
"""

from __future__ import annotations

from sandbox_core.audit.plant import CANARY_VAR
from sandbox_core.audit.report import CHECK_NAMES, CHECKS, AuditReport, Check
from sandbox_core.audit.run import run_audit

__all__ = ["CANARY_VAR", "CHECKS", "CHECK_NAMES", "AuditReport", "Check", "run_audit"]
