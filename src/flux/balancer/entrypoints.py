"""Published ports: which service each entry point of this host serves (pure).

Theory of operation
-------------------
A service may be *published* (its spec's ``publish`` port, ``fluxctl --publish``): every fluxd
listens on that port at its ``-publish-ip`` and balances the connections over the service's
live instances on every host, as it does a VIP's.  Unlike a VIP, nothing is intercepted: the
port is a real listening socket of this host, so there is no iptables rule and no reject state;
an entry point with no live instance accepts and resets, as a VIP listener does when its last
instance failed.

An :class:`EntryPoint` is one published port and what it routes to.  Today that is one
service, the port's holder; the entry point is the unit a later routing by host name (several
services on one port, chosen by ``Host`` or TLS SNI) extends with a table, which is why the
balancer keeps listeners per port and not per service.

Two services publishing one port cannot both be served without host names.
:func:`resolve_entry_points` decides as :func:`~flux.balancer.services.resolve_conflicts` does
for addresses: the spec created first (etcd's create revision, the same on every host; then
the name) holds the port, every other claimant is refused with a :class:`PortConflict` until
the holder goes or moves.  The protocol is the holder's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from flux.model import Protocol, ProxyProtocol, ServiceInfo

__all__ = ["EntryPoint", "PortConflict", "PublishClaim", "resolve_entry_points"]


@dataclass(frozen=True, slots=True)
class PublishClaim:
    """A service's claim on a published port: the port, its protocol, its live instances
    (name -> address), the revision its spec was created at and the PROXY protocol header its
    instances get first, if any."""

    port: int
    protocol: Protocol
    instances: Mapping[str, str] = field(default_factory=dict)
    created: int = 0
    proxy_protocol: ProxyProtocol | Literal[""] = ""

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
        return cls(spec.publish, spec.effective_protocol, live, info.created, spec.proxy_protocol)


@dataclass(frozen=True, slots=True)
class EntryPoint:
    """One published port and the service it serves, with that service's protocol and PROXY
    protocol (a change of either is a new listener)."""

    port: int
    service: str
    protocol: Protocol
    proxy_protocol: ProxyProtocol | Literal[""] = ""


@dataclass(frozen=True, slots=True)
class PortConflict:
    """``service`` is refused published ``port`` because ``holder`` claimed it first."""

    service: str
    port: int
    holder: str

    def __str__(self) -> str:
        return f"port {self.port} is also published by service {self.holder}"


def resolve_entry_points(
    claims: Mapping[str, PublishClaim],
) -> tuple[dict[int, EntryPoint], dict[str, PortConflict]]:
    """The entry point of every claimed port, and the services refused theirs.

    Of the services that claim one port, the one whose spec was created first (lowest
    ``created``, then the name) holds it.
    """
    by_port: dict[int, list[str]] = {}
    for name, claim in claims.items():
        by_port.setdefault(claim.port, []).append(name)
    entries: dict[int, EntryPoint] = {}
    refused: dict[str, PortConflict] = {}
    for port, names in by_port.items():
        holder, *others = sorted(names, key=lambda name: (claims[name].created, name))
        claim = claims[holder]
        entries[port] = EntryPoint(port, holder, claim.protocol, claim.proxy_protocol)
        for name in others:
            refused[name] = PortConflict(name, port, holder)
    return entries, refused
