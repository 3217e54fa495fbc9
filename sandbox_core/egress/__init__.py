"""Host side of the network crossing: the policy, host-side resolution, the relay and its log.

The sandbox has no network of its own; its proxy (:mod:`sandbox_core.inside.proxy`) asks the
host for each connection. :mod:`.policy` decides by name and by address (declared tables);
:mod:`.relay` resolves names on the host, connects to the very address it checked, takes the
client's socket from the worker and splices the two (:mod:`.tunnel`), and logs every decision.
"""

from sandbox_core.egress.policy import BLOCKED_NETWORKS, Decision, Policy
from sandbox_core.egress.relay import Relay

__all__ = ["BLOCKED_NETWORKS", "Decision", "Policy", "Relay"]
