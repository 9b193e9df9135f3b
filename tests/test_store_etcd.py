"""The etcd store against a real etcd: etcd3-py's fixes, connections, and faults.

Faults come from the real thing: the session's etcd is stopped and started again (always left
running), a loopback forwarder between a store and etcd is cut or made to swallow traffic (a
partition, while etcd itself stays up for everyone else), history is compacted with etcdctl.
TLS and authentication each get a private etcd of their own, started for the test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.client
import etcd3.aio_client
import pytest

from flux.model import Host, HostRef, Instance, Service, ServiceInfo
from flux.store import ServiceUpdate, StoreError, StoreUnavailable
from flux.store._etcd3_compat import AioClient, _JsonFramer
from flux.store.etcd import EtcdStore, _reason
from tests.support.etcd_server import EtcdServer, free_port
from tests.support.processes import stop_process

SPEC = Service(address="10.128.0.1:80", protocol="http")
INSTANCE = Instance(host=HostRef(address="10.0.0.1"), address="10.0.0.1:8080")
INSTANCE_KEY = "/weave-flux/service/svc/instances/inst"


# -- helpers -----------------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


class Follower:
    """Consumes a watch in the background and keeps the view its updates describe."""

    def __init__(self, watch: AsyncGenerator[ServiceUpdate, None]) -> None:
        self.watch = watch
        self.updates: list[ServiceUpdate] = []
        self.view: dict[str, ServiceInfo] = {}
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for update in self.watch:
            self.updates.append(update)
            if update.reset:
                self.view = {k: v for k, v in update.services.items() if v is not None}
                continue
            for name, service in update.services.items():
                if service is None:
                    self.view.pop(name, None)
                else:
                    self.view[name] = service

    @property
    def resets(self) -> int:
        return sum(update.reset for update in self.updates)

    async def until(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        async def done() -> bool:
            if self.task.done():
                self.task.result()  # a watch that raised fails the test with its error
                raise AssertionError("the watch ended")
            return check()

        await eventually(done, timeout)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.watch.aclose()


@pytest.fixture
async def stores(etcd: EtcdServer) -> AsyncIterator[Callable[..., EtcdStore]]:
    """Makes stores (default: straight to the test etcd) and closes them afterwards."""
    made: list[EtcdStore] = []

    def make(*endpoints: str, **options: Any) -> EtcdStore:
        store = EtcdStore(list(endpoints) or [etcd.endpoint], **{"timeout": 2.0, **options})
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.close()


@pytest.fixture
async def tasks() -> AsyncIterator[list[asyncio.Task[None]]]:
    """Background tasks of a test, cancelled at its end."""
    started: list[asyncio.Task[None]] = []
    try:
        yield started
    finally:
        for task in started:
            task.cancel()
        await asyncio.gather(*started, return_exceptions=True)


@pytest.fixture
async def followers() -> AsyncIterator[list[Follower]]:
    made: list[Follower] = []
    try:
        yield made
    finally:
        for follower in made:
            await follower.close()


@contextlib.contextmanager
def etcd_stopped(server: EtcdServer) -> Iterator[None]:
    """An etcd outage; etcd runs again afterwards whatever happens."""
    server.stop()
    try:
        yield
    finally:
        server.start()


class Partition:
    """A loopback forwarder between a store and etcd that a test can cut or make silent.

    ``cut()`` resets every connection and refuses new ones (a host that is down);
    ``silence()`` keeps connections open but drops every byte (a peer that vanished
    without closing anything); ``heal()`` forwards again.
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._mode = "open"
        self._transports: set[asyncio.BaseTransport] = set()
        self._server: asyncio.Server | None = None
        self.endpoint = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "cut":
            writer.transport.abort()
            return
        self._transports.add(writer.transport)
        if self._mode == "silent":
            with contextlib.suppress(OSError):
                while await reader.read(65536):
                    pass
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.transport.abort()
            return
        self._transports.add(up_writer.transport)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self._mode == "open":
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            self._transports.discard(writer.transport)

    def cut(self) -> None:
        self._mode = "cut"
        for transport in list(self._transports):
            transport.abort()  # type: ignore[attr-defined]

    def silence(self) -> None:
        self._mode = "silent"

    def heal(self) -> None:
        self._mode = "open"

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def partition(etcd: EtcdServer) -> AsyncIterator[Partition]:
    proxy = Partition(etcd.client_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def watcher_count(server_endpoint: str) -> int:
    """Watchers etcd itself holds open (from its metrics)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server_endpoint}/metrics") as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("etcd_debugging_mvcc_watcher_total "):
            return int(float(line.split()[1]))
    raise AssertionError("etcd reports no watcher gauge")


def current_revision(server: EtcdServer) -> int:
    status = json.loads(server.etcdctl("endpoint", "status", "-w", "json"))
    return int(status[0]["Status"]["header"]["revision"])


# -- etcd3-py compatibility (src/flux/store/_etcd3_compat.py) ------------------------------------


@pytest.fixture
async def raw_client(etcd: EtcdServer) -> AsyncIterator[AioClient]:
    client = AioClient(
        host="127.0.0.1",
        port=etcd.client_port,
        protocol="http",
        ssl_context=None,
        timeout=aiohttp.ClientTimeout(total=5),
    )
    try:
        assert (await client.detect_version()).startswith("3.")
        yield client
    finally:
        await client.close()


async def test_the_shim_makes_watch_and_keepalive_streams_work(raw_client: AioClient) -> None:
    watch = raw_client.watch_create("/weave-flux/", prefix=True)
    try:
        async with asyncio.timeout(5):
            created = await anext(watch)
            assert created.created
            await raw_client.put("/weave-flux/probe", "1")
            event = (await anext(watch)).events[0]
        assert event.kv.key == b"/weave-flux/probe"
    finally:
        watch.close()

    lease = await raw_client.lease_grant(30)
    keepalive = raw_client.lease_keep_alive(b'{"ID":%d}' % lease.ID)
    try:
        async with asyncio.timeout(5):
            assert (await anext(keepalive)).TTL == 30
    finally:
        keepalive.close()


async def test_the_shim_is_still_needed(
    raw_client: AioClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # If this fails, aiohttp or etcd3-py fixed the problem: the shim can go.
    monkeypatch.setattr(
        etcd3.aio_client, "_RequestContextManager", aiohttp.client._RequestContextManager
    )
    watch = raw_client.watch_create("/weave-flux/", prefix=True)
    try:
        with pytest.raises(TypeError):
            await anext(watch)
    finally:
        watch.close()


async def test_a_burst_of_watch_responses_arrives_whole(raw_client: AioClient) -> None:
    watch = raw_client.watch_create("/weave-flux/", prefix=True)
    count = 300
    try:
        async with asyncio.timeout(20):
            assert (await anext(watch)).created
            # Concurrent puts make etcd send responses faster than one read takes them.
            await asyncio.gather(*(raw_client.put(f"/weave-flux/k{i}", "v") for i in range(count)))
            seen: set[bytes] = set()
            while len(seen) < count:
                seen.update(event.kv.key for event in (await anext(watch)).events)
    finally:
        watch.close()
    assert seen == {f"/weave-flux/k{i}".encode() for i in range(count)}


class _Chunks:
    """Stands in for an aiohttp response whose body arrives in the given pieces."""

    def __init__(self, data: bytes, size: int) -> None:
        self._pieces = [data[i : i + size] for i in range(0, len(data), size)]
        self.content = self

    async def readany(self) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""


MESSAGES = [
    {"result": {"events": [{"kv": {"key": "e30=", "value": 'a "quoted" } { value'}}]}},
    {"result": {"header": {"revision": "7"}, "note": "back\\slash\\\" and \\\\"}},
    {"result": {}},
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 100_000])
@pytest.mark.parametrize("separator", [b"\n", b""])
async def test_the_framer_cuts_a_stream_into_messages(size: int, separator: bytes) -> None:
    data = separator.join(json.dumps(m).encode() for m in MESSAGES) + separator
    framer = _JsonFramer(_Chunks(data, size))  # type: ignore[arg-type]
    got = [json.loads(await framer.next()) for _ in MESSAGES]
    assert got == MESSAGES
    with pytest.raises(StopAsyncIteration):
        await framer.next()


async def test_the_framer_reports_a_message_cut_short() -> None:
    framer = _JsonFramer(_Chunks(b'{"result": {"x": 1}', 4))  # type: ignore[arg-type]
    with pytest.raises(etcd3.errors.Etcd3StreamError):
        await framer.next()


async def test_decoding_a_large_range_does_not_stall_the_loop() -> None:
    client = AioClient(
        host="127.0.0.1",
        port=free_port(),
        protocol="http",
        ssl_context=None,
        timeout=aiohttp.ClientTimeout(total=1),
    )
    kvs = [
        {
            "key": base64.b64encode(f"/weave-flux/service/s/instances/{i:064x}".encode()).decode(),
            "value": base64.b64encode(b'{"address":"10.0.0.1:80"}').decode(),
            "mod_revision": str(i + 2),
            "lease": "7",
        }
        for i in range(2000)
    ]
    data = {"header": {"revision": "2001"}, "kvs": kvs, "count": "2000"}
    try:
        started = time.perf_counter()
        response = client._modelizeResponseData("/kv/range", data)
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    assert response.header.revision == 2001
    assert response.kvs[1999].key == f"/weave-flux/service/s/instances/{1999:064x}".encode()
    assert response.kvs[0].value == b'{"address":"10.0.0.1:80"}'
    assert (response.kvs[5].mod_revision, response.kvs[5].lease) == (7, 7)
    # Measured here: about 1 s without the cache (fix 3), under 0.1 s with it.
    assert elapsed < 0.4, f"decoding 2,000 keys took {elapsed:.2f} s"


async def test_the_framer_raises_errors_sent_in_a_stream() -> None:
    error = {
        "grpc_code": 14,
        "http_code": 503,
        "message": "transport is closing",
        "http_status": "Service Unavailable",
    }
    framer = _JsonFramer(_Chunks(json.dumps({"error": error}).encode() + b"\n", 5))  # type: ignore[arg-type]
    with pytest.raises(etcd3.errors.Etcd3Exception) as caught:
        await framer.next()
    assert (caught.value.code, caught.value.error) == (14, "transport is closing")


# -- connections ---------------------------------------------------------------------------------


async def test_an_unreachable_etcd_is_one_clear_error() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = EtcdStore([dead], timeout=1.0)  # makes no connection yet
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.ping()
        message = str(caught.value)
        assert message.startswith(f"etcd is unreachable: {dead}: ")
        assert "\n" not in message
        assert store.reachable is False and store.endpoint == dead
        with pytest.raises(StoreUnavailable):
            await store.run_lease(5)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("endpoints", "problem"),
    [
        (["ftp://127.0.0.1:2379"], "invalid etcd endpoint 'ftp://127.0.0.1:2379'"),
        (["http://127.0.0.1:notaport"], "invalid etcd endpoint"),
        ([], "no etcd endpoint given"),
        ("", "no etcd endpoint given"),
    ],
)
def test_bad_endpoints_are_refused(endpoints: list[str] | str, problem: str) -> None:
    with pytest.raises(StoreError, match=problem):
        EtcdStore(endpoints)


async def test_requests_fail_over_to_the_next_endpoint(
    etcd: EtcdServer, stores: Callable[..., EtcdStore], partition: Partition
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = stores(dead, partition.endpoint, etcd.endpoint)
    await store.add_service("svc", SPEC)
    assert store.endpoint == partition.endpoint

    partition.cut()
    assert await store.get_all_services() == {"svc": ServiceInfo(name="svc", spec=SPEC)}
    assert store.endpoint == etcd.endpoint


async def test_a_first_endpoint_that_never_answers_is_passed_over(etcd: EtcdServer) -> None:
    # A hung member (stopped, or its machine gone quiet): the kernel completes the handshake
    # into the backlog and nothing ever answers.  The first request (the version probe)
    # once waited for aiohttp's default 5 minutes instead of the store's timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = EtcdStore([hung, etcd.endpoint], timeout=1.0)
        try:
            await asyncio.wait_for(store.ping(), 10)
            assert store.endpoint == etcd.endpoint
        finally:
            await store.close()


def open_http_clients() -> set[int]:
    """The aiohttp sessions and connectors alive and not closed in this process."""
    gc.collect()
    kinds = (aiohttp.ClientSession, aiohttp.BaseConnector)
    return {id(o) for o in gc.get_objects() if isinstance(o, kinds) and not o.closed}


async def test_a_connect_attempt_cancelled_midway_closes_its_client() -> None:
    # Cancelled while the version probe waits on a hung member (a supervisor stopping the
    # component, a caller's timeout): the client made for the attempt, an aiohttp session and
    # its connector, was left open, and only garbage collection at loop close reported it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = EtcdStore([f"http://127.0.0.1:{silent.getsockname()[1]}"], timeout=30.0)
        before = open_http_clients()
        attempt = asyncio.create_task(store.ping())
        await asyncio.sleep(0.3)  # connected into the backlog, waiting for an answer
        assert len(open_http_clients() - before) == 2, "the attempt's session and connector"
        attempt.cancel()
        await asyncio.gather(attempt, return_exceptions=True)
        assert attempt.cancelled()
        assert open_http_clients() - before == set()
        await store.close()


# -- the lease ---------------------------------------------------------------------------------


async def test_an_expired_lease_takes_its_records_and_watchers_see_it(
    stores: Callable[..., EtcdStore],
    tasks: list[asyncio.Task[None]],
    followers: list[Follower],
) -> None:
    holder, other = stores(), stores()
    await holder.add_service("svc", SPEC)
    await holder.add_instance("svc", "inst", INSTANCE)
    keeper = asyncio.create_task(holder.run_lease(2))
    tasks.append(keeper)
    await asyncio.wait_for(holder.wait_lease(), 5)
    follower = Follower(other.watch_services(instances=True))
    followers.append(follower)
    await follower.until(lambda: "inst" in follower.view.get("svc", SPEC_INFO).instances)

    keeper.cancel()  # the holder stops keeping its lease alive (say it was killed)

    await follower.until(lambda: follower.view["svc"].instances == {}, timeout=6)
    assert await other.get_service("svc", instances=True) == SPEC_INFO
    assert follower.resets == 1, "seen as a change, not a new snapshot"


SPEC_INFO = ServiceInfo(name="svc", spec=SPEC)


async def test_run_lease_raises_while_etcd_is_down_then_keeps_the_same_lease(
    etcd: EtcdServer, stores: Callable[..., EtcdStore]
) -> None:
    store = stores()
    await store.add_service("svc", SPEC)
    await store.add_instance("svc", "inst", INSTANCE)
    keeper = asyncio.create_task(store.run_lease(6))
    await asyncio.wait_for(store.wait_lease(), 5)
    lease = store.lease_id
    assert store.reachable is True
    age = store.lease_age()
    assert age is not None and 0 <= age < 6

    with etcd_stopped(etcd):
        with pytest.raises(StoreUnavailable, match="etcd is unreachable"):
            await asyncio.wait_for(keeper, 10)
        assert store.reachable is False
        # The lease is still held as far as this store knows, and ages.
        outage_age = store.lease_age()
        assert outage_age is not None and outage_age > age
        # A write during the outage fails, but is kept and written once etcd is back.
        with pytest.raises(StoreUnavailable):
            await store.register_host(Host(address="10.0.0.1"))

    keeper = asyncio.create_task(store.run_lease(6))  # the supervisor's retry
    try:
        async def host_written() -> bool:
            return etcd.get("/weave-flux/host/10.0.0.1") is not None

        await eventually(host_written)
        assert store.lease_id == lease, "a short outage keeps the lease"
        assert store.reachable is True
        fresh = store.lease_age()
        assert fresh is not None and fresh < outage_age
        lease_of = json.loads(etcd.etcdctl("get", INSTANCE_KEY, "-w", "json"))["kvs"][0]["lease"]
        assert lease_of == lease
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)


async def test_a_keepalive_without_answer_states_its_own_time_limit(
    stores: Callable[..., EtcdStore], partition: Partition
) -> None:
    # A keep-alive waits min(timeout, TTL/3), here 1 s, not the store's 5 s the line said.
    store = stores(partition.endpoint, timeout=5.0)
    keeper = asyncio.create_task(store.run_lease(3))
    try:
        await asyncio.wait_for(store.wait_lease(), 5)
        partition.silence()
        with pytest.raises(StoreUnavailable) as caught:
            await asyncio.wait_for(keeper, 10)
        assert str(caught.value) == (
            f"etcd is unreachable: {partition.endpoint}: no answer within 1 s"
        )
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)

    assert _reason(TimeoutError(), 10 / 3) == "no answer within 3.33 s"  # TTL 10


async def test_a_partition_longer_than_the_ttl_brings_the_records_back_on_a_new_lease(
    stores: Callable[..., EtcdStore],
    partition: Partition,
    tasks: list[asyncio.Task[None]],
    followers: list[Follower],
) -> None:
    holder = stores(partition.endpoint, timeout=0.5)
    observer = stores()
    await observer.add_service("svc", SPEC)
    await holder.add_instance("svc", "inst", INSTANCE)

    async def supervise() -> None:
        # What fluxd's supervisor does with a failing component, with a short backoff.
        while True:
            with contextlib.suppress(StoreUnavailable):
                await holder.run_lease(2)
            await asyncio.sleep(0.2)

    tasks.append(asyncio.create_task(supervise()))
    await asyncio.wait_for(holder.wait_lease(), 5)
    old = holder.lease_id
    follower = Follower(observer.watch_services(instances=True))
    followers.append(follower)
    await follower.until(lambda: "inst" in follower.view.get("svc", SPEC_INFO).instances)

    partition.cut()  # etcd stays up for everyone else; the lease expires there
    await follower.until(lambda: follower.view["svc"].instances == {}, timeout=6)
    partition.heal()

    await follower.until(lambda: "inst" in follower.view["svc"].instances, timeout=6)
    assert holder.lease_id not in (None, old)


# -- watches -----------------------------------------------------------------------------------


async def test_a_watch_takes_a_new_snapshot_after_an_etcd_restart(
    etcd: EtcdServer,
    stores: Callable[..., EtcdStore],
    followers: list[Follower],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flux.store")
    store = stores()
    await store.add_service("before", SPEC)
    follower = Follower(store.watch_services())
    followers.append(follower)
    await follower.until(lambda: "before" in follower.view)
    await asyncio.sleep(0.2)  # the stream is open once the follower waits for a change

    with etcd_stopped(etcd):
        await asyncio.sleep(0.5)
    await store.add_service("after", SPEC)

    await follower.until(lambda: "after" in follower.view)
    assert follower.resets == 2
    assert set(follower.view) == {"before", "after"}
    assert "taking a new snapshot" in caplog.text


async def test_a_watch_cut_off_sees_what_changed_meanwhile(
    stores: Callable[..., EtcdStore], partition: Partition, followers: list[Follower]
) -> None:
    watched, direct = stores(partition.endpoint, timeout=0.5), stores()
    await direct.add_service("gone", SPEC)
    follower = Follower(watched.watch_services())
    followers.append(follower)
    await follower.until(lambda: "gone" in follower.view)
    await asyncio.sleep(0.2)

    partition.cut()
    await direct.remove_service("gone")
    await direct.add_service("new", SPEC)
    await asyncio.sleep(0.5)
    assert "gone" in follower.view, "nothing can arrive while cut off"
    partition.heal()

    await follower.until(lambda: set(follower.view) == {"new"})
    assert follower.updates[-1].reset, "learnt from a fresh snapshot"


async def test_a_silent_stream_is_noticed(
    stores: Callable[..., EtcdStore], partition: Partition, followers: list[Follower]
) -> None:
    watched = stores(partition.endpoint, timeout=0.5, watch_idle=0.5)
    direct = stores()
    follower = Follower(watched.watch_services())
    followers.append(follower)
    await follower.until(lambda: follower.resets == 1)
    await asyncio.sleep(0.2)

    partition.silence()  # the stream stays open but nothing gets through
    await direct.add_service("lost", SPEC)
    await asyncio.sleep(1.5)
    partition.heal()  # the old stream would now deliver later events, but never that one

    await follower.until(lambda: "lost" in follower.view)
    assert follower.resets == 2


async def test_a_broken_stream_is_blamed_on_its_own_endpoint(
    etcd: EtcdServer,
    stores: Callable[..., EtcdStore],
    partition: Partition,
    followers: list[Follower],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The watch stream stays on the first endpoint while other requests fail over to the
    # second; when the first then dies, the line naming the failure once named the second.
    caplog.set_level(logging.WARNING, logger="flux.store")
    store = stores(partition.endpoint, etcd.endpoint, timeout=0.5)
    follower = Follower(store.watch_services())
    followers.append(follower)
    await follower.until(lambda: follower.resets == 1)
    await asyncio.sleep(0.2)  # the stream is open once the follower waits for a change

    partition.silence()
    await store.ping()  # no answer from the first within the timeout: on to the second
    assert store.endpoint == etcd.endpoint
    partition.cut()  # the stream, still on the first, breaks

    await follower.until(lambda: follower.resets == 2)
    assert f"the watch stream broke: {partition.endpoint}: " in caplog.text
    assert f"broke: {etcd.endpoint}" not in caplog.text


async def test_a_watch_gives_up_when_etcd_stays_away(
    stores: Callable[..., EtcdStore], partition: Partition
) -> None:
    store = stores(partition.endpoint, timeout=0.5, watch_retry=1.0)
    watch = store.watch_services()
    try:
        await asyncio.wait_for(anext(watch), 5)
        waiting = asyncio.create_task(anext(watch))
        await asyncio.sleep(0.2)
        partition.cut()
        with pytest.raises(StoreUnavailable, match=f"etcd is unreachable: {partition.endpoint}"):
            await asyncio.wait_for(waiting, 5)
    finally:
        await watch.aclose()

    fresh = store.watch_services()
    with pytest.raises(StoreUnavailable):  # no snapshot at all: at once, no retrying
        await asyncio.wait_for(anext(fresh), 0.9)
    await fresh.aclose()


async def test_a_compacted_revision_forces_a_new_snapshot(
    etcd: EtcdServer, stores: Callable[..., EtcdStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flux.store")
    store, writer = stores(), stores()
    watch = store.watch_services()
    try:
        first = await asyncio.wait_for(anext(watch), 5)
        assert first == ServiceUpdate(services={}, reset=True)
        # A slow consumer: history moves on and is compacted before it asks for more.
        await writer.add_service("svc", SPEC)
        await writer.remove_service("svc")
        await writer.add_service("svc", SPEC)
        await asyncio.to_thread(etcd.etcdctl, "compact", str(current_revision(etcd)))

        update = await asyncio.wait_for(anext(watch), 5)
        assert update == ServiceUpdate(services={"svc": SPEC_INFO}, reset=True)
        assert "was compacted; taking a new snapshot" in caplog.text

        await writer.remove_service("svc")
        assert await asyncio.wait_for(anext(watch), 5) == ServiceUpdate(services={"svc": None})
    finally:
        await watch.aclose()


async def test_closing_or_cancelling_a_watch_closes_its_stream(
    etcd: EtcdServer, stores: Callable[..., EtcdStore]
) -> None:
    store = stores()
    await store.ping()
    before = await watcher_count(etcd.endpoint)
    tasks_before = asyncio.all_tasks()

    async def streams(n: int) -> bool:
        return await watcher_count(etcd.endpoint) == n

    # Closed while it waits at a yield, with its next read running: aclose().
    watch = store.watch_services()
    await asyncio.wait_for(anext(watch), 5)
    change = asyncio.create_task(anext(watch))
    await eventually(lambda: streams(before + 1))
    await store.add_service("svc", SPEC)
    assert (await asyncio.wait_for(change, 5)).services == {"svc": SPEC_INFO}
    await watch.aclose()
    await eventually(lambda: streams(before))
    assert asyncio.all_tasks() == tasks_before, "the pending read is gone too"

    # Cancelled while it waits for etcd: what a supervisor does to the balancer.
    async def consume() -> None:
        async for _ in store.watch_services():
            pass

    consumer = asyncio.create_task(consume())
    await eventually(lambda: streams(before + 1))
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    await eventually(lambda: streams(before))
    assert asyncio.all_tasks() == tasks_before


async def test_a_cancel_that_meets_the_opening_of_a_stream_is_not_lost(
    stores: Callable[..., EtcdStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a supervisor does to the balancer, at the instant etcd confirms a new stream.  A
    # wait_for around that read (3.11) returned the answer instead, and the watch went on.
    store = stores()
    consumer: list[asyncio.Task[None]] = []
    real_watch_create = AioClient.watch_create

    class CancelsAsItOpens:
        def __init__(self, stream: Any) -> None:
            self.stream = stream
            self.opened = False

        async def __anext__(self) -> Any:
            response = await self.stream.__anext__()
            if not self.opened:
                self.opened = True
                consumer[0].cancel()
            return response

        def close(self) -> None:
            self.stream.close()

    def watch_create(self: AioClient, *args: Any, **kwargs: Any) -> CancelsAsItOpens:
        return CancelsAsItOpens(real_watch_create(self, *args, **kwargs))

    async def consume() -> None:
        async for _ in store.watch_services():
            pass

    monkeypatch.setattr(AioClient, "watch_create", watch_create)
    consumer.append(asyncio.create_task(consume()))
    try:
        await asyncio.wait(consumer, timeout=10)
        assert consumer[0].cancelled()
    finally:
        consumer[0].cancel()
        await asyncio.gather(*consumer, return_exceptions=True)


# -- TLS and authentication (private etcd members) ----------------------------------------------


class PrivateEtcd:
    """An etcd member of its own, for options the session's etcd does not have."""

    def __init__(self, data_dir: Path, scheme: str, args: list[str], ctl: list[str]) -> None:
        self.port, peer = free_port(), free_port()
        self.endpoint = f"{scheme}://127.0.0.1:{self.port}"
        self._ctl = ctl
        log = open(data_dir.parent / f"etcd-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                "etcd",
                "--name", "private",
                "--data-dir", str(data_dir),
                "--listen-client-urls", self.endpoint,
                "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"private=http://127.0.0.1:{peer}",
                "--log-level", "warn",
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["etcdctl", f"--endpoints={self.endpoint}", "--dial-timeout=2s", *self._ctl, *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            text=True,
            timeout=30,
            check=check,
        )

    async def wait_healthy(self) -> None:
        async def healthy() -> bool:
            assert self.process.poll() is None, "etcd exited"
            result = await asyncio.to_thread(self.etcdctl, "endpoint", "health", check=False)
            return result.returncode == 0

        await eventually(healthy, timeout=20)

    def stop(self) -> None:
        stop_process(self.process)


def make_certificates(directory: Path) -> dict[str, str]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True,
                       timeout=60)  # fmt: skip

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt",
            "-subj", "/CN=flux test CA", "-days", "1")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
                "-extfile", "san.ext")  # fmt: skip
    return {n: str(directory / n) for n in ("ca.crt", "server.crt", "server.key",
                                            "client.crt", "client.key")}  # fmt: skip


@pytest.fixture
async def tls_etcd(tmp_path: Path) -> AsyncIterator[tuple[PrivateEtcd, dict[str, str]]]:
    certs = make_certificates(tmp_path)
    server = PrivateEtcd(
        tmp_path / "data",
        "https",
        ["--cert-file", certs["server.crt"], "--key-file", certs["server.key"],
         "--trusted-ca-file", certs["ca.crt"], "--client-cert-auth"],
        ["--cacert", certs["ca.crt"], "--cert", certs["client.crt"], "--key", certs["client.key"]],
    )  # fmt: skip
    try:
        await server.wait_healthy()
        yield server, certs
    finally:
        server.stop()


async def test_tls_with_a_client_certificate(tls_etcd: tuple[PrivateEtcd, dict[str, str]]) -> None:
    server, certs = tls_etcd
    store = EtcdStore(
        [server.endpoint],
        ca_file=certs["ca.crt"],
        cert_file=certs["client.crt"],
        key_file=certs["client.key"],
        timeout=2.0,
    )
    stranger = EtcdStore([server.endpoint], timeout=2.0)  # trusts no such CA
    try:
        await store.add_service("svc", SPEC)
        watch = store.watch_services()
        assert (await asyncio.wait_for(anext(watch), 5)).services == {"svc": SPEC_INFO}
        await watch.aclose()
        with pytest.raises(StoreUnavailable, match="certificate verify failed"):
            await stranger.ping()
    finally:
        await store.close()
        await stranger.close()


def test_unreadable_tls_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot load the etcd TLS files"):
        EtcdStore(["https://127.0.0.1:2379"], ca_file=str(tmp_path / "missing.crt"))


@pytest.fixture
async def auth_etcd(tmp_path: Path) -> AsyncIterator[PrivateEtcd]:
    # Simple tokens that expire after a second, so re-authentication is exercised.
    server = PrivateEtcd(tmp_path / "data", "http", ["--auth-token", "simple",
                                                    "--auth-token-ttl", "1"], [])  # fmt: skip
    try:
        await server.wait_healthy()
        for command in (
            ["role", "add", "root"],
            ["user", "add", "root:rootpw"],
            ["user", "grant-role", "root", "root"],
            ["auth", "enable"],
        ):
            await asyncio.to_thread(server.etcdctl, *command)
        yield server
    finally:
        server.stop()


async def test_username_and_password(auth_etcd: PrivateEtcd) -> None:
    store = EtcdStore([auth_etcd.endpoint], username="root", password="rootpw", timeout=2.0)
    wrong = EtcdStore([auth_etcd.endpoint], username="root", password="nope", timeout=2.0)
    anonymous = EtcdStore([auth_etcd.endpoint], timeout=2.0)
    try:
        await store.add_service("svc", SPEC)
        watch = store.watch_services()
        assert (await asyncio.wait_for(anext(watch), 5)).services == {"svc": SPEC_INFO}
        await watch.aclose()
        await asyncio.sleep(2.5)  # the token expires; the store signs in again
        assert await store.get_all_services() == {"svc": SPEC_INFO}

        with pytest.raises(StoreError, match="authentication failed") as caught:
            await wrong.ping()
        assert not isinstance(caught.value, StoreUnavailable)
        with pytest.raises(StoreError, match="user name is empty"):
            await anonymous.ping()
    finally:
        for each in (store, wrong, anonymous):
            await each.close()
