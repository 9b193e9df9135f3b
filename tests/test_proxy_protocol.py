"""The PROXY protocol header a tcp service's instances get first (fluxctl --proxy-protocol).

The header itself against the examples of HAProxy's proxy-protocol.txt; then through a listener
as fluxd runs it, on each path a connection can take: the engine accepting (the engine makes
the header), the engine connecting a client the listener picked for (the listener makes it,
the engine sends it first), and the Python relay (the listener sends it on the instance socket
it connected).  The instance is a plain socket that checks the exact bytes, then a real HAProxy
(``bind ... accept-proxy``) that answers with the client address it read from the header.
Everything listens on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flux._splice import SpliceEngine
from flux.balancer.listener import ConnectionBudget, Listener
from flux.balancer.pool import Pool
from flux.model import ProxyProtocol
from flux.relay import make_relay, packed_sockaddr
from flux.relay.proxy_protocol import PROXY_V2_SIGNATURE, PROXY_VERSIONS, proxy_header
from tests.support.haproxy import haproxy_reading_proxy_headers

LOOPBACK = "127.0.0.1"
PATHS = ["engine-accepts", "engine-connects", "python"]
VERSIONS: list[ProxyProtocol] = ["v1", "v2"]


# -- the header -----------------------------------------------------------------------------------


def test_v1_is_the_text_line_of_the_spec() -> None:
    assert proxy_header(1, ("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert proxy_header(1, ("fd00::1", 4), ("::1", 80)) == b"PROXY TCP6 fd00::1 ::1 4 80\r\n"
    longest = proxy_header(1, ("ffff:" * 7 + "ffff", 65535), ("ffff:" * 7 + "ffff", 65535))
    assert len(longest) == 104  # within the spec's 107, which RELAY_PREFACE_MAX holds
    assert proxy_header(1, ("127.0.0.1", 1), ("::1", 2)) == b"PROXY UNKNOWN\r\n"


def test_v2_is_the_binary_block_of_the_spec() -> None:
    header = proxy_header(2, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert header == (
        PROXY_V2_SIGNATURE
        + b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 bytes follow
        + bytes([192, 168, 0, 1, 192, 168, 0, 11])
        + (56324).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
    )
    six = proxy_header(2, ("fd00::1", 4), ("::1", 80))
    assert six[12:16] == b"\x21\x21\x00\x24" and len(six) == 16 + 36
    assert proxy_header(2, ("127.0.0.1", 1), ("::1", 2)) == PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        proxy_header(3, ("127.0.0.1", 1), ("127.0.0.1", 2))


# -- through a listener ---------------------------------------------------------------------------


def test_the_engine_refuses_a_bad_preface_or_version() -> None:
    engine = SpliceEngine()
    engine.start()
    try:
        address = packed_sockaddr("127.0.0.1", 9)
        too_long = pytest.raises(ValueError, match="preface must be at most 108 bytes, got 109")
        with socket.socket() as client, too_long:
            engine.connect(client.fileno(), address, 1, 1.0, preface=b"x" * 109)
        bad_version = pytest.raises(ValueError, match="proxy_protocol must be 0, 1 or 2, got 3")
        with socket.create_server((LOOPBACK, 0)) as server, bad_version:
            engine.listen(1, server.fileno(), proxy_protocol=3)
    finally:
        engine.stop()


@contextlib.asynccontextmanager
async def listening(
    path: str, version: ProxyProtocol, instance_address: str, dead: str | None = None
) -> AsyncIterator[tuple[Listener, int]]:
    """A listener of tcp service "db" with ``version``'s header, over the relay ``path``
    needs, its instance at ``instance_address`` (and one at ``dead``, where nothing listens);
    yields it and its port."""
    relay = make_relay("python" if path == "python" else "splice")
    await relay.start()
    loop = asyncio.get_running_loop()
    pool = Pool(now=loop.time, rng=random.Random(3))
    pool.update({"i0": instance_address} | ({"dead": dead} if dead else {}))
    listener = Listener("db", "tcp", LOOPBACK, pool, relay, connect_timeout=2.0,
                        budget=ConnectionBudget(), proxy_protocol=version)  # fmt: skip
    port = listener.open()
    try:
        yield listener, port
    finally:
        listener.close()
        await relay.close(1.0)


async def client_through(
    path: str, listener: Listener, port: int
) -> tuple[socket.socket, tuple[str, int]]:
    """A client connected the way ``path`` takes; returns it (non-blocking) and the address it
    reached, which the header must name as the server's."""
    if path != "engine-connects":
        client = socket.create_connection((LOOPBACK, port))
        client.setblocking(False)
        return client, (LOOPBACK, port)
    # The engine hands a client over when it cannot pick itself; here the hand-over is made
    # directly, with a client accepted on a socket of the test's own.
    with socket.create_server((LOOPBACK, 0)) as door:
        client = socket.create_connection(door.getsockname())
        accepted, peer = door.accept()
        reached = accepted.getsockname()
    listener.handed_over(accepted.detach(), peer[0], 0, 0)
    client.setblocking(False)
    return client, reached


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(data)), 5)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", PATHS)
async def test_the_instance_gets_the_header_then_the_client_s_bytes(
    path: str, version: ProxyProtocol
) -> None:
    """The pool also holds an instance where nothing listens: a client tried there first goes
    on to the live one with one header, the failed connect having sent nothing."""
    loop = asyncio.get_running_loop()
    instance = socket.create_server((LOOPBACK, 0))
    instance.setblocking(False)
    host, instance_port = instance.getsockname()
    with socket.create_server((LOOPBACK, 0)) as closed:
        dead = "{}:{}".format(*closed.getsockname())
    try:
        async with listening(path, version, f"{host}:{instance_port}", dead) as (listener, port):
            for _ in range(6):  # a header per connection, each naming its own client
                client, reached = await client_through(path, listener, port)
                with client:
                    expected = proxy_header(
                        PROXY_VERSIONS[version], client.getsockname(), reached
                    )
                    await loop.sock_sendall(client, b"hello")
                    upstream, _ = await asyncio.wait_for(loop.sock_accept(instance), 5)
                    with upstream:
                        got = await recv_exactly(upstream, len(expected) + 5)
                        assert got == expected + b"hello"
                        # Then the bytes flow both ways as on any tcp service.
                        await loop.sock_sendall(upstream, b"world")
                        assert await recv_exactly(client, 5) == b"world"
    finally:
        instance.close()


# -- a real server that reads it ------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", PATHS)
async def test_haproxy_behind_the_service_sees_the_client_s_address(
    path: str, version: ProxyProtocol, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    with haproxy_reading_proxy_headers(tmp_path, LOOPBACK) as (host, instance_port):
        async with listening(path, version, f"{host}:{instance_port}") as (listener, port):
            client, _ = await client_through(path, listener, port)
            with client:
                await loop.sock_sendall(
                    client, b"GET / HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n"
                )
                answer = b""
                while chunk := await asyncio.wait_for(loop.sock_recv(client, 4096), 5):
                    answer += chunk
                client_ip, client_port = client.getsockname()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert body.decode() == f"{client_ip} {client_port}"
