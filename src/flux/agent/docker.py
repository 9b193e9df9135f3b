"""The Docker side of the agent: running containers as a snapshot, then as deltas.

Theory of operation
-------------------
:class:`DockerWatcher` turns the Docker engine into a stream of
:class:`~flux.agent.enrol.ContainerUpdate`: first a ``reset`` snapshot of every running
container, then one delta per change.  It does so in an order that loses nothing (reference
§3.2):

1. subscribe to the event stream and wait until Docker has accepted the subscription;
2. list the running containers; events keep arriving meanwhile and are queued;
3. merge: an event seen since subscribing beats the listing (a container listed but reported
   dead is dropped, one started after the listing was taken is added), see
   :func:`merge_listing`;
4. inspect the survivors and emit the snapshot; then follow the queued events.

Reading the stream never waits for Docker to answer anything else: the reader only parses and
queues, and one worker inspects started containers and applies lifecycle events in order.  A
container that is gone by the time it is inspected produces nothing.

When the stream ends or fails (dockerd restarted, socket gone), the watcher reconnects with a
capped exponential backoff and starts again at step 1: a fresh snapshot repairs whatever was
missed.  Every ``reconcile_interval`` seconds it also re-lists and re-inspects (steps 2-4 on the
open stream) and emits a new snapshot, which repairs drift from events Docker never sent;
:meth:`DockerWatcher.request_reconcile` asks for one at once.

Engine access goes through the small :class:`DockerClient` protocol; :class:`AiodockerClient`
implements it with aiodocker (``DOCKER_HOST`` or the local socket), tests can substitute a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from flux.agent.enrol import Container, ContainerEvent, ContainerUpdate, apply_event
from flux.supervise import Backoff

__all__ = [
    "AiodockerClient",
    "DockerClient",
    "DockerWatcher",
    "ListingMerge",
    "merge_listing",
    "parse_event",
]

log = logging.getLogger("flux.agent.docker")

# What we subscribe to.  Docker matches "health_status" against "health_status: <status>".
EVENT_FILTERS: Mapping[str, list[str]] = {
    "type": ["container", "network"],
    "event": [
        "start", "die", "pause", "unpause", "kill", "stop", "health_status",
        "connect", "disconnect",
    ],
}

# Failures that mean "the engine is unreachable or went away": reconnect, don't crash.
_UNAVAILABLE = (DockerError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


class DockerStreamEnded(Exception):
    """The event stream closed (dockerd stopped or restarted)."""


class DockerClient(Protocol):
    """What the watcher needs from a Docker engine."""

    async def version(self) -> str:
        """The engine's version (also checks that it answers)."""

    def events(
        self, filters: Mapping[str, list[str]]
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Mapping[str, Any]]]:
        """Subscribe; entering returns once the engine has accepted the subscription."""

    async def list_running(self) -> list[str]:
        """IDs of the running (and paused) containers."""

    async def inspect(self, container_id: str) -> Mapping[str, Any] | None:
        """``docker inspect``, or None when there is no such container."""

    async def close(self) -> None:
        """Release connections."""


class AiodockerClient:
    """:class:`DockerClient` on aiodocker.

    The engine address is ``url``, else ``DOCKER_HOST``, else the local socket, resolved here
    rather than by aiodocker so that a socket that does not exist yet (dockerd restarting) is
    an unreachable engine to retry, not a construction error.
    """

    def __init__(self, url: str | None = None, *, request_timeout: float = 30.0) -> None:
        self.url = url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self._docker = aiodocker.Docker(
            url=self.url,
            timeout=aiohttp.ClientTimeout(total=request_timeout, connect=5),
        )

    async def version(self) -> str:
        info = await self._docker.version()
        return str(info.get("Version", "unknown"))

    @contextlib.asynccontextmanager
    async def events(
        self, filters: Mapping[str, list[str]]
    ) -> AsyncIterator[AsyncIterator[Mapping[str, Any]]]:
        # aiodocker's public events API starts its request in a background task, so there is
        # no way to know when the subscription is in place, and subscribe-then-list needs
        # exactly that.  Its own implementation uses this request helper, which returns once
        # the response headers (the engine's acceptance) have arrived.
        async with self._docker._query(
            "events",
            method="GET",
            params={"filters": json.dumps(filters)},
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as response:
            try:
                yield _json_lines(response)
            finally:
                response.close()

    async def list_running(self) -> list[str]:
        return [container.id for container in await self._docker.containers.list()]

    async def inspect(self, container_id: str) -> Mapping[str, Any] | None:
        try:
            return await self._docker.containers.container(container_id).show()
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise

    async def close(self) -> None:
        await self._docker.close()


async def _json_lines(response: aiohttp.ClientResponse) -> AsyncIterator[Mapping[str, Any]]:
    # The engine writes one JSON object per line.  An abrupt close (dockerd killed) surfaces
    # as a payload error: for us it is the end of the stream, like a clean EOF.
    while True:
        try:
            line = await response.content.readline()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            return
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
        except ValueError:
            log.warning("ignoring a Docker event that is not JSON: %.80r", line)
            continue
        if isinstance(data, dict):
            yield data


def parse_event(raw: Mapping[str, Any]) -> ContainerEvent | None:
    """The :class:`ContainerEvent` in a raw Docker event, or None if it is not one we use."""
    kind = raw.get("Type") or "container"
    action = str(raw.get("Action") or raw.get("status") or "")
    actor = raw.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    if kind == "network":
        container_id = str(attributes.get("container") or "")
        if action in ("connect", "disconnect") and container_id:
            return ContainerEvent("network", container_id)
        return None
    if kind != "container":
        return None
    container_id = str(actor.get("ID") or raw.get("id") or "")
    if not container_id:
        return None
    if action.startswith("health_status"):
        _, _, health = action.partition(":")
        return ContainerEvent("health_status", container_id, health=health.strip())
    if action == "kill":
        return ContainerEvent("kill", container_id, signal=str(attributes.get("signal") or ""))
    if action in ("start", "die", "pause", "unpause", "stop"):
        return ContainerEvent(action, container_id)
    return None


@dataclass(frozen=True, slots=True)
class ListingMerge:
    """A container listing merged with the events seen around it.

    ``present``: the containers to inspect for the snapshot.  ``started``: those (re)started
    since subscribing, whose earlier flags no longer hold.  ``replay``: per container, the
    ``kill``/``stop`` events since its last start, which inspection cannot show.
    """

    present: frozenset[str]
    started: frozenset[str]
    replay: Mapping[str, tuple[ContainerEvent, ...]]


def merge_listing(listed: Iterable[str], events: Iterable[ContainerEvent]) -> ListingMerge:
    """Merge a listing of running containers with the events received since subscribing.

    Events are applied in order over the listing: ``start`` makes a container present, ``die``
    absent, so whatever an event says beats the listing (which may have been taken before or
    after the event).
    """
    present = dict.fromkeys(listed, True)
    started: set[str] = set()
    replay: dict[str, list[ContainerEvent]] = {}
    for event in events:
        cid = event.container_id
        if event.action == "start":
            present[cid] = True
            started.add(cid)
            replay.pop(cid, None)
        elif event.action == "die":
            present[cid] = False
            replay.pop(cid, None)
        elif event.action in ("kill", "stop"):
            replay.setdefault(cid, []).append(event)
    alive = frozenset(cid for cid, here in present.items() if here)
    return ListingMerge(
        present=alive,
        started=frozenset(started),
        replay={cid: tuple(evs) for cid, evs in replay.items() if cid in alive},
    )


_END = object()  # queued by the reader when the stream ends
_RECONCILE = object()  # queued by request_reconcile()


class DockerWatcher:
    """Running containers from a Docker engine, as a reset snapshot then deltas.

    :meth:`run` calls ``emit`` with each :class:`ContainerUpdate` and never returns on its
    own: it reconnects (with a new snapshot) after the engine goes away.
    """

    def __init__(
        self,
        connect: Callable[[], DockerClient] = AiodockerClient,
        *,
        reconcile_interval: float = 60.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        inspect_concurrency: int = 8,
    ) -> None:
        if reconcile_interval <= 0:
            raise ValueError(f"invalid reconcile interval {reconcile_interval!r}: must be > 0")
        self._connect = connect
        self.reconcile_interval = reconcile_interval
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._inspect_slots = asyncio.Semaphore(inspect_concurrency)
        self._known: dict[str, Container] = {}
        self._queue: asyncio.Queue[ContainerEvent | object] | None = None
        self.connected = False
        self.snapshots = 0
        self.connections = 0
        self.last_error: str | None = None
        # time.time() when the running containers were last listed and inspected.
        self.last_reconcile: float | None = None

    @property
    def containers(self) -> Mapping[str, Container]:
        """The running containers as last reported."""
        return self._known

    def request_reconcile(self) -> bool:
        """Re-list and re-inspect now, after the events already queued; False if offline."""
        if self._queue is None or not self.connected:
            return False
        self._queue.put_nowait(_RECONCILE)
        return True

    async def run(self, emit: Callable[[ContainerUpdate], None]) -> None:
        """Watch forever, calling ``emit`` for each update."""
        while True:
            client = self._connect()
            try:
                await self._session(client, emit)
            except (*_UNAVAILABLE, DockerStreamEnded) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self.connected = False
                with contextlib.suppress(*_UNAVAILABLE):
                    await client.close()
            delay = self._backoff.next()
            log.warning(
                "Docker engine unavailable (%s); reconnecting in %.1f s", self.last_error, delay
            )
            await asyncio.sleep(delay)

    async def _session(self, client: DockerClient, emit: Callable[[ContainerUpdate], None]) -> None:
        # Flags only events can tell (``stopping``) are not carried across connections: the
        # engine may have restarted the container meanwhile.
        self._known = {}
        version = await client.version()
        queue: asyncio.Queue[ContainerEvent | object] = asyncio.Queue()
        self._queue = queue
        async with client.events(EVENT_FILTERS) as stream:
            self.connections += 1
            log.info("watching Docker engine %s", version)
            reader = asyncio.create_task(self._read(stream, queue), name="flux:docker-events")
            try:
                await self._resync(client, queue, emit)
                self.connected = True
                self._backoff.reset()
                loop = asyncio.get_running_loop()
                due = loop.time() + self.reconcile_interval
                while True:
                    remaining = due - loop.time()
                    try:
                        if remaining <= 0:
                            raise TimeoutError  # a reconcile already due comes before any event
                        # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation
                        # that arrives with an event, and the watcher would outlive its stop.
                        async with asyncio.timeout(remaining):
                            item = await queue.get()
                    except TimeoutError:
                        await self._resync(client, queue, emit)
                        due = loop.time() + self.reconcile_interval
                        continue
                    if item is _END:
                        raise DockerStreamEnded("the Docker event stream closed")
                    if item is _RECONCILE:
                        await self._resync(client, queue, emit)
                        due = loop.time() + self.reconcile_interval
                        continue
                    assert isinstance(item, ContainerEvent)
                    await self._handle(client, item, emit)
            finally:
                self._queue = None
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    @staticmethod
    async def _read(
        stream: AsyncIterator[Mapping[str, Any]], queue: asyncio.Queue[ContainerEvent | object]
    ) -> None:
        try:
            async for raw in stream:
                event = parse_event(raw)
                if event is not None:
                    queue.put_nowait(event)
        finally:
            queue.put_nowait(_END)

    async def _inspect(self, client: DockerClient, container_id: str) -> Container | None:
        async with self._inspect_slots:
            data = await client.inspect(container_id)
        if data is None or not (data.get("State") or {}).get("Running"):
            return None  # gone (or exited) before we looked: nothing to announce
        return Container.from_inspect(data)

    async def _resync(
        self,
        client: DockerClient,
        queue: asyncio.Queue[ContainerEvent | object],
        emit: Callable[[ContainerUpdate], None],
    ) -> None:
        listed = await client.list_running()
        seen: list[ContainerEvent] = []
        while not queue.empty():
            item = queue.get_nowait()
            if item is _END:
                raise DockerStreamEnded("the Docker event stream closed while listing")
            if isinstance(item, ContainerEvent):
                seen.append(item)  # (a queued reconcile request is this very resync)
        merge = merge_listing(listed, seen)
        ids = sorted(merge.present)
        # Every inspection finishes (each is bounded by the request timeout) before a failure
        # is raised, so none is left running behind a reconnection.
        found = await asyncio.gather(
            *(self._inspect(client, cid) for cid in ids), return_exceptions=True
        )
        for outcome in found:
            if isinstance(outcome, BaseException):
                raise outcome
        snapshot: dict[str, Container] = {}
        for cid, container in zip(ids, found, strict=True):
            if not isinstance(container, Container):
                continue
            previous = self._known.get(cid)
            if previous is not None and previous.stopping and cid not in merge.started:
                container = replace(container, stopping=True)
            for event in merge.replay.get(cid, ()):
                container = apply_event(container, event) or container
            snapshot[cid] = container
        self._known = snapshot
        self.snapshots += 1
        self.last_reconcile = time.time()
        emit(ContainerUpdate(dict(snapshot), reset=True))

    async def _handle(
        self,
        client: DockerClient,
        event: ContainerEvent,
        emit: Callable[[ContainerUpdate], None],
    ) -> None:
        cid = event.container_id
        previous = self._known.get(cid)
        if event.action in ("start", "network"):
            if event.action == "network" and previous is None:
                return
            fresh = await self._inspect(client, cid)
            if fresh is None:
                return  # gone already; its die event (queued) removes it if it was known
            if event.action == "network" and previous is not None:
                fresh = replace(fresh, stopping=previous.stopping)
            updated: Container | None = fresh
        else:
            if previous is None:
                return
            updated = apply_event(previous, event)
        if updated == previous:
            return
        if updated is None:
            del self._known[cid]
        else:
            self._known[cid] = updated
        emit(ContainerUpdate({cid: updated}))
