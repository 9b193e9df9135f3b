"""Notices: one log line per thing an HTTP service's data path did on its own (an answer, a
timeout, a switch to plain relaying, exchanges cut short), naming the service, the client and
the reason, through both relays; and the limiter that keeps a flood to a handful of lines per
service.

The relay cases drive both ends through tests/support/relay_harness.py (as test_relay_http.py
does) and read the lines with caplog; the limiter's cases inject its clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import time
from collections.abc import Iterator

import pytest

from flux._splice import HTTP_ERROR_RESPONSES, SpliceEngine
from flux._splice import NOTICE_KINDS as ENGINE_KINDS
from flux.balancer.listener import ConnectionBudget, Listener
from flux.balancer.pool import Pool
from flux.model import ConnectionInfo
from flux.relay import SpliceRelay, make_relay
from flux.relay.notices import (
    NOTICE_BURST,
    NOTICE_KINDS,
    ROUTER_KINDS,
    NoticeLimiter,
    NoticeSubject,
)
from tests.support.h2_frames import Peer, data, headers, rst, settings
from tests.support.http_streams import H2_PREFACE, request, response
from tests.support.relay_harness import (
    KINDS,
    LOOPBACK,
    Harness,
    Link,
    recv_exactly,
    recv_to_eof,
    reset,
    run,
    send,
)

INFO = ConnectionInfo("web", "http", "web-1", "10.9.9.9:80", LOOPBACK)
LOGGER = "flux.relay"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Collect(logging.Handler):
    """Keeps the messages of the records it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """The notice lines written at INFO and above (the list fills as the test runs)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    handler = Collect()
    logging.getLogger(LOGGER).addHandler(handler)
    try:
        yield handler.messages
    finally:
        logging.getLogger(LOGGER).removeHandler(handler)


def address(link: Link) -> str:
    """The client's ip:port as the relay sees it."""
    host, port = link.client.getsockname()
    return f"{host}:{port}"


async def open_web(h: Harness) -> Link:
    return await h.open(http=True, info=INFO)


async def finish(link: Link) -> None:
    """Close the test's two ends and wait for the relay to end the connection."""
    link.client.close()
    link.server.close()
    await link.result


# ---- one line per event, through both relays ---------------------------------------------------


MALFORMED = [
    (b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
     400, "content-length-list"),
    (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400, "field"),
    (b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431,
     "head-too-large"),
]


@pytest.mark.parametrize(("head", "status", "reason"), MALFORMED)
def test_a_rejected_request_is_one_line_naming_service_client_and_reason(
    kind: str, lines: list[str], head: bytes, status: int, reason: str
) -> None:
    clients: list[str] = []

    async def scenario(h: Harness) -> None:
        link = await open_web(h)
        clients.append(address(link))
        sender = asyncio.ensure_future(send(link.client, head))
        assert await recv_to_eof(link.client) == HTTP_ERROR_RESPONSES[status]
        sender.cancel()
        with contextlib.suppress(ConnectionResetError):
            await recv_to_eof(link.server)
        await finish(link)

    run(kind, scenario)
    assert lines == [f"http service web: answered {status} to {clients[0]} ({reason})"]


def test_each_header_timeout_is_one_line_saying_what_fluxd_did(
    kind: str, lines: list[str]
) -> None:
    clients: dict[str, str] = {}

    async def scenario(h: Harness) -> None:
        slow, silent, owed = await open_web(h), await open_web(h), await open_web(h)
        clients.update(slow=address(slow), silent=address(silent), owed=address(owed))
        await send(slow.client, b"GET / HTTP/1.1\r\nHost:")
        # A request awaits its response while the next head stalls: reset, not answered.
        await send(owed.client, request(b"PUT", b"/", b"abc") + b"GET / HTTP/1.1\r\nHost:")
        await recv_exactly(owed.server, len(request(b"PUT", b"/", b"abc")))
        assert await recv_to_eof(slow.client) == HTTP_ERROR_RESPONSES[408]
        assert await recv_to_eof(silent.client) == b""
        with contextlib.suppress(ConnectionResetError):
            await recv_to_eof(owed.client)
        for link in (slow, silent, owed):
            await finish(link)

    run(kind, scenario, http_header_timeout=0.3, http_idle_timeout=5.0)
    assert sorted(lines) == sorted([
        f"http service web: answered 408 to {clients['slow']} (header timeout)",
        f"http service web: closed {clients['silent']} (header timeout, nothing sent)",
        f"http service web: reset {clients['owed']} (header timeout, responses owed)",
        f"http service web: 1 exchange with {clients['owed']} cut short by the client",
    ])


def test_each_idle_close_is_one_line(kind: str, lines: list[str]) -> None:
    clients: dict[str, str] = {}

    async def scenario(h: Harness) -> None:
        idle, silent = await open_web(h), await open_web(h)
        clients.update(idle=address(idle), silent=address(silent))
        await send(idle.client, request())
        await recv_exactly(idle.server, len(request()))
        await send(idle.server, response())
        await recv_exactly(idle.client, len(response()))
        assert await recv_to_eof(idle.client) == b""
        assert await recv_to_eof(silent.client) == b""
        for link in (idle, silent):
            await finish(link)

    # The idle timeout is the shorter: a client that sends nothing is closed after it.
    run(kind, scenario, http_header_timeout=5.0, http_idle_timeout=0.3)
    assert sorted(lines) == sorted([
        f"http service web: closed {clients['idle']} (idle timeout)",
        f"http service web: closed {clients['silent']} (idle timeout, nothing sent)",
    ])


SWITCHES = [
    (request(extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n"),
     b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
     "switched by 101 (upgrade)"),
    (b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
     b"HTTP/1.1 200 Connection Established\r\n\r\n", "switched by 200 (connect)"),
    (b"", response(), "framing given up (unsolicited)"),
    (request(), b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
     "framing given up (content-length)"),
]


@pytest.mark.parametrize(("asked", "answer", "why"), SWITCHES)
def test_a_switch_to_plain_relaying_is_one_line_with_its_reason(
    kind: str, lines: list[str], asked: bytes, answer: bytes, why: str
) -> None:
    clients: list[str] = []

    async def scenario(h: Harness) -> None:
        link = await open_web(h)
        clients.append(address(link))
        if asked:
            await send(link.client, asked)
            await recv_exactly(link.server, len(asked))
        await send(link.server, answer)
        assert await recv_exactly(link.client, len(answer)) == answer
        # Plain relaying from here: what would be a malformed request passes.
        plain = b"\x00 not HTTP\r\n\r\n"
        await send(link.client, plain)
        assert await recv_exactly(link.server, len(plain)) == plain
        await finish(link)

        if isinstance(h.relay, SpliceRelay):
            switched = h.relay.engine.stats()["http_switched"]
            assert switched == (1 if why.startswith("switched") else 0)

    run(kind, scenario)
    assert lines == [f"http service web: relaying {clients[0]} as plain TCP, {why}"]


@pytest.mark.parametrize("who", ["instance", "client", "fluxd"])
def test_exchanges_cut_short_are_one_line_naming_who_cut_them(
    kind: str, lines: list[str], who: str
) -> None:
    clients: list[str] = []

    async def scenario(h: Harness) -> None:
        link = await open_web(h)
        clients.append(address(link))
        burst = request(b"GET", b"/1") + request(b"GET", b"/2")
        await send(link.client, burst)
        await recv_exactly(link.server, len(burst))
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        await send(link.server, head + b"x" * 10)
        await recv_exactly(link.client, len(head) + 10)
        if who == "instance":
            reset(link.server)
        elif who == "client":
            reset(link.client)
        else:
            await h.relay.close(0.05)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await recv_to_eof(link.client if who != "client" else link.server)
        await finish(link)

    run(kind, scenario)
    by = "fluxd" if who == "fluxd" else f"the {who}"
    assert lines == [f"http service web: 2 exchanges with {clients[0]} cut short by {by}"]


def test_an_http2_observer_that_gives_up_is_one_line_and_the_bytes_still_flow(
    kind: str, lines: list[str]
) -> None:
    clients: list[str] = []

    async def scenario(h: Harness) -> None:
        link = await open_web(h)
        clients.append(address(link))
        # A header block no HPACK decoder can read: observation ends, the bytes do not.
        opening = H2_PREFACE + settings() + headers(1, b"\xff\xff\xff\xff\xff\x7f")
        await send(link.client, opening)
        assert await recv_exactly(link.server, len(opening)) == opening
        answer = settings() + data(1, b"still relayed", end_stream=True)
        await send(link.server, answer)
        assert await recv_exactly(link.client, len(answer)) == answer
        await finish(link)

    run(kind, scenario)
    assert lines == [f"http service web: stopped observing HTTP/2 from {clients[0]} (hpack)"]


@pytest.mark.parametrize("who", ["client", "instance"])
def test_an_http2_stream_reset_is_one_line_naming_who_reset_it(
    kind: str, lines: list[str], who: str
) -> None:
    clients: list[str] = []

    async def scenario(h: Harness) -> None:
        link = await open_web(h)
        clients.append(address(link))
        client, server = Peer(), Peer()
        opening = H2_PREFACE + settings() + client.request(1) + client.request(3)
        await send(link.client, opening)
        await recv_exactly(link.server, len(opening))
        answer = settings() + server.response(3, 200, b"ok")
        await send(link.server, answer)
        await recv_exactly(link.client, len(answer))
        sender = link.client if who == "client" else link.server
        await send(sender, rst(1))
        await recv_exactly(link.server if who == "client" else link.client, 13)
        await finish(link)

    run(kind, scenario)
    assert lines == [f"http service web: 1 exchange with {clients[0]} cut short by the {who}"]


def test_a_flood_of_bad_requests_writes_a_handful_of_lines_and_an_exact_summary(
    kind: str, lines: list[str]
) -> None:
    total = 2000
    bad = b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"

    async def one(h: Harness, slots: asyncio.Semaphore) -> None:
        async with slots:
            link = await open_web(h)
            await send(link.client, bad)
            assert await recv_to_eof(link.client) == HTTP_ERROR_RESPONSES[400]
            await finish(link)

    async def scenario(h: Harness) -> None:
        slots = asyncio.Semaphore(32)
        await asyncio.gather(*(one(h, slots) for _ in range(total)))
        if isinstance(h.relay, SpliceRelay):
            assert h.relay.engine.stats()["http_answered"] == total

    run(kind, scenario, deadline=120.0)
    full = [line for line in lines if re.fullmatch(
        r"http service web: answered 400 to 127\.0\.0\.1:\d+ \(field\)", line)]
    summaries = [re.fullmatch(r"http service web: … (\d+) more rejections in the last [\d.]+s",
                              line) for line in lines]
    counted = [int(m.group(1)) for m in summaries if m is not None]
    assert len(full) == NOTICE_BURST and len(counted) == 1, lines
    assert len(lines) == NOTICE_BURST + 1
    assert len(full) + counted[0] == total


def test_under_debug_a_line_names_the_instance_and_the_connection_s_bytes(
    kind: str, lines: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clients: list[str] = []

    async def scenario(h: Harness) -> None:
        link = await open_web(h)
        clients.append(address(link))
        await send(link.client, request())
        await recv_exactly(link.server, len(request()))
        await send(link.server, response())
        await recv_exactly(link.client, len(response()))
        await send(link.client, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        assert await recv_to_eof(link.client) == HTTP_ERROR_RESPONSES[400]
        await finish(link)

    run(kind, scenario)
    (line,) = lines
    expected = (
        f"http service web: answered 400 to {clients[0]} (field) [instance web-1 at "
        f"10.9.9.9:80, {len(request())} bytes to it, {len(response())} to the client, "
    )
    assert line.startswith(expected) and re.fullmatch(r"\d+\.\d{3} s open]",
                                                       line[len(expected):]), line


@pytest.mark.parametrize("relay_kind", KINDS)
async def test_a_listener_s_notices_name_its_service_and_instance(
    relay_kind: str, lines: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Through a listener, as fluxd runs it: the engine accepts (its notices carry service and
    instance ids), the Python relay gets each connection's info from the listener."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    instance = socket.create_server((LOOPBACK, 0))  # accepted by the kernel; never read
    host, instance_port = instance.getsockname()
    instance_address = f"{host}:{instance_port}"
    relay = make_relay(relay_kind)  # type: ignore[arg-type]
    await relay.start()
    loop = asyncio.get_running_loop()
    pool = Pool(now=loop.time, rng=random.Random(5))
    pool.update({"i0": instance_address})
    listener = Listener("svc", "http", LOOPBACK, pool, relay, connect_timeout=1.0,
                        budget=ConnectionBudget())
    port = listener.open()
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        client_host, client_port = writer.get_extra_info("sockname")
        client = f"{client_host}:{client_port}"
        writer.write(MALFORMED[0][0])
        assert await asyncio.wait_for(reader.read(), 5) == HTTP_ERROR_RESPONSES[400]
        writer.close()
        await writer.wait_closed()
    finally:
        listener.close()
        await relay.close(1.0)
        instance.close()
    (line,) = lines
    assert line.startswith(f"http service svc: answered 400 to {client} (content-length-list)"
                           f" [instance i0 at {instance_address}, 0 bytes to it, 0 to the "
                           f"client, "), line


def test_the_engine_queues_at_most_4096_notices_and_counts_the_rest() -> None:
    """Nobody drains while 4,200 connections are each answered 400: 4,096 notices wait, the
    rest are counted as dropped (the answers themselves are all counted)."""
    total, kept = 4200, 4096
    engine = SpliceEngine()
    engine.start()
    clients: list[socket.socket] = []
    try:
        for token in range(1, total + 1):
            client, relay_client = socket.socketpair()
            relay_upstream, instance = socket.socketpair()
            clients += [client, instance]
            engine.add(relay_client.detach(), relay_upstream.detach(), token, http=True)
            client.sendall(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        # Every answer counted, and every notice published or dropped (the last batch's are
        # published after its answers are counted).
        deadline = time.monotonic() + 30
        while engine.stats()["notices_dropped"] < total - kept:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
        notices = engine.drain_all().notices
        stats = engine.stats()
        assert (stats["http_answered"], stats["notices_dropped"]) == (total, total - kept)
        assert len(notices) == kept
        assert {(n.kind, n.reason, n.status) for n in notices} == {("rejected", "field", 400)}
    finally:
        for sock in clients:
            sock.close()
        engine.stop()


# ---- the limiter ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


WEB = NoticeSubject("web", "10.0.0.5:51234", "web-1 at 172.17.0.3:80")
API = NoticeSubject("api", "10.0.0.6:40000", "")


def test_the_limiter_writes_a_burst_then_one_summary_when_the_window_ends(
    lines: list[str],
) -> None:
    clock = Clock()
    limiter = NoticeLimiter(burst=2, window=10.0, clock=clock)
    for _ in range(7):
        limiter.notice(WEB, "rejected", "field", status=400)
        clock.now += 1
    assert lines == ["http service web: answered 400 to 10.0.0.5:51234 (field)"] * 2
    limiter.summarize()  # 7 s into the window: not over yet
    assert len(lines) == 2
    clock.now += 3
    limiter.summarize()
    assert lines[2:] == ["http service web: … 5 more rejections in the last 10s"]
    # A new window: full lines again, and nothing left to summarize.
    limiter.notice(WEB, "rejected", "field", status=400)
    limiter.close()
    assert len(lines) == 4


def test_the_next_notice_after_the_window_writes_its_summary_first(lines: list[str]) -> None:
    clock = Clock()
    limiter = NoticeLimiter(burst=1, window=10.0, clock=clock)
    limiter.notice(WEB, "idle-closed", "idle")
    limiter.notice(WEB, "idle-closed", "idle")
    clock.now += 12
    limiter.notice(WEB, "idle-closed", "nothing-sent")
    assert lines == [
        "http service web: closed 10.0.0.5:51234 (idle timeout)",
        "http service web: … 1 more idle closes in the last 10s",
        "http service web: closed 10.0.0.5:51234 (idle timeout, nothing sent)",
    ]


def test_the_limit_is_per_service_and_kind(lines: list[str]) -> None:
    clock = Clock()
    limiter = NoticeLimiter(burst=1, window=10.0, clock=clock)
    for _ in range(3):
        limiter.notice(WEB, "rejected", "host", status=400)
        limiter.notice(WEB, "cut", "instance", count=2)
        limiter.notice(API, "rejected", "host", status=400)
    clock.now += 2.5
    limiter.close()
    assert lines == [
        "http service web: answered 400 to 10.0.0.5:51234 (host)",
        "http service web: 2 exchanges with 10.0.0.5:51234 cut short by the instance",
        "http service api: answered 400 to 10.0.0.6:40000 (host)",
        "http service web: … 2 more rejections in the last 2.5s",
        "http service web: … 2 more connections with exchanges cut short in the last 2.5s",
        "http service api: … 2 more rejections in the last 2.5s",
    ]


def test_the_limiter_adds_the_instance_and_bytes_under_debug(
    lines: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    limiter = NoticeLimiter(clock=Clock())
    limiter.notice(WEB, "switched", "upgrade", status=101, bytes_up=120, bytes_down=80, age=0.25)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    limiter.notice(WEB, "switched", "upgrade", status=101, bytes_up=120, bytes_down=80, age=0.25)
    assert lines == [
        "http service web: relaying 10.0.0.5:51234 as plain TCP, switched by 101 (upgrade)",
        "http service web: relaying 10.0.0.5:51234 as plain TCP, switched by 101 (upgrade)"
        " [instance web-1 at 172.17.0.3:80, 120 bytes to it, 80 to the client, 0.250 s open]",
    ]


async def test_the_summary_comes_on_time_without_another_notice(lines: list[str]) -> None:
    limiter = NoticeLimiter(burst=1, window=0.05)
    limiter.attach(asyncio.get_running_loop())
    for _ in range(3):
        limiter.notice(WEB, "opaque", "unsolicited")
    await asyncio.sleep(0.2)
    assert len(lines) == 2 and re.fullmatch(
        r"http service web: … 2 more framing give-ups in the last 0(\.\d)?s", lines[1]
    ), lines
    limiter.close()


def test_every_kind_the_engine_names_has_a_row_and_says_each_reason() -> None:
    assert set(ENGINE_KINDS) == set(NOTICE_KINDS) - ROUTER_KINDS
    reasons = {
        "rejected": ["field"], "header-timeout": ["head-incomplete", "nothing-sent",
                                                  "responses-owed"],
        "idle-closed": ["idle", "nothing-sent"], "opaque": ["unsolicited"],
        "switched": ["upgrade", "connect"], "cut": ["client", "instance", "fluxd"],
        "h2-gave-up": ["hpack", "sequence", "padding", "table-size", "memory",
                       "response-first"],
        "misrouted": ["unknown host a.example", "no Host", "HTTP/2, no default service"],
    }
    for name, row in NOTICE_KINDS.items():
        for reason in reasons[name]:
            assert "10.0.0.5:1" in row.describe("10.0.0.5:1", reason, 0, 1)
