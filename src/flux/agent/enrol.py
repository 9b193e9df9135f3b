"""Enrolment: which running containers are instances of which services, where, in what state.

Theory of operation
-------------------
This module is pure: Docker's inspect JSON and service definitions go in, instance records
come out.  The Docker adapter (``docker.py``) feeds it container records and lifecycle events;
the publisher (``publish.py``) writes what it decides.

*Containers.*  :class:`Container` is the part of ``docker inspect`` that enrolment needs, plus
one thing Docker does not keep: ``stopping``, set when a ``kill``/``stop`` event was seen for a
container that has not died yet.

*Lifecycle.*  Every change a Docker event makes to a known container is in
:data:`_TRANSITIONS` (``die`` ends it; ``pause``, ``unpause``, ``health_status`` and
``kill``/``stop`` change a flag; a ``kill`` counts only with a signal that ends the container,
not with one that asks it to reload).  ``start`` (and a network change) is not a transition: the
adapter inspects the container and the fresh record replaces the old one.  The instance state
is derived from the flags in one fixed order, :data:`_STATE_ORDER`::

    stopping          -> draining     (only live instances get new connections, so a
    paused            -> paused        container that is going away is drained first)
    health unhealthy  -> unhealthy
    no address        -> no address
    otherwise         -> live

*Enrolment.*  A container is an instance of a service when it matches any of the service's
rules (a rule matches when all its selector entries do; see ``flux.selector``).  The rule
recorded is the first match in sorted-name order, so the choice is stable (the original's was
map order).  The port is the rule's instance port, else the service's; without one the
instance has no address.  The address (SPEC §3.3):

- ``--net=host`` containers: host IP + port, whatever the network mode;
- ``local`` mode: host IP + the host port Docker publishes for ``<port>/tcp`` on a wildcard
  address (empty, ``0.0.0.0``, ``::``) or on the host IP, first such binding;
- ``global`` mode: the container's IPv4 address + port; with several networks the first one in
  sorted-name order that has an IPv4 address (the top-level ``IPAddress`` only when no network
  has one, as with engines that report no per-network addresses).

*Reset protocol* (:class:`Enroller`, reference §3.5).  Containers and services both start
*unknown*, which is not the same as empty: nothing is emitted until a snapshot of each has been
seen, and deltas for a side that is still unknown are ignored.  Once both are known, every
snapshot yields a ``reset`` update holding every instance (the publisher then compares with
the store), and every delta yields only the instances that really changed, ``None`` for those
that went away.
"""

from __future__ import annotations

import ipaddress
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from flux.model import HostRef, Instance, InstanceState, ServiceInfo, format_address
from flux.selector import container_labels, matches
from flux.store.base import ServiceUpdate

__all__ = [
    "Container",
    "ContainerEvent",
    "ContainerUpdate",
    "Enroller",
    "InstanceKey",
    "InstanceUpdate",
    "NetworkMode",
    "PortBinding",
    "apply_event",
    "enrol",
    "enrol_all",
    "instance_address",
    "instance_state",
]

NetworkMode = Literal["local", "global"]

# (service name, full container ID): the key of an instance record.
InstanceKey = tuple[str, str]

# Host addresses Docker uses for "published on every interface".
_WILDCARD_HOST_IPS = frozenset({"", "0.0.0.0", "::"})

# Signals that end a container whatever it runs; its own stop signal (Config.StopSignal) is
# added per container.  Others (HUP, USR1, WINCH...) usually mean "reload", not "go away".
_ENDING_SIGNALS: frozenset[int] = frozenset(
    {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
)


@dataclass(frozen=True, slots=True)
class PortBinding:
    """One host binding of a container port (an entry of ``NetworkSettings.Ports``)."""

    host_ip: str
    host_port: str


@dataclass(frozen=True, slots=True)
class Container:
    """A running container, as much of ``docker inspect`` as enrolment uses."""

    id: str
    image: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    env: tuple[str, ...] = ()
    network_mode: str = "default"
    ip_address: str = ""
    networks: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, tuple[PortBinding, ...]] = field(default_factory=dict)
    paused: bool = False
    health: str = ""
    stop_signal: str = ""
    stopping: bool = False

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any], *, stopping: bool = False) -> Container:
        """Build a record from Docker's ``GET /containers/<id>/json`` answer.

        Docker writes ``null`` for many empty fields (labels, env, an exposed but unpublished
        port), so every field is read defensively.
        """
        config = data.get("Config") or {}
        host_config = data.get("HostConfig") or {}
        settings = data.get("NetworkSettings") or {}
        state = data.get("State") or {}
        networks = {
            str(name): str((endpoint or {}).get("IPAddress") or "")
            for name, endpoint in (settings.get("Networks") or {}).items()
        }
        ports = {
            str(port): tuple(
                PortBinding(str(b.get("HostIp") or ""), str(b.get("HostPort") or ""))
                for b in (bindings or ())
                if isinstance(b, Mapping)
            )
            for port, bindings in (settings.get("Ports") or {}).items()
        }
        labels = {str(k): str(v) for k, v in (config.get("Labels") or {}).items()}
        return cls(
            id=str(data.get("Id") or ""),
            image=str(config.get("Image") or ""),
            labels=labels,
            env=tuple(str(e) for e in (config.get("Env") or ())),
            network_mode=str(host_config.get("NetworkMode") or "default"),
            ip_address=str(settings.get("IPAddress") or ""),
            networks=networks,
            ports=ports,
            paused=bool(state.get("Paused")),
            health=str((state.get("Health") or {}).get("Status") or ""),
            stop_signal=str(config.get("StopSignal") or ""),
            stopping=stopping,
        )

    @property
    def selector_labels(self) -> dict[str, str]:
        """What selectors are evaluated against, and what an instance records."""
        return container_labels(self.image, self.labels, self.env)


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    """A Docker event about one container, reduced to what the lifecycle needs.

    ``action`` is ``start``, ``die``, ``pause``, ``unpause``, ``kill``, ``stop``,
    ``health_status`` (with ``health``) or ``network`` (connected to or disconnected from a
    network: its addresses changed).
    """

    action: str
    container_id: str
    signal: str = ""
    health: str = ""


@dataclass(frozen=True, slots=True)
class ContainerUpdate:
    """Containers from Docker: every running one (``reset``), or those that changed."""

    containers: Mapping[str, Container | None]
    reset: bool = False


@dataclass(frozen=True, slots=True)
class InstanceUpdate:
    """This host's instances: all of them (``reset``), or those that changed (``None``: gone)."""

    instances: Mapping[InstanceKey, Instance | None]
    reset: bool = False


# -- lifecycle -------------------------------------------------------------------------------


def _parse_signal(text: str) -> int | None:
    text = text.strip().upper()
    if not text:
        return None
    if text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        return None


def _on_kill(container: Container, event: ContainerEvent) -> Container:
    ending: set[int] = set(_ENDING_SIGNALS)
    own = _parse_signal(container.stop_signal)
    if own is not None:
        ending.add(own)
    sent = _parse_signal(event.signal)
    # A kill event without a signal attribute comes from old engines: assume it ends it.
    if sent is None or sent in ending:
        return replace(container, stopping=True)
    return container


_TRANSITIONS: Mapping[str, Callable[[Container, ContainerEvent], Container | None]] = {
    "die": lambda c, e: None,
    "pause": lambda c, e: replace(c, paused=True),
    "unpause": lambda c, e: replace(c, paused=False),
    "health_status": lambda c, e: replace(c, health=e.health),
    "kill": _on_kill,
    "stop": lambda c, e: replace(c, stopping=True),
}


def apply_event(container: Container, event: ContainerEvent) -> Container | None:
    """The record after ``event`` (``None`` when the container died).

    Events that are not lifecycle transitions (``start``, ``network``) leave it unchanged:
    the adapter re-inspects the container for those.
    """
    transition = _TRANSITIONS.get(event.action)
    return container if transition is None else transition(container, event)


# First condition that holds decides the state.
_STATE_ORDER: tuple[tuple[Callable[[Container, str | None], bool], InstanceState], ...] = (
    (lambda c, address: c.stopping, InstanceState.DRAINING),
    (lambda c, address: c.paused, InstanceState.PAUSED),
    (lambda c, address: c.health == "unhealthy", InstanceState.UNHEALTHY),
    (lambda c, address: address is None, InstanceState.NO_ADDRESS),
)


def instance_state(container: Container, address: str | None) -> InstanceState:
    """The state an instance of ``container`` with ``address`` is in."""
    for condition, state in _STATE_ORDER:
        if condition(container, address):
            return state
    return InstanceState.LIVE


# -- addresses ---------------------------------------------------------------------------------


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


def instance_address(
    container: Container, port: int, *, host_ip: str, network_mode: NetworkMode
) -> str | None:
    """Where ``container`` serves ``port`` for clients on other hosts, or None."""
    if not port:
        return None
    if container.network_mode == "host":
        return format_address(host_ip, port)
    if network_mode == "local":
        for binding in container.ports.get(f"{port}/tcp", ()):
            if binding.host_ip in _WILDCARD_HOST_IPS or _same_ip(binding.host_ip, host_ip):
                if binding.host_port.isdigit() and 0 < int(binding.host_port) < 65536:
                    return format_address(host_ip, int(binding.host_port))
                return None
        return None
    for name in sorted(container.networks):
        ip = _ipv4(container.networks[name])
        if ip is not None:
            return format_address(ip, port)
    ip = _ipv4(container.ip_address)
    return None if ip is None else format_address(ip, port)


# -- enrolment ---------------------------------------------------------------------------------


def _enrol_in(
    container: Container,
    labels: Mapping[str, str],
    service: ServiceInfo,
    *,
    host_ip: str,
    network_mode: NetworkMode,
) -> Instance | None:
    for rule_name in sorted(service.rules):
        rule = service.rules[rule_name]
        if not matches(rule.selector, labels):
            continue
        port = rule.instance_port or service.spec.instance_port
        address = instance_address(container, port, host_ip=host_ip, network_mode=network_mode)
        return Instance(
            host=HostRef(address=host_ip),
            containerRule=rule_name,
            address=address,
            labels=dict(labels),
            state=instance_state(container, address),
        )
    return None


def enrol(
    container: Container,
    services: Mapping[str, ServiceInfo],
    *,
    host_ip: str,
    network_mode: NetworkMode,
) -> dict[str, Instance]:
    """The instances ``container`` is, keyed by service name."""
    labels = container.selector_labels
    result: dict[str, Instance] = {}
    for name, service in services.items():
        instance = _enrol_in(
            container, labels, service, host_ip=host_ip, network_mode=network_mode
        )
        if instance is not None:
            result[name] = instance
    return result


def enrol_all(
    containers: Iterable[Container],
    services: Mapping[str, ServiceInfo],
    *,
    host_ip: str,
    network_mode: NetworkMode,
) -> dict[InstanceKey, Instance]:
    """Every instance the ``containers`` are, keyed by (service, container ID)."""
    return {
        (service, container.id): instance
        for container in containers
        for service, instance in enrol(
            container, services, host_ip=host_ip, network_mode=network_mode
        ).items()
    }


def _check_mode(network_mode: str) -> NetworkMode:
    if network_mode == "local":
        return "local"
    if network_mode == "global":
        return "global"
    raise ValueError(f"invalid network mode {network_mode!r}: use 'local' or 'global'")


class Enroller:
    """Containers and services in, this host's instances (as updates) out.

    Feed it Docker's :class:`ContainerUpdate` and the store's :class:`ServiceUpdate` (rules
    included); each call returns the
    :class:`InstanceUpdate` to publish, or ``None`` when there is nothing to publish.
    """

    def __init__(self, host_ip: str, network_mode: str = "local") -> None:
        self.host_ip = str(ipaddress.ip_address(host_ip))
        self.network_mode = _check_mode(network_mode)
        self._containers: dict[str, Container] | None = None
        self._services: dict[str, ServiceInfo] | None = None
        self._instances: dict[InstanceKey, Instance] = {}

    @property
    def ready(self) -> bool:
        """True once a snapshot of both containers and services has been seen."""
        return self._containers is not None and self._services is not None

    @property
    def instances(self) -> Mapping[InstanceKey, Instance]:
        """The instances this host should have now (empty until :attr:`ready`)."""
        return self._instances

    @property
    def containers(self) -> Mapping[str, Container] | None:
        """The running containers known, or None while unknown."""
        return self._containers

    @property
    def services(self) -> Mapping[str, ServiceInfo] | None:
        """The services known, or None while unknown."""
        return self._services

    def forget(self) -> None:
        """Go back to knowing nothing: the next two snapshots produce a reset update."""
        self._containers = None
        self._services = None
        self._instances = {}

    def update_containers(self, update: ContainerUpdate) -> InstanceUpdate | None:
        """Take a container snapshot or delta; return what to publish."""
        if update.reset:
            self._containers = {
                cid: c for cid, c in update.containers.items() if c is not None
            }
            return self._full_reset()
        if self._containers is None:
            return None
        for cid, container in update.containers.items():
            if container is None:
                self._containers.pop(cid, None)
            else:
                self._containers[cid] = container
        if self._services is None:
            return None
        changes: dict[InstanceKey, Instance | None] = {}
        for cid in update.containers:
            container = self._containers.get(cid)
            wanted = (
                {}
                if container is None
                else enrol(
                    container,
                    self._services,
                    host_ip=self.host_ip,
                    network_mode=self.network_mode,
                )
            )
            for service in self._services:
                self._change((service, cid), wanted.get(service), changes)
        return InstanceUpdate(changes) if changes else None

    def update_services(self, update: ServiceUpdate) -> InstanceUpdate | None:
        """Take a service snapshot or delta from the store's watch; return what to publish."""
        services = update.services
        if update.reset:
            self._services = {name: s for name, s in services.items() if s is not None}
            return self._full_reset()
        if self._services is None:
            return None
        for name, service in services.items():
            if service is None:
                self._services.pop(name, None)
            else:
                self._services[name] = service
        if self._containers is None:
            return None
        changes: dict[InstanceKey, Instance | None] = {}
        for name in services:
            service = self._services.get(name)
            for cid, container in self._containers.items():
                wanted = None
                if service is not None:
                    wanted = _enrol_in(
                        container,
                        container.selector_labels,
                        service,
                        host_ip=self.host_ip,
                        network_mode=self.network_mode,
                    )
                self._change((name, cid), wanted, changes)
        return InstanceUpdate(changes) if changes else None

    def _change(
        self,
        key: InstanceKey,
        wanted: Instance | None,
        changes: dict[InstanceKey, Instance | None],
    ) -> None:
        current = self._instances.get(key)
        if wanted == current:
            return
        if wanted is None:
            del self._instances[key]
        else:
            self._instances[key] = wanted
        changes[key] = wanted

    def _full_reset(self) -> InstanceUpdate | None:
        if self._containers is None or self._services is None:
            return None
        self._instances = enrol_all(
            self._containers.values(),
            self._services,
            host_ip=self.host_ip,
            network_mode=self.network_mode,
        )
        return InstanceUpdate(dict(self._instances), reset=True)
