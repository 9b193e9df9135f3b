"""The relay suites' harness: a started relay between two loopback listeners, and the test's
two ends of every connection it relays.

``client`` is the test's end of the client connection, ``server`` its end of the upstream
connection, so a scenario can half-close, reset, read slowly or stop reading on either side.
:func:`run` runs a scenario under a deadline on a fresh uvloop loop and then checks that no
descriptor, pipe, buffer or task outlived it.  Used by tests/test_relay.py (the behaviour
suite) and tests/test_relay_http.py (the HTTP suite), each against both relays (``KINDS``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sized
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop

from flux.model import ConnectionInfo
from flux.relay import ExchangeObserver, PythonRelay, RelayResult, SpliceRelay, make_relay

KINDS = ["splice", "python"]
LOOPBACK = "127.0.0.1"
MiB = 1 << 20
RESET_LINGER = struct.pack("ii", 1, 0)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def describe(fds: set[int]) -> list[str]:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd} -> ?")
    return out


@dataclass
class Link:
    """One relayed connection, seen from the test's two ends."""

    client: socket.socket
    server: socket.socket
    result: asyncio.Future[RelayResult]


class Harness:
    """A started relay plus front/back listeners; tracks every socket the test opens."""

    def __init__(self, kind: str, options: dict[str, Any]) -> None:
        self.kind = kind
        self.relay = make_relay(kind, **options)  # type: ignore[arg-type]
        self.sockets: list[socket.socket] = []
        self.links: list[Link] = []
        # Concurrent accepts on one listener may take each other's connections: one at a time.
        self.opening = asyncio.Lock()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.relay.start()
        self.front = self.listener()
        self.back = self.listener()

    def listener(self) -> socket.socket:
        sock = socket.create_server((LOOPBACK, 0), backlog=4096)
        sock.setblocking(False)
        self.sockets.append(sock)
        return sock

    async def pair(self, listener: socket.socket) -> tuple[socket.socket, socket.socket]:
        near = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        near.setblocking(False)
        try:
            await self.loop.sock_connect(near, listener.getsockname())
            far, _ = await self.loop.sock_accept(listener)
        except BaseException:
            near.close()
            raise
        far.setblocking(False)
        return near, far

    async def open(
        self,
        *,
        buffers: int | None = None,
        http: bool = False,
        observe: ExchangeObserver | None = None,
        info: ConnectionInfo | None = None,
        pin_host: bool = False,
        forwarded: bool = False,
    ) -> Link:
        """A client connected through the relay to the test's server end.

        ``buffers`` pins SO_SNDBUF/SO_RCVBUF on all four sockets, so that what the kernel
        buffers is bounded and what the relay buffers can be told apart; ``info`` names the
        service and instance in the connection's notices; ``pin_host`` and ``forwarded`` as
        for submit.
        """
        async with self.opening:
            client, relay_client = await self.pair(self.front)
            self.sockets.append(client)
            relay_upstream, server = await self.pair(self.back)
            self.sockets.append(server)
        if buffers is not None:
            for sock in (client, relay_client, relay_upstream, server):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        link = Link(
            client,
            server,
            self.relay.submit(
                relay_client,
                relay_upstream,
                http=http,
                observe=observe,
                info=info,
                pin_host=pin_host,
                forwarded=forwarded,
            ),
        )
        self.links.append(link)
        return link

    async def reported(self, seen: Sized, count: int, timeout: float = 5.0) -> None:
        """Wait until an observer's ``seen`` holds ``count`` exchanges (a flush delivers the
        engine's at once); flush once more after, so nothing reported late is pending."""
        deadline = time.monotonic() + timeout
        while len(seen) < count:
            self.relay.flush()
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(seen)} of {count} exchanges reported: {seen}")
            await asyncio.sleep(0.01)
        self.relay.flush()

    async def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        await self.relay.close(grace=5.0)


def run(
    kind: str,
    scenario: Callable[[Harness], Awaitable[None]],
    *,
    deadline: float = 60.0,
    **options: Any,
) -> Harness:
    """Run a scenario on a fresh uvloop loop and check that it leaked nothing."""
    # uvloop opens one process-wide pipe with its first loop; let that happen outside the count.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.sleep(0))
    fds_before = open_fds()
    harness: Harness | None = None

    async def main() -> None:
        nonlocal harness
        harness = Harness(kind, options)
        await harness.start()
        try:
            async with asyncio.timeout(deadline):
                await scenario(harness)
        finally:
            await harness.close()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert leftover == [], f"tasks outlived the scenario: {leftover}"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert harness is not None
    # Clients that close from threads of their own (grpcio's poller) may still be closing:
    # a descriptor still open after a short wait is a leak.
    deadline = time.monotonic() + 2.0
    leaked = open_fds() - fds_before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.02)
        leaked = open_fds() - fds_before
    assert not leaked, f"descriptors leaked: {describe(leaked)}"
    assert harness.relay.active == 0
    if isinstance(harness.relay, SpliceRelay):
        stats = harness.relay.engine.stats()
        assert stats["active"] == 0, stats
        assert stats["sockets_owned"] == 0, stats
        assert stats["pipes_lent"] == 0, stats
        assert stats["pipes_open"] == 0, stats
        assert stats["inflight_bytes"] == 0, stats
        assert stats["buffers_lent"] == 0, stats
    return harness


H2_COUNTERS = ("http_h2", "http_h2_gave_up", "http_h2_untracked")


def h2_counts(relay: object) -> tuple[int, int, int]:
    """What a relay counted of HTTP/2 observation (H2_COUNTERS): the engine's counters of the
    splice relay, the Python relay's own under the same names."""
    if isinstance(relay, SpliceRelay):
        stats = relay.engine.stats()
        return (stats["http_h2"], stats["http_h2_gave_up"], stats["http_h2_untracked"])
    assert isinstance(relay, PythonRelay)
    counters = relay.h2_counters
    return (counters.http_h2, counters.http_h2_gave_up, counters.http_h2_untracked)


# ---- endpoint helpers (the test's two ends) -----------------------------------------------------


async def send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, min(65536, n - len(out)))
        if not chunk:
            raise AssertionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


async def recv_to_eof(sock: socket.socket, size: int = 65536) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, size):
        out += chunk
    return bytes(out)


async def expect_reset(sock: socket.socket) -> None:
    """Read until the socket reports a reset; an orderly EOF fails the test."""
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectionResetError):
        while await loop.sock_recv(sock, 65536):
            pass


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
    sock.close()


class Pattern:
    """A non-periodic byte stream (slices of a random block at shifting offsets) and its hash."""

    block = os.urandom(4 * MiB)

    def __init__(self, total: int, seed: int) -> None:
        self.total = total
        self.seed = seed

    def chunks(self, size: int = MiB - 4099) -> Any:
        sent = 0
        k = self.seed
        while sent < self.total:
            n = min(size, self.total - sent)
            start = (k * 7919) % (len(self.block) - n)
            yield self.block[start : start + n]
            sent += n
            k += 1

    def digest(self) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()


def blocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(True)
    sock.settimeout(30.0)
    return sock


def send_pattern(sock: socket.socket, pattern: Pattern, progress: list[int] | None = None) -> str:
    h = hashlib.sha256()
    for chunk in pattern.chunks():
        sock.sendall(chunk)
        h.update(chunk)
        if progress is not None:
            progress[0] += len(chunk)
    sock.shutdown(socket.SHUT_WR)
    return h.hexdigest()


def receive_digest(sock: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    buf = bytearray(MiB)
    view = memoryview(buf)
    total = 0
    while n := sock.recv_into(buf):
        h.update(view[:n])
        total += n
    return total, h.hexdigest()


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
