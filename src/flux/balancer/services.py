"""The balancer's view of each service, and every transition between its states.

Theory of operation
-------------------
For the balancer a service is in one of three states:

- ``absent``: nothing on this host — the service is unknown, deleted, has no address (the
  balancer ignores such services; they may still drive an edge balancer), or has an address
  flux cannot program (IPv6: the rules are IPv4 iptables);
- ``rejecting``: it has an address but no live instance: a REJECT rule makes clients fail at
  once;
- ``forwarding``: it has an address and at least one live instance: a listener with a pool of
  instances, and a DNAT rule sending the address to the listener.

A change to a service (a watch delta, or every service of a reset snapshot) is a *view*:
address, protocol, and the live instances (name -> address).  :func:`transition` compares it
with the service's current state and returns the new state and the actions that get there.
The table :data:`TRANSITIONS` holds every (from, to) pair, with a second row where the
*endpoint* (what the listener and the rule are for) changed: for ``rejecting`` that is the
address, for ``forwarding`` the address or the protocol — both replace the listener, because
a listener proxies with one protocol and a DNAT rule points at one listener.

Ordering inside an action list is the safety argument, and it is fixed by the table:

- a listener exists, with its pool filled, before any DNAT rule points at it;
- the new rule is installed before the old one is removed, so there is no window in which a
  client's SYN meets no rule (and, for a VIP that is not local, would leave the host);
- a listener is closed only after its rule is gone.  Closing a listener stops accepting; the
  connections it already proxies carry on until they end.

Two services may claim one address (records written by hand, or two fluxctls at once).
:func:`resolve_conflicts` decides over the whole set of views which one keeps it; the others
are treated as absent until the address is free, so no two services in ``rejecting`` or
``forwarding`` ever share an address, and the rule set has one rule per address.

Each action kind belongs to a :class:`Phase` (prepare, install, remove, retire) in that order.
A caller applying many transitions at once — a reset snapshot with a thousand services — may
order all their actions by phase (:func:`in_phase_order`, stable) and apply every rule change
of the install and remove phases as ONE iptables batch; the per-service guarantees above still
hold because phases only ever move later actions later.  ``replace_listener`` opens the new
listener and hands it the old one's pool (instances keep their health); the old listener is
closed by the ``close_listener`` at the end.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from flux.model import Protocol, ProxyProtocol, ServiceInfo, parse_address

__all__ = [
    "TRANSITIONS",
    "Action",
    "ActionKind",
    "Conflict",
    "Endpoint",
    "Phase",
    "ServiceState",
    "ServiceView",
    "State",
    "Transition",
    "in_phase_order",
    "reset",
    "resolve_conflicts",
    "step",
    "transition",
    "why_ignored",
]


class State(enum.StrEnum):
    """Where a service is, for the balancer."""

    ABSENT = "absent"
    REJECTING = "rejecting"
    FORWARDING = "forwarding"


class Phase(enum.IntEnum):
    """When an action runs relative to others when transitions are applied together."""

    PREPARE = 0
    INSTALL = 1
    REMOVE = 2
    RETIRE = 3


class ActionKind(enum.StrEnum):
    """What the balancer must do; see :class:`Action` for the arguments."""

    OPEN_LISTENER = "open_listener"
    REPLACE_LISTENER = "replace_listener"
    UPDATE_POOL = "update_pool"
    INSTALL_DNAT = "install_dnat"
    INSTALL_REJECT = "install_reject"
    REMOVE_RULE = "remove_rule"
    CLOSE_LISTENER = "close_listener"

    @property
    def phase(self) -> Phase:
        return _PHASES[self]


_PHASES = {
    ActionKind.OPEN_LISTENER: Phase.PREPARE,
    ActionKind.REPLACE_LISTENER: Phase.PREPARE,
    ActionKind.UPDATE_POOL: Phase.PREPARE,
    ActionKind.INSTALL_DNAT: Phase.INSTALL,
    ActionKind.INSTALL_REJECT: Phase.INSTALL,
    ActionKind.REMOVE_RULE: Phase.REMOVE,
    ActionKind.CLOSE_LISTENER: Phase.RETIRE,
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a listener and a rule serve: the service address and the protocol, the PROXY
    protocol header its instances get first, if any, and whether its request heads get
    X-Forwarded-For (a change of either is a new listener)."""

    address: str
    protocol: Protocol
    proxy_protocol: ProxyProtocol | Literal[""] = ""
    forwarded: bool = False


def _frozen(instances: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(instances))


@dataclass(frozen=True, slots=True)
class ServiceView:
    """A service as the balancer needs it: endpoint and live instances (name -> address).

    ``created`` is the revision its spec was created at (:attr:`ServiceInfo.created`), which
    decides who keeps an address two services claim (:func:`resolve_conflicts`).
    """

    endpoint: Endpoint
    instances: Mapping[str, str] = field(default_factory=dict)
    created: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", _frozen(self.instances))

    @classmethod
    def from_info(cls, info: ServiceInfo) -> ServiceView | None:
        """The view of ``info``, or None when the balancer ignores it (:func:`why_ignored`)."""
        if why_ignored(info) is not None:
            return None
        live = {
            name: instance.address
            for name, instance in info.instances.items()
            if instance.receives_connections and instance.address is not None
        }
        spec = info.spec
        assert spec.address is not None
        endpoint = Endpoint(
            spec.address, spec.effective_protocol, spec.proxy_protocol, spec.forwarded
        )
        return cls(endpoint, live, info.created)


def why_ignored(info: ServiceInfo) -> str | None:
    """Why the balancer leaves ``info`` alone (one line for a log), or None if it does not."""
    if info.spec.address is None:
        return f"service {info.name!r} has no address"
    ip, _ = parse_address(info.spec.address)
    if isinstance(ip, ipaddress.IPv6Address):
        return (
            f"service {info.name!r} has IPv6 address {info.spec.address}: "
            "only IPv4 service addresses can be intercepted"
        )
    return None


@dataclass(frozen=True, slots=True)
class ServiceState:
    """Where a service is, and the endpoint and instances its listener/rule were set up for."""

    state: State = State.ABSENT
    endpoint: Endpoint | None = None
    instances: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", _frozen(self.instances))


ABSENT = ServiceState()


@dataclass(frozen=True, slots=True)
class Action:
    """One step for the balancer to take.

    ``endpoint`` says which listener or rule the action is about: for ``replace_listener``
    the new one, with the listener being replaced in ``previous``.  ``instances`` is set for
    ``update_pool``; ``rule`` (``dnat`` or ``reject``) for ``remove_rule``.
    """

    kind: ActionKind
    service: str
    endpoint: Endpoint
    instances: Mapping[str, str] | None = None
    previous: Endpoint | None = None
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """The new state of a service and the actions that get there, in order."""

    state: ServiceState
    actions: tuple[Action, ...]


class _Use(enum.Enum):
    NEW = "new"
    OLD = "old"


_A = ActionKind
# (from, to, endpoint changed) -> ((action, which endpoint it concerns), ...).  Every
# combination is listed; "changed" is always False when either side is absent.
TRANSITIONS: Mapping[tuple[State, State, bool], tuple[tuple[ActionKind, _Use], ...]] = {
    (State.ABSENT, State.ABSENT, False): (),
    (State.ABSENT, State.REJECTING, False): ((_A.INSTALL_REJECT, _Use.NEW),),
    (State.ABSENT, State.FORWARDING, False): (
        (_A.OPEN_LISTENER, _Use.NEW),
        (_A.UPDATE_POOL, _Use.NEW),
        (_A.INSTALL_DNAT, _Use.NEW),
    ),
    (State.REJECTING, State.ABSENT, False): ((_A.REMOVE_RULE, _Use.OLD),),
    (State.REJECTING, State.REJECTING, False): (),
    (State.REJECTING, State.REJECTING, True): (
        (_A.INSTALL_REJECT, _Use.NEW),
        (_A.REMOVE_RULE, _Use.OLD),
    ),
    (State.REJECTING, State.FORWARDING, False): (
        (_A.OPEN_LISTENER, _Use.NEW),
        (_A.UPDATE_POOL, _Use.NEW),
        (_A.INSTALL_DNAT, _Use.NEW),
        (_A.REMOVE_RULE, _Use.OLD),
    ),
    (State.REJECTING, State.FORWARDING, True): (
        (_A.OPEN_LISTENER, _Use.NEW),
        (_A.UPDATE_POOL, _Use.NEW),
        (_A.INSTALL_DNAT, _Use.NEW),
        (_A.REMOVE_RULE, _Use.OLD),
    ),
    (State.FORWARDING, State.ABSENT, False): (
        (_A.REMOVE_RULE, _Use.OLD),
        (_A.CLOSE_LISTENER, _Use.OLD),
    ),
    (State.FORWARDING, State.REJECTING, False): (
        (_A.INSTALL_REJECT, _Use.NEW),
        (_A.REMOVE_RULE, _Use.OLD),
        (_A.CLOSE_LISTENER, _Use.OLD),
    ),
    (State.FORWARDING, State.REJECTING, True): (
        (_A.INSTALL_REJECT, _Use.NEW),
        (_A.REMOVE_RULE, _Use.OLD),
        (_A.CLOSE_LISTENER, _Use.OLD),
    ),
    # Same endpoint: only the pool changes (and only if the instances did, see transition()).
    (State.FORWARDING, State.FORWARDING, False): ((_A.UPDATE_POOL, _Use.NEW),),
    (State.FORWARDING, State.FORWARDING, True): (
        (_A.REPLACE_LISTENER, _Use.NEW),
        (_A.UPDATE_POOL, _Use.NEW),
        (_A.INSTALL_DNAT, _Use.NEW),
        (_A.REMOVE_RULE, _Use.OLD),
        (_A.CLOSE_LISTENER, _Use.OLD),
    ),
}


def _target(view: ServiceView | None) -> State:
    if view is None:
        return State.ABSENT
    return State.FORWARDING if view.instances else State.REJECTING


def _changed(current: ServiceState, view: ServiceView | None, target: State) -> bool:
    if current.state is State.ABSENT or target is State.ABSENT or view is None:
        return False
    old, new = current.endpoint, view.endpoint
    assert old is not None
    if current.state is State.REJECTING or target is State.REJECTING:
        # A REJECT rule depends on the address only; a listener being opened or closed in
        # this step is new or going anyway.
        return old.address != new.address
    return old != new


def transition(name: str, current: ServiceState, view: ServiceView | None) -> Transition:
    """Move service ``name`` from ``current`` to what ``view`` asks (None: gone or ignored)."""
    target = _target(view)
    changed = _changed(current, view, target)
    steps = TRANSITIONS[(current.state, target, changed)]
    if (
        current.state is State.FORWARDING
        and target is State.FORWARDING
        and not changed
        and view is not None
        and dict(current.instances) == dict(view.instances)
    ):
        steps = ()
    if view is None:
        new_state = ABSENT
    elif current.state is State.REJECTING and target is State.REJECTING and not changed:
        # Only the protocol changed, which a REJECT rule does not depend on: keep the
        # endpoint the rule was installed for, so a later remove_rule names that very rule.
        new_state = current
    else:
        new_state = ServiceState(
            target, view.endpoint, view.instances if target is State.FORWARDING else {}
        )
    actions = []
    for kind, use in steps:
        endpoint = new_state.endpoint if use is _Use.NEW else current.endpoint
        assert endpoint is not None
        actions.append(
            Action(
                kind=kind,
                service=name,
                endpoint=endpoint,
                instances=new_state.instances if kind is ActionKind.UPDATE_POOL else None,
                previous=current.endpoint if kind is ActionKind.REPLACE_LISTENER else None,
                rule=(
                    ("dnat" if current.state is State.FORWARDING else "reject")
                    if kind is ActionKind.REMOVE_RULE
                    else None
                ),
            )
        )
    return Transition(new_state, tuple(actions))


def reset(
    current: Mapping[str, ServiceState], snapshot: Mapping[str, ServiceView | None]
) -> tuple[dict[str, ServiceState], list[Action]]:
    """Apply a full snapshot: every service in it transitions; every other one goes absent.

    Returns the new states (absent services are dropped) and the actions, service by service
    in name order; order them with :func:`in_phase_order` to apply them as one batch.
    """
    states: dict[str, ServiceState] = {}
    actions: list[Action] = []
    for name in sorted(set(current) | set(snapshot)):
        result = transition(name, current.get(name, ABSENT), snapshot.get(name))
        actions.extend(result.actions)
        if result.state.state is not State.ABSENT:
            states[name] = result.state
    return states, actions


@dataclass(frozen=True, slots=True)
class Conflict:
    """``service`` is refused its address because ``holder`` claimed it first."""

    service: str
    address: str
    holder: str

    def __str__(self) -> str:
        return f"address {self.address} is also used by service {self.holder}"


def resolve_conflicts(
    views: Mapping[str, ServiceView],
) -> tuple[dict[str, ServiceView], dict[str, Conflict]]:
    """Split ``views`` into the services that may have their address and those refused it.

    One address (``IP:port``) can carry one rule, so of the services that claim it only one is
    served: the one whose spec was created first (lowest ``created``; then by name).  The
    creation revision is etcd's, the same on every host, so every fluxd picks the same service
    and the cluster behaves as one; and a service that works is never displaced by a newer
    spec that happens to sort first.  A refused service is absent for the balancer (no rule,
    no listener) until the holder goes or moves: then it wins the address on the next update.
    """
    claims: dict[str, list[str]] = {}
    for name, view in views.items():
        claims.setdefault(view.endpoint.address, []).append(name)
    served: dict[str, ServiceView] = {}
    refused: dict[str, Conflict] = {}
    for address, names in claims.items():
        holder, *others = sorted(names, key=lambda name: (views[name].created, name))
        served[holder] = views[holder]
        for name in others:
            refused[name] = Conflict(name, address, holder)
    return served, refused


def step(
    current: Mapping[str, ServiceState],
    conflicts: Mapping[str, Conflict],
    wanted: Mapping[str, ServiceView],
    changed: Iterable[str] | None,
) -> tuple[dict[str, ServiceState], list[Action], dict[str, Conflict]]:
    """One watch update: resolve ``wanted`` (every service's view) and transition.

    ``changed`` names the services the update touched (None for a reset snapshot: every
    service).  Besides those, every service whose conflict started or ended transitions too,
    since a change to one service can free or take another one's address.  Returns the new
    states (absent ones dropped), the actions, and the new conflicts.
    """
    served, refused = resolve_conflicts(wanted)
    if changed is None:
        states, actions = reset(current, served)
        return states, actions, refused
    moved = refused.keys() | conflicts.keys()
    touched = set(changed) | {name for name in moved if refused.get(name) != conflicts.get(name)}
    states = dict(current)
    actions = []
    for name in sorted(touched):
        result = transition(name, current.get(name, ABSENT), served.get(name))
        actions.extend(result.actions)
        if result.state.state is State.ABSENT:
            states.pop(name, None)
        else:
            states[name] = result.state
    return states, actions, refused


def in_phase_order(actions: list[Action]) -> list[Action]:
    """``actions`` ordered by phase, keeping their order within a phase (see module docstring)."""
    return sorted(actions, key=lambda action: action.kind.phase)
