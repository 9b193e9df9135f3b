"""The balancer end to end on this host: store updates → listeners + real iptables → traffic.

Host clients connect to service addresses in 127.42.0.0/16 (loopback, so nothing can leave the
machine); the nat OUTPUT jump sends them to listeners on 127.0.0.1 (bridge ``lo``), which relay
to small TCP servers on 127.0.0.1.  Each test uses its own chain name and removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator

import pytest

from flux.balancer.balancer import Balancer
from flux.balancer.iptables import IPTables
from flux.model import Host, HostRef, Instance, InstanceState, Service
from flux.relay import make_relay
from flux.store.memory import MemoryBackend, MemoryStore

pytestmark = pytest.mark.iptables

_vip_counter = itertools.count(1)


def fresh_vip() -> str:
    n = next(_vip_counter)
    return f"127.42.{100 + n // 250}.{n % 250 + 1}"


class Backend:
    """A TCP server on 127.0.0.1 that answers each line with its name, then closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self, port: int = 0) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            data = await reader.readline()
            writer.write(f"{self.name}:{data.decode().strip()}\n".encode())
            await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def request(vip: str, port: int, text: str = "hi") -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(vip, port), 5)
    try:
        writer.write(f"{text}\n".encode())
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
    finally:
        writer.close()


class Cluster:
    """A memory store with this host's balancer running against it."""

    def __init__(self, relay_kind: str) -> None:
        self.chain = "FLUXT" + secrets.token_hex(3).upper()
        self.backend = MemoryBackend()
        self.admin = MemoryStore(self.backend)  # fluxctl's view
        self.agent = MemoryStore(self.backend)  # the host that owns instances
        self.balancer = Balancer(
            MemoryStore(self.backend),
            make_relay(relay_kind),
            IPTables(self.chain),
            bind_ip=lambda: "127.0.0.1",
            bridge="lo",
            connect_timeout=1.0,
        )
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # The balancer serves instances of registered hosts only: register the agent's host.
        await self.agent.register_host(Host(address="127.0.0.1"))
        self.tasks.append(asyncio.create_task(self.agent.run_lease(30)))
        self.tasks.append(asyncio.create_task(self.balancer.run()))
        await self.agent.wait_lease()
        await self.until(lambda: self.balancer.ready)

    async def until(self, predicate, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for task in self.tasks:
                if task.done():
                    task.result()
            assert time.monotonic() < deadline, "condition not reached within the deadline"
            await asyncio.sleep(0.01)

    async def forwarding(self, service: str, vip: str, instances: int = 1) -> None:
        """Wait until ``service`` forwards to ``instances`` instances and its DNAT is in place."""
        await self.until(
            lambda: pool_size(self, service) == instances
            and f"-d {vip}/32" in self.nat_rules()
            and f"-d {vip}/32" not in self.filter_rules()
        )

    async def add_instance(self, service: str, name: str, address: str | None, **kw) -> None:
        instance = Instance(host=HostRef(address="127.0.0.1"), address=address, **kw)
        await self.agent.add_instance(service, name, instance)

    def nat_rules(self) -> str:
        return subprocess.run(
            ["iptables", "-w", "-t", "nat", "-S", self.chain], capture_output=True, text=True
        ).stdout

    def filter_rules(self) -> str:
        return subprocess.run(
            ["iptables", "-w", "-t", "filter", "-S", self.chain], capture_output=True, text=True
        ).stdout

    async def stop(self) -> None:
        await self.balancer.stop_accepting()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.balancer.remove_rules()
        await self.balancer.drain(1.0)


def pool_size(cluster: Cluster, service: str) -> int:
    entry = cluster.balancer.listeners.get(service)
    return 0 if entry is None else len(entry[1].pool)


@pytest.fixture(params=["splice", "python"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    c = Cluster(request.param)
    try:
        await c.start()
        yield c
    finally:
        with contextlib.suppress(Exception):
            await c.stop()
        await IPTables(c.chain).cleanup()  # even if the test failed half-way


async def test_connections_spread_over_instances_and_follow_changes(cluster: Cluster) -> None:
    backends = [await Backend(f"b{i}").start() for i in range(3)]
    vip = fresh_vip()
    try:
        await cluster.admin.add_service("web", Service(address=f"{vip}:8080"))
        for b in backends:
            await cluster.add_instance("web", b.name, b.address)
        await cluster.forwarding("web", vip, 3)
        assert f"-d {vip}/32" in cluster.nat_rules()
        answers = [await request(vip, 8080, str(i)) for i in range(60)]
        assert {a.split(":")[0] for a in answers} == {"b0", "b1", "b2"}
        assert all(a.endswith(f":{i}") for i, a in enumerate(answers))
        # An instance that is no longer live stops receiving connections.
        await cluster.add_instance("web", "b0", backends[0].address, state=InstanceState.DRAINING)
        await cluster.until(lambda: pool_size(cluster, "web") == 2)
        answers = [await request(vip, 8080) for _ in range(20)]
        assert {a.split(":")[0] for a in answers} == {"b1", "b2"}
    finally:
        for b in backends:
            await b.stop()


async def test_service_without_instances_refuses_at_once(cluster: Cluster) -> None:
    vip = fresh_vip()
    await cluster.admin.add_service("empty", Service(address=f"{vip}:9000"))
    await cluster.until(lambda: "empty" in cluster.balancer.states)
    await cluster.until(lambda: f"-d {vip}/32" in cluster.filter_rules())
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(asyncio.open_connection(vip, 9000), 5)
    assert time.monotonic() - started < 1.0
    assert cluster.nat_rules().count("DNAT") == 0


async def test_a_killed_instance_costs_clients_nothing(cluster: Cluster) -> None:
    backends = [await Backend(f"k{i}").start() for i in range(3)]
    vip = fresh_vip()
    try:
        await cluster.admin.add_service("svc", Service(address=f"{vip}:80"))
        for b in backends:
            await cluster.add_instance("svc", b.name, b.address)
        await cluster.forwarding("svc", vip, 3)
        failures = 0
        for i in range(150):
            if i == 50:
                await backends[1].stop()  # dies without telling etcd
            try:
                answer = await request(vip, 80, str(i))
                assert answer.endswith(f":{i}")
                assert not (i > 50 and answer.startswith("k1:"))
            except (TimeoutError, OSError, AssertionError):
                failures += 1
        assert failures == 0
        pool = cluster.balancer.listeners["svc"][1].pool
        assert "k1" not in pool.ready
    finally:
        for b in backends:
            await b.stop()


async def test_all_instances_dead_resets_the_client_fast(cluster: Cluster) -> None:
    vip = fresh_vip()
    dead = await Backend("dead").start()
    address = dead.address
    await dead.stop()
    await cluster.admin.add_service("gone", Service(address=f"{vip}:81"))
    await cluster.add_instance("gone", "dead", address)
    await cluster.forwarding("gone", vip)
    started = time.monotonic()
    # The reset may arrive before or after the client's connect completes.
    with contextlib.suppress(ConnectionResetError):
        reader, writer = await asyncio.open_connection(vip, 81)
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
    assert time.monotonic() - started < 2.0


async def test_established_connections_survive_service_removal(cluster: Cluster) -> None:
    received: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            received.append(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    vip = fresh_vip()
    try:
        await cluster.admin.add_service("long", Service(address=f"{vip}:82"))
        await cluster.add_instance("long", "echo", f"127.0.0.1:{port}")
        await cluster.forwarding("long", vip)
        reader, writer = await asyncio.open_connection(vip, 82)
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"one"
        await cluster.admin.remove_service("long")
        await cluster.until(
            lambda: "long" not in cluster.balancer.states
            and vip not in cluster.nat_rules() + cluster.filter_rules()
        )
        writer.write(b"two")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"two"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_address_change_moves_the_rule(cluster: Cluster) -> None:
    backend = await Backend("m").start()
    vip1, vip2 = fresh_vip(), fresh_vip()
    try:
        await cluster.admin.add_service("mv", Service(address=f"{vip1}:83"))
        await cluster.add_instance("mv", "m", backend.address)
        await cluster.forwarding("mv", vip1)
        assert (await request(vip1, 83)).startswith("m:")
        await cluster.admin.add_service("mv", Service(address=f"{vip2}:84"))
        await cluster.forwarding("mv", vip2)
        assert f"-d {vip1}/32" not in cluster.nat_rules()
        assert (await request(vip2, 84)).startswith("m:")
    finally:
        await backend.stop()


async def test_a_listener_closes_only_after_no_rule_points_at_it(cluster: Cluster) -> None:
    # An address change replaces the listener: while the batch that moves the DNAT rule runs,
    # the old rule still sends clients to the old listener, which must still be open then.
    backend = await Backend("r").start()
    vip1, vip2 = fresh_vip(), fresh_vip()
    try:
        await cluster.admin.add_service("rl", Service(address=f"{vip1}:85"))
        await cluster.add_instance("rl", "r", backend.address)
        await cluster.forwarding("rl", vip1)
        _, old = cluster.balancer.listeners["rl"]
        open_during_sync: list[bool] = []
        real_sync = cluster.balancer.iptables.sync

        async def sync(desired, **kwargs):  # the real sync, noting the old listener's state
            open_during_sync.append(old.is_open)
            return await real_sync(desired, **kwargs)

        cluster.balancer.iptables.sync = sync  # type: ignore[method-assign]
        await cluster.admin.add_service("rl", Service(address=f"{vip2}:86"))
        await cluster.forwarding("rl", vip2)
        await cluster.until(lambda: not old.is_open)
        assert open_during_sync == [True]
        assert (await request(vip2, 86)).startswith("r:")
    finally:
        await backend.stop()


async def test_an_instance_that_never_answers_times_out_and_the_next_one_serves(
    cluster: Cluster,
) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
    # hangs (on loopback too) until the balancer's -connect-timeout (1 s here).
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers: list[socket.socket] = []
    good = await Backend("good").start()
    vip = fresh_vip()
    try:
        for _ in range(4):  # fill the queue (backlog 0 still admits one or two)
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(silent.getsockname())
            fillers.append(filler)
        await asyncio.sleep(0.2)
        await cluster.admin.add_service("slow", Service(address=f"{vip}:82"))
        host, port = silent.getsockname()
        await cluster.add_instance("slow", "silent", f"{host}:{port}")
        await cluster.add_instance("slow", "good", good.address)
        await cluster.forwarding("slow", vip, 2)
        pool = cluster.balancer.listeners["slow"][1].pool
        slowest = 0.0
        for i in range(30):  # the pick is random: until one request has met the silent one
            started = time.monotonic()
            assert (await request(vip, 82, str(i))).startswith("good:")
            slowest = max(slowest, time.monotonic() - started)
            if "silent" not in pool.ready:
                break
        assert "silent" not in pool.ready
        # That request waited out the timeout, then was served by the other instance.
        assert 0.9 <= slowest < 3.0
    finally:
        await good.stop()
        for sock in (*fillers, silent):
            sock.close()
