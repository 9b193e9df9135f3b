"""Watch updates merged while the balancer is busy (flux.balancer.coalesce)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from flux.balancer.coalesce import Pending, coalesced
from flux.model import Service, ServiceInfo
from flux.store.base import ServiceUpdate


def info(name: str, address: str) -> ServiceInfo:
    return ServiceInfo(name=name, spec=Service(address=address))


A1, A2 = info("a", "127.42.0.1:80"), info("a", "127.42.0.2:80")
B1, C1 = info("b", "127.42.0.3:80"), info("c", "127.42.0.4:80")


def merged(*updates: ServiceUpdate) -> ServiceUpdate:
    pending = Pending()
    for update in updates:
        pending.add(update)
    return pending.take()


def test_later_deltas_win_per_service() -> None:
    update = merged(ServiceUpdate({"a": A1, "b": B1}), ServiceUpdate({"a": A2, "b": None}))
    assert update == ServiceUpdate({"a": A2, "b": None})


def test_a_reset_replaces_what_came_before_and_absorbs_what_follows() -> None:
    update = merged(
        ServiceUpdate({"c": C1}),
        ServiceUpdate({"a": A1, "b": B1}, reset=True),
        ServiceUpdate({"a": A2, "b": None}),
    )
    # c is gone from the reset (it no longer exists), b was removed after it.
    assert update == ServiceUpdate({"a": A2}, reset=True)


def test_take_empties_it() -> None:
    pending = Pending()
    assert not pending
    pending.add(ServiceUpdate({"a": A1}))
    assert pending
    pending.take()
    assert not pending
    with pytest.raises(AssertionError):
        pending.take()


class Source:
    """A watch whose updates the test hands in one by one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[ServiceUpdate | Exception] = asyncio.Queue()
        self.closed = False

    async def watch(self) -> AsyncGenerator[ServiceUpdate, None]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed = True


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_updates_that_arrive_while_busy_come_as_one() -> None:
    source = Source()
    updates = coalesced(source.watch())
    source.queue.put_nowait(ServiceUpdate({"a": A1, "b": B1}, reset=True))
    assert await asyncio.wait_for(updates.__anext__(), 5) == ServiceUpdate(
        {"a": A1, "b": B1}, reset=True
    )
    # The consumer is busy (not asking): three deltas arrive meanwhile.
    for update in (ServiceUpdate({"a": A2}), ServiceUpdate({"c": C1}), ServiceUpdate({"b": None})):
        source.queue.put_nowait(update)
    await settle()
    assert await asyncio.wait_for(updates.__anext__(), 5) == ServiceUpdate(
        {"a": A2, "c": C1, "b": None}
    )
    # An update arriving while the consumer waits is handed over on its own.
    waiting = asyncio.ensure_future(updates.__anext__())
    await settle()
    assert not waiting.done()
    source.queue.put_nowait(ServiceUpdate({"a": A1}))
    assert await asyncio.wait_for(waiting, 5) == ServiceUpdate({"a": A1})
    await updates.aclose()
    assert source.closed


async def test_a_failing_watch_hands_over_what_it_delivered_then_raises() -> None:
    source = Source()
    updates = coalesced(source.watch())
    source.queue.put_nowait(ServiceUpdate({"a": A1}, reset=True))
    source.queue.put_nowait(RuntimeError("the watch broke"))
    await settle()
    assert await asyncio.wait_for(updates.__anext__(), 5) == ServiceUpdate({"a": A1}, reset=True)
    with pytest.raises(RuntimeError, match="the watch broke"):
        await asyncio.wait_for(updates.__anext__(), 5)
    assert source.closed


async def test_cancelling_the_consumer_closes_the_watch() -> None:
    source = Source()

    async def consume() -> None:
        async for _ in coalesced(source.watch()):
            pass

    task = asyncio.create_task(consume())
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed
