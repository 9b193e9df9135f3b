"""The publisher: diff-based writes of this host's instances, on the in-memory store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flux.agent.publish import Publisher
from flux.model import HostRef, Instance, InstanceState, Service
from flux.store.base import StoreUnavailable
from flux.store.memory import MemoryStore

HOST = "10.98.99.100"
OTHER = "10.98.99.101"


def inst(address: str | None = f"{HOST}:32768", host: str = HOST, **fields: Any) -> Instance:
    fields.setdefault("state", InstanceState.LIVE if address else InstanceState.NO_ADDRESS)
    fields.setdefault("labels", {"image": "foo", "tag": "latest"})
    return Instance(host=HostRef(address=host), address=address, containerRule="r", **fields)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    lease = asyncio.create_task(store.run_lease(30))
    await store.wait_lease()  # instances are host-owned: written on the lease
    for name in ("svc", "other-svc"):
        await store.add_service(name, Service(address="10.128.0.1:80", instancePort=80))
    try:
        yield store
    finally:
        lease.cancel()
        await asyncio.gather(lease, return_exceptions=True)


async def stored(store: MemoryStore) -> dict[tuple[str, str], Instance]:
    services = await store.get_all_services(instances=True)
    return {
        (name, iid): instance
        for name, info in services.items()
        for iid, instance in info.instances.items()
    }


async def test_add_then_remove(store: MemoryStore) -> None:
    # The original's TestSetInstances.
    publisher = Publisher(store, HOST)
    await publisher.sync({})
    await publisher.apply({("svc", "inst"): inst()})
    assert await stored(store) == {("svc", "inst"): inst()}
    await publisher.apply({("svc", "inst"): None})
    assert await stored(store) == {}
    assert (publisher.adds, publisher.removes) == (1, 1)


async def test_reset_removes_only_this_hosts_stale_instances(store: MemoryStore) -> None:
    # The original's TestSetInstancesCleanup.
    await store.add_instance("svc", "old-inst", inst())
    await store.add_instance("svc", "other-host-inst", inst(f"{OTHER}:1", host=OTHER))
    publisher = Publisher(store, HOST)
    await publisher.sync({("svc", "inst"): inst()})
    assert await stored(store) == {
        ("svc", "other-host-inst"): inst(f"{OTHER}:1", host=OTHER),
        ("svc", "inst"): inst(),
    }
    assert (publisher.adds, publisher.removes) == (1, 1)


async def test_nothing_written_when_nothing_changed(store: MemoryStore) -> None:
    wanted = {
        ("svc", "a"): inst(),
        ("svc", "b"): inst(None),
        ("other-svc", "a"): inst(state=InstanceState.DRAINING),
    }
    publisher = Publisher(store, HOST)
    await publisher.sync(wanted)
    assert publisher.writes == 3
    # The same publisher with nothing changed: reads, no writes.
    await publisher.sync(wanted)
    await publisher.apply(wanted)
    await publisher.apply({("svc", "never-written"): None})
    assert publisher.writes == 3
    # A new publisher (a restarted fluxd) rewrites each instance once, so that it sits on the
    # new process's lease and not on the crashed one's; after that, nothing.
    again = Publisher(store, HOST)
    await again.sync(wanted)
    assert again.writes == 3
    await again.sync(wanted)
    await again.apply(wanted)
    await again.apply({("svc", "never-written"): None})
    assert again.writes == 3
    assert again.syncs == 2


async def test_only_real_changes_are_written(store: MemoryStore) -> None:
    publisher = Publisher(store, HOST)
    await publisher.sync({("svc", "a"): inst()})
    await publisher.apply({("svc", "a"): inst(state=InstanceState.PAUSED)})
    await publisher.apply({("svc", "a"): inst(state=InstanceState.PAUSED)})
    assert publisher.writes == 2
    assert (await stored(store))[("svc", "a")].state is InstanceState.PAUSED


async def test_reset_repairs_records_changed_behind_our_back(store: MemoryStore) -> None:
    publisher = Publisher(store, HOST)
    await publisher.sync({("svc", "a"): inst(), ("svc", "b"): inst()})
    await store.add_instance("svc", "a", inst(f"{HOST}:1"))  # someone else's edit
    await store.remove_instance("svc", "b")
    before = publisher.writes
    await publisher.sync({("svc", "a"): inst(), ("svc", "b"): inst()})
    assert publisher.writes - before == 2
    assert await stored(store) == {("svc", "a"): inst(), ("svc", "b"): inst()}


async def test_already_absent_counts_as_removed(store: MemoryStore) -> None:
    publisher = Publisher(store, HOST)
    await publisher.sync({("svc", "a"): inst()})
    await store.remove_service("svc")  # takes the instance with it
    await publisher.apply({("svc", "a"): None})
    assert publisher.written == {}
    assert await stored(store) == {}


async def test_store_errors_propagate_and_a_sync_recovers(store: MemoryStore) -> None:
    publisher = Publisher(store, HOST)
    await publisher.sync({("svc", "a"): inst()})
    store.inject_error()
    with pytest.raises(StoreUnavailable):
        await publisher.apply({("svc", "b"): inst(), ("svc", "a"): None})
    with pytest.raises(StoreUnavailable):
        await publisher.sync({("svc", "b"): inst()})
    store.clear_error()
    await publisher.sync({("svc", "b"): inst()})
    assert await stored(store) == {("svc", "b"): inst()}
    assert publisher.written == {("svc", "b"): inst()}


async def test_host_address_is_compared_as_an_ip(store: MemoryStore) -> None:
    await store.add_instance("svc", "v6", inst("[fd00::1]:80", host="fd00:0::1"))
    publisher = Publisher(store, "fd00::1")
    await publisher.sync({})
    assert await stored(store) == {}
