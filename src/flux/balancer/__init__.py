"""The balancer: services with an address -> listeners, instance pools and iptables rules.

The pure core is :mod:`.pool` (which instance gets a connection), :mod:`.rules` (which
iptables rules flux wants, and the batch that installs them) and :mod:`.services` (each
service's state and the ordered actions of every transition); :mod:`.iptables` is the thin
adapter that reads and writes the kernel's tables.
"""

from flux.balancer.iptables import IPTables, IPTablesError
from flux.balancer.pool import Choice, InstanceHealth, Pool
from flux.balancer.rules import Interception, RuleSet, desired_rules, validate_chain
from flux.balancer.services import (
    Action,
    ActionKind,
    Endpoint,
    ServiceState,
    ServiceView,
    State,
    in_phase_order,
    reset,
    transition,
)

__all__ = [
    "Action",
    "ActionKind",
    "Choice",
    "Endpoint",
    "IPTables",
    "IPTablesError",
    "InstanceHealth",
    "Interception",
    "Pool",
    "RuleSet",
    "ServiceState",
    "ServiceView",
    "State",
    "desired_rules",
    "in_phase_order",
    "reset",
    "transition",
    "validate_chain",
]
