"""The agent's Docker side: a scripted engine for the orderings, then the real engine.

The first part drives :class:`DockerWatcher` (and the whole agent, on the in-memory store)
with a scripted engine, to produce the orderings a real engine makes hard to hit on purpose:
events while the listing is in flight, containers gone before inspection, a stream that ends.
The second part runs the agent against the real Docker engine and the real etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from flux.agent.agent import Agent
from flux.agent.docker import DockerWatcher, merge_listing, parse_event
from flux.agent.enrol import Container, ContainerEvent, ContainerUpdate
from flux.model import HostRef, Instance, InstanceState, Rule, Service
from flux.store.base import NotFound, StoreUnavailable
from flux.store.etcd import EtcdStore
from flux.store.memory import MemoryStore
from tests.support.docker_images import ensure_busybox_image
from tests.support.etcd_server import EtcdServer

DEADLINE = 10.0


# -- a scripted engine -----------------------------------------------------------------------------


def inspect_json(
    cid: str,
    *,
    image: str = "foo-image:version",
    labels: Mapping[str, str] | None = None,
    ip: str = "172.17.0.2",
    ports: Mapping[str, list[dict[str, str]]] | None = None,
    paused: bool = False,
) -> dict[str, Any]:
    """A minimal ``docker inspect`` answer."""
    return {
        "Id": cid,
        "State": {"Running": True, "Paused": paused},
        "Config": {"Image": image, "Labels": dict(labels or {}), "Env": []},
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {
            "IPAddress": ip,
            "Networks": {"bridge": {"IPAddress": ip}},
            "Ports": {k: list(v) for k, v in (ports or {}).items()},
        },
    }


class ScriptedEngine:
    """A Docker engine's state and event streams, driven by the test."""

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.streams: list[asyncio.Queue[Mapping[str, Any] | None]] = []
        self.during_list: Callable[[], None] | None = None
        self.available = True
        self.lists = 0

    def event(self, action: str, cid: str, **attributes: str) -> None:
        actor = {"ID": cid, "Attributes": attributes}
        raw = {"Type": "container", "Action": action, "Actor": actor}
        for queue in self.streams:
            queue.put_nowait(raw)

    def start(self, cid: str, **fields: Any) -> None:
        self.containers[cid] = inspect_json(cid, **fields)
        self.event("start", cid)

    def die(self, cid: str) -> None:
        self.containers.pop(cid, None)
        self.event("die", cid)

    def end_streams(self) -> None:
        """Close every event stream, as a dockerd restart does."""
        for queue in self.streams:
            queue.put_nowait(None)
        self.streams.clear()

    def connect(self) -> ScriptedClient:
        return ScriptedClient(self)


class ScriptedClient:
    """One connection to a :class:`ScriptedEngine` (a ``DockerClient``)."""

    def __init__(self, engine: ScriptedEngine) -> None:
        self.engine = engine

    def _check(self) -> None:
        if not self.engine.available:
            raise OSError("scripted engine unavailable")

    async def version(self) -> str:
        self._check()
        return "scripted"

    @contextlib.asynccontextmanager
    async def events(
        self, filters: Mapping[str, list[str]]
    ) -> AsyncIterator[AsyncIterator[Mapping[str, Any]]]:
        self._check()
        queue: asyncio.Queue[Mapping[str, Any] | None] = asyncio.Queue()
        self.engine.streams.append(queue)

        async def stream() -> AsyncIterator[Mapping[str, Any]]:
            while (item := await queue.get()) is not None:
                yield item

        try:
            yield stream()
        finally:
            with contextlib.suppress(ValueError):
                self.engine.streams.remove(queue)

    async def list_running(self) -> list[str]:
        self._check()
        self.engine.lists += 1
        listed = list(self.engine.containers)
        if self.engine.during_list is not None:
            hook, self.engine.during_list = self.engine.during_list, None
            hook()
        await asyncio.sleep(0)
        return listed

    async def inspect(self, container_id: str) -> Mapping[str, Any] | None:
        self._check()
        await asyncio.sleep(0)
        return self.engine.containers.get(container_id)

    async def close(self) -> None:
        pass


class Recorder:
    """Collects a watcher's updates and waits for them."""

    def __init__(self) -> None:
        self.updates: list[ContainerUpdate] = []
        self._changed = asyncio.Event()

    def __call__(self, update: ContainerUpdate) -> None:
        self.updates.append(update)
        self._changed.set()

    async def next(self, timeout: float = DEADLINE) -> ContainerUpdate:
        seen = len(self.updates)
        async with asyncio.timeout(timeout):
            while len(self.updates) == seen:
                self._changed.clear()
                await self._changed.wait()
        return self.updates[seen]

    async def wait_for(self, count: int, timeout: float = DEADLINE) -> None:
        async with asyncio.timeout(timeout):
            while len(self.updates) < count:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def watching(
    engine: ScriptedEngine, **options: Any
) -> AsyncIterator[tuple[DockerWatcher, Recorder]]:
    options.setdefault("backoff_initial", 0.01)
    options.setdefault("backoff_max", 0.05)
    watcher = DockerWatcher(engine.connect, **options)
    recorder = Recorder()
    task = asyncio.create_task(watcher.run(recorder))
    try:
        yield watcher, recorder
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert engine.streams == [], "the watcher left an event stream open"


# -- pure helpers ----------------------------------------------------------------------------------


def test_parse_event() -> None:
    def raw(kind: str, action: str, actor: str, **attributes: str) -> dict[str, Any]:
        return {"Type": kind, "Action": action, "Actor": {"ID": actor, "Attributes": attributes}}

    assert parse_event(raw("container", "start", "c1")) == ContainerEvent("start", "c1")
    assert parse_event(raw("container", "kill", "c1", signal="15")) == ContainerEvent(
        "kill", "c1", signal="15"
    )
    assert parse_event(raw("container", "health_status: unhealthy", "c1")) == ContainerEvent(
        "health_status", "c1", health="unhealthy"
    )
    assert parse_event(raw("network", "connect", "net1", container="c1")) == ContainerEvent(
        "network", "c1"
    )
    assert parse_event(raw("container", "exec_start: sh", "c1")) is None
    assert parse_event(raw("image", "pull", "busybox")) is None
    assert parse_event(raw("network", "create", "net1")) is None
    # Engines before API 1.22 only had "status" and "id".
    assert parse_event({"status": "die", "id": "c1"}) == ContainerEvent("die", "c1")


def test_events_seen_during_the_listing_win() -> None:
    # The original's TestDockerListener: 1 and 2 run; while listing, 2 dies and 3 starts.
    merged = merge_listing(
        ["1", "2"], [ContainerEvent("die", "2"), ContainerEvent("start", "3")]
    )
    assert merged.present == {"1", "3"}
    assert merged.started == {"3"}
    # The last event about a container decides; kill/stop after the last start are replayed.
    merged = merge_listing(
        ["4"],
        [
            ContainerEvent("kill", "4", signal="15"),
            ContainerEvent("die", "4"),
            ContainerEvent("start", "4"),
            ContainerEvent("kill", "4", signal="15"),
            ContainerEvent("start", "5"),
            ContainerEvent("die", "5"),
        ],
    )
    assert merged.present == {"4"}
    assert merged.replay == {"4": (ContainerEvent("kill", "4", signal="15"),)}


# -- the watcher, scripted -------------------------------------------------------------------------


async def test_listener_snapshot_then_deltas() -> None:
    # TestDockerListener, end to end through the watcher.
    engine = ScriptedEngine()
    engine.containers = {"1": inspect_json("1"), "2": inspect_json("2")}

    def meanwhile() -> None:
        engine.die("2")
        engine.start("3")

    engine.during_list = meanwhile
    async with watching(engine) as (watcher, updates):
        first = await updates.next()
        assert first.reset and set(first.containers) == {"1", "3"}
        assert watcher.connected

        engine.die("1")
        assert (await updates.next()).containers == {"1": None}

        # A container that came and went before it could be inspected produces nothing.
        engine.event("start", "4")
        engine.event("die", "4")
        engine.start("5", image="five")
        update = await updates.next()
        assert not update.reset and list(update.containers) == ["5"]
        five = update.containers["5"]
        assert five is not None and five.image == "five"
        await asyncio.sleep(0.05)
        assert len(updates.updates) == 3


async def test_empty_engine_still_gives_a_snapshot() -> None:
    async with watching(ScriptedEngine()) as (_, updates):
        first = await updates.next()
        assert first.reset and dict(first.containers) == {}


async def test_lifecycle_events_become_deltas() -> None:
    engine = ScriptedEngine()
    engine.containers = {"c": inspect_json("c")}
    async with watching(engine) as (_, updates):
        await updates.next()
        flags = []
        for action, attributes in [
            ("pause", {}),
            ("unpause", {}),
            ("health_status: unhealthy", {}),
            ("health_status: healthy", {}),
            ("kill", {"signal": "1"}),  # a reload: no change, no update
            ("kill", {"signal": "15"}),
        ]:
            engine.event(action, "c", **attributes)
            if action == "kill" and attributes["signal"] == "1":
                continue
            container = (await updates.next()).containers["c"]
            assert container is not None
            flags.append((container.paused, container.health, container.stopping))
        assert flags == [
            (True, "", False),
            (False, "", False),
            (False, "unhealthy", False),
            (False, "healthy", False),
            (False, "healthy", True),
        ]
        engine.die("c")
        assert (await updates.next()).containers == {"c": None}
        # Events about containers never announced are ignored.
        engine.event("pause", "unknown")
        engine.event("die", "unknown")
        await asyncio.sleep(0.05)
        assert len(updates.updates) == 7


async def test_kill_seen_during_listing_is_kept() -> None:
    engine = ScriptedEngine()
    engine.containers = {"c": inspect_json("c")}
    engine.during_list = lambda: engine.event("kill", "c", signal="15")
    async with watching(engine) as (_, updates):
        first = await updates.next()
        container = first.containers["c"]
        assert container is not None and container.stopping


async def test_network_change_reinspects() -> None:
    engine = ScriptedEngine()
    engine.containers = {"c": inspect_json("c", ip="172.17.0.2")}
    async with watching(engine) as (_, updates):
        await updates.next()
        engine.containers["c"] = inspect_json("c", ip="10.9.0.2")
        for queue in engine.streams:
            queue.put_nowait(
                {"Type": "network", "Action": "connect",
                 "Actor": {"ID": "net", "Attributes": {"container": "c"}}}
            )
        container = (await updates.next()).containers["c"]
        assert container is not None and container.networks == {"bridge": "10.9.0.2"}


async def test_stream_end_reconnects_with_a_fresh_snapshot() -> None:
    engine = ScriptedEngine()
    engine.containers = {"a": inspect_json("a"), "b": inspect_json("b")}
    async with watching(engine) as (watcher, updates):
        await updates.next()
        # dockerd goes away; while it is down "b" dies and "c" starts without events for us.
        engine.available = False
        engine.end_streams()
        engine.containers.pop("b")
        engine.containers["c"] = inspect_json("c")
        async with asyncio.timeout(DEADLINE):
            while watcher.connected:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # a few failed reconnection attempts
        engine.available = True
        resync = await updates.next()
        assert resync.reset and set(resync.containers) == {"a", "c"}
        assert watcher.connections == 2 and watcher.connected
        assert watcher.last_error is not None


async def test_engine_unreachable_at_start_is_retried() -> None:
    engine = ScriptedEngine()
    engine.available = False
    engine.containers = {"a": inspect_json("a")}
    async with watching(engine) as (watcher, updates):
        await asyncio.sleep(0.1)
        assert not watcher.connected and updates.updates == []
        engine.available = True
        first = await updates.next()
        assert first.reset and set(first.containers) == {"a"}
        assert watcher.connected


async def test_periodic_reconcile_repairs_missed_events() -> None:
    engine = ScriptedEngine()
    engine.containers = {"a": inspect_json("a")}
    async with watching(engine, reconcile_interval=0.2) as (watcher, updates):
        await updates.next()
        first = watcher.last_reconcile
        assert first is not None and first <= time.time()
        engine.containers["b"] = inspect_json("b")  # no event: Docker dropped it
        update = await updates.next(timeout=2.0)
        assert update.reset and set(update.containers) == {"a", "b"}
        assert watcher.snapshots == 2 and watcher.connections == 1
        assert watcher.last_reconcile is not None and watcher.last_reconcile >= first


async def test_reconcile_on_request() -> None:
    engine = ScriptedEngine()
    engine.containers = {"a": inspect_json("a")}
    watcher = DockerWatcher(engine.connect)
    assert not watcher.request_reconcile()  # not connected: nothing to do
    async with watching(engine) as (watcher, updates):
        await updates.next()
        engine.containers["b"] = inspect_json("b")
        assert watcher.request_reconcile()
        update = await updates.next()
        assert update.reset and set(update.containers) == {"a", "b"}
        assert engine.lists == 2


async def test_a_stop_that_arrives_with_an_event_is_not_lost() -> None:
    # fluxd stops the watcher by cancelling it.  A wait_for around the queue (3.11) returned
    # the event instead when the cancel came with it, and the watcher went on watching.
    watcher = DockerWatcher(ScriptedEngine().connect)
    recorder = Recorder()
    task = asyncio.create_task(watcher.run(recorder))
    try:
        await recorder.next()
        assert watcher.request_reconcile()
        task.cancel()
        await asyncio.wait([task], timeout=DEADLINE)
        assert task.cancelled()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_paused_containers_are_listed_as_paused() -> None:
    engine = ScriptedEngine()
    engine.containers = {"p": inspect_json("p", paused=True)}
    async with watching(engine) as (_, updates):
        first = await updates.next()
        assert first.containers == {"p": Container.from_inspect(engine.containers["p"])}
        assert first.containers["p"] is not None and first.containers["p"].paused


# -- the whole agent, scripted engine and in-memory store ------------------------------------------


@contextlib.asynccontextmanager
async def scripted_agent(
    engine: ScriptedEngine, **options: Any
) -> AsyncIterator[tuple[Agent, MemoryStore]]:
    store = MemoryStore()
    lease = asyncio.create_task(store.run_lease(30))
    options.setdefault("backoff_initial", 0.01)
    options.setdefault("backoff_max", 0.05)
    agent = Agent(store, engine.connect, host_ip="10.98.99.100", network_mode="global", **options)
    task = asyncio.create_task(agent.run())
    try:
        yield agent, store
    finally:
        task.cancel()
        lease.cancel()
        await asyncio.gather(task, lease, return_exceptions=True)


async def memory_instances(store: MemoryStore, service: str) -> dict[str, Instance]:
    return dict((await store.get_service(service, instances=True)).instances)


async def until(check: Callable[[], Any], timeout: float = DEADLINE) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


async def test_agent_component_survives_a_store_outage() -> None:
    # The original's TestSyncInstancesComponent.
    engine = ScriptedEngine()
    engine.containers = {"foo": inspect_json("foo", image="foo-image:version", ip="10.0.0.5")}
    async with scripted_agent(engine) as (agent, store):
        await store.add_service("svc1", Service(instancePort=80))
        await store.set_rule("svc1", "default", Rule(selector={"image": "foo-image"}))

        async def svc1_enrolled() -> bool:
            return set(await memory_instances(store, "svc1")) == {"foo"}

        await until(svc1_enrolled)
        instance = (await memory_instances(store, "svc1"))["foo"]
        assert instance.address == "10.0.0.5:80" and instance.host.address == "10.98.99.100"

        # etcd goes away; meanwhile the agent learns of changes it cannot write yet.
        store.inject_error()
        engine.die("foo")
        engine.start("bar", image="foo-image:version", ip="10.0.0.6")
        await asyncio.sleep(0.1)
        store.clear_error()
        await store.add_service("svc2", Service(instancePort=80))
        await store.set_rule("svc2", "default", Rule(selector={"image": "foo-image"}))

        async def both_repaired() -> bool:
            return (
                set(await memory_instances(store, "svc1")) == {"bar"}
                and set(await memory_instances(store, "svc2")) == {"bar"}
            )

        await until(both_repaired)
        await asyncio.wait_for(agent.wait_synced(), DEADLINE)
        assert agent.in_sync


async def test_agent_reconcile_writes_nothing_when_nothing_changed() -> None:
    engine = ScriptedEngine()
    engine.containers = {f"c{i}": inspect_json(f"c{i}", ip=f"10.0.0.{i + 2}") for i in range(20)}
    async with scripted_agent(engine, reconcile_interval=0.05) as (agent, store):
        await store.add_service("svc", Service(instancePort=80))
        await store.set_rule("svc", "default", Rule(selector={"image": "foo-image"}))

        async def all_enrolled() -> bool:
            return len(await memory_instances(store, "svc")) == 20

        await until(all_enrolled)
        await asyncio.wait_for(agent.wait_synced(), DEADLINE)
        writes, syncs = agent.publisher.writes, agent.publisher.syncs
        await until(lambda: asyncio.sleep(0, agent.publisher.syncs >= syncs + 3))
        assert agent.docker.snapshots >= 4
        assert agent.publisher.writes == writes == 20


async def test_agent_removes_instances_of_a_removed_rule_and_service() -> None:
    engine = ScriptedEngine()
    engine.containers = {
        "a": inspect_json("a", labels={"app": "a"}),
        "b": inspect_json("b", labels={"app": "b"}),
    }
    async with scripted_agent(engine) as (agent, store):
        await store.add_service("svc", Service(instancePort=80))
        await store.set_rule("svc", "ra", Rule(selector={"app": "a"}))
        await store.set_rule("svc", "rb", Rule(selector={"app": "b"}))

        async def enrolled(expected: set[str]) -> bool:
            try:
                return set(await memory_instances(store, "svc")) == expected
            except NotFound:
                return not expected

        await until(lambda: enrolled({"a", "b"}))
        await store.remove_rule("svc", "rb")
        await until(lambda: enrolled({"a"}))
        await store.remove_service("svc")
        await until(lambda: asyncio.sleep(0, not agent.instances))
        await asyncio.wait_for(agent.wait_synced(), DEADLINE)
        assert agent.publisher.written == {}


# -- the real engine and the real etcd -------------------------------------------------------------
#
# Containers carry a label unique to the test (``flux-test=<random>``) that every rule selects
# on, so nothing else running on the engine is ever enrolled, and teardown removes exactly the
# test's containers.  Ports are published on 127.0.0.1 only.


def _docker_cli(*args: str, timeout: float = 60.0) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


async def docker(*args: str, timeout: float = 60.0) -> str:
    """Run the docker CLI without blocking the event loop the agent runs on."""
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode().strip()


@pytest.fixture(scope="module")
def busybox() -> str:
    """The test image; fails (never skips) when the Docker engine does not answer."""
    try:
        _docker_cli("version", "--format", "{{.Server.Version}}", timeout=20)
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"the Docker engine does not answer ({exc}); `make test` starts dockerd")
    return ensure_busybox_image()


class Containers:
    """The containers one test creates, all labelled ``flux-test=<tag>``."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.tag = f"t{secrets.token_hex(6)}"

    async def run(self, *options: str, cmd: tuple[str, ...] = ("sleep", "300"),
                  init: bool = True) -> str:
        """Start a container; return its full ID."""
        args = ["run", "-d", "--label", f"flux-test={self.tag}", *options]
        if init:
            args.append("--init")  # so SIGTERM ends `sleep` and teardown is quick
        return await docker(*args, self.image, *cmd)

    async def inspect(self, cid: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(await docker("inspect", cid))
        return data[0]

    async def host_port(self, cid: str, port: str = "80/tcp") -> int:
        bindings = (await self.inspect(cid))["NetworkSettings"]["Ports"][port]
        return int(bindings[0]["HostPort"])

    def remove_all(self) -> None:
        ids = _docker_cli("ps", "-aq", "--filter", f"label=flux-test={self.tag}").split()
        if ids:
            _docker_cli("rm", "-f", *ids)


@pytest.fixture
def containers(busybox: str) -> Iterator[Containers]:
    created = Containers(busybox)
    try:
        yield created
    finally:
        created.remove_all()


class Harness:
    """An agent on the test's etcd, plus a second client playing fluxctl and the reader."""

    def __init__(self, etcd: EtcdServer, containers: Containers) -> None:
        self.etcd = etcd
        self.containers = containers
        self.fluxctl = EtcdStore(etcd.endpoint)
        self.stores: list[EtcdStore] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.agent: Agent | None = None
        self._agent_task: asyncio.Task[None] | None = None

    def selector(self, **entries: str) -> dict[str, str]:
        return {"flux-test": self.containers.tag, **entries}

    async def service(
        self,
        name: str,
        instance_port: int = 80,
        rules: Mapping[str, Mapping[str, str]] | None = None,
        **selector: str,
    ) -> None:
        """Define a service; its rules (default: one rule ``default`` with ``selector``)."""
        await self.fluxctl.add_service(name, Service(instancePort=instance_port))
        for rule, entries in (rules or {"default": selector}).items():
            await self.fluxctl.set_rule(name, rule, Rule(selector=self.selector(**entries)))

    async def start_agent(
        self, *, host_ip: str = "127.0.0.1", mode: str = "local", store: EtcdStore | None = None,
        **options: Any,
    ) -> Agent:
        if store is None:
            store = EtcdStore(self.etcd.endpoint)
            self.stores.append(store)
            self.tasks.append(asyncio.create_task(store.run_lease(10)))
        options.setdefault("backoff_initial", 0.1)
        options.setdefault("backoff_max", 1.0)
        self.agent = Agent(store, host_ip=host_ip, network_mode=mode, **options)
        self._agent_task = asyncio.create_task(self.agent.run())
        return self.agent

    async def stop_agent(self) -> None:
        if self._agent_task is not None:
            self._agent_task.cancel()
            await asyncio.gather(self._agent_task, return_exceptions=True)
            self._agent_task = None

    async def close(self) -> None:
        await self.stop_agent()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for store in [*self.stores, self.fluxctl]:
            with contextlib.suppress(Exception):
                await store.revoke_lease()
            await store.close()

    async def instances(self, service: str) -> dict[str, Instance]:
        try:
            return dict((await self.fluxctl.get_service(service, instances=True)).instances)
        except NotFound:
            return {}

    async def wait(
        self,
        service: str,
        check: Callable[[dict[str, Instance]], bool],
        timeout: float = DEADLINE,
    ) -> dict[str, Instance]:
        """Poll the store until ``check(instances)`` holds; fail with what was there."""
        found: dict[str, Instance] = {}
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(StoreUnavailable):
                found = await self.instances(service)
                if check(found):
                    return found
            await asyncio.sleep(0.1)
        raise AssertionError(f"service {service!r} never satisfied the check; it had {found}")

    async def wait_state(
        self, service: str, cid: str, state: InstanceState, timeout: float = DEADLINE
    ) -> Instance:
        found = await self.wait(
            service,
            lambda got: cid in got and got[cid].state is state,
            timeout,
        )
        return found[cid]


@pytest.fixture
async def harness(etcd: EtcdServer, containers: Containers) -> AsyncIterator[Harness]:
    h = Harness(etcd, containers)
    try:
        yield h
    finally:
        await h.close()


async def test_local_mode_with_a_loopback_binding(harness: Harness) -> None:
    await harness.service("web", instance_port=80)
    cid = await harness.containers.run("-p", "127.0.0.1::80", "-e", "MODE=a=b")
    await harness.start_agent(mode="local")
    instance = await harness.wait_state("web", cid, InstanceState.LIVE)
    port = await harness.containers.host_port(cid)
    assert instance.address == f"127.0.0.1:{port}"
    assert instance.host.address == "127.0.0.1"
    assert instance.container_rule == "default"
    assert instance.labels is not None
    assert instance.labels["image"] == "flux-test/busybox"
    assert instance.labels["tag"] == "latest"
    assert instance.labels["env.MODE"] == "a=b"
    assert instance.labels["flux-test"] == harness.containers.tag


async def test_local_mode_binding_on_another_interface_has_no_address(harness: Harness) -> None:
    # Published on loopback only, but this host's IP is another one: peers cannot reach it.
    await harness.service("web", instance_port=80)
    cid = await harness.containers.run("-p", "127.0.0.1::80")
    await harness.start_agent(host_ip="192.0.2.200", mode="local")
    instance = await harness.wait_state("web", cid, InstanceState.NO_ADDRESS)
    assert instance.address is None


async def test_global_mode_uses_the_container_ip(harness: Harness) -> None:
    await harness.service("web", instance_port=8080)
    cid = await harness.containers.run()
    await harness.start_agent(mode="global")
    instance = await harness.wait_state("web", cid, InstanceState.LIVE)
    ip = (await harness.containers.inspect(cid))["NetworkSettings"]["Networks"]["bridge"][
        "IPAddress"
    ]
    assert ip and instance.address == f"{ip}:8080"


async def test_host_network_and_no_address(harness: Harness) -> None:
    await harness.service("web", instance_port=8080)
    host_net = await harness.containers.run("--net=host")
    unpublished = await harness.containers.run()
    await harness.start_agent(mode="local")
    found = await harness.wait("web", lambda got: len(got) == 2)
    assert found[host_net].address == "127.0.0.1:8080"
    assert found[host_net].state is InstanceState.LIVE
    assert found[unpublished].address is None
    assert found[unpublished].state is InstanceState.NO_ADDRESS


async def test_label_and_env_rules(harness: Harness) -> None:
    await harness.service("by-label", app="web")
    await harness.service("by-env", rules={"from-env": {"env.SERVICE_NAME": "boo"}})
    labelled = await harness.containers.run("--label", "app=web", "-p", "127.0.0.1::80")
    with_env = await harness.containers.run("-e", "SERVICE_NAME=boo", "-p", "127.0.0.1::80")
    neither = await harness.containers.run("--label", "app=db", "-e", "SERVICE_NAME=bar")
    await harness.start_agent()
    assert set(await harness.wait("by-label", lambda got: len(got) == 1)) == {labelled}
    found = await harness.wait("by-env", lambda got: len(got) == 1)
    assert set(found) == {with_env}
    assert found[with_env].container_rule == "from-env"
    # Started while the agent runs: enrolled from the start event.
    late = await harness.containers.run("--label", "app=web")
    assert set(await harness.wait("by-label", lambda got: len(got) == 2)) == {labelled, late}
    assert neither not in await harness.instances("by-label")


async def test_pause_and_unpause(harness: Harness) -> None:
    await harness.service("web")
    cid = await harness.containers.run("-p", "127.0.0.1::80")
    await harness.start_agent()
    await harness.wait_state("web", cid, InstanceState.LIVE)
    await docker("pause", cid)
    await harness.wait_state("web", cid, InstanceState.PAUSED)
    await docker("unpause", cid)
    await harness.wait_state("web", cid, InstanceState.LIVE)


async def test_health_check_going_unhealthy_and_back(harness: Harness) -> None:
    await harness.service("web")
    cid = await harness.containers.run(
        "-p", "127.0.0.1::80",
        "--health-cmd", "test -f /tmp/ok",
        "--health-interval", "300ms",
        "--health-retries", "1",
        "--health-timeout", "2s",
        cmd=("sh", "-c", "touch /tmp/ok; exec sleep 300"),
    )
    await harness.start_agent()
    await harness.wait_state("web", cid, InstanceState.LIVE)  # "starting" counts as live
    async with asyncio.timeout(DEADLINE):
        while await docker("inspect", "-f", "{{.State.Health.Status}}", cid) != "healthy":
            await asyncio.sleep(0.1)
    await harness.wait_state("web", cid, InstanceState.LIVE)
    await docker("exec", cid, "rm", "/tmp/ok")
    await harness.wait_state("web", cid, InstanceState.UNHEALTHY)
    await docker("exec", cid, "touch", "/tmp/ok")
    await harness.wait_state("web", cid, InstanceState.LIVE)


async def test_kill_drains_then_death_removes(harness: Harness) -> None:
    await harness.service("web")
    # Without an init process, `sleep` is PID 1 and ignores SIGTERM: the container keeps
    # running after the TERM, as a server finishing its requests would.
    cid = await harness.containers.run("-p", "127.0.0.1::80", init=False)
    await harness.start_agent()
    await harness.wait_state("web", cid, InstanceState.LIVE)
    await docker("kill", "--signal", "TERM", cid)
    await harness.wait_state("web", cid, InstanceState.DRAINING)
    await docker("kill", cid)
    await harness.wait("web", lambda got: cid not in got)


async def test_rule_narrowed_widened_and_service_removed(harness: Harness) -> None:
    await harness.service("web", app="web")
    first = await harness.containers.run("--label", "app=web", "--label", "tier=a")
    second = await harness.containers.run("--label", "app=web", "--label", "tier=b")
    agent = await harness.start_agent()
    await harness.wait("web", lambda got: set(got) == {first, second})
    await harness.fluxctl.set_rule("web", "default", Rule(selector=harness.selector(tier="a")))
    await harness.wait("web", lambda got: set(got) == {first})
    await harness.fluxctl.set_rule("web", "b", Rule(selector=harness.selector(tier="b")))
    found = await harness.wait("web", lambda got: set(got) == {first, second})
    assert found[second].container_rule == "b"
    await harness.fluxctl.remove_service("web")
    async with asyncio.timeout(DEADLINE):
        while agent.instances:
            await asyncio.sleep(0.05)
    # Removing the service took its instances with it; the agent's removals found them gone.
    await harness.service("web", app="web")
    await harness.wait("web", lambda got: set(got) == {first, second})


async def test_changes_while_the_agent_is_stopped_are_repaired(harness: Harness) -> None:
    await harness.service("web")
    stays = await harness.containers.run("-p", "127.0.0.1::80")
    goes = await harness.containers.run("-p", "127.0.0.1::80")
    store = EtcdStore(harness.etcd.endpoint)
    harness.stores.append(store)
    harness.tasks.append(asyncio.create_task(store.run_lease(10)))
    # Another host's instance of the same service: never touched.
    other = Instance(host=HostRef(address="192.0.2.99"), address="192.0.2.99:80",
                     labels={}, state=InstanceState.LIVE)
    other_store = EtcdStore(harness.etcd.endpoint)
    harness.stores.append(other_store)
    harness.tasks.append(asyncio.create_task(other_store.run_lease(10)))
    await other_store.add_instance("web", "other-host-instance", other)

    await harness.start_agent(store=store)
    await harness.wait("web", lambda got: {stays, goes} <= set(got))
    await harness.stop_agent()
    # The records stay (the lease is still held) while the agent sees nothing.
    await docker("kill", goes)
    arrives = await harness.containers.run("-p", "127.0.0.1::80")
    assert set(await harness.instances("web")) == {stays, goes, "other-host-instance"}

    await harness.start_agent(store=store)
    expected = {stays, arrives, "other-host-instance"}
    found = await harness.wait("web", lambda got: set(got) == expected)
    assert found["other-host-instance"] == other


async def test_etcd_restarted_under_a_running_agent(harness: Harness) -> None:
    await harness.service("web")
    before = await harness.containers.run("-p", "127.0.0.1::80")
    agent = await harness.start_agent()
    await harness.wait("web", lambda got: set(got) == {before})
    await asyncio.to_thread(harness.etcd.stop)
    try:
        during = await harness.containers.run("-p", "127.0.0.1::80")
        await docker("kill", before)
        async with asyncio.timeout(DEADLINE):
            while set(agent.instances) != {("web", during)}:
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(harness.etcd.start)
    found = await harness.wait("web", lambda got: set(got) == {during}, timeout=20)
    assert found[during].state is InstanceState.LIVE


async def test_dockerd_restart_resyncs(harness: Harness) -> None:
    await harness.service("web")
    comes_back = await harness.containers.run("-p", "127.0.0.1::80", "--restart", "always")
    does_not = await harness.containers.run("-p", "127.0.0.1::80")
    agent = await harness.start_agent()
    await harness.wait("web", lambda got: set(got) == {comes_back, does_not})
    connections = agent.docker.connections
    took = await asyncio.to_thread(restart_dockerd)
    assert took < 30, f"dockerd took {took:.1f} s to restart"
    port = await harness.containers.host_port(comes_back)
    found = await harness.wait(
        "web",
        lambda got: set(got) == {comes_back}
        and got[comes_back].address == f"127.0.0.1:{port}",
        timeout=20,
    )
    assert found[comes_back].state is InstanceState.LIVE
    assert agent.docker.connections > connections
    assert agent.docker_connected


# -- restarting dockerd, safely --------------------------------------------------------------------


# The engine the tests talk to writes its pid here; private dockerds of the multi-host tests and
# the soak run beside it with pidfiles of their own, so counting dockerd processes would not do.
_DOCKERD_PIDFILE = Path("/var/run/docker.pid")


def _dockerd_pid() -> int:
    try:
        pid = int(_DOCKERD_PIDFILE.read_text().strip())
    except (OSError, ValueError) as exc:
        raise AssertionError(f"no pid of the default dockerd in {_DOCKERD_PIDFILE}: {exc}") from exc
    comm = Path(f"/proc/{pid}/comm")
    assert comm.exists() and comm.read_text().strip() == "dockerd", (
        f"{_DOCKERD_PIDFILE} names pid {pid}, which is not a running dockerd"
    )
    return pid


def _docker_answers() -> bool:
    try:
        _docker_cli("version", "--format", "{{.Server.Version}}", timeout=5)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return True


def restart_dockerd(timeout: float = 30.0) -> float:
    """Stop dockerd and start it again as it was started; return the seconds it took.

    Only for a dockerd started by hand: one managed by systemd, or one running containers that
    are not the test suite's (label ``flux-test``), is refused with an assertion error.  The
    new dockerd gets the old one's command line, environment, working directory and log file,
    and is detached from the test process.  Whatever happens, dockerd is running on return.
    """
    pid = _dockerd_pid()
    proc = Path(f"/proc/{pid}")
    cgroups = (proc / "cgroup").read_text()
    assert "docker.service" not in cgroups, "refusing to restart a dockerd managed by systemd"
    running = set(_docker_cli("ps", "-q").split())
    ours = set(_docker_cli("ps", "-q", "--filter", "label=flux-test").split())
    assert running <= ours, f"refusing to restart dockerd: it runs containers {running - ours}"
    argv = [a for a in (proc / "cmdline").read_bytes().decode().split("\0") if a]
    environ = dict(
        item.split("=", 1)
        for item in (proc / "environ").read_bytes().decode().split("\0")
        if "=" in item
    )
    cwd = os.readlink(proc / "cwd")
    log_path = os.readlink(proc / "fd" / "1")
    if not os.path.isfile(log_path):
        log_path = os.devnull
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = started + timeout
        while proc.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.exists():
            os.kill(pid, signal.SIGKILL)
            while proc.exists():
                time.sleep(0.05)
    finally:
        if not _docker_answers():
            # `setsid ... &` in a shell that exits at once: dockerd is re-parented away from
            # the test process and survives it, as the one started by hand did.
            subprocess.run(
                ["sh", "-c", 'setsid "$@" >>"$LOG" 2>&1 </dev/null &', "sh", *argv],
                cwd=cwd,
                env={**environ, "LOG": log_path},
                timeout=10,
                check=True,
            )
            deadline = time.monotonic() + timeout
            while not _docker_answers():
                assert time.monotonic() < deadline, f"dockerd did not come back in {timeout} s"
                time.sleep(0.1)
    return time.monotonic() - started
