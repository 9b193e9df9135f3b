"""One behaviour suite, two relays: the compiled splice engine and its Python twin, the oracle.

Every scenario runs against both implementations on the uvloop event loop, over real loopback
sockets.  The test drives both ends of a relayed connection itself: ``client`` is the test's end
of the client connection, ``server`` the test's end of the upstream connection, so it can
half-close, reset, read slowly or stop reading on either side.  Each scenario runs under a
deadline, and its teardown checks that no descriptor, pipe or task outlived it.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import resource
import socket
import struct
import time

import pytest
import uvloop

from flux.relay import PythonRelay, RelayResult, SpliceRelay, make_relay, packed_sockaddr
from tests.support.relay_harness import (
    KINDS,
    LOOPBACK,
    Harness,
    Link,
    MiB,
    Pattern,
    blocking,
    describe,
    expect_reset,
    open_fds,
    receive_digest,
    recv_exactly,
    recv_to_eof,
    reset,
    run,
    send,
    send_pattern,
    wait_until,
)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---- the suite ----------------------------------------------------------------------------------


def test_small_messages_round_trip(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        link = await h.open()
        for i in range(200):
            request = b"ping %d " % i * (1 + i % 7)
            await send(link.client, request)
            assert await recv_exactly(link.server, len(request)) == request
            response = b"pong %d\n" % i
            await send(link.server, response)
            assert await recv_exactly(link.client, len(response)) == response
        # Partial reads: many tiny writes arrive intact and in order.
        for i in range(100):
            await send(link.server, bytes([i]))
        assert await recv_exactly(link.client, 100) == bytes(range(100))

    run(kind, scenario)


def test_half_close_from_client_keeps_the_reply_flowing(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        link = await h.open()
        await send(link.client, b"request body")
        link.client.shutdown(socket.SHUT_WR)
        # The server sees the request and then EOF ...
        assert await recv_to_eof(link.server) == b"request body"
        # ... and can still answer over the half-open connection.
        for _ in range(3):
            await send(link.server, b"reply part;")
            await asyncio.sleep(0.01)
        link.server.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(link.client) == b"reply part;" * 3
        result = await link.result
        assert result.error is None
        assert (result.to_upstream, result.to_client) == (12, 33)

    run(kind, scenario)


def test_half_close_from_server_keeps_the_request_flowing(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        link = await h.open()
        await send(link.server, b"banner")
        link.server.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(link.client) == b"banner"
        for _ in range(4):
            await send(link.client, b"late data;")
            await asyncio.sleep(0.01)
        link.client.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(link.server) == b"late data;" * 4
        result = await link.result
        assert result.error is None
        assert (result.to_upstream, result.to_client) == (40, 6)

    run(kind, scenario)


def test_bytes_and_eof_sent_before_the_hand_over_are_relayed(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        client, relay_client = await h.pair(h.front)
        h.sockets.append(client)
        relay_upstream, server = await h.pair(h.back)
        h.sockets.append(server)
        await send(client, b"early request")
        client.shutdown(socket.SHUT_WR)
        await send(server, b"early banner")
        server.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.05)
        result = h.relay.submit(relay_client, relay_upstream)
        assert await recv_to_eof(server) == b"early request"
        assert await recv_to_eof(client) == b"early banner"
        assert (await result).error is None

    run(kind, scenario)


def test_eof_both_ways_closes_both_sockets_and_reports_the_bytes(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        link = await h.open()
        await send(link.client, b"x" * 1000)
        await send(link.server, b"y" * 777)
        assert await recv_exactly(link.server, 1000) == b"x" * 1000
        assert await recv_exactly(link.client, 777) == b"y" * 777
        before = len(open_fds())
        link.client.shutdown(socket.SHUT_WR)
        link.server.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(link.client) == b""
        assert await recv_to_eof(link.server) == b""
        result = await link.result
        assert (result.to_upstream, result.to_client, result.error) == (1000, 777, None)
        assert result.duration > 0
        # The relay's two sockets are gone once the result is in.
        assert len(open_fds()) == before - 2
        assert h.relay.active == 0

    run(kind, scenario)


def test_reset_from_server_reaches_the_client(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        link = await h.open()
        await send(link.client, b"hello")
        assert await recv_exactly(link.server, 5) == b"hello"
        reset(link.server)
        await expect_reset(link.client)
        result = await link.result
        assert result.error == "ECONNRESET"
        assert result.to_upstream == 5

    run(kind, scenario)


def test_reset_from_client_reaches_the_server(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        link = await h.open()
        await send(link.server, b"welcome")
        assert await recv_exactly(link.client, 7) == b"welcome"
        reset(link.client)
        await expect_reset(link.server)
        result = await link.result
        assert result.error == "ECONNRESET"
        assert result.to_client == 7

    run(kind, scenario)


def test_reset_after_half_close_still_propagates(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        link = await h.open()
        link.client.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(link.server) == b""
        # The client direction is finished; a reset from the server must still reach it.
        reset(link.server)
        await expect_reset(link.client)
        assert (await link.result).error == "ECONNRESET"

    run(kind, scenario)


def test_large_transfer_both_ways_with_checksums(kind: str) -> None:
    size = 128 * MiB

    async def scenario(h: Harness) -> None:
        link = await h.open()
        up, down = Pattern(size, 1), Pattern(size, 2)
        client, server = blocking(link.client), blocking(link.server)
        sent_up, sent_down, got_up, got_down = await asyncio.gather(
            asyncio.to_thread(send_pattern, client, up),
            asyncio.to_thread(send_pattern, server, down),
            asyncio.to_thread(receive_digest, server),
            asyncio.to_thread(receive_digest, client),
        )
        assert got_up == (size, sent_up)
        assert got_down == (size, sent_down)
        result = await link.result
        assert (result.to_upstream, result.to_client, result.error) == (size, size, None)
        if isinstance(h.relay, SpliceRelay):
            stats = h.relay.engine.stats()
            # Bulk flows go through pipes, and at most one pipe per direction is in use.
            assert stats["bytes_spliced"] > 0.9 * 2 * size, stats
            assert stats["pipes_created"] <= 2, stats

    run(kind, scenario)


def test_slow_reader_stalls_the_writer_with_bounded_buffering(kind: str) -> None:
    total = 48 * MiB
    kernel_buffer = 128 * 1024

    async def scenario(h: Harness) -> None:
        link = await h.open(buffers=kernel_buffer)
        pattern = Pattern(total, 3)
        progress = [0]
        server = blocking(link.server)
        sender = asyncio.create_task(asyncio.to_thread(send_pattern, server, pattern, progress))
        loop = asyncio.get_running_loop()
        received = 0
        h_recv = hashlib.sha256()
        max_inflight = 0
        max_pipes = 0
        # Phase 1: a reader that takes 64 KiB every 10 ms (about 6 MiB/s).
        slow_until = time.monotonic() + 1.0
        while time.monotonic() < slow_until:
            chunk = await loop.sock_recv(link.client, 65536)
            h_recv.update(chunk)
            received += len(chunk)
            max_inflight = max(max_inflight, h.relay.inflight_bytes)
            if isinstance(h.relay, SpliceRelay):
                max_pipes = max(max_pipes, h.relay.engine.pipes_lent)
            await asyncio.sleep(0.01)
        ahead = progress[0] - received
        # The writer is held back: only kernel buffers (four sockets of 128 KiB, doubled by
        # the kernel) and the relay's own bounded buffer sit between the two ends.
        assert progress[0] < total / 2, f"writer got {progress[0]} bytes ahead of a slow reader"
        assert ahead < 6 * MiB, f"{ahead} bytes buffered between writer and reader"
        assert max_inflight <= 2 * MiB + 64 * 1024, max_inflight
        assert max_pipes <= 2
        # Phase 2: read the rest at full speed; nothing was lost or reordered.
        while chunk := await loop.sock_recv(link.client, MiB):
            h_recv.update(chunk)
            received += len(chunk)
        assert await sender == h_recv.hexdigest()
        assert received == total
        link.client.shutdown(socket.SHUT_WR)
        result = await link.result
        assert (result.to_client, result.error) == (total, None)

    run(kind, scenario)


def test_a_bulk_flow_does_not_starve_small_exchanges(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        bulk = await h.open()
        chat = await h.open()
        pattern = Pattern(256 * MiB, 5)
        transfer = asyncio.gather(
            asyncio.to_thread(send_pattern, blocking(bulk.server), pattern),
            asyncio.to_thread(receive_digest, blocking(bulk.client)),
        )
        await asyncio.sleep(0.05)
        rounds, worst = 0, 0.0
        while not transfer.done() and rounds < 2000:
            started = time.monotonic()
            await send(chat.client, b"?" * 100)
            await recv_exactly(chat.server, 100)
            await send(chat.server, b"!" * 100)
            await recv_exactly(chat.client, 100)
            worst = max(worst, time.monotonic() - started)
            rounds += 1
        sent, received = await transfer
        assert received == (pattern.total, sent)
        assert rounds >= 10, f"only {rounds} round trips during the transfer"
        assert worst < 0.25, f"a round trip took {worst:.3f} s next to a bulk flow"

    run(kind, scenario)


def test_many_concurrent_connections(kind: str) -> None:
    count = 800

    async def converse(link: Link, i: int) -> None:
        for round_ in range(3):
            request = b"req %d.%d\n" % (i, round_)
            await send(link.client, request)
            assert await recv_exactly(link.server, len(request)) == request
            await send(link.server, request.upper() * 10)
            assert await recv_exactly(link.client, 10 * len(request)) == request.upper() * 10
        link.client.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(link.server) == b""
        link.server.close()
        assert await recv_to_eof(link.client) == b""
        result = await link.result
        assert result.error is None
        assert result.to_client == 10 * result.to_upstream > 0

    async def scenario(h: Harness) -> None:
        links = [await h.open() for _ in range(count)]
        await asyncio.sleep(0.05)
        assert h.relay.active == count
        await asyncio.gather(*(converse(link, i) for i, link in enumerate(links)))
        assert h.relay.active == 0

    run(kind, scenario)


def test_connection_churn(kind: str) -> None:
    total, parallel = 3000, 64

    async def one(h: Harness, i: int) -> None:
        link = await h.open()
        request = b"GET /%d\r\n" % i
        await send(link.client, request)
        if i % 2:
            # Client half-closes first: the upstream side sees the second EOF.
            link.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(link.server) == request
            await send(link.server, b"ok")
            link.server.shutdown(socket.SHUT_WR)
        else:
            # Server answers and closes first: the client side sees the second EOF.
            assert await recv_exactly(link.server, len(request)) == request
            await send(link.server, b"ok")
            link.server.shutdown(socket.SHUT_WR)
            await asyncio.sleep(0)
            link.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(link.server) == b""
        assert await recv_to_eof(link.client) == b"ok"
        result = await link.result
        assert (result.to_upstream, result.to_client, result.error) == (len(request), 2, None)
        link.client.close()
        link.server.close()
        h.sockets.remove(link.client)
        h.sockets.remove(link.server)
        h.links.remove(link)

    async def scenario(h: Harness) -> None:
        gate = asyncio.Semaphore(parallel)

        async def bounded(i: int) -> None:
            async with gate:
                await one(h, i)

        started = time.monotonic()
        await asyncio.gather(*(bounded(i) for i in range(total)))
        assert h.relay.active == 0
        assert time.monotonic() - started < 45

    run(kind, scenario)


def test_idle_connections_hold_no_pipes_or_buffers(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        idle = [await h.open() for _ in range(1000)]
        busy = [await h.open() for _ in range(50)]
        payload = os.urandom(2 * MiB)

        async def bulk(link: Link) -> None:
            await asyncio.gather(send(link.server, payload), send(link.client, payload))
            got_client, got_server = await asyncio.gather(
                recv_exactly(link.client, len(payload)), recv_exactly(link.server, len(payload))
            )
            assert got_client == got_server == payload

        await asyncio.gather(*(bulk(link) for link in busy))
        await wait_until(lambda: h.relay.inflight_bytes == 0, 5.0, "buffers to drain")
        if isinstance(h.relay, SpliceRelay):
            engine = h.relay.engine
            assert engine.pipes_lent == 0
            # Copy buffers, too, are held only while bytes are in them.
            assert engine.stats()["buffers_lent"] == 0, engine.stats()
            assert 0 < engine.stats()["buffers_idle"] <= 256
            # Pipes were used while bytes were in flight, and pooled (not kept) afterwards.
            assert engine.stats()["pipes_created"] > 0
            assert engine.pipes_idle <= 64
        assert h.relay.active == 1050
        # Idle connections still work afterwards.
        for link in idle[:10] + busy[:10]:
            await send(link.client, b"still there?")
            assert await recv_exactly(link.server, 12) == b"still there?"

    run(kind, scenario)


def test_close_lets_transfers_finish_within_grace_then_cuts_the_rest(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        finishing = await h.open()
        stuck = await h.open()
        await send(stuck.client, b"hanging")

        async def serve_slowly() -> None:
            for _ in range(8):
                await send(finishing.server, b"z" * 65536)
                await asyncio.sleep(0.05)
            finishing.server.shutdown(socket.SHUT_WR)
            finishing.client.shutdown(socket.SHUT_WR)

        server_task = asyncio.create_task(serve_slowly())
        reader = asyncio.create_task(recv_to_eof(finishing.client))
        started = time.monotonic()
        grace = 1.5
        closing = asyncio.create_task(h.relay.close(grace=grace))
        await asyncio.sleep(0)
        with socket.socket() as a, socket.socket() as b, pytest.raises(RuntimeError):
            h.relay.submit(a, b)
        assert len(await reader) == 8 * 65536
        await server_task
        done = await finishing.result
        assert done.error is None and done.to_client == 8 * 65536
        assert time.monotonic() - started < grace
        await closing
        elapsed = time.monotonic() - started
        assert grace <= elapsed < grace + 2.0, elapsed
        cut = await stuck.result
        assert cut.error == "ECANCELED"
        assert cut.to_upstream == 7
        await expect_reset(stuck.client)
        await expect_reset(stuck.server)

    run(kind, scenario)


def test_descriptor_exhaustion_degrades_to_copying(kind: str) -> None:
    size = 16 * MiB

    async def scenario(h: Harness) -> None:
        link = await h.open()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        limit = max(open_fds()) + 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            # Take every free descriptor below the limit: the relay cannot create a pipe now.
            while True:
                try:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    break
            up = Pattern(size, 4)
            payload = b"".join(up.chunks())
            got, _ = await asyncio.gather(
                recv_exactly(link.server, size), send(link.client, payload)
            )
            assert hashlib.sha256(got).hexdigest() == up.digest()
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if isinstance(h.relay, SpliceRelay):
            stats = h.relay.engine.stats()
            assert stats["pipe_failures"] > 0, stats
            assert stats["pipes_created"] == 0, stats
        # With descriptors back, the same connection goes on (and may splice again).
        await send(link.client, b"after")
        assert await recv_exactly(link.server, 5) == b"after"

    run(kind, scenario)


# ---- engine specifics ---------------------------------------------------------------------------


def test_engine_copies_small_messages_and_splices_bulk() -> None:
    async def scenario(h: Harness) -> None:
        assert isinstance(h.relay, SpliceRelay)
        engine = h.relay.engine
        link = await h.open()
        for _ in range(50):
            await send(link.client, b"q" * 100)
            await recv_exactly(link.server, 100)
            await send(link.server, b"r" * 300)
            await recv_exactly(link.client, 300)
        stats = engine.stats()
        assert stats["calls_splice"] == 0 and stats["pipes_created"] == 0, stats
        payload = os.urandom(32 * MiB)
        got, _ = await asyncio.gather(recv_exactly(link.client, len(payload)),
                                      send(link.server, payload))
        assert got == payload
        stats = engine.stats()
        assert stats["bytes_spliced"] > 0.9 * len(payload), stats
        # After the bulk flow goes quiet, small messages are copied again.
        await wait_until(lambda: engine.pipes_lent == 0, 5.0, "the pipe to be returned")
        for _ in range(3):
            await send(link.server, b"r" * 300)
            await recv_exactly(link.client, 300)
        calls = engine.stats()["calls_splice"]
        for _ in range(20):
            await send(link.server, b"r" * 300)
            await recv_exactly(link.client, 300)
        assert engine.stats()["calls_splice"] == calls

    run("splice", scenario)


def test_engine_rejects_bad_settings_and_misuse() -> None:
    from flux._splice import SpliceEngine

    with pytest.raises(ValueError, match="pipe_size"):
        SpliceEngine(pipe_size=100)
    with pytest.raises(ValueError, match="small_buffer"):
        SpliceEngine(small_buffer=1)
    engine = SpliceEngine()
    with pytest.raises(RuntimeError, match="not running"):
        engine.add(0, 1, 1)
    engine.start()
    try:
        with pytest.raises(ValueError, match="distinct"):
            engine.add(5, 5, 1)
        with pytest.raises(RuntimeError):
            engine.start()
    finally:
        engine.stop()
    engine.stop()
    assert engine.eventfd == -1
    assert engine.drain() == []


def test_make_relay_defaults_to_the_engine() -> None:
    assert isinstance(make_relay(), SpliceRelay)
    assert isinstance(make_relay("python"), PythonRelay)
    with pytest.raises(ValueError, match="'splice' or 'python', got 'copy'"):
        make_relay("copy")  # type: ignore[arg-type]


class Outcome:
    """A ConnectHandler that records what became of one SpliceRelay.connect()."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.up = loop.create_future()
        self.result: asyncio.Future[RelayResult] = loop.create_future()
        self.failed: asyncio.Future[tuple[int, int]] = loop.create_future()

    def established(self) -> None:
        self.up.set_result(True)

    def ended(self, result: RelayResult) -> None:
        self.result.set_result(result)

    def connect_failed(self, client_fd: int, code: int) -> None:
        self.failed.set_result((client_fd, code))


def test_engine_connects_the_upstream_itself() -> None:
    # SpliceRelay.connect: the engine makes and connects the upstream socket; the handler
    # hears when it is up and when it ends; a failed or timed-out connect gives the client back
    # unread, so the caller can try elsewhere.
    async def scenario() -> None:
        before = open_fds()
        relay = SpliceRelay()
        await relay.start()
        servers = []
        try:
            for family, host in ((socket.AF_INET, LOOPBACK), (socket.AF_INET6, "::1")):
                server = socket.socket(family, socket.SOCK_STREAM)
                servers.append(server)
                server.bind((host, 0))
                server.listen(8)
                server.setblocking(False)
                client, ours = socket.socketpair()
                client.setblocking(False)
                outcome = Outcome()
                await send(client, b"sent before the connect")
                port = server.getsockname()[1]
                relay.connect(ours.detach(), packed_sockaddr(host, port), 2.0, outcome)
                upstream, _ = await asyncio.get_running_loop().sock_accept(server)
                await asyncio.wait_for(outcome.up, 5.0)
                assert await recv_exactly(upstream, 23) == b"sent before the connect"
                await send(upstream, b"answer")
                assert await recv_exactly(client, 6) == b"answer"
                client.shutdown(socket.SHUT_WR)
                upstream.shutdown(socket.SHUT_WR)
                assert await recv_to_eof(upstream) == b""
                result = await asyncio.wait_for(outcome.result, 5.0)
                assert (result.to_upstream, result.to_client, result.error) == (23, 6, None)
                client.close()
                upstream.close()

            # Refused: nothing listens on the port.
            port = servers[0].getsockname()[1]
            servers[0].close()
            client, ours = socket.socketpair()
            client.setblocking(False)
            await send(client, b"keep me")
            outcome = Outcome()
            relay.connect(ours.detach(), packed_sockaddr(LOOPBACK, port), 2.0, outcome)
            fd, code = await asyncio.wait_for(outcome.failed, 5.0)
            assert code == errno.ECONNREFUSED
            back = socket.socket(fileno=fd)
            assert back.recv(100) == b"keep me"  # unread: another instance can still take it
            back.close()
            client.close()
            assert not outcome.up.done() and not outcome.result.done()

            # Timed out: a listener whose accept queue is full drops the SYN.
            silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            servers.append(silent)
            silent.bind((LOOPBACK, 0))
            silent.listen(0)
            for _ in range(4):
                filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                servers.append(filler)
                filler.setblocking(False)
                filler.connect_ex(silent.getsockname())
            await asyncio.sleep(0.2)
            client, ours = socket.socketpair()
            outcome = Outcome()
            started = time.monotonic()
            relay.connect(ours.detach(), packed_sockaddr(*silent.getsockname()), 0.3, outcome)
            fd, code = await asyncio.wait_for(outcome.failed, 5.0)
            assert code == errno.ETIMEDOUT
            assert 0.25 <= time.monotonic() - started < 2.0
            os.close(fd)
            client.close()
            stats = relay.engine.stats()
            assert (stats["connects"], stats["connect_failures"]) == (4, 2), stats
            assert stats["sockets_owned"] == 0 and relay.active == 0, stats
        finally:
            for sock in servers:
                sock.close()
            await relay.close(1.0)
        assert open_fds() - before == set(), describe(open_fds() - before)

    uvloop.run(asyncio.wait_for(scenario(), 30))


def test_packed_sockaddr_is_what_the_kernel_takes() -> None:
    v4 = packed_sockaddr("10.1.2.3", 8080)
    assert len(v4) == 16 and v4[2:4] == struct.pack("!H", 8080) and v4[4:8] == bytes([10, 1, 2, 3])
    v6 = packed_sockaddr("fd00::2", 443)
    assert len(v6) == 28 and v6[2:4] == struct.pack("!H", 443)
    assert v6[8:24] == socket.inet_pton(socket.AF_INET6, "fd00::2")
    assert struct.unpack("=H", v4[:2])[0] == socket.AF_INET
    assert struct.unpack("=H", v6[:2])[0] == socket.AF_INET6
