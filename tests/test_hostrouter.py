"""flux.balancer.hostrouter: the first request head (or TLS ClientHello) of a port shared by
host name, on real loopback sockets, with listeners that only record the clients they are handed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import cast

import pytest

from flux.balancer.entrypoints import HostRoutes
from flux.balancer.hostrouter import HEAD_MAX, NO_SNI_MATCH, HostRouter
from flux.balancer.listener import ConnectionBudget, Listener
from flux.model import Protocol
from flux.relay.notices import NoticeLimiter
from tests.support.tls import client_hello, refragment

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Taker:
    """A service's listener as the router sees it: takes client descriptors."""

    def __init__(self) -> None:
        self.taken: list[socket.socket] = []

    def take(self, client_fd: int, client_ip: str) -> None:
        assert client_ip == "127.0.0.1"
        self.taken.append(socket.socket(fileno=client_fd))

    def abort_connecting(self) -> None:
        """Nothing is connecting here."""


class Router:
    def __init__(self, default: bool, timeout: float, protocol: Protocol = "http") -> None:
        self.www, self.fallback = _Taker(), _Taker()
        self.answered: list[tuple[str, int | str]] = []
        self.budget = ConnectionBudget()
        listeners = {"www": cast(Listener, self.www), "fallback": cast(Listener, self.fallback)}
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.router = HostRouter(
            "127.0.0.1",
            self.port,
            f"published:{self.port}",
            HostRoutes((("www.example.test", "www"),), "fallback" if default else None),
            listeners,
            notices=NoticeLimiter(),
            header_timeout=timeout,
            on_answered=lambda entry, status: self.answered.append((entry, status)),
            budget=self.budget,
            protocol=protocol,
        )
        self.router.open()
        self.clients: list[socket.socket] = []

    async def client(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        self.clients.append(sock)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        return sock

    def close(self) -> None:
        self.router.close()
        for sock in self.clients + self.www.taken + self.fallback.taken:
            sock.close()


async def read_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    data = b""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    return data


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
async def router(request: pytest.FixtureRequest) -> AsyncIterator[Router]:
    made = Router(*getattr(request, "param", (False, 5.0)))
    yield made
    made.close()
    assert made.budget.held == 0


async def test_a_head_in_pieces_is_peeked_whole_and_left_in_the_socket(router: Router) -> None:
    calls = 0
    readable = router.router._readable

    def counted(r: object) -> None:
        nonlocal calls
        calls += 1
        readable(r)  # type: ignore[arg-type]

    router.router._readable = counted  # type: ignore[method-assign]
    sock = await router.client()
    head = b"GET / HTTP/1.1\r\nUser-Agent: t\r\nHost: WWW.example.test:80\r\n\r\n"
    for piece in (head[:10], head[10:30], head[30:]):
        sock.send(piece)
        await asyncio.sleep(0.05)
    await wait_for(lambda: router.www.taken)
    # Woken once per piece (SO_RCVLOWAT), not once per loop iteration for the bytes peeked.
    assert calls <= 4
    (taken,) = router.www.taken
    assert taken.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    taken.setblocking(True)
    taken.settimeout(2)
    assert taken.recv(65536) == head
    assert router.budget.held == 1  # the service's listener gives it back
    router.budget.release()


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        (b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n", b"for host nowhere.test"),
        (b"GET / HTTP/1.0\r\n\r\n", b"without a Host"),
        (b"GET / HTTP/1.1\r\nHost: \x01bad\r\n\r\n", b"for host ?bad"),
    ],
)
async def test_an_unknown_or_missing_host_is_answered_404_naming_it(
    router: Router, request_: bytes, named: bytes
) -> None:
    sock = await router.client()
    sock.send(request_)
    answer = await read_to_eof(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"Connection: close" in head
    assert named in body and body.endswith(b"\n") and body.count(b"\n") == 1
    assert router.answered == [(f"published:{router.port}", 404)]
    assert not router.www.taken


@pytest.mark.parametrize("router", [(True, 5.0)], indirect=True)
async def test_the_default_takes_unknown_hosts_and_http2(router: Router) -> None:
    for data in (b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n", PREFACE + b"\0\0\0\4\0\0\0\0\0"):
        sock = await router.client()
        sock.send(data)
    await wait_for(lambda: len(router.fallback.taken) == 2)
    assert router.answered == [] and not router.www.taken
    for taken in router.fallback.taken:
        router.budget.release()
        taken.close()
    router.fallback.taken.clear()


async def test_http2_without_a_default_is_closed(router: Router) -> None:
    sock = await router.client()
    sock.send(PREFACE[:10])
    await asyncio.sleep(0.05)
    sock.send(PREFACE[10:])
    with contextlib.suppress(ConnectionResetError):
        assert await read_to_eof(sock) == b""
    assert router.answered == []


@pytest.mark.parametrize("router", [(False, 0.3)], indirect=True)
async def test_the_header_timeout_answers_408_or_closes_a_silent_client(router: Router) -> None:
    silent = await router.client()
    started = await router.client()
    started.send(b"GET / HTTP/1.1\r\nHost: www.exa")
    assert await read_to_eof(silent) == b""
    answer = await read_to_eof(started)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert router.answered == [(f"published:{router.port}", 408)]


async def test_a_first_head_over_the_limit_is_answered_431(router: Router) -> None:
    sock = await router.client()
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nX-Long: " + b"a" * HEAD_MAX)
    answer = await read_to_eof(sock)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


async def test_closing_the_router_closes_the_clients_it_reads(router: Router) -> None:
    sock = await router.client()
    sock.send(b"GET / HTTP/1.1\r\n")
    await wait_for(lambda: router.budget.held == 1)
    router.router.close()
    with contextlib.suppress(ConnectionResetError):
        assert await read_to_eof(sock) == b""
    assert router.budget.held == 0


# -- tcp: the TLS server name (SNI) ------------------------------------------------------------


def _taken_whole(taker: _Taker, sent: bytes) -> None:
    """``taker`` was handed one client whose bytes are all still unread."""
    (taken,) = taker.taken
    assert taken.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    taken.setblocking(True)
    taken.settimeout(2)
    data = b""
    while len(data) < len(sent):
        data += taken.recv(65536)
    assert data == sent


@pytest.mark.parametrize("router", [(False, 5.0, "tcp")], indirect=True)
async def test_a_tls_client_is_handed_on_by_server_name_untouched(router: Router) -> None:
    hello = refragment(client_hello("WWW.example.test"), 64)
    sock = await router.client()
    for at in range(0, len(hello), 200):
        sock.send(hello[at : at + 200])
        await asyncio.sleep(0.02)
    await wait_for(lambda: router.www.taken)
    _taken_whole(router.www, hello)
    assert router.answered == []
    router.budget.release()


@pytest.mark.parametrize("router", [(False, 5.0, "tcp")], indirect=True)
@pytest.mark.parametrize(
    "first", [client_hello("nowhere.example.test"), client_hello(None), b"SSH-2.0-x\r\n"]
)
async def test_no_server_name_match_and_no_default_is_closed_and_counted(
    router: Router, first: bytes
) -> None:
    sock = await router.client()
    sock.send(first)
    with contextlib.suppress(ConnectionResetError):
        assert await read_to_eof(sock) == b""
    assert router.answered == [(f"published:{router.port}", NO_SNI_MATCH)]
    assert not router.www.taken and not router.fallback.taken


@pytest.mark.parametrize("router", [(True, 5.0, "tcp")], indirect=True)
async def test_the_default_takes_unknown_names_and_clients_without_tls(router: Router) -> None:
    for first in (client_hello("nowhere.example.test"), client_hello(None), b"SSH-2.0-x\r\n"):
        sock = await router.client()
        sock.send(first)
        await wait_for(lambda: router.fallback.taken)
        _taken_whole(router.fallback, first)
        router.budget.release()
        router.fallback.taken.pop().close()
    assert router.answered == [] and not router.www.taken


@pytest.mark.parametrize("router", [(True, 0.3, "tcp")], indirect=True)
async def test_an_incomplete_client_hello_is_closed_at_the_header_timeout(
    router: Router,
) -> None:
    sock = await router.client()
    sock.send(client_hello("www.example.test")[:20])
    with contextlib.suppress(ConnectionResetError):
        assert await read_to_eof(sock) == b""
    assert router.answered == [] and not router.fallback.taken
