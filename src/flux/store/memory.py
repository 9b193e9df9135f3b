"""The store in memory: the same behaviour as etcd, for fast tests of what uses a store.

Theory of operation
-------------------
:class:`MemoryBackend` is a very small etcd: a flat key space with a revision counter, leases
that expire on a clock, and watchers that receive the changes of each revision.  Several
:class:`MemoryStore` objects on one backend are several hosts on one cluster.  A store keeps
the same key layout and the same desired-state/lease protocol as
:class:`~flux.store.etcd.EtcdStore`, and reads and watches through the same
:class:`~flux.store.keys.ServiceTree` and :class:`~flux.store.keys.ServiceWatch`, so the two
agree (``tests/test_store_contract.py`` runs one suite against both).  Unlike the original's
in-memory store, ``add_service`` replaces only the spec, as etcd does.

What tests can do with it:

- **time**: the backend's clock is a :class:`ManualClock` unless another is given, so leases
  expire only when a test says so: ``backend.advance(seconds)`` moves the clock and expires
  every lease not kept alive meanwhile; ``backend.expire_lease(id)`` drops one lease at once
  (what ``etcdctl lease revoke`` does behind its holder's back).  A holder learns of the loss
  straight away and grants a new lease, so no test waits for a keep-alive.
- **outages**: ``store.inject_error(exc)`` makes every call of that store raise ``exc``
  (:class:`StoreUnavailable` by default) and its watches raise it too; ``clear_error()`` ends
  the outage.  Host-owned writes during an outage still change the desired state, as with etcd.
- **bad data**: ``backend.put_raw(key, value)`` writes anything, as etcdctl would.
- **broken streams**: ``backend.break_watches()`` makes every watch take a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from flux.model import Host, Rule, Service, ServiceInfo, encode_record
from flux.store.base import NotFound, ServiceUpdate, StoreUnavailable
from flux.store.keys import (
    HOSTS,
    PREFIX,
    PROMETHEUS_TARGETS,
    SERVICES,
    Follow,
    KeyEvent,
    Problems,
    ServiceTree,
    ServiceWatch,
    decode_hosts,
    decode_targets,
    rule_key,
    service_dir,
    spec_key,
)
from flux.store.leased import LeasedStore

__all__ = ["ManualClock", "MemoryBackend", "MemoryStore"]

log = logging.getLogger("flux.store")


class ManualClock:
    """A clock that moves only when told to (seconds, as a float)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        if seconds < 0:
            raise ValueError(f"cannot move a clock back ({seconds!r} s)")
        self._now += seconds


@dataclass(slots=True)
class _Lease:
    ttl: int
    deadline: float
    on_lost: Callable[[], None] | None


@dataclass(slots=True)
class _Entry:
    value: str
    lease: int
    created: int = 0  # the revision that created the key, set on commit


# Put in a watcher's queue: the "stream" broke, take a new snapshot.
_BROKEN = object()


@dataclass(eq=False, slots=True)
class _Watcher:
    prefix: str
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)


class _NoSuchLease(Exception):
    """A write named a lease the backend does not have."""


class MemoryBackend:
    """One in-memory "cluster" that several :class:`MemoryStore` objects (hosts) share."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock: Callable[[], float] = clock if clock is not None else ManualClock()
        self.revision = 1
        self._kv: dict[str, _Entry] = {}
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 0x6C65617365  # arbitrary, and far from 0 (which means "no lease")
        self._watchers: set[_Watcher] = set()

    # -- for tests: look inside, break things ------------------------------------------------

    def put_raw(self, key: str, value: str, lease: int = 0) -> None:
        """Write any value at any key, as etcdctl would."""
        self._expire_due()
        if lease and lease not in self._leases:
            raise KeyError(f"no lease {lease:x}")
        self._commit({key: _Entry(value, lease)})

    def delete_raw(self, key: str) -> None:
        """Delete one key if it exists."""
        self.delete(key)

    def get_raw(self, key: str) -> str | None:
        """The value at ``key``, or None."""
        entry = self._kv.get(key)
        return entry.value if entry else None

    def lease_of(self, key: str) -> int:
        """The lease ``key`` is attached to; 0 for none (or no such key)."""
        entry = self._kv.get(key)
        return entry.lease if entry else 0

    def keys(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, sorted."""
        return sorted(key for key in self._kv if key.startswith(prefix))

    def leases(self) -> list[int]:
        """The leases that exist now."""
        self._expire_due()
        return sorted(self._leases)

    def advance(self, seconds: float) -> None:
        """Move the (manual) clock and expire the leases that were not kept alive."""
        if not isinstance(self.clock, ManualClock):
            raise TypeError("advance() needs the backend to run on a ManualClock")
        self.clock.advance(seconds)
        self._expire_due()

    def expire_lease(self, lease_id: int) -> None:
        """Drop a lease and its keys now, as if it had expired (unknown leases are ignored)."""
        self._drop(lease_id)

    def break_watches(self) -> None:
        """Make every open watch behave as if its stream broke."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(_BROKEN)

    # -- the key-value operations the stores use -------------------------------------------------

    def range(self, prefix: str) -> list[tuple[str, str]]:
        self._expire_due()
        return [(key, self._kv[key].value) for key in self.keys(prefix)]

    def snapshot(self, prefix: str) -> list[KeyEvent]:
        """The keys under ``prefix`` as put events, with the revisions that created them."""
        self._expire_due()
        return [
            KeyEvent(key, self._kv[key].value, self._kv[key].created) for key in self.keys(prefix)
        ]

    def get(self, key: str) -> str | None:
        self._expire_due()
        return self.get_raw(key)

    def put(self, key: str, value: str, lease: int = 0) -> None:
        self._expire_due()
        if lease and lease not in self._leases:
            raise _NoSuchLease(lease)
        self._commit({key: _Entry(value, lease)})

    def put_if_exists(self, condition: str, key: str, value: str) -> bool:
        """Write ``key`` only if ``condition`` (another key) exists, in one step."""
        self._expire_due()
        if condition not in self._kv:
            return False
        self._commit({key: _Entry(value, 0)})
        return True

    def delete(self, key: str, *, prefix: bool = False) -> int:
        self._expire_due()
        doomed = self.keys(key) if prefix else [key] if key in self._kv else []
        self._commit(dict.fromkeys(doomed))
        return len(doomed)

    def write_many(self, puts: dict[str, str], deletes: set[str], lease: int) -> None:
        self._expire_due()
        if lease not in self._leases:
            raise _NoSuchLease(lease)
        changes: dict[str, _Entry | None] = {key: _Entry(v, lease) for key, v in puts.items()}
        changes.update((key, None) for key in deletes if key in self._kv)
        self._commit(changes)

    def grant(self, ttl: int, on_lost: Callable[[], None] | None = None) -> int:
        self._expire_due()
        self._next_lease += 1
        self._leases[self._next_lease] = _Lease(ttl, self.clock() + ttl, on_lost)
        return self._next_lease

    def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; its TTL, or 0 if it is gone."""
        self._expire_due()
        lease = self._leases.get(lease_id)
        if lease is None:
            return 0
        lease.deadline = self.clock() + lease.ttl
        return lease.ttl

    def revoke(self, lease_id: int) -> None:
        self._expire_due()
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.on_lost = None  # the holder asked for it
        self._drop(lease_id)

    def open_watch(self, prefix: str) -> tuple[list[KeyEvent], _Watcher]:
        """A snapshot of ``prefix`` and a watcher that receives every later change to it."""
        pairs = self.snapshot(prefix)
        watcher = _Watcher(prefix)
        self._watchers.add(watcher)
        return pairs, watcher

    def close_watch(self, watcher: _Watcher) -> None:
        self._watchers.discard(watcher)

    @property
    def watch_count(self) -> int:
        """How many watches are open (tests check that closing one closes it here)."""
        return len(self._watchers)

    # -- inside ---------------------------------------------------------------------------------

    def _commit(self, changes: dict[str, _Entry | None]) -> None:
        """Apply the changes as one revision and tell the watchers (None deletes a key)."""
        changes = {k: v for k, v in changes.items() if v is not None or k in self._kv}
        if not changes:
            return
        self.revision += 1
        events = []
        for key, entry in changes.items():
            if entry is None:
                del self._kv[key]
            else:
                old = self._kv.get(key)
                entry.created = old.created if old is not None else self.revision
                self._kv[key] = entry
            if entry is None:
                events.append(KeyEvent(key, None))
            else:
                events.append(KeyEvent(key, entry.value, entry.created))
        for watcher in self._watchers:
            mine = [event for event in events if event.key.startswith(watcher.prefix)]
            if mine:
                watcher.queue.put_nowait(mine)

    def _drop(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        self._commit({key: None for key, entry in self._kv.items() if entry.lease == lease_id})
        if lease.on_lost is not None:
            lease.on_lost()

    def _expire_due(self) -> None:
        now = self.clock()
        for lease_id in [i for i, lease in self._leases.items() if lease.deadline <= now]:
            self._drop(lease_id)


class MemoryStore(LeasedStore):
    """A :class:`Store` on a :class:`MemoryBackend` (a new one unless given)."""

    def __init__(self, backend: MemoryBackend | None = None) -> None:
        self.backend = backend if backend is not None else MemoryBackend()
        self._error: BaseException | None = None
        self._reachable = False  # the last call found no outage (see Store.reachable)
        self._desired: dict[str, str] = {}
        self._stale: set[str] = set()
        self._dirty = False
        self._lease: int | None = None
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._watchers: set[_Watcher] = set()
        self._problems = Problems()

    # -- outages ---------------------------------------------------------------------------------

    def inject_error(self, exc: BaseException | None = None) -> None:
        """Make every later call (and every open watch) of this store raise ``exc``."""
        self._error = exc if exc is not None else StoreUnavailable("memory store: outage")
        for watcher in self._watchers:
            watcher.queue.put_nowait(_BROKEN)

    def clear_error(self) -> None:
        """End the outage started by :meth:`inject_error`."""
        self._error = None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error.with_traceback(None)

    async def _enter(self) -> None:
        # Every call yields once, as a network call would, so tasks interleave as with etcd.
        await asyncio.sleep(0)
        self._reachable = self._error is None
        self._check()

    # -- lifecycle -------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._enter()

    @property
    def endpoint(self) -> None:
        return None

    @property
    def reachable(self) -> bool:
        return self._reachable

    async def close(self) -> None:
        await asyncio.sleep(0)

    # -- definitions -----------------------------------------------------------------------------

    async def add_service(self, name: str, spec: Service) -> None:
        key = spec_key(name)
        await self._enter()
        self.backend.put(key, encode_record(spec))

    async def remove_service(self, name: str) -> bool:
        prefix = service_dir(name)
        await self._enter()
        return self.backend.delete(prefix, prefix=True) > 0

    async def remove_all_services(self) -> None:
        await self._enter()
        self.backend.delete(SERVICES, prefix=True)

    async def get_service(
        self, name: str, *, rules: bool = False, instances: bool = False, known_hosts: bool = False
    ) -> ServiceInfo:
        prefix = service_dir(name)
        await self._enter()
        follow = Follow.of(rules=rules, instances=instances, known_hosts=known_hosts)
        events = self.backend.snapshot(prefix)
        if follow.hosts:
            events += self.backend.snapshot(HOSTS)
        return ServiceTree.from_events(events, follow, self._problems).require(name)

    async def get_all_services(
        self, *, rules: bool = False, instances: bool = False, known_hosts: bool = False
    ) -> dict[str, ServiceInfo]:
        await self._enter()
        follow = Follow.of(rules=rules, instances=instances, known_hosts=known_hosts)
        events = self.backend.snapshot(PREFIX if follow.hosts else SERVICES)
        return ServiceTree.from_events(events, follow, self._problems).services()

    async def set_rule(self, service: str, name: str, rule: Rule) -> None:
        key = rule_key(service, name)
        await self._enter()
        if not self.backend.put_if_exists(spec_key(service), key, encode_record(rule)):
            raise NotFound(f"service {service!r} does not exist")

    async def remove_rule(self, service: str, name: str) -> bool:
        key = rule_key(service, name)
        await self._enter()
        return self.backend.delete(key) > 0

    # -- host-owned records ----------------------------------------------------------------------

    async def get_hosts(self) -> dict[str, Host]:
        await self._enter()
        return decode_hosts(self.backend.range(HOSTS), self._problems)

    async def get_prometheus_targets(self) -> dict[str, str]:
        await self._enter()
        return decode_targets(self.backend.range(PROMETHEUS_TARGETS), self._problems)

    async def _keep(self, key: str, value: str) -> None:
        await asyncio.sleep(0)
        self._desired[key] = value
        self._stale.discard(key)
        if self._lease is None:
            return  # written when a lease is granted
        if self._error is not None:
            self._dirty = True
            self._check()
        try:
            self.backend.put(key, value, lease=self._lease)
        except _NoSuchLease:
            self._wake.set()  # the keeper finds the loss, grants a new lease, rewrites

    async def _forget(self, key: str) -> None:
        await asyncio.sleep(0)
        self._desired.pop(key, None)
        if self._error is not None:
            self._stale.add(key)
            self._dirty = True
            self._check()
        self._stale.discard(key)
        self.backend.delete(key)

    # -- the lease -------------------------------------------------------------------------------

    def _write_all(self) -> None:
        assert self._lease is not None
        self.backend.write_many(dict(self._desired), set(self._stale), self._lease)
        self._stale.clear()
        self._dirty = False

    def _establish(self, ttl: int) -> None:
        if self._lease is not None:
            if self.backend.keepalive(self._lease) > 0:
                self._lease_refreshed()
            else:
                log.warning("lease %x has expired; granting a new one", self._lease)
                self._drop_lease()
        if self._lease is None:
            self._lease = self.backend.grant(ttl, on_lost=self._wake.set)
            self._lease_refreshed()
            self._dirty = True
            log.info("holding lease %x (TTL %d s)", self._lease, ttl)
        if self._dirty:
            self._write_all()
        self._ready.set()

    async def run_lease(self, ttl: int) -> None:
        if ttl < 1:
            raise ValueError(f"invalid lease TTL {ttl!r}: must be at least 1 second")
        while True:
            await self._enter()
            try:
                self._establish(ttl)
            except _NoSuchLease:
                self._drop_lease()
                continue
            while True:
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see EtcdStore
                    async with asyncio.timeout(ttl / 3):
                        await self._wake.wait()
                self._wake.clear()
                await self._enter()
                lease = self._lease
                if lease is None:
                    break  # revoked: hold a new one
                if self.backend.keepalive(lease) <= 0:
                    log.warning(
                        "lease %x has expired; granting a new one and rewriting %d records",
                        lease,
                        len(self._desired),
                    )
                    self._drop_lease()
                    break
                self._lease_refreshed()
                if self._dirty:
                    self._write_all()

    async def revoke_lease(self) -> None:
        await asyncio.sleep(0)
        lease = self._lease
        self._drop_lease()
        self._desired.clear()
        self._stale.clear()
        self._dirty = False
        self._wake.set()
        self._check()
        if lease is not None:
            self.backend.revoke(lease)

    # -- watches ---------------------------------------------------------------------------------

    def watch_services(
        self, *, rules: bool = False, instances: bool = False, known_hosts: bool = False
    ) -> AsyncGenerator[ServiceUpdate, None]:
        return self._watch_services(
            Follow.of(rules=rules, instances=instances, known_hosts=known_hosts)
        )

    async def _watch_services(self, follow: Follow) -> AsyncGenerator[ServiceUpdate, None]:
        watch = ServiceWatch(follow, self._problems)
        while True:
            await self._enter()
            pairs, watcher = self.backend.open_watch(PREFIX if follow.hosts else SERVICES)
            self._watchers.add(watcher)
            try:
                yield watch.reset(pairs)
                while True:
                    item = await watcher.queue.get()
                    if item is _BROKEN:
                        log.warning("service watch: the stream broke; taking a new snapshot")
                        break
                    assert isinstance(item, list)
                    update = watch.apply(item)
                    if update is not None:
                        yield update
            finally:
                self.backend.close_watch(watcher)
                self._watchers.discard(watcher)
