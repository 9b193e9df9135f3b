"""The publisher: this host's instances into the store, writing only what changed.

Theory of operation
-------------------
The publisher remembers every instance record it has written (``written``).  A delta is
compared with that memory and only real differences reach the store; an update that changes
nothing costs nothing (``writes`` counts every ``add_instance``/``remove_instance`` call, so
tests and benchmarks can check that it stays 0).

A reset (:meth:`Publisher.sync`) does not trust the memory: it reads what the store holds for
this host, rewrites each instance that is missing or different, and removes each of this
host's instances that is no longer wanted: leftovers from a previous run, or records changed
behind our back.  A record that is identical to what we want but was not written by this
publisher (a previous fluxd on this host wrote it, before a crash and a quick restart) is
rewritten all the same: it sits on the old process's lease and would vanish when that lease
expires.  So the first reset after start writes every instance once; later resets with
nothing changed write nothing.  Records of other hosts are never touched (reference §3.6,
TestSetInstancesCleanup); a record that is already gone counts as removed (§8.7).

Instances are host-owned records: the store writes them on this host's lease, so they vanish
with the host.  Any store error propagates: the caller (the agent's supervisor) restarts the
publisher after a backoff, and a restarted publisher starts with a :meth:`sync`, which repairs
whatever a half-done batch left behind.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping

from flux.agent.enrol import InstanceKey
from flux.model import Instance
from flux.store.base import Store

__all__ = ["Publisher"]

log = logging.getLogger("flux.agent.publish")


def _normal_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


class Publisher:
    """Writes this host's instances to ``store``, diffing against what it wrote before."""

    def __init__(self, store: Store, host_ip: str) -> None:
        self._store = store
        self.host_ip = _normal_ip(host_ip)
        self._written: dict[InstanceKey, Instance] = {}
        # Keys this publisher wrote through its store (so they are on this process's lease).
        self._owned: set[InstanceKey] = set()
        self.adds = 0
        self.removes = 0
        self.syncs = 0

    @property
    def writes(self) -> int:
        """Store writes so far (adds and removes)."""
        return self.adds + self.removes

    @property
    def written(self) -> Mapping[InstanceKey, Instance]:
        """The instances as last written (what the store holds for this host, as we know)."""
        return self._written

    async def sync(self, wanted: Mapping[InstanceKey, Instance]) -> None:
        """Make the store hold exactly ``wanted`` for this host (a reset)."""
        services = await self._store.get_all_services(instances=True)
        existing: dict[InstanceKey, Instance] = {
            (service, instance_id): instance
            for service, info in services.items()
            for instance_id, instance in info.instances.items()
            if _normal_ip(instance.host.address) == self.host_ip
        }
        self._written = {key: value for key, value in existing.items() if key in self._owned}
        self.syncs += 1
        for key in sorted(existing.keys() - wanted.keys()):
            self._written.setdefault(key, existing[key])
            await self._remove(key)
        for key in sorted(wanted):
            await self._put(key, wanted[key])

    async def apply(self, changes: Mapping[InstanceKey, Instance | None]) -> None:
        """Apply a delta: write the instances that differ, remove those that went away."""
        for key in sorted(changes):
            instance = changes[key]
            if instance is None:
                if key in self._written:
                    await self._remove(key)
            else:
                await self._put(key, instance)

    async def _put(self, key: InstanceKey, instance: Instance) -> None:
        if self._written.get(key) == instance:
            return
        service, instance_id = key
        await self._store.add_instance(service, instance_id, instance)
        self.adds += 1
        self._written[key] = instance
        self._owned.add(key)
        where = instance.address or "no address"
        log.info(
            "Registering service '%s' instance '%s' at %s (%s)",
            service, instance_id[:12], where, instance.effective_state,
        )

    async def _remove(self, key: InstanceKey) -> None:
        service, instance_id = key
        await self._store.remove_instance(service, instance_id)
        self.removes += 1
        del self._written[key]
        self._owned.discard(key)
        log.info("Deregistering service '%s' instance '%s'", service, instance_id[:12])
