"""What only the in-memory store has: a manual clock, injected outages, a backdoor.

Everything both stores share is in test_store_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from flux.model import Host, HostRef, Instance, Service, ServiceInfo
from flux.store import ServiceUpdate, StoreError, StoreUnavailable
from flux.store.memory import ManualClock, MemoryBackend, MemoryStore

SPEC = Service(address="10.128.0.1:80")
INSTANCE = Instance(host=HostRef(address="10.0.0.1"), address="10.0.0.1:8080")
KEY = "/weave-flux/service/svc/instances/inst"


@pytest.fixture
async def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
async def tasks() -> AsyncIterator[list[asyncio.Task[None]]]:
    started: list[asyncio.Task[None]] = []
    try:
        yield started
    finally:
        for task in started:
            task.cancel()
        await asyncio.gather(*started, return_exceptions=True)


async def holding(store: MemoryStore, tasks: list[asyncio.Task[None]], ttl: int = 10) -> int:
    tasks.append(asyncio.create_task(store.run_lease(ttl)))
    await asyncio.wait_for(store.wait_lease(), 5)
    assert store.lease_id is not None
    return store.lease_id


def test_the_manual_clock_moves_only_forward() -> None:
    clock = ManualClock(5.0)
    clock.advance(2.5)
    assert clock() == 7.5
    with pytest.raises(ValueError, match="cannot move a clock back"):
        clock.advance(-1)


async def test_a_lease_nobody_keeps_alive_expires_on_the_clock(
    backend: MemoryBackend, tasks: list[asyncio.Task[None]]
) -> None:
    store, observer = MemoryStore(backend), MemoryStore(backend)
    await store.add_service("svc", SPEC)
    await store.add_instance("svc", "inst", INSTANCE)
    await holding(store, tasks, ttl=10)
    watch = observer.watch_services(instances=True)
    expected = ServiceInfo(name="svc", spec=SPEC, instances={"inst": INSTANCE})
    assert (await anext(watch)).services == {"svc": expected}
    tasks[0].cancel()  # the holder stops keeping its lease alive

    backend.advance(9.9)
    assert backend.get_raw(KEY) is not None
    backend.advance(0.1)

    assert backend.get_raw(KEY) is None
    update = await asyncio.wait_for(anext(watch), 1)
    assert update == ServiceUpdate(services={"svc": ServiceInfo(name="svc", spec=SPEC)})
    await watch.aclose()


async def test_a_lease_expired_under_a_running_keeper_is_replaced_at_once(
    backend: MemoryBackend, tasks: list[asyncio.Task[None]]
) -> None:
    store = MemoryStore(backend)
    await store.add_instance("svc", "inst", INSTANCE)
    await store.register_host(Host(address="10.0.0.1"))
    old = await holding(store, tasks, ttl=30)

    backend.advance(31)  # in fake time the keeper never got to run

    async with asyncio.timeout(1):  # far less than the 10 s keep-alive interval
        while store.lease_id in (None, old):
            await asyncio.sleep(0)
    assert backend.lease_of(KEY) == store.lease_id
    assert backend.lease_of("/weave-flux/host/10.0.0.1") == store.lease_id
    assert backend.leases() == [store.lease_id]


async def test_an_outage_fails_every_call_and_watch(
    backend: MemoryBackend, tasks: list[asyncio.Task[None]]
) -> None:
    store = MemoryStore(backend)
    await store.add_service("svc", SPEC)
    watch = store.watch_services()
    await anext(watch)

    store.inject_error()
    for call in (
        store.ping(),
        store.get_all_services(),
        store.add_service("other", SPEC),
        store.get_hosts(),
        store.run_lease(5),
    ):
        with pytest.raises(StoreUnavailable, match="memory store: outage"):
            await call
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(anext(watch), 1)

    store.clear_error()
    assert set(await store.get_all_services()) == {"svc"}
    assert backend.watch_count == 0, "the failed watch let go of its watcher"


async def test_an_injected_error_is_raised_as_given(backend: MemoryBackend) -> None:
    store = MemoryStore(backend)
    store.inject_error(StoreError("etcd at x refused the request: permission denied"))
    with pytest.raises(StoreError, match="permission denied"):
        await store.get_all_services()


async def test_an_outage_affects_only_that_store(backend: MemoryBackend) -> None:
    down, up = MemoryStore(backend), MemoryStore(backend)
    down.inject_error()
    await up.add_service("svc", SPEC)
    assert set(await up.get_all_services()) == {"svc"}


async def test_writes_during_an_outage_are_kept_and_caught_up(
    backend: MemoryBackend, tasks: list[asyncio.Task[None]]
) -> None:
    store = MemoryStore(backend)
    await store.add_instance("svc", "gone", INSTANCE)
    lease = await holding(store, tasks, ttl=1)

    store.inject_error()
    with pytest.raises(StoreUnavailable):
        await store.add_instance("svc", "inst", INSTANCE)
    with pytest.raises(StoreUnavailable):
        await store.remove_instance("svc", "gone")
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(tasks[0], 2)  # the keeper fails at its next keep-alive
    store.clear_error()
    assert backend.get_raw(KEY) is None
    assert backend.get_raw("/weave-flux/service/svc/instances/gone") is not None

    await holding(store, tasks, ttl=1)  # the supervisor's retry

    assert store.lease_id == lease
    assert backend.lease_of(KEY) == lease
    assert backend.get_raw("/weave-flux/service/svc/instances/gone") is None


async def test_a_broken_stream_gives_a_fresh_snapshot(backend: MemoryBackend) -> None:
    store = MemoryStore(backend)
    watch = store.watch_services()
    assert await anext(watch) == ServiceUpdate(services={}, reset=True)
    backend.break_watches()
    backend.put_raw("/weave-flux/service/svc/spec", '{"address":"10.128.0.1:80"}')

    update = await asyncio.wait_for(anext(watch), 1)
    assert update == ServiceUpdate(services={"svc": ServiceInfo(name="svc", spec=SPEC)}, reset=True)
    await watch.aclose()
    assert backend.watch_count == 0


async def test_the_backdoor(backend: MemoryBackend) -> None:
    backend.put_raw("/weave-flux/service/x/spec", "not json")
    assert backend.keys("/weave-flux/") == ["/weave-flux/service/x/spec"]
    assert backend.get_raw("/weave-flux/service/x/spec") == "not json"
    assert backend.lease_of("/weave-flux/service/x/spec") == 0
    backend.delete_raw("/weave-flux/service/x/spec")
    assert backend.keys() == []
    with pytest.raises(KeyError, match="no lease"):
        backend.put_raw("/k", "v", lease=12345)


def test_advance_needs_a_manual_clock() -> None:
    with pytest.raises(TypeError, match="ManualClock"):
        MemoryBackend(clock=lambda: 0.0).advance(1)
