"""Published ports: which service each entry point of this host serves (pure).

Theory of operation
-------------------
A service may be *published* (its spec's ``publish`` port, ``fluxctl --publish``): every fluxd
listens on that port at its ``-publish-ip`` and balances the connections over the service's
live instances on every host, as it does a VIP's.  Unlike a VIP, nothing is intercepted: the
port is a real listening socket of this host, so there is no iptables rule and no reject state;
an entry point with no live instance accepts and resets, as a VIP listener does when its last
instance failed.

An :class:`EntryPoint` is one published port and what it routes to: its holder, and for an
http port shared by host name a :class:`HostRoutes` table.  The balancer keeps listeners per
port, not per service.

Sharing a port by host name
---------------------------
Several services of one protocol may publish one port when they have host names
(``hostnames``, ``fluxctl --hostname``).  On an **http** port each connection goes to the
service named by its *first* request's ``Host`` (:func:`request_host` reads it:
case-insensitive, the port and a trailing dot dropped); on a **tcp** port, to the service named
by the server name (SNI) of the client's TLS ClientHello
(:func:`~flux.balancer.clienthello.read_server_name`; the TLS bytes go on untouched).  An exact
name wins over a wildcard (``*.example.com`` matches one label); a service on the port without
host names is the *default*, for every name no other has (and, tcp, for clients that name
none).  Without one, an unknown or missing host is answered ``404`` by fluxd (http) or the
client is closed (tcp).

:func:`resolve_entry_points` decides as :func:`~flux.balancer.services.resolve_conflicts` does
for addresses: the specs claiming a port are taken in the order they were created (etcd's
create revision, the same on every host; then the name), and each is admitted unless it
clashes with one admitted before it:

- its protocol differs from the port's (the first one's): tcp and http cannot share a port;
- it has no host names and the port already has a default;
- one of its host names is already another admitted service's on that port.

A service refused is refused whole (never two owners of a name, never half a service), with a
:class:`PortConflict` naming the reason and the service that claimed it first, until that one
goes or changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from flux.model import Protocol, ProxyProtocol, ServiceInfo

__all__ = [
    "EntryPoint",
    "HostRoutes",
    "PortConflict",
    "PublishClaim",
    "request_host",
    "resolve_entry_points",
]


@dataclass(frozen=True, slots=True)
class PublishClaim:
    """A service's claim on a published port: the port, its protocol, its live instances
    (name -> address), the revision its spec was created at, the PROXY protocol header its
    instances get first, if any, and whether its request heads get X-Forwarded-For."""

    port: int
    protocol: Protocol
    instances: Mapping[str, str] = field(default_factory=dict)
    created: int = 0
    hostnames: tuple[str, ...] = ()
    proxy_protocol: ProxyProtocol | Literal[""] = ""  # tcp only
    forwarded: bool = False  # http only

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", MappingProxyType(dict(self.instances)))

    @classmethod
    def from_info(cls, info: ServiceInfo) -> PublishClaim | None:
        """The claim of ``info``, or None when the service publishes no port."""
        if not info.spec.publish:
            return None
        live = {
            name: instance.address
            for name, instance in info.instances.items()
            if instance.receives_connections and instance.address is not None
        }
        spec = info.spec
        return cls(
            spec.publish,
            spec.effective_protocol,
            live,
            info.created,
            spec.hostnames,
            spec.proxy_protocol,
            spec.forwarded,
        )


@dataclass(frozen=True, slots=True)
class HostRoutes:
    """Which service of a port shared by host name serves a request's host (or a TLS
    client's server name): ``names`` (exact name or ``*.suffix`` -> service) and the
    ``default`` service (None: fluxd answers 404, or closes a tcp client)."""

    names: tuple[tuple[str, str], ...]
    default: str | None = None

    def pick(self, host: str | None) -> str | None:
        """The service for ``host`` (as :func:`request_host` or
        :func:`~flux.balancer.clienthello.read_server_name` gives it; None: none named)."""
        if host:
            table = dict(self.names)
            service = table.get(host)
            if service is not None:
                return service
            _, dot, parent = host.partition(".")
            if dot and parent:
                service = table.get("*." + parent)
                if service is not None:
                    return service
        return self.default

    @property
    def services(self) -> tuple[str, ...]:
        """Every service the table routes to, in name order."""
        named = {service for _, service in self.names}
        if self.default is not None:
            named.add(self.default)
        return tuple(sorted(named))


def request_host(head: bytes) -> str | None:
    """The host a complete HTTP/1.x request head (start line through the empty line) names,
    as routes compare it: its one ``Host`` field, lower case, without the port or a trailing
    dot; None when it has none, several, or an empty one (the engine's framer judges the rest
    of the head once the connection is relayed)."""
    found: str | None = None
    count = 0
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        if name.strip(b" \t\r").lower() == b"host":
            count += 1
            found = value.strip(b" \t\r").decode("latin-1")
    if count != 1 or not found:
        return None
    return normalise_request_host(found)


def normalise_request_host(value: str) -> str | None:
    """A ``Host`` value (``name``, ``name:port``, ``[v6]:port``) as routes compare it."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host = value[: end + 1] if end > 0 else value
    else:
        host = value.rpartition(":")[0] if ":" in value else value
    host = host.removesuffix(".")
    return host or None


@dataclass(frozen=True, slots=True)
class EntryPoint:
    """One published port and the service holding it, with that service's protocol; for a
    port shared by host name, ``routes`` (None: every connection goes to ``service``); for a
    port held by one service, its PROXY protocol (tcp) and X-Forwarded-For (http) settings (a
    change of the service, the protocol or either setting is a new listener; on a shared port
    each service's listener has its own)."""

    port: int
    service: str
    protocol: Protocol
    routes: HostRoutes | None = None
    proxy_protocol: ProxyProtocol | Literal[""] = ""
    forwarded: bool = False

    @property
    def shared(self) -> bool:
        """Connections are routed by host name (the port's listener reads the first head)."""
        return self.routes is not None


@dataclass(frozen=True, slots=True)
class PortConflict:
    """``service`` is refused published ``port`` because ``holder`` claimed it first:
    ``hostname`` is the name both claim, ``protocol`` the port's when theirs differ."""

    service: str
    port: int
    holder: str
    hostname: str | None = None
    protocol: Protocol | None = None

    def __str__(self) -> str:
        if self.hostname is not None:
            return (
                f"host name {self.hostname} on port {self.port} is also claimed by service"
                f" {self.holder}"
            )
        if self.protocol is not None:
            return (
                f"port {self.port} is published by {self.protocol} service {self.holder}"
                " (tcp and http services cannot share a port)"
            )
        return f"port {self.port} is also published by service {self.holder}"


def _admit(
    port: int, names: list[str], claims: Mapping[str, PublishClaim]
) -> tuple[EntryPoint, dict[str, PortConflict]]:
    """One port's entry point from its claimants in creation order (see the module header)."""
    holder = names[0]
    protocol = claims[holder].protocol
    refused: dict[str, PortConflict] = {}
    owners: dict[str, str] = {}  # host name -> service
    default: str | None = None
    for name in names:
        claim = claims[name]
        conflict: PortConflict | None = None
        if claim.protocol != protocol:
            conflict = PortConflict(name, port, holder, protocol=protocol)
        elif not claim.hostnames:
            if default is not None:
                conflict = PortConflict(name, port, default)
        else:
            taken = [host for host in claim.hostnames if host in owners]
            if taken:
                conflict = PortConflict(name, port, owners[taken[0]], hostname=taken[0])
        if conflict is not None:
            refused[name] = conflict
            continue
        if not claim.hostnames:
            default = name
        for host in claim.hostnames:
            owners[host] = name
    if not owners:
        claim = claims[holder]
        return EntryPoint(
            port, holder, protocol, None, claim.proxy_protocol, claim.forwarded
        ), refused
    routes = HostRoutes(tuple(sorted(owners.items())), default)
    return EntryPoint(port, holder, protocol, routes), refused


def resolve_entry_points(
    claims: Mapping[str, PublishClaim],
) -> tuple[dict[int, EntryPoint], dict[str, PortConflict]]:
    """The entry point of every claimed port, and the services refused theirs.

    Of the services that claim one port, the one whose spec was created first (lowest
    ``created``, then the name) holds it; the others share it by host name or are refused
    (see the module header).
    """
    by_port: dict[int, list[str]] = {}
    for name, claim in claims.items():
        by_port.setdefault(claim.port, []).append(name)
    entries: dict[int, EntryPoint] = {}
    refused: dict[str, PortConflict] = {}
    for port, names in by_port.items():
        ordered = sorted(names, key=lambda name: (claims[name].created, name))
        entries[port], conflicts = _admit(port, ordered, claims)
        refused.update(conflicts)
    return entries, refused
