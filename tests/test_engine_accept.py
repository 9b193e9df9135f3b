"""The engine accepting for a service: snapshots, hand-overs, shards and what it counts.

Engine-level cases drive ``SpliceEngine`` directly with real sockets on 127.0.0.1; the
listener-level cases run a :class:`Listener` over both relays (the splice relay, whose engine
accepts, and the Python relay, the behaviour oracle) and check that clients see the same and
that the metric totals equal what the clients did, with several shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flux._splice import SpliceEngine, _may_meet_itself
from flux.balancer.listener import ConnectionBudget, Listener
from flux.balancer.pool import Pool
from flux.metrics.counters import Metrics
from flux.relay import make_relay, packed_sockaddr
from tests.support.listening import close_listener
from tests.support.netns import add_netns, delete_netns, netns_run

LOCAL = "127.0.0.1"


class Echo:
    """A threaded echo server on 127.0.0.1 that remembers how many clients it served."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOCAL, 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.served = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{LOCAL}:{self.port}"

    @property
    def packed(self) -> bytes:
        return packed_sockaddr(LOCAL, self.port)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.served += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        close_listener(self.sock, self._thread)


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    try:
        yield server
    finally:
        server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def listening_sockets(count: int, *, nodelay: bool = True) -> list[socket.socket]:
    """``count`` listening sockets on one port (SO_REUSEPORT), as the listener makes them
    (with TCP_NODELAY set before they listen, unless ``nodelay`` is false)."""
    sockets: list[socket.socket] = []
    port = 0
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if nodelay:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((LOCAL, port))
        port = s.getsockname()[1]
        s.listen(1024)
        sockets.append(s)
    return sockets


class Engines:
    """``n`` started shards listening for service 1 on one port."""

    def __init__(self, n: int, *, limit: int = 10_000, nodelay: bool = True) -> None:
        first = SpliceEngine()
        self.engines = [first] + [SpliceEngine(shard_of=first) for _ in range(n - 1)]
        for engine in self.engines:
            engine.start()
        first.set_budget(limit, 0)
        sockets = listening_sockets(n, nodelay=nodelay)
        self.port = sockets[0].getsockname()[1]
        for engine, sock in zip(self.engines, sockets, strict=True):
            engine.listen(1, sock.detach(), connect_timeout=1.0)

    def set_pool(self, targets: list[tuple[int, bytes]], python_at_ns: int = 0) -> None:
        for engine in self.engines:
            engine.set_pool(1, targets, False, python_at_ns)

    def handed(self) -> list[tuple[int, int, int, int, int]]:
        out = []
        for engine in self.engines:
            out.extend(engine.drain_all().handed)
        return out

    def wait_handed(self) -> list[tuple[int, int, int, int, int]]:
        """Hand-overs, waiting up to 5 s for the first."""
        got: list[tuple[int, int, int, int, int]] = []
        wait_for(lambda: bool(got.extend(self.handed()) or got), "a hand-over")
        return got

    def tally(self) -> dict[int, int]:
        """Connections counted per instance id, over all shards."""
        counts: dict[int, int] = {}
        for engine in self.engines:
            for instance, _, n in engine.service_counts(1).tally:
                counts[instance] = counts.get(instance, 0) + n
        return counts

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()


@pytest.fixture
def engines() -> Iterator[Callable[..., Engines]]:
    made: list[Engines] = []

    def make(n: int = 1, **kwargs: int) -> Engines:
        made.append(Engines(n, **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for group in made:
            group.stop()


def round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection((LOCAL, port), timeout=5) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        chunks = []
        while data := c.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---- the engine on its own ------------------------------------------------------------------


def test_engine_picks_from_the_snapshot_and_counts_each_connection(
    engines: Callable[..., Engines], echo: Echo
) -> None:
    group = engines()
    group.set_pool([(7, echo.packed)])
    for i in range(20):
        assert round_trip(group.port, b"hello %d" % i) == b"hello %d" % i
    wait_for(lambda: group.engines[0].service_counts(1).active == 0, "the connections to end")
    up, down, active, rejected, tally = group.engines[0].service_counts(1)
    sent = sum(len(b"hello %d" % i) for i in range(20))
    assert (up, down, active, rejected) == (sent, sent, 0, (0, 0, 0, 0))
    ip = int.from_bytes(socket.inet_aton(LOCAL), "little")
    assert tally == [(7, ip, 20)]
    assert group.handed() == []
    assert group.engines[0].held == 0
    assert echo.served == 20


def test_without_a_usable_snapshot_clients_are_handed_over_unread(
    engines: Callable[..., Engines], echo: Echo
) -> None:
    group = engines()
    for snapshot in ("none", "empty", "stale"):
        if snapshot == "empty":
            group.set_pool([])
        elif snapshot == "stale":
            # A retry is due: only the pool may pick now.
            group.set_pool([(7, echo.packed)], python_at_ns=time.monotonic_ns() - 1)
        client = socket.create_connection((LOCAL, group.port), timeout=5)
        client.sendall(b"first bytes")
        [(service, fd, _, instance, code)] = group.wait_handed()
        assert (service, instance, code) == (1, 0, 0), snapshot
        with socket.socket(fileno=fd) as accepted:
            accepted.settimeout(5)
            assert accepted.recv(100) == b"first bytes"  # nothing was read by the engine
        client.close()
    assert echo.served == 0


def test_a_failed_connect_hands_the_client_back_with_the_instance(
    engines: Callable[..., Engines],
) -> None:
    group = engines()
    group.set_pool([(9, packed_sockaddr(LOCAL, closed_port()))])
    client = socket.create_connection((LOCAL, group.port), timeout=5)
    client.sendall(b"kept")
    [(_, fd, ip, instance, code)] = group.wait_handed()
    assert (instance, code) == (9, errno.ECONNREFUSED)
    assert ip == int.from_bytes(socket.inet_aton(LOCAL), "little")
    with socket.socket(fileno=fd) as accepted:
        accepted.settimeout(5)
        assert accepted.recv(100) == b"kept"
    client.close()
    assert group.tally() == {}  # never up: not counted
    assert group.engines[0].held == 0


def test_snapshot_changes_under_load_lose_no_client(
    engines: Callable[..., Engines], echo: Echo
) -> None:
    """Instances come and go (and the pool empties) while clients arrive: each client is
    either relayed by the engine or handed over, never dropped."""
    group = engines(2)
    other = Echo()
    total = 300
    replies: list[bytes] = []
    stop = threading.Event()

    def clients() -> None:
        for i in range(total):
            replies.append(round_trip(group.port, b"n%d" % i))

    def serve_handed() -> int:
        served = 0
        while not stop.is_set() or served < total:
            for _, fd, _, instance, _ in group.handed():
                # The caller's path: connect itself and give both sockets to the engine.
                upstream = socket.create_connection((LOCAL, echo.port), timeout=5)
                group.engines[0].add(fd, upstream.detach(), 1000 + served + instance)
                served += 1
            if stop.is_set() and len(replies) == total:
                break
            time.sleep(0.002)
        return served

    snapshots = [
        [(1, echo.packed)],
        [(1, echo.packed), (2, other.packed)],
        [(2, other.packed)],
        [],
    ]
    try:
        worker = threading.Thread(target=clients)
        worker.start()
        handed_count = [0]
        server = threading.Thread(target=lambda: handed_count.__setitem__(0, serve_handed()))
        server.start()
        rng = random.Random(11)
        deadline = time.monotonic() + 60
        while worker.is_alive() and time.monotonic() < deadline:
            group.set_pool(rng.choice(snapshots))
            time.sleep(0.003)
        worker.join(60)
        stop.set()
        server.join(60)
        assert replies == [b"n%d" % i for i in range(total)]
        counted = sum(group.tally().values())
        assert counted + handed_count[0] == total
        assert counted > 0 and handed_count[0] > 0  # both paths were taken
    finally:
        other.close()


def test_shards_share_the_new_connections(engines: Callable[..., Engines], echo: Echo) -> None:
    group = engines(2)
    group.set_pool([(3, echo.packed)])
    for i in range(200):
        assert round_trip(group.port, b"%d" % i) == b"%d" % i
    per_shard = [sum(n for _, _, n in e.service_counts(1).tally) for e in group.engines]
    assert sum(per_shard) == 200
    # SO_REUSEPORT hashes each connection's ports: about half each (binomial, 200 draws).
    assert min(per_shard) >= 60, per_shard


def _own_sockets_facing(peer: tuple[str, int]) -> list[socket.socket]:
    """Duplicates of this process's TCP sockets connected to ``peer`` (the engine's side of
    its connections: the engine runs in this process), found among /proc/self/fd."""
    found: dict[str, socket.socket] = {}  # by inode: a duplicate names the same socket
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            inode = os.readlink(f"/proc/self/fd/{name}")
            if not inode.startswith("socket:") or inode in found:
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
            with contextlib.suppress(OSError):
                if sock.family == socket.AF_INET and sock.getpeername() == peer:
                    found[inode] = sock
                    continue
            sock.close()
    return list(found.values())


@pytest.mark.parametrize("listener_nodelay", [True, False])
def test_both_sides_of_an_accepted_connection_send_without_delay(
    engines: Callable[..., Engines], echo: Echo, listener_nodelay: bool
) -> None:
    """TCP_NODELAY on the engine's client socket and on the upstream it connects: small
    messages go out at once.  The client inherits it from a listening socket that had it
    before it listened (no setsockopt per client); from any other, the engine sets it."""
    group = engines(1, nodelay=listener_nodelay)
    group.set_pool([(3, echo.packed)])
    with socket.create_connection((LOCAL, group.port), timeout=5) as client:
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
        client_side = _own_sockets_facing(client.getsockname())
        upstream = _own_sockets_facing((LOCAL, echo.port))
        assert len(client_side) == 1 and len(upstream) == 1, (client_side, upstream)
        for sock in client_side + upstream:
            with sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_spent_budget_pauses_accepting_and_says_so_once(
    engines: Callable[..., Engines], echo: Echo
) -> None:
    group = engines(1, limit=2)
    group.set_pool([(4, echo.packed)])
    held = [socket.create_connection((LOCAL, group.port), timeout=5) for _ in range(3)]
    try:
        for c in held[:2]:
            c.sendall(b"x")
            assert c.recv(1) == b"x"
        assert [(n[1], n[4]) for n in group.wait_handed()] == [(-1, 0)]
        held[2].sendall(b"y")
        held[2].settimeout(0.3)
        with pytest.raises(TimeoutError):
            held[2].recv(1)  # waits in the backlog
        held[0].close()
        wait_for(lambda: group.engines[0].held == 1, "a connection to end")
        group.engines[0].resume(1)
        held[2].settimeout(5)
        assert held[2].recv(1) == b"y"
    finally:
        for c in held:
            c.close()


def test_bytes_are_counted_while_the_connection_is_open(
    engines: Callable[..., Engines], echo: Echo
) -> None:
    group = engines()
    group.set_pool([(5, echo.packed)])
    with socket.create_connection((LOCAL, group.port), timeout=5) as c:
        c.sendall(b"z" * 5000)
        got = 0
        while got < 5000:
            got += len(c.recv(65536))
        # The counter moves just after the send() the client read from: wait for it.
        wait_for(
            lambda: group.engines[0].service_counts(1)[:3] == (5000, 5000, 1),
            "the live byte counts",
        )


# ---- listeners over both relays (the Python relay is the oracle) ----------------------------


@pytest.fixture(params=["splice", "python"])
def relay_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


async def _until(predicate: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("shards", [1, 2])
async def test_metric_totals_equal_what_the_clients_did(
    relay_kind: str, shards: int, echo: Echo
) -> None:
    metrics = Metrics()
    relay = make_relay(relay_kind, shards=shards)
    if relay.acceptor is not None:  # the engine counts what it accepts itself
        metrics.counters.append(relay.acceptor.counts)
    await relay.start()
    loop = asyncio.get_running_loop()
    pool = Pool(now=loop.time, rng=random.Random(5))
    pool.update({"i0": echo.address})
    listener = Listener(
        "svc",
        "tcp",
        LOCAL,
        pool,
        relay,
        connect_timeout=1.0,
        on_connection=metrics.on_connection,
        on_done=metrics.on_done,
        budget=ConnectionBudget(),
    )
    port = listener.open()
    try:
        sizes = [random.Random(i).randrange(1, 200_000) for i in range(40)]
        replies = await asyncio.gather(*(_exchange(port, b"q" * n) for n in sizes))
        assert [len(r) for r in replies] == sizes
        await _until(lambda: metrics.totals()[2].get("svc", 0) == 0, "active to drop")
        connections, byte_counts, _, _ = metrics.totals()
        assert connections == {("i0", LOCAL, LOCAL, "tcp", "svc"): len(sizes)}
        assert byte_counts == {
            ("svc", "to_instance"): sum(sizes),
            ("svc", "to_client"): sum(sizes),
        }
    finally:
        listener.close()
        await relay.close(1.0)


async def test_an_instance_on_probation_is_probed_by_the_pool(echo: Echo) -> None:
    """The engine hands clients to the pool while an instance is on probation; once the
    probe succeeded the engine picks again."""
    relay = make_relay("splice", shards=2)
    await relay.start()
    loop = asyncio.get_running_loop()
    now = [100.0]
    pool = Pool(now=lambda: now[0], rng=random.Random(1))
    pool.update({"i0": echo.address})
    listener = Listener("svc", "tcp", LOCAL, pool, relay, connect_timeout=1.0)
    port = listener.open()
    engine = relay.engine  # type: ignore[attr-defined]

    def to_python() -> int:
        shards = relay.engines  # type: ignore[attr-defined]
        return sum(int(shard.stats()["to_python"]) for shard in shards)

    try:
        assert await _exchange(port, b"a") == b"a"
        assert to_python() == 0
        pool.failed("i0")  # queued, due after 1 s of the pool's clock
        await asyncio.sleep(0.05)
        now[0] += 2  # due: the next client must go through the pool, which probes i0
        listener._push_pool()  # the pool's clock jumped; the listener pushes on changes
        assert await _exchange(port, b"b") == b"b"
        assert pool.healthy("i0")  # the probe succeeded
        assert to_python() >= 1
        # The new snapshot reaches the shards soon after: from then on none is handed over.
        async with asyncio.timeout(5):
            while True:
                handed = to_python()
                for _ in range(5):
                    assert await _exchange(port, b"c") == b"c"
                if to_python() == handed:
                    break
        # Each client has closed; the engine retires its connection on its own thread.
        async with asyncio.timeout(5):
            while engine.held:
                await asyncio.sleep(0.01)
    finally:
        listener.close()
        await loop.create_task(relay.close(1.0))


# argv: the port of the one-port ephemeral range, and who connects: "submitted" (the caller
# hands the engine a client to connect) or "accepted" (the engine accepts the client itself and
# its snapshot's target is that port, so set_pool marks it for the check; the listening socket
# and the client use ports outside the range, which stays free for the upstream).
_SELF_CONNECT = """
import errno, socket, sys, time
from flux._splice import SpliceEngine
from flux.relay import packed_sockaddr
engine = SpliceEngine()
engine.start()
target = packed_sockaddr("127.0.0.1", int(sys.argv[1]))
if sys.argv[2] == "submitted":
    client, other = socket.socketpair()
    engine.connect(client.detach(), target, 1, 2.0)
else:
    server = socket.create_server(("127.0.0.1", 30001))
    engine.set_pool(1, [(5, target)], False, 0)
    engine.listen(1, server.detach(), connect_timeout=2.0)
    client = socket.socket()
    client.bind(("127.0.0.2", 30002))
    client.connect(("127.0.0.1", 30001))
    client.sendall(b"x")
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    drained = engine.drain_all()
    if drained.established:
        print("established")
        break
    if drained.completions:
        ended = drained.completions[0]
        print("handed back", errno.errorcode[ended.errno], ended.client_fd >= 0)
        break
    if drained.handed:
        handed = drained.handed[0]
        print("handed back", errno.errorcode.get(handed.errno, handed.errno), "to", handed.instance)
        break
    time.sleep(0.01)
engine.stop()
"""


def test_an_upstream_connected_to_itself_is_a_failed_connect() -> None:
    """With one source port left (40000) and nobody listening on it, a connect to
    127.0.0.1:40000 connects the socket to itself (TCP simultaneous open): every byte would
    come back to the client.  The engine must see a failed connect, not an instance, both for
    a connection the caller submits and for a client the engine accepted itself."""
    name = f"fluxself{random.randrange(1 << 20):x}"
    add_netns(name)
    try:
        netns_run(name, "ip", "link", "set", "lo", "up")
        netns_run(name, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 40000")
        result = netns_run(name, sys.executable, "-c", _SELF_CONNECT, "40000", "submitted")
        assert result.stdout.strip() == "handed back ECONNREFUSED True", result
        # The first one left port 40000 in TIME_WAIT: the second gets a port of its own.
        netns_run(name, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40001 40001")
        result = netns_run(name, sys.executable, "-c", _SELF_CONNECT, "40001", "accepted")
        assert result.stdout.strip() == "handed back ECONNREFUSED to 5", result
    finally:
        delete_netns(name)


def test_only_targets_that_could_meet_themselves_are_checked() -> None:
    """set_pool marks a target for the self-connect check (a getsockname() per connection)
    only when it is an IPv4 address of this host on a port of the ephemeral range."""
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert _may_meet_itself(packed_sockaddr("127.0.0.1", low))
    assert _may_meet_itself(packed_sockaddr("127.3.4.5", high))  # all of 127/8 is local
    assert not _may_meet_itself(packed_sockaddr("127.0.0.1", low - 1))
    assert high == 65535 or not _may_meet_itself(packed_sockaddr("127.0.0.1", high + 1))
    assert not _may_meet_itself(packed_sockaddr("192.0.2.7", low))  # TEST-NET-1: never local
    assert not _may_meet_itself(packed_sockaddr("::1", low))  # the check looks at IPv4 only
