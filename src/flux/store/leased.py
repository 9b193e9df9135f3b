"""The host-owned records and lease plumbing that every store shares (see flux.store.base)."""

from __future__ import annotations

import abc
import asyncio
import time

from flux.model import Host, Instance, encode_record
from flux.store.base import Store
from flux.store.keys import encode_target, host_key, instance_key, prometheus_key

__all__ = ["LeasedStore"]


class LeasedStore(Store):
    """What every store does the same way with host-owned records and its lease.

    A subclass keeps ``_lease`` (the lease held, or None) and ``_ready`` (set while a lease is
    held and the desired records are written on it), and implements :meth:`_keep` and
    :meth:`_forget`, which change the desired state and, when a lease is held, the store.
    """

    _lease: int | None
    _ready: asyncio.Event
    # time.monotonic() when the lease was last granted or kept alive (see lease_age).
    _lease_kept: float | None = None

    @abc.abstractmethod
    async def _keep(self, key: str, value: str) -> None:
        """Desire ``key`` = ``value`` on the lease (written now, or when a lease is granted)."""

    @abc.abstractmethod
    async def _forget(self, key: str) -> None:
        """Stop desiring ``key`` and delete it."""

    async def add_instance(self, service: str, instance_id: str, instance: Instance) -> None:
        await self._keep(instance_key(service, instance_id), encode_record(instance))

    async def remove_instance(self, service: str, instance_id: str) -> bool:
        await self._forget(instance_key(service, instance_id))
        return True

    async def register_host(self, host: Host) -> None:
        await self._keep(host_key(host.address), encode_record(host))

    async def deregister_host(self, address: str) -> None:
        await self._forget(host_key(address))

    async def set_prometheus_target(self, host_address: str, target: str) -> None:
        await self._keep(prometheus_key(host_address), encode_target(target))

    @property
    def lease_id(self) -> int | None:
        return self._lease

    def lease_age(self) -> float | None:
        if self._lease is None or self._lease_kept is None:
            return None
        return max(0.0, time.monotonic() - self._lease_kept)

    async def wait_lease(self) -> None:
        await self._ready.wait()

    def _lease_refreshed(self) -> None:
        """The lease was just granted or kept alive."""
        self._lease_kept = time.monotonic()

    def _drop_lease(self) -> None:
        self._lease = None
        self._lease_kept = None
        self._ready.clear()
