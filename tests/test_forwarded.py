"""X-Forwarded-For on an http service's request heads (fluxctl --forwarded).

The rewrite of one head (flux.relay.forwarded, and the engine's C twin checked against it byte
for byte, on examples and on generated heads); the framer's HEAD events it is driven by; then
through a listener as fluxd runs it, on each path a connection can take (the engine accepting,
the engine connecting a client the listener picked for, the Python relay), with a plain socket
as the instance that checks the exact bytes (pipelined requests, a head split over several
sends, bodies, keep-alive, a service without the option) and a real HTTP server (the standard
library's) that answers with the fields it parsed; last a real fluxd with etcd, through a
published port and a service address.  Everything listens on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux._splice import HttpFramerProbe
from flux._splice import forwarded_head as engine_forwarded_head
from flux.balancer.listener import ConnectionBudget, Listener
from flux.balancer.pool import Pool
from flux.relay import SpliceRelay, make_relay
from flux.relay.forwarded import FORWARDED_GROWTH_MAX, forwarded_head
from tests.support.etcd_server import EtcdServer
from tests.support.fluxd_process import Fluxd, wait_until
from tests.support.other_host import OtherHost, random_loopback_vip, rules_for
from tests.support.published_fluxd import Published, free_port, start_published
from tests.support.relay_harness import Harness, recv_exactly, run, send
from tests.support.relay_harness import wait_until as wait_for_condition

LOOPBACK = "127.0.0.1"
PATHS = ["engine-accepts", "engine-connects", "python"]
GET = b"GET /a HTTP/1.1\r\nHost: web.example\r\nAccept: */*\r\n\r\n"


# -- one head -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "rewritten"),
    [
        (
            GET,
            b"GET /a HTTP/1.1\r\nHost: web.example\r\nAccept: */*\r\n"
            b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: web.example\r\n\r\n",
        ),
        # A spoofed one is kept and extended; the client's Proto and Host are replaced.
        (
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\nHost: a:8080\r\n"
            b"x-forwarded-proto: https\r\nX-FORWARDED-HOST: evil\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6, 10.0.0.7\r\nHost: a:8080\r\n"
            b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: a:8080\r\n\r\n",
        ),
        # Several lines: the last one is extended (the list, joined in order, ends with it).
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nVia: x\r\n"
            b"x-forwarded-for:2.2.2.2 \t\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nVia: x\r\n"
            b"x-forwarded-for:2.2.2.2, 10.0.0.7\r\n"
            b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n\r\n",
        ),
        # An empty value becomes the address alone; bare LF line ends are kept.
        (
            b"GET / HTTP/1.1\nHost:  a  \nX-Forwarded-For:   \n\n",
            b"GET / HTTP/1.1\nHost:  a  \nX-Forwarded-For: 10.0.0.7\n"
            b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n\n",
        ),
        # HTTP/1.0 without Host: no X-Forwarded-Host (and the client's is dropped).
        (
            b"POST /f HTTP/1.0\r\nContent-Length: 3\r\nX-Forwarded-Host: h\r\n\r\n",
            b"POST /f HTTP/1.0\r\nContent-Length: 3\r\nX-Forwarded-For: 10.0.0.7\r\n"
            b"X-Forwarded-Proto: http\r\n\r\n",
        ),
        # Names that only start like the fields are other fields.
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For-Real: 1\r\nX-Forwarded-Hosts: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For-Real: 1\r\nX-Forwarded-Hosts: 2\r\n"
            b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n\r\n",
        ),
    ],
    ids=["plain", "spoofed", "several-lines", "empty-value-lf", "http10-no-host", "lookalikes"],
)
def test_a_head_gets_the_client_appended_and_proto_and_host_replaced(
    head: bytes, rewritten: bytes
) -> None:
    assert forwarded_head(head, "10.0.0.7") == rewritten
    assert engine_forwarded_head(head, "10.0.0.7") == rewritten


def test_an_ipv6_client_is_named_bare_and_the_growth_is_bounded() -> None:
    ip = "ffff:" * 7 + "ffff"  # the longest IPv6 text there is
    host = b"h" * 300
    head = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    out = forwarded_head(head, ip)
    assert b"X-Forwarded-For: " + ip.encode() + b"\r\n" in out
    assert len(out) - len(head) <= len(host) + FORWARDED_GROWTH_MAX
    assert engine_forwarded_head(head, ip) == out


_NAMES = st.sampled_from([
    "Host", "host", "X-Forwarded-For", "x-forwarded-for", "X-Forwarded-Proto",
    "X-Forwarded-Host", "X-FORWARDED-HOST", "Accept", "Via", "Forwarded", "X-Forwarded-Fo",
    "Content-Length",
])  # fmt: skip
_VALUES = st.text(alphabet=" \t,abc123.:[]", max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(st.tuples(_NAMES, _VALUES, st.sampled_from(["\r\n", "\n"])), max_size=8),
    ending=st.sampled_from(["\r\n", "\n"]),
    ip=st.sampled_from(["127.0.0.1", "::1", "2001:db8::7", "unknown"]),
)
def test_the_engine_rewrites_every_head_as_the_python_relay_does(
    fields: list[tuple[str, str, str]], ending: str, ip: str
) -> None:
    head = "GET /x HTTP/1.1\r\n" + "".join(f"{n}:{v}{e}" for n, v, e in fields) + ending
    data = head.encode()
    assert engine_forwarded_head(data, ip) == forwarded_head(data, ip)


def test_the_engine_s_rewrite_refuses_what_is_not_a_head() -> None:
    with pytest.raises(ValueError, match="complete request head"):
        engine_forwarded_head(b"GET / HTTP/1.1\r\nHost: a", "10.0.0.1")
    with pytest.raises(ValueError, match="client_ip must be shorter"):
        engine_forwarded_head(GET, "1" * 48)


# -- the framer's HEAD events ---------------------------------------------------------------------


def test_the_framer_reports_where_each_accepted_head_lies_only_when_asked() -> None:
    post = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
    stream = b"\r\n" + GET + post + GET
    probe = HttpFramerProbe()
    probe.report_heads()
    heads = [(ev.start, ev.pos) for ev in probe.feed("request", stream) if ev.kind == "head"]
    first = 2  # after the empty line a client may send before a request
    second = first + len(GET)
    third = second + len(post)
    assert heads == [
        (first, first + len(GET)),
        (second, second + len(post) - 4),
        (third, third + len(GET)),
    ]
    plain = HttpFramerProbe()
    assert all(ev.kind != "head" for ev in plain.feed("request", stream))
    # A malformed head is no head: it is answered 400, never forwarded.
    bad = HttpFramerProbe()
    bad.report_heads()
    kinds = [ev.kind for ev in bad.feed("request", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")]
    assert kinds == ["malformed", "reject"]


# -- through a listener ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def listening(
    path: str, instance_address: str, *, forwarded: bool = True
) -> AsyncIterator[tuple[Listener, int]]:
    """A listener of http service "web" (with ``forwarded``), over the relay ``path`` needs,
    its instance at ``instance_address``; yields it and its port."""
    relay = make_relay("python" if path == "python" else "splice")
    await relay.start()
    loop = asyncio.get_running_loop()
    pool = Pool(now=loop.time, rng=random.Random(5))
    pool.update({"i0": instance_address})
    listener = Listener("web", "http", LOOPBACK, pool, relay, connect_timeout=2.0,
                        budget=ConnectionBudget(), forwarded=forwarded)  # fmt: skip
    port = listener.open()
    try:
        yield listener, port
    finally:
        listener.close()
        await relay.close(1.0)


async def client_through(path: str, listener: Listener, port: int) -> socket.socket:
    """A client connected the way ``path`` takes (non-blocking)."""
    if path != "engine-connects":
        client = socket.create_connection((LOOPBACK, port))
        client.setblocking(False)
        return client
    # The engine hands a client over when it cannot pick itself; here the hand-over is made
    # directly, with a client accepted on a socket of the test's own.
    with socket.create_server((LOOPBACK, 0)) as door:
        client = socket.create_connection(door.getsockname())
        accepted, peer = door.accept()
    listener.handed_over(accepted.detach(), peer[0], 0, 0)
    client.setblocking(False)
    return client


@contextlib.asynccontextmanager
async def instance_and_client(
    path: str, *, forwarded: bool = True
) -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    """A plain socket as the instance of "web" and a client through the listener: yields the
    client and the instance's side of the connection the relay made."""
    loop = asyncio.get_running_loop()
    instance = socket.create_server((LOOPBACK, 0))
    instance.setblocking(False)
    host, instance_port = instance.getsockname()
    try:
        async with listening(path, f"{host}:{instance_port}", forwarded=forwarded) as (
            listener,
            port,
        ):
            client = await client_through(path, listener, port)
            with client:
                upstream, _ = await asyncio.wait_for(loop.sock_accept(instance), 5)
                upstream.setblocking(False)
                with upstream:
                    yield client, upstream
    finally:
        instance.close()


def head_of(message: bytes) -> bytes:
    """A request's head: through its empty line."""
    return message[: message.index(b"\r\n\r\n") + 4]


def rewritten(stream: bytes, heads: list[bytes], ip: str) -> bytes:
    """``stream`` with each of ``heads`` (in order) rewritten as fluxd must."""
    out, rest = b"", stream
    for head in heads:
        before, found, rest = rest.partition(head)
        assert found
        out += before + forwarded_head(head, ip)
    return out + rest


POST = b"POST /upload HTTP/1.1\r\nHost: web.example\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: web.example\r\nX-Forwarded-For: 6.6.6.6\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nHost:\r\n6\r\n x: y\n\r\n0\r\nX-T: 1\r\n\r\n"
)


@pytest.mark.parametrize("path", PATHS)
async def test_pipelined_requests_are_each_rewritten_and_bodies_pass_untouched(
    path: str,
) -> None:
    """Three pipelined requests in one send (one with a body that looks like fields), each
    head rewritten, the bodies byte for byte; then keep-alive requests one at a time."""
    loop = asyncio.get_running_loop()
    spoofed = GET.replace(b"Accept", b"X-Forwarded-For: 6.6.6.6\r\nAccept")
    stream = GET + POST + CHUNKED + spoofed
    async with instance_and_client(path) as (client, upstream):
        ip = client.getsockname()[0]
        await loop.sock_sendall(client, stream)
        want = rewritten(stream, [GET, head_of(POST), head_of(CHUNKED), spoofed], ip)
        got = await recv_exactly(upstream, len(want))
        assert got == want
        assert b"X-Forwarded-For: 6.6.6.6, " + ip.encode() + b"\r\n" in got
        assert got.count(b"X-Forwarded-Proto: http\r\n") == 4
        # The instance answers them all; the client reads the answers untouched.
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        await loop.sock_sendall(upstream, answer * 4)
        assert await recv_exactly(client, len(answer) * 4) == answer * 4
        for _ in range(3):  # keep-alive: every head, not only the first
            await loop.sock_sendall(client, POST)
            want = rewritten(POST, [head_of(POST)], ip)
            assert await recv_exactly(upstream, len(want)) == want
            await loop.sock_sendall(upstream, answer)
            assert await recv_exactly(client, len(answer)) == answer


@pytest.mark.parametrize("path", PATHS)
async def test_a_head_split_over_several_sends_goes_whole_and_rewritten(path: str) -> None:
    loop = asyncio.get_running_loop()
    head = head_of(POST)
    async with instance_and_client(path) as (client, upstream):
        ip = client.getsockname()[0]
        for piece in (head[:5], head[5:20], head[20:-3], head[-3:] + b"hel"):
            await loop.sock_sendall(client, piece)
            await asyncio.sleep(0.05)
        await loop.sock_sendall(client, b"lo world")
        want = forwarded_head(head, ip) + b"hello world"
        assert await recv_exactly(upstream, len(want)) == want


@pytest.mark.parametrize("path", PATHS)
async def test_a_head_that_grows_past_the_buffer_and_a_large_body_arrive_whole(
    path: str,
) -> None:
    """A 40 KiB Host (well within the 64 KiB head limit, the rewrite copies it once more) and
    a 256 KiB body (spliced past the framer once it is bulk)."""
    loop = asyncio.get_running_loop()
    body = random.Random(9).randbytes(256 * 1024)
    head = (
        b"PUT /big HTTP/1.1\r\nHost: " + b"h" * 40000 + b"\r\n"
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )  # fmt: skip
    async with instance_and_client(path) as (client, upstream):
        ip = client.getsockname()[0]
        sending = loop.create_task(loop.sock_sendall(client, head + body))
        want = forwarded_head(head, ip) + body
        assert await recv_exactly(upstream, len(want)) == want
        await asyncio.wait_for(sending, 5)


@pytest.mark.parametrize("path", PATHS)
async def test_without_forwarded_the_bytes_are_untouched(path: str) -> None:
    loop = asyncio.get_running_loop()
    stream = GET + POST + CHUNKED
    async with instance_and_client(path, forwarded=False) as (client, upstream):
        await loop.sock_sendall(client, stream)
        assert await recv_exactly(upstream, len(stream)) == stream


@pytest.mark.parametrize("path", PATHS)
async def test_an_http2_connection_is_not_rewritten(path: str) -> None:
    """The HTTP/2 preface and frames (here a SETTINGS frame, then bytes that would be a head
    in HTTP/1.x) go as they came: fluxd does not rewrite HTTP/2."""
    loop = asyncio.get_running_loop()
    stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + GET
    async with instance_and_client(path) as (client, upstream):
        await loop.sock_sendall(client, stream)
        assert await recv_exactly(upstream, len(stream)) == stream


# -- the relays alone (the harness checks that nothing leaked: descriptors, buffers, bytes) -------


@pytest.mark.parametrize("kind", ["splice", "python"])
def test_both_relays_rewrite_a_deep_pipeline_split_anywhere_alike(kind: str) -> None:
    """45 pipelined requests, more than the framer's ring of 32 awaiting responses (the
    client's bytes wait for a response to free a slot, then go rewritten), sent in random
    pieces; the instance answers nothing before it holds 32 requests (the ring is full then),
    then each request as its head arrives."""
    rng = random.Random(11)
    asks = [GET, head_of(POST) + b"hello world", CHUNKED] * 15
    stream = b"".join(asks)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    async def scenario(h: Harness) -> None:
        loop = asyncio.get_running_loop()
        link = await h.open(http=True, forwarded=True)
        want = rewritten(stream, [head_of(ask) for ask in asks], link.client.getsockname()[0])

        async def instance() -> bytes:
            got, answered = b"", 0
            while len(got) < len(want):
                chunk = await asyncio.wait_for(loop.sock_recv(link.server, 65536), 5)
                assert chunk, f"EOF after {len(got)} bytes"
                got += chunk
                seen = got.count(b"X-Forwarded-Proto: http\r\n")
                if seen >= 32:
                    await send(link.server, answer * (seen - answered))
                    answered = seen
            return got

        served = asyncio.create_task(instance())
        start = 0
        while start < len(stream):
            size = rng.randint(1, 300)
            await send(link.client, stream[start : start + size])
            start += size
            await asyncio.sleep(rng.choice([0, 0, 0.001]))
        assert await served == want
        assert await recv_exactly(link.client, len(answer) * len(asks)) == (
            answer * len(asks)
        )
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 0

    run(kind, scenario)


@pytest.mark.parametrize(
    "host", [20, 8000, 12000], ids=["small-head", "8-kib-head", "head-outgrowing-the-buffer"]
)
def test_heads_that_arrive_in_one_read_are_rewritten_with_no_extra_syscall(host: int) -> None:
    """One recv() and one send() per message each way, as without the option
    (test_relay_http's count): the rewritten head leaves in the send that would have carried
    it, also when it no longer fits the 16 KiB copy buffer it was read into."""
    rounds = 500
    ask = b"GET /x HTTP/1.1\r\nHost: " + b"h" * host + b"\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def scenario(h: Harness) -> None:
        assert isinstance(h.relay, SpliceRelay)
        link = await h.open(http=True, forwarded=True)
        want = forwarded_head(ask, link.client.getsockname()[0])
        before = h.relay.engine.stats()
        for _ in range(rounds):
            await send(link.client, ask)
            assert await recv_exactly(link.server, len(want)) == want
            await send(link.server, answer)
            await recv_exactly(link.client, len(answer))
        # The engine counts a send() once it returned, which may be just after the client
        # read its bytes: wait for the count (bounded), then compare.
        expected = {"calls_recv": 2 * rounds, "calls_send": 2 * rounds}

        def calls() -> dict[str, int]:
            after = h.relay.engine.stats()
            return {name: after[name] - before[name] for name in expected}

        with contextlib.suppress(AssertionError):
            await wait_for_condition(lambda: calls() == expected, 2.0, "the counts")
        assert calls() == expected
        link.client.close()
        link.server.close()
        await link.result

    run("splice", scenario)


# -- a real HTTP server ---------------------------------------------------------------------------


class _EchoFields(BaseHTTPRequestHandler):
    """Answers every request with the forwarding fields it parsed and the body it read."""

    protocol_version = "HTTP/1.1"  # keep-alive: several requests per connection

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        document = {
            "x-forwarded-for": self.headers.get_all("X-Forwarded-For") or [],
            "x-forwarded-proto": self.headers.get_all("X-Forwarded-Proto") or [],
            "x-forwarded-host": self.headers.get_all("X-Forwarded-Host") or [],
            "host": self.headers.get("Host"),
            "body": body.hex(),
        }
        payload = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read the answers."""


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[str, int]]:
    server = ThreadingHTTPServer((LOOPBACK, 0), _EchoFields)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def read_answers(sock: socket.socket, count: int) -> list[dict[str, object]]:
    """``count`` JSON answers (Content-Length framed) from a blocking socket."""
    buffer, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"EOF after {buffer!r}"
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "EOF in a body"
            buffer += chunk
        answers.append(json.loads(buffer[:length]))
        buffer = buffer[length:]
    return answers


def ask_echo(ip: str, port: int, *requests: bytes) -> tuple[list[dict[str, object]], str]:
    """Send ``requests`` pipelined on one connection; the answers and the client's address."""
    with socket.create_connection((ip, port), timeout=5) as sock:
        sock.sendall(b"".join(requests))
        return read_answers(sock, len(requests)), sock.getsockname()[0]


@pytest.mark.parametrize("path", PATHS)
async def test_a_real_server_sees_the_client_s_address_and_fluxd_s_proto_and_host(
    path: str,
) -> None:
    loop = asyncio.get_running_loop()
    spoofed = (
        b"POST /s HTTP/1.1\r\nHost: shop.example:8080\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nContent-Length: 5\r\n"
        b"\r\nabcde"
    )
    with echo_server() as (host, instance_port):
        async with listening(path, f"{host}:{instance_port}") as (listener, port):
            client = await client_through(path, listener, port)
            with client:
                await loop.sock_sendall(client, GET + spoofed + GET)
                client.setblocking(True)
                answers = await asyncio.to_thread(read_answers, client, 3)
                ip = client.getsockname()[0]
    assert answers[0] == {
        "x-forwarded-for": [ip], "x-forwarded-proto": ["http"],
        "x-forwarded-host": ["web.example"], "host": "web.example", "body": "",
    }  # fmt: skip
    assert answers[1] == {
        "x-forwarded-for": [f"6.6.6.6, {ip}"], "x-forwarded-proto": ["http"],
        "x-forwarded-host": ["shop.example:8080"], "host": "shop.example:8080",
        "body": b"abcde".hex(),
    }  # fmt: skip
    assert answers[2] == answers[0]


# -- a real fluxd ---------------------------------------------------------------------------------


@pytest.fixture
def published(
    request: pytest.FixtureRequest,
    etcd: EtcdServer,
    fluxd_factory: Callable[..., Fluxd],
    other_host: OtherHost,
) -> Published:
    """A fluxd publishing on a random loopback address (``request.param``: more flags)."""
    return start_published(fluxd_factory, other_host, getattr(request, "param", ()))


@pytest.mark.parametrize(
    "published", [(), ("-relay", "python")], ids=["engine", "python-relay"], indirect=True
)
def test_fluxd_forwards_the_client_s_address_through_a_published_port_and_a_vip(
    published: Published,
) -> None:
    """An http service with ``forwarded`` (and a tcp one with the PROXY protocol, for what
    /status shows of both), its instance the standard library's HTTP server."""
    web_port = free_port(published.ip)
    vip = random_loopback_vip()
    with echo_server() as (host, port):
        published.service(
            "web", address=f"{vip}:80", publish=web_port, instancePort=port, protocol="http",
            forwarded=True,
        )  # fmt: skip
        published.service("db", address=f"{random_loopback_vip()}:5432", proxyProtocol="v1")
        published.host.add_instance("web", "web-1", f"{host}:{port}")
        published.wait_state("web", "listening")
        wait_until(lambda: rules_for(published.daemon.chain, vip, "DNAT"), 15, "web's DNAT rule")
        wait_until(
            lambda: len(published.published("web").get("instances", [])) == 1, 10, "the instance"
        )
        spoofed = GET.replace(b"Accept", b"X-Forwarded-For: 6.6.6.6\r\nAccept")
        for ip, target in [(published.ip, web_port), (vip, 80)]:
            answers, client_ip = ask_echo(ip, target, GET, spoofed, POST)
            assert [a["x-forwarded-for"] for a in answers] == [
                [client_ip], [f"6.6.6.6, {client_ip}"], [client_ip]
            ]
            assert all(a["x-forwarded-proto"] == ["http"] for a in answers)
            assert all(a["x-forwarded-host"] == ["web.example"] for a in answers)
            assert answers[2]["body"] == b"hello world".hex()
    status = published.status()
    web, db = status["web"], status["db"]
    assert isinstance(web, dict) and isinstance(db, dict)
    assert (web["forwarded"], web["proxy_protocol"]) == (True, "")
    assert (db["forwarded"], db["proxy_protocol"]) == (False, "v1")
