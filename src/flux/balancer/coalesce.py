"""Watch updates that arrive while the balancer is busy, merged into one.

Theory of operation
-------------------
A burst of writes to etcd (a deploy touching many services, another host's agent coming back
with all its instances, a thousand ``fluxctl`` calls from a script) reaches the balancer as
many watch updates.  Applied one by one, each would run its own ``iptables-restore``, and
each of those pays a process start and, with the nf_tables backend, a read of the chain it
changes: a burst of a thousand writes would take a thousand batches.

:func:`coalesced` reads the watch in a task of its own and, whenever the balancer is ready for
more, hands it everything that arrived meanwhile as ONE update: a reset replaces whatever came
before it, a later delta wins over an earlier one for the same service, and a reset followed
by deltas stays a reset with the deltas folded in.  The result is the state at the latest
revision read, which is all the balancer acts on; a service's intermediate states may be
skipped, but nothing is reordered and nothing is lost.  An update that arrives while the
balancer is idle is handed over at once, so a single change costs no extra latency.

A watch that fails hands over what it delivered first, then raises its error; closing the
result (or cancelling its consumer) cancels the reading task and closes the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from flux.model import ServiceInfo
from flux.store.base import ServiceUpdate

__all__ = ["Pending", "coalesced"]


class Pending:
    """Updates received and not yet handed over, merged (see the module docstring)."""

    def __init__(self) -> None:
        self._services: dict[str, ServiceInfo | None] | None = None
        self._reset = False

    def __bool__(self) -> bool:
        return self._services is not None

    def add(self, update: ServiceUpdate) -> None:
        """Fold ``update`` into what is pending."""
        if self._services is None or update.reset:
            self._services = dict(update.services)
            self._reset = update.reset
        elif self._reset:
            # A reset lists the services that exist: a removal takes one out of the list.
            for name, info in update.services.items():
                if info is None:
                    self._services.pop(name, None)
                else:
                    self._services[name] = info
        else:
            self._services.update(update.services)

    def take(self) -> ServiceUpdate:
        """The merged update; nothing is pending afterwards."""
        assert self._services is not None, "nothing pending"
        update = ServiceUpdate(self._services, reset=self._reset)
        self._services, self._reset = None, False
        return update


async def coalesced(
    updates: AsyncGenerator[ServiceUpdate, None],
) -> AsyncGenerator[ServiceUpdate, None]:
    """Yield from ``updates``, merging those that arrived while the consumer was busy."""
    pending = Pending()
    arrived = asyncio.Event()
    failure: list[BaseException] = []
    finished = False

    async def read() -> None:
        nonlocal finished
        try:
            async for update in updates:
                pending.add(update)
                arrived.set()
        except Exception as exc:  # handed to the consumer, after what came before it
            failure.append(exc)
        finally:
            finished = True
            arrived.set()

    reader = asyncio.create_task(read(), name="watch-reader")
    try:
        while True:
            if not pending and not finished:
                arrived.clear()
                await arrived.wait()
            if pending:
                yield pending.take()
            elif failure:
                raise failure[0]
            elif finished:
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await updates.aclose()
