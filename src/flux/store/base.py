"""The store interface: what fluxd and fluxctl need from etcd.

Theory of operation
-------------------
Two kinds of record live in the store:

- **Definitions** (service specs and rules) are written by fluxctl and live until removed.
- **Host-owned records** (this host's record, its instances, its Prometheus target) are written
  by one fluxd and attached to that fluxd's *lease*.  When the fluxd dies, etcd drops the lease
  and with it every record, and every watcher sees the deletions.

A store object remembers the host-owned records it has been asked to keep (its *desired*
state).  :meth:`Store.run_lease` grants a lease, writes that whole desired state on it, and keeps
the lease alive at TTL/3.  If the lease is lost (etcd was unreachable for longer than the TTL)
it grants a new one and rewrites everything: no restart, nothing dropped.  Host-owned writes
made while no lease is held are kept and written as soon as one is granted.

Watches follow the original's "reset then deltas" protocol: the first update is a full
snapshot flagged ``reset``; after it, each change to a service yields an update holding just
that service (``None`` when it was removed).  A broken stream or a compacted revision makes the
watch yield a fresh ``reset`` snapshot; only when no snapshot can be taken at all does it raise
:class:`StoreUnavailable`, for the caller's supervisor to retry with backoff.

Records that do not decode (bad JSON, failed validation, a service directory without a spec)
are logged and skipped by every read; they never fail a whole read or stop a watch.  Each is
logged once per store object (so once per fluxd or fluxctl run), not again at every re-read,
until its value changes.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

from flux.model import Host, Instance, Rule, Service, ServiceInfo

__all__ = [
    "NotFound",
    "ServiceUpdate",
    "Store",
    "StoreError",
    "StoreUnavailable",
]


class StoreError(Exception):
    """A store operation failed; the message is one line for people."""


class StoreUnavailable(StoreError):
    """The store (etcd) cannot be reached or did not answer in time."""


class NotFound(StoreError):
    """The service (or rule) named does not exist."""


@dataclass(frozen=True, slots=True)
class ServiceUpdate:
    """One step of a service watch.

    ``reset`` updates hold every service; other updates hold the services that changed, with
    ``None`` for a service that was removed.
    """

    services: Mapping[str, ServiceInfo | None]
    reset: bool = False


class Store(abc.ABC):
    """Access to services, rules, instances and hosts, with this host's lease."""

    # -- lifecycle -----------------------------------------------------------------------

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return when the store answers; raise :class:`StoreUnavailable` otherwise."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections.  Does not revoke the lease (see :meth:`revoke_lease`)."""

    # -- definitions (fluxctl) ------------------------------------------------------------

    @abc.abstractmethod
    async def add_service(self, name: str, spec: Service) -> None:
        """Create the service, or replace its spec (its rules and instances stay)."""

    @abc.abstractmethod
    async def remove_service(self, name: str) -> bool:
        """Remove the service with its rules and instances; False if there was none."""

    @abc.abstractmethod
    async def remove_all_services(self) -> None:
        """Remove every service."""

    @abc.abstractmethod
    async def get_service(
        self, name: str, *, rules: bool = False, instances: bool = False, known_hosts: bool = False
    ) -> ServiceInfo:
        """Read one service; raise :class:`NotFound` if it does not exist.

        With ``known_hosts``, instances whose host has no host record are left out (and logged):
        see :class:`flux.store.keys.ServiceTree`.
        """

    @abc.abstractmethod
    async def get_all_services(
        self, *, rules: bool = False, instances: bool = False, known_hosts: bool = False
    ) -> dict[str, ServiceInfo]:
        """Read every (valid) service, keyed by name (``known_hosts`` as for get_service)."""

    @abc.abstractmethod
    async def set_rule(self, service: str, name: str, rule: Rule) -> None:
        """Create or replace a rule; raise :class:`NotFound` if the service does not exist."""

    @abc.abstractmethod
    async def remove_rule(self, service: str, name: str) -> bool:
        """Remove a rule; False if there was none."""

    # -- host-owned records (fluxd), attached to the lease ---------------------------------

    @abc.abstractmethod
    async def add_instance(self, service: str, instance_id: str, instance: Instance) -> None:
        """Write (or rewrite) an instance of this host on the lease."""

    @abc.abstractmethod
    async def remove_instance(self, service: str, instance_id: str) -> bool:
        """Remove an instance; an instance that is already gone counts as removed."""

    @abc.abstractmethod
    async def register_host(self, host: Host) -> None:
        """Write this host's record on the lease."""

    @abc.abstractmethod
    async def deregister_host(self, address: str) -> None:
        """Remove a host record (absent counts as removed)."""

    @abc.abstractmethod
    async def get_hosts(self) -> dict[str, Host]:
        """Every live host, keyed by its address."""

    @abc.abstractmethod
    async def set_prometheus_target(self, host_address: str, target: str) -> None:
        """Advertise this host's metrics endpoint (``IP:port``) on the lease."""

    @abc.abstractmethod
    async def get_prometheus_targets(self) -> dict[str, str]:
        """Advertised metrics endpoints, keyed by host address."""

    # -- the lease --------------------------------------------------------------------------

    @abc.abstractmethod
    async def run_lease(self, ttl: int) -> None:
        """Hold a lease for as long as this runs (it returns only when cancelled).

        Grants a lease of ``ttl`` seconds, writes every host-owned record on it, and keeps it
        alive every ``ttl / 3`` seconds; on losing it, grants a new one and rewrites.  Raises
        :class:`StoreUnavailable` when the store cannot be reached, for a supervisor to retry.
        """

    @abc.abstractmethod
    async def wait_lease(self) -> None:
        """Return once a lease is held and the host-owned records are written on it."""

    @abc.abstractmethod
    async def revoke_lease(self) -> None:
        """Revoke the lease (every host-owned record vanishes at once) and forget them."""

    @property
    @abc.abstractmethod
    def lease_id(self) -> int | None:
        """The lease held now, if any."""

    @abc.abstractmethod
    def lease_age(self) -> float | None:
        """Seconds since the lease was last granted or kept alive; None while none is held.
        (Approaching the TTL means the keep-alives are not getting through.)"""

    # -- what /status shows of the store ------------------------------------------------------

    @property
    @abc.abstractmethod
    def endpoint(self) -> str | None:
        """Where requests go now (an etcd URL); None for a store with no such place."""

    @property
    @abc.abstractmethod
    def reachable(self) -> bool:
        """Whether the last request got an answer (False before the first one)."""

    # -- watches ------------------------------------------------------------------------------

    @abc.abstractmethod
    def watch_services(
        self, *, rules: bool = False, instances: bool = False, known_hosts: bool = False
    ) -> AsyncGenerator[ServiceUpdate, None]:
        """Yield a reset snapshot, then per-service deltas (see the module docstring).

        Changes to rules (instances) produce updates only when ``rules`` (``instances``) is
        set, and the services yielded then carry them.  With ``known_hosts`` the watch follows
        host records too and leaves out instances whose host is not registered; a host
        registering or going away yields the services of its instances.  Closing the generator
        (``aclose()``, or cancelling the task iterating it) closes the watch.
        """

