"""HTTP connections through both relays: verbatim bytes, exchange timing, the relay's answers.

The scenarios drive both ends themselves (see tests/support/relay_harness.py): the test is the
client and the instance, so it decides exactly which bytes each side sends and when, and checks
what the other side received, what the relay reported per exchange, and what it answered itself.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import itertools
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from flux._splice import HTTP_ERROR_RESPONSES
from flux.relay import HTTP_CUT_SIDES, GrpcCall, SpliceRelay
from tests.support.http_streams import H2_PREFACE, request, response
from tests.support.relay_harness import (
    KINDS,
    Harness,
    Link,
    MiB,
    Pattern,
    h2_counts,
    recv_exactly,
    recv_to_eof,
    reset,
    run,
    send,
)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Exchanges:
    """What the relay reported, one tuple per exchange (HTTP/1.x: never a gRPC call)."""

    seen: list[tuple[str, int, int, int]] = field(default_factory=list)

    def __call__(
        self,
        method: str,
        status: int,
        roundtrips_us: list[int],
        totals_us: list[int],
        grpc: GrpcCall | None,
    ) -> None:
        assert len(roundtrips_us) == len(totals_us) > 0
        assert grpc is None
        for roundtrip, total in zip(roundtrips_us, totals_us, strict=True):
            self.seen.append((method, status, roundtrip, total))

    def labels(self) -> list[tuple[str, int]]:
        return [(method, status) for method, status, _, _ in self.seen]


UPGRADE = request(extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
SWITCHED = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n")


async def flushed(h: Harness, obs: Exchanges, count: int, timeout: float = 5.0) -> None:
    """Wait until ``count`` exchanges were reported."""
    await h.reported(obs.seen, count, timeout)


async def open_http(h: Harness, obs: Exchanges | None = None) -> Link:
    return await h.open(http=True, observe=obs)


def h2_frame(kind: int, flags: int = 0, stream: int = 0, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame (RFC 9113 section 4.1)."""
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
            + payload)


def test_keep_alive_exchanges_are_relayed_verbatim_and_reported_in_order(kind: str) -> None:
    calls = [(b"GET", b"", 200), (b"POST", b"payload", 201), (b"HEAD", b"", 200),
             (b"DELETE", b"", 204), (b"BREW", b"", 404)]

    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        for method, body, status in calls:
            sent = request(method, b"/x", body)
            await send(link.client, sent)
            assert await recv_exactly(link.server, len(sent)) == sent
            answer = response(status, b"body!" if status != 204 else b"")
            if method == b"HEAD":
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
            await send(link.server, answer)
            assert await recv_exactly(link.client, len(answer)) == answer
        await flushed(h, obs, len(calls))
        assert obs.labels() == [("GET", 200), ("POST", 201), ("HEAD", 200), ("DELETE", 204),
                                ("OTHER", 404)]
        assert all(0 <= rt <= total for _, _, rt, total in obs.seen)
        link.client.close()
        link.server.close()
        result = await link.result
        assert result.answered == 0

    run(kind, scenario)


def test_roundtrip_and_total_measure_the_instance_and_the_body(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        body = b"x" * 1000
        started = time.monotonic()
        await send(link.client, request())
        await recv_exactly(link.server, len(request()))
        await asyncio.sleep(0.05)
        await send(link.server, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await asyncio.sleep(0.1)
        await send(link.server, body)
        await recv_exactly(link.client, 38 + 1000)
        elapsed_us = (time.monotonic() - started) * 1e6
        await flushed(h, obs, 1)
        (_, _, roundtrip, total), = obs.seen
        # Event-loop timers may fire up to a millisecond early.
        assert 48_000 <= roundtrip < 150_000, obs.seen
        assert roundtrip + 98_000 <= total <= elapsed_us, (obs.seen, elapsed_us)
        link.client.close()
        link.server.close()
        await link.result

    run(kind, scenario)


def test_pipelined_requests_are_answered_and_counted_in_order(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        burst = request(b"GET", b"/1") + request(b"PUT", b"/2", b"abc") + request(b"GET", b"/3")
        await send(link.client, burst)
        assert await recv_exactly(link.server, len(burst)) == burst
        answers = response(200, b"one") + response(201, b"two") + response(404, b"three")
        await send(link.server, answers)
        assert await recv_exactly(link.client, len(answers)) == answers
        await flushed(h, obs, 3)
        assert obs.labels() == [("GET", 200), ("PUT", 201), ("GET", 404)]
        link.client.close()
        link.server.close()
        await link.result

    run(kind, scenario)


def test_a_pipeline_deeper_than_the_framer_ring_is_answered_and_counted_whole(kind: str) -> None:
    # 100 pipelined GETs in one write: the relay forwards at most 32 unanswered (the framer's
    # ring) and reads the rest as responses free slots, so every exchange is counted.
    depth = 100
    burst = b"".join(request(b"GET", b"/%d" % i) for i in range(depth))
    answers = [response(200, b"%d" % i) for i in range(depth)]

    async def instance(link: Link) -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        got, answered, most = b"", 0, 0
        while answered < depth:
            chunk = await loop.sock_recv(link.server, 65536)
            assert chunk, f"EOF after {answered} requests"
            got += chunk
            complete = got.count(b"\r\n\r\n")
            most = max(most, complete - answered)
            await send(link.server, b"".join(answers[answered:complete]))
            answered = complete
        return got, most

    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        served = asyncio.create_task(instance(link))
        await send(link.client, burst)
        assert await recv_exactly(link.client, len(b"".join(answers))) == b"".join(answers)
        got, most = await served
        assert got == burst and most <= 32
        await flushed(h, obs, depth)
        assert obs.labels() == [("GET", 200)] * depth
        link.client.close()
        link.server.close()
        await link.result

    run(kind, scenario)


def test_large_bodies_both_ways_arrive_intact_and_the_connection_stays_framed(
    kind: str,
) -> None:
    size = 16 * MiB

    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        pattern = Pattern(size, seed=3)
        upload = b"".join(pattern.chunks())
        head = b"PUT /big HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % size
        sender = asyncio.ensure_future(send(link.client, head + upload))
        got = await recv_exactly(link.server, len(head) + size)
        await sender
        assert hashlib.sha256(got[len(head):]).digest() == hashlib.sha256(upload).digest()
        reply_head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
        sender = asyncio.ensure_future(send(link.server, reply_head + upload))
        got = await recv_exactly(link.client, len(reply_head) + size)
        await sender
        assert got == reply_head + upload
        # Chunked, in big chunks, with a trailer; then one more small exchange.
        chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n" % (2 * MiB) + upload[: 2 * MiB] + b"\r\n"
                   + b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n")
        await send(link.client, request(b"GET", b"/chunked"))
        await recv_exactly(link.server, len(request(b"GET", b"/chunked")))
        sender = asyncio.ensure_future(send(link.server, chunked))
        assert await recv_exactly(link.client, len(chunked)) == chunked
        await sender
        await send(link.client, request(b"GET", b"/last"))
        await recv_exactly(link.server, len(request(b"GET", b"/last")))
        await send(link.server, response(204, b""))
        await recv_exactly(link.client, len(response(204, b"")))
        await flushed(h, obs, 3)
        assert obs.labels() == [("PUT", 200), ("GET", 200), ("GET", 204)]
        link.client.close()
        link.server.close()
        await link.result
        if isinstance(h.relay, SpliceRelay):
            stats = h.relay.engine.stats()
            assert stats["bytes_spliced"] > size, stats  # bodies of known length were spliced
            assert stats["http_opaque"] == 0, stats

    run(kind, scenario)


def test_a_malformed_request_is_answered_400_after_the_responses_owed(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        good = request(b"GET", b"/ok")
        await send(link.client, good + b"GET /bad HTTP/1.1\r\nBad Header\r\n\r\n")
        assert await recv_exactly(link.server, len(good)) == good
        await send(link.server, response(200, b"fine"))
        received = await recv_to_eof(link.client)
        assert received == response(200, b"fine") + HTTP_ERROR_RESPONSES[400]
        # The instance got the good request only, then the end of the stream.
        assert await recv_to_eof(link.server) == b""
        link.client.close()
        link.server.close()
        result = await link.result
        assert result.answered == 400
        await flushed(h, obs, 1)
        assert obs.labels() == [("GET", 200)]

    run(kind, scenario)


def test_a_pinned_connection_answers_421_to_a_request_for_another_host(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await h.open(http=True, observe=obs, pin_host=True)
        first = b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
        same = b"GET /2 HTTP/1.1\r\nHost: WWW.example.com:80\r\n\r\n"
        await send(link.client, first)
        assert await recv_exactly(link.server, len(first)) == first
        await send(link.server, response(200, b"one"))
        assert await recv_exactly(link.client, len(response(200, b"one"))) == response(200, b"one")
        await send(link.client, same + b"GET /3 HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        assert await recv_exactly(link.server, len(same)) == same
        await send(link.server, response(200, b"two"))
        received = await recv_to_eof(link.client)
        assert received == response(200, b"two") + HTTP_ERROR_RESPONSES[421]
        # Nothing of the misdirected request reached the instance.
        assert await recv_to_eof(link.server) == b""
        link.client.close()
        link.server.close()
        result = await link.result
        assert result.answered == 421
        await flushed(h, obs, 2)
        assert obs.labels() == [("GET", 200), ("GET", 200)]

    run(kind, scenario)


def test_an_oversized_request_head_is_answered_431(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        link = await open_http(h, Exchanges())
        head = b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        sender = asyncio.ensure_future(send(link.client, head))
        assert await recv_to_eof(link.client) == HTTP_ERROR_RESPONSES[431]
        link.client.close()
        sender.cancel()
        assert await recv_to_eof(link.server) == b""  # nothing of it, then the end
        link.server.close()
        assert (await link.result).answered == 431

    run(kind, scenario)


async def received_so_far(sock: socket.socket, settle: float = 0.1) -> bytes:
    """What reached ``sock`` within ``settle`` s, read without waiting for more."""
    await asyncio.sleep(settle)
    out = bytearray()
    with contextlib.suppress(BlockingIOError):
        while chunk := sock.recv(65536):
            out += chunk
    return bytes(out)


async def send_in_pieces(sock: socket.socket, data: bytes, size: int, pause: float) -> None:
    for start in range(0, len(data), size):
        await send(sock, data[start : start + size])
        await asyncio.sleep(pause)


def test_a_head_sent_in_pieces_reaches_the_instance_whole_and_at_once(kind: str) -> None:
    head = request(b"GET", b"/pieces", extra=b"User-Agent: test\r\nAccept: */*\r\n")

    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        for piece in (head[:10], head[10:40]):
            await send(link.client, piece)
            assert await received_so_far(link.server) == b""
        await send(link.client, head[40:])
        assert await recv_exactly(link.server, len(head)) == head
        await send(link.server, response())
        assert await recv_exactly(link.client, len(response())) == response()
        await flushed(h, obs, 1)
        assert obs.labels() == [("GET", 200)]
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 0

    run(kind, scenario)


def test_a_malformed_head_in_two_pieces_reaches_nothing_of_itself_to_the_instance(
    kind: str,
) -> None:
    good = request(b"GET", b"/ok")

    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        # The good request goes at once; the next head is not complete yet.
        await send(link.client, good + b"GET /bad HTTP/1.1\r\nHost: svc\r\n")
        assert await recv_exactly(link.server, len(good)) == good
        assert await received_so_far(link.server) == b""
        await send(link.client, b"Bad Header\r\n\r\n")
        await send(link.server, response(200, b"fine"))
        received = await recv_to_eof(link.client)
        assert received == response(200, b"fine") + HTTP_ERROR_RESPONSES[400]
        assert await recv_to_eof(link.server) == b""
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 400
        await flushed(h, obs, 1)
        assert obs.labels() == [("GET", 200)]

    run(kind, scenario)


def test_a_head_over_the_limit_in_many_pieces_is_answered_431_and_reaches_nothing(
    kind: str,
) -> None:
    head = b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"

    async def scenario(h: Harness) -> None:
        link = await open_http(h, Exchanges())

        async def client() -> None:
            # The relay answers at the 65,537th octet and then discards what still comes.
            with contextlib.suppress(ConnectionError):
                await send_in_pieces(link.client, head, 4096, 0.005)

        sender = asyncio.ensure_future(client())
        assert await recv_to_eof(link.client) == HTTP_ERROR_RESPONSES[431]
        assert await recv_to_eof(link.server) == b""
        await sender
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 431

    run(kind, scenario)


def test_a_40_kib_head_in_pieces_is_held_whole_then_forwarded(kind: str) -> None:
    head = request(b"GET", b"/cookies", extra=b"Cookie: " + b"c" * 40_000 + b"\r\n")

    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        await send_in_pieces(link.client, head[:-10], 5000, 0.01)
        assert await received_so_far(link.server) == b""
        if isinstance(h.relay, SpliceRelay):
            assert h.relay.engine.stats()["buffers_lent"] == 1  # the held head's
        await send(link.client, head[-10:])
        assert await recv_exactly(link.server, len(head)) == head
        await send(link.server, response())
        assert await recv_exactly(link.client, len(response())) == response()
        await flushed(h, obs, 1)
        assert obs.labels() == [("GET", 200)]
        if isinstance(h.relay, SpliceRelay):
            assert h.relay.engine.stats()["buffers_lent"] == 0  # given back once out
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 0

    run(kind, scenario)


def test_a_long_head_outgrows_a_small_copy_buffer_and_is_still_held_whole() -> None:
    # With 1 KiB copy buffers a 40 KiB head takes dozens of reads: held in a buffer that
    # grows, it still goes at once, and the buffer is given back.
    head = request(b"GET", b"/cookies", extra=b"Cookie: " + b"c" * 40_000 + b"\r\n")

    async def scenario(h: Harness) -> None:
        assert isinstance(h.relay, SpliceRelay)
        obs = Exchanges()
        link = await open_http(h, obs)
        await send(link.client, head[:-1])
        assert await received_so_far(link.server) == b""
        await send(link.client, head[-1:])
        assert await recv_exactly(link.server, len(head)) == head
        await send(link.server, response())
        assert await recv_exactly(link.client, len(response())) == response()
        await flushed(h, obs, 1)
        assert h.relay.engine.stats()["buffers_lent"] == 0
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 0

    run("splice", scenario, small_buffer=1024)


def test_a_held_head_the_client_leaves_unfinished_goes_as_it_came(kind: str) -> None:
    # Not a request fluxd judged or answered: the instance gets what the client sent.
    async def scenario(h: Harness) -> None:
        link = await open_http(h, Exchanges())
        await send(link.client, b"GET / HTTP/1.1\r\nHo")
        assert await received_so_far(link.server) == b""
        link.client.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(link.server) == b"GET / HTTP/1.1\r\nHo"
        link.server.close()
        assert await recv_to_eof(link.client) == b""
        link.client.close()
        assert (await link.result).answered == 0

    run(kind, scenario)


def test_bytes_held_after_an_upgrade_request_go_once_the_switch_is_accepted(kind: str) -> None:
    # After an Upgrade request the next bytes may be the new protocol's; while the answer is
    # awaited they are read as HTTP, so a partial head is held, and the switch lets it go.
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        await send(link.client, UPGRADE + b"HELLO there")
        assert await recv_exactly(link.server, len(UPGRADE)) == UPGRADE
        assert await received_so_far(link.server) == b""
        await send(link.server, SWITCHED)
        assert await recv_exactly(link.client, len(SWITCHED)) == SWITCHED
        assert await recv_exactly(link.server, 11) == b"HELLO there"
        await pass_both_ways(link, b"\x81\x05hello", b"GET nonsense\r\n\r\n")
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 0
        await flushed(h, obs, 1)
        assert obs.labels() == [("GET", 101)]

    run(kind, scenario)


def test_an_http2_preface_split_across_reads_is_relayed_whole(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        link = await open_http(h, Exchanges())
        opening = H2_PREFACE + h2_frame(4)
        await send(link.client, opening[:16])       # "PRI * HTTP/2.0\r\n": not judged yet
        assert await received_so_far(link.server) == b""
        await send(link.client, opening[16:])
        assert await recv_exactly(link.server, len(opening)) == opening
        await pass_both_ways(link, h2_frame(4, flags=1))
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 0
        if isinstance(h.relay, SpliceRelay):
            stats = h.relay.engine.stats()
            assert (stats["http_opaque"], stats["http_h2"]) == (0, 1), stats

    run(kind, scenario)


@pytest.mark.parametrize(("relay", "options"), [("splice", {}), ("python", {}),
                                               ("splice", {"small_buffer": 1024})],
                         ids=["splice", "python", "splice-1kib-buffers"])
def test_pipelined_requests_split_anywhere_arrive_intact_and_are_all_counted(
    relay: str, options: dict[str, int],
) -> None:
    # Heads from a few bytes to 20 KiB, bodies of known length and chunked, all pipelined and
    # cut at random points: whatever is held and appended, the instance gets the stream as
    # sent, and every exchange is counted (the engine reports them grouped by labels).
    rng = random.Random(17)
    asks: list[tuple[str, bytes]] = []
    for i in range(60):
        cookie = b"Cookie: %s\r\n" % (b"c" * rng.choice([0, 100, 5000, 20_000]))
        shape = rng.choice(["GET", "POST", "chunked"])
        body = bytes(rng.choice(b"abcxyz") for _ in range(rng.choice([1, 3000, 40_000])))
        if shape == "GET":
            asks.append(("GET", request(b"GET", b"/%d" % i, extra=cookie)))
        elif shape == "POST":
            asks.append(("POST", request(b"POST", b"/%d" % i, body, extra=cookie)))
        else:
            chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            asks.append(("POST", request(b"POST", b"/%d" % i, extra=cookie
                                         + b"Transfer-Encoding: chunked\r\n")[:-2]
                         + b"\r\n" + chunked))
    stream = b"".join(ask for _, ask in asks)
    ends = list(itertools.accumulate(len(ask) for _, ask in asks))

    async def instance(link: Link) -> bytes:
        loop = asyncio.get_running_loop()
        got, answered = b"", 0
        while answered < len(asks):
            chunk = await loop.sock_recv(link.server, 65536)
            assert chunk, f"EOF after {answered} requests"
            got += chunk
            complete = bisect.bisect_right(ends, len(got))
            await send(link.server, response() * (complete - answered))
            answered = complete
        return got

    async def client(link: Link) -> None:
        start = 0
        while start < len(stream):
            size = rng.randint(1, 8000)
            await send(link.client, stream[start : start + size])
            start += size
            await asyncio.sleep(rng.choice([0, 0, 0.001]))

    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        served = asyncio.create_task(instance(link))
        await client(link)
        answers = response() * len(asks)
        assert await recv_exactly(link.client, len(answers)) == answers
        assert await served == stream
        await flushed(h, obs, len(asks))
        assert Counter(obs.labels()) == Counter((method, 200) for method, _ in asks)
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 0

    run(relay, scenario, **options)


@pytest.mark.parametrize("cookie", [0, 8000], ids=["small-head", "8-kib-head"])
def test_heads_that_arrive_in_one_read_cost_no_extra_syscalls(cookie: int) -> None:
    # Holding a head that is not complete costs nothing when heads arrive whole: measured
    # before heads were held, this loop made exactly one recv() and one send() per message
    # each way (2,000 of each for 1,000 exchanges), with either head.
    rounds = 1000
    ask = request(b"GET", b"/x", extra=b"Cookie: %s\r\n" % (b"c" * cookie) if cookie else b"")

    async def scenario(h: Harness) -> None:
        assert isinstance(h.relay, SpliceRelay)
        link = await open_http(h, None)
        before = h.relay.engine.stats()
        for _ in range(rounds):
            await send(link.client, ask)
            await recv_exactly(link.server, len(ask))
            await send(link.server, response())
            await recv_exactly(link.client, len(response()))
        after = h.relay.engine.stats()
        calls = {name: after[name] - before[name] for name in ("calls_recv", "calls_send")}
        assert calls == {"calls_recv": 2 * rounds, "calls_send": 2 * rounds}, calls
        link.client.close()
        link.server.close()
        await link.result

    run("splice", scenario)


def test_a_slow_request_head_gets_408_and_an_idle_connection_is_closed(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        started = time.monotonic()  # before the opening: the first head is timed from it
        slow = await open_http(h, obs)
        idle = await open_http(h, obs)
        busy = await open_http(h, obs)
        await send(slow.client, b"GET / HTTP/1.1\r\nHost:")
        await send(idle.client, request())
        await recv_exactly(idle.server, len(request()))
        await send(idle.server, response())
        await recv_exactly(idle.client, len(response()))
        # A request waiting on a slow instance is not idle, however long it waits.
        await send(busy.client, request())
        await recv_exactly(busy.server, len(request()))
        assert await recv_to_eof(slow.client) == HTTP_ERROR_RESPONSES[408]
        assert time.monotonic() - started >= 0.3
        assert await recv_to_eof(slow.server) == b""  # nothing of the head it timed out
        assert await recv_to_eof(idle.client) == b""
        assert time.monotonic() - started >= 0.5
        await asyncio.sleep(0.3)
        await send(busy.server, response())
        assert await recv_exactly(busy.client, len(response())) == response()
        for link in (slow, idle, busy):
            link.client.close()
            link.server.close()
        assert (await slow.result).answered == 408
        assert (await idle.result).answered == 0
        await busy.result

    run(kind, scenario, http_header_timeout=0.3, http_idle_timeout=0.5)


async def pass_both_ways(link: Link, *blobs: bytes) -> None:
    """Each blob from the client reaches the server untouched, and its reverse comes back."""
    for blob in blobs:
        await send(link.client, blob)
        assert await recv_exactly(link.server, len(blob)) == blob
        await send(link.server, blob[::-1])
        assert await recv_exactly(link.client, len(blob)) == blob[::-1]


def test_an_upgrade_switches_to_plain_relaying(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        await send(link.client, UPGRADE)
        assert await recv_exactly(link.server, len(UPGRADE)) == UPGRADE
        await send(link.server, SWITCHED)
        assert await recv_exactly(link.client, len(SWITCHED)) == SWITCHED
        # Not HTTP any more: bytes that would be malformed requests pass untouched.
        await pass_both_ways(link, b"\x81\x05hello", b"GET nonsense\r\n\r\n", b"\x00" * 100_000)
        link.client.close()
        link.server.close()
        result = await link.result
        assert result.answered == 0
        await flushed(h, obs, 1)
        assert obs.labels() == [("GET", 101)]

    run(kind, scenario, http_idle_timeout=0.2)


def test_a_connection_that_opens_with_the_http2_preface_is_observed_as_http2(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        # What HTTP/2 clients with prior knowledge do: the preface and SETTINGS in one write.
        opening = H2_PREFACE + h2_frame(4)
        await send(link.client, opening)
        assert await asyncio.wait_for(recv_exactly(link.server, len(opening)), 5) == opening
        # The server's SETTINGS (MAX_CONCURRENT_STREAMS 100) and its ACK of the client's.
        answer = h2_frame(4, payload=bytes.fromhex("000300000064")) + h2_frame(4, flags=1)
        await send(link.server, answer)
        assert await asyncio.wait_for(recv_exactly(link.client, len(answer)), 5) == answer
        # Then frames both ways, whatever bytes they carry: the HEADERS block is no HPACK (a
        # literal whose value runs past the block), so observation ends, the bytes flow on.
        await pass_both_ways(link, h2_frame(4, flags=1),
                             h2_frame(1, 5, 1, b"\x82\x86\x84GET / HTTP/1.1"),
                             h2_frame(0, 1, 1, b"\x00" * 70_000))
        link.client.close()
        link.server.close()
        result = await link.result
        assert result.answered == 0
        h.relay.flush()
        assert obs.seen == []
        assert h2_counts(h.relay) == (1, 1, 0)  # observed as HTTP/2, then given up
        if isinstance(h.relay, SpliceRelay):
            assert h.relay.engine.stats()["http_opaque"] == 0  # HTTP/1.x give-ups only

    run(kind, scenario)


@pytest.mark.parametrize("lengths", [b"Content-Length: 5\r\nContent-Length: 5\r\n",
                                     b"Content-Length: 5, 5\r\n"], ids=["repeated", "list"])
def test_a_repeated_or_list_content_length_is_answered_400(kind: str, lengths: bytes) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        good = request(b"POST", b"/ok", b"hello")
        await send(link.client, good + b"POST /twice HTTP/1.1\r\nHost: svc\r\n" + lengths
                   + b"\r\nhello")
        assert await recv_exactly(link.server, len(good)) == good
        await send(link.server, response(200, b"fine"))
        received = await recv_to_eof(link.client)
        assert received == response(200, b"fine") + HTTP_ERROR_RESPONSES[400]
        assert await recv_to_eof(link.server) == b""   # nothing of the refused request
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 400
        await flushed(h, obs, 1)
        assert obs.labels() == [("POST", 200)]
        if isinstance(h.relay, SpliceRelay):
            assert h.relay.engine.stats()["http_answered"] == 1

    run(kind, scenario, deadline=15.0)


def test_the_header_timeout_runs_from_the_opening_and_closes_a_silent_client_quietly(
    kind: str,
) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        started = time.monotonic()
        silent = await open_http(h, obs)
        late = await open_http(h, obs)

        async def ended(link: Link) -> tuple[bytes, float]:
            received = await recv_to_eof(link.client)
            return received, time.monotonic() - started

        await asyncio.sleep(0.4)
        await send(late.client, b"GET / HTTP/1.1\r\nHost:")
        (nothing, silent_at), (answer, late_at) = await asyncio.gather(ended(silent),
                                                                       ended(late))
        # A client that sent nothing was asked nothing: closed quietly, both ways, after the
        # header timeout (not the idle timeout).
        assert nothing == b"" and 0.5 <= silent_at < 2.0, silent_at
        assert await recv_to_eof(silent.server) == b""
        # The first request's head counts from the opening, not from its first byte (0.9 s).
        assert answer == HTTP_ERROR_RESPONSES[408] and 0.5 <= late_at < 0.75, late_at
        for link in (silent, late):
            link.client.close()
            link.server.close()
        silent_result, late_result = await silent.result, await late.result
        assert (silent_result.answered, silent_result.error) == (0, None)
        assert late_result.answered == 408
        if isinstance(h.relay, SpliceRelay):
            stats = h.relay.engine.stats()
            assert (stats["http_header_timeouts"], stats["http_answered"]) == (2, 1), stats

    run(kind, scenario, http_header_timeout=0.5, http_idle_timeout=5.0)


CUT_BY = {side: k for k, side in enumerate(HTTP_CUT_SIDES, 1)}


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_response_cut_by_the_instance_is_counted_once_as_cut_by_it(kind: str, how: str) -> None:
    # Three pipelined GETs: the first answered, the second cut in its body, the third never
    # answered (an instance killed mid-response).
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        burst = request(b"GET", b"/1") + request(b"GET", b"/2") + request(b"GET", b"/3")
        await send(link.client, burst)
        await recv_exactly(link.server, len(burst))
        started = time.monotonic()
        partial = response(200, b"one") + b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        await send(link.server, partial + b"x" * 500)
        await recv_exactly(link.client, len(partial) + 500)
        await asyncio.sleep(0.05)
        if how == "reset":
            reset(link.server)
        else:
            link.server.close()
        with contextlib.suppress(ConnectionResetError):
            await recv_to_eof(link.client)
        link.client.close()
        await link.result
        await flushed(h, obs, 3)
        await asyncio.sleep(0.05)
        h.relay.flush()
        assert obs.labels() == [("GET", 200), ("GET", CUT_BY["instance"]),
                                ("GET", CUT_BY["instance"])]
        # The time so far: from the request head to the cut.
        elapsed_us = (time.monotonic() - started) * 1e6
        for _, _, roundtrip, total in obs.seen[1:]:
            assert 40_000 <= total <= elapsed_us + 50_000 and roundtrip <= total, obs.seen

    run(kind, scenario)


def test_an_instance_that_closes_under_a_deep_pipeline_frees_the_client(kind: str) -> None:
    # 40 pipelined GETs: 32 reach the instance, which answers 10 and closes.  The client is
    # not held waiting for ring slots that will never free, and the unanswered are counted:
    # the 22 read, and the 8 more read when the 10 answers freed slots if the relay saw those
    # before the close.
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        burst = request() * 40
        await send(link.client, burst)
        got = await recv_exactly(link.server, len(request()) * 32)
        await send(link.server, response() * 10)
        link.server.close()
        assert await recv_exactly(link.client, len(response()) * 10) == response() * 10
        with contextlib.suppress(ConnectionResetError):
            assert await recv_to_eof(link.client) == b""
        link.client.close()
        await link.result
        await flushed(h, obs, 32)
        h.relay.flush()
        assert got == burst[: len(got)]
        labels = obs.labels()
        assert labels[:10] == [("GET", 200)] * 10 and len(labels) in (32, 40)
        assert labels[10:] == [("GET", CUT_BY["instance"])] * (len(labels) - 10)

    run(kind, scenario)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_that_leaves_mid_response_is_counted_as_cutting_it(kind: str, how: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        await send(link.client, request())
        await recv_exactly(link.server, len(request()))
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
        await send(link.server, head + b"x" * 100)
        await recv_exactly(link.client, len(head) + 100)
        if how == "reset":
            reset(link.client)
        else:
            link.client.close()
        # The instance carries on until it notices: EOF (the relay passes the client's on)
        # or a reset.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await recv_to_eof(link.server)
        link.server.close()
        await link.result
        await flushed(h, obs, 1)
        await asyncio.sleep(0.05)
        h.relay.flush()
        assert obs.labels() == [("GET", CUT_BY["client"])]

    run(kind, scenario)


def test_a_header_timeout_that_cuts_a_pending_response_counts_it_as_cut_by_the_client(
    kind: str,
) -> None:
    # A request awaits a slow instance while the client's next head stalls: the header timeout
    # cannot answer 408 before the response owed, so it resets, and the first exchange is cut.
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        await send(link.client, request(b"PUT", b"/", b"abc") + b"GET / HTTP/1.1\r\nHost:")
        await recv_exactly(link.server, len(request(b"PUT", b"/", b"abc")))
        with contextlib.suppress(ConnectionResetError):
            await recv_to_eof(link.client)
        assert (await link.result).error == "ETIMEDOUT"
        await flushed(h, obs, 1)
        assert obs.labels() == [("PUT", CUT_BY["client"])]
        (_, _, roundtrip, total), = obs.seen
        assert 250_000 <= roundtrip <= total, obs.seen

    run(kind, scenario, http_header_timeout=0.3)


def test_a_request_unanswered_when_the_relay_stops_is_counted_as_cut_by_fluxd(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        await send(link.client, request(b"POST", b"/", b"abc"))
        await recv_exactly(link.server, len(request(b"POST", b"/", b"abc")))
        await h.relay.close(0.05)
        await link.result
        assert obs.labels() == [("POST", CUT_BY["fluxd"])]

    run(kind, scenario)


def test_a_close_delimited_response_ends_at_eof(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        ask = b"GET / HTTP/1.0\r\n\r\n"
        await send(link.client, ask)
        assert await recv_exactly(link.server, len(ask)) == ask
        await send(link.server, b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        link.server.close()
        assert await recv_to_eof(link.client) == b"HTTP/1.0 200 OK\r\n\r\nuntil the end"
        link.client.close()
        await link.result
        await flushed(h, obs, 1)
        assert obs.labels() == [("GET", 200)]

    run(kind, scenario)


def test_100_continue_counts_once_with_the_final_status(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        link = await open_http(h, obs)
        head = (b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n"
                b"Expect: 100-continue\r\n\r\n")
        await send(link.client, head)
        assert await recv_exactly(link.server, len(head)) == head
        await send(link.server, b"HTTP/1.1 100 Continue\r\n\r\n")
        assert await recv_exactly(link.client, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        await send(link.client, b"data")
        assert await recv_exactly(link.server, 4) == b"data"
        await send(link.server, response(201, b"ok"))
        assert await recv_exactly(link.client, len(response(201, b"ok"))) == response(201, b"ok")
        await flushed(h, obs, 1)
        await asyncio.sleep(0.05)
        h.relay.flush()
        assert obs.labels() == [("POST", 201)]
        link.client.close()
        link.server.close()
        await link.result

    run(kind, scenario)


def test_without_an_observer_http_rules_still_apply() -> None:
    async def scenario(h: Harness) -> None:
        link = await open_http(h, None)
        await send(link.client, request())
        await recv_exactly(link.server, len(request()))
        await send(link.server, response())
        await recv_exactly(link.client, len(response()))
        await send(link.client, b"NOT HTTP AT ALL\r\n\r\n")
        assert await recv_to_eof(link.client) == HTTP_ERROR_RESPONSES[400]
        link.client.close()
        link.server.close()
        assert (await link.result).answered == 400
        assert isinstance(h.relay, SpliceRelay)
        stats = h.relay.engine.stats()
        assert (stats["http_exchanges"], stats["http_answered"]) == (1, 1), stats
        assert stats["exchanges_dropped"] == 0, stats

    run("splice", scenario)


def test_many_http_connections_at_once_are_each_counted(kind: str) -> None:
    connections, rounds = 40, 25

    async def one(h: Harness, obs: Exchanges, index: int) -> None:
        link = await open_http(h, obs)
        for i in range(rounds):
            ask = request(b"GET", b"/%d/%d" % (index, i))
            await send(link.client, ask)
            await recv_exactly(link.server, len(ask))
            await send(link.server, response(200, b"r%d" % i))
            await recv_exactly(link.client, len(response(200, b"r%d" % i)))
        link.client.close()
        link.server.close()
        await link.result

    async def scenario(h: Harness) -> None:
        obs = Exchanges()
        await asyncio.gather(*(one(h, obs, i) for i in range(connections)))
        h.relay.flush()
        assert len(obs.seen) == connections * rounds
        assert set(obs.labels()) == {("GET", 200)}

    run(kind, scenario)


@pytest.mark.parametrize("timeout", [-1.0, 90000.0])
def test_engine_refuses_bad_http_timeouts(timeout: float) -> None:
    from flux._splice import SpliceEngine

    with pytest.raises(ValueError, match=r"timeout must be 0\.\.86400 seconds"):
        SpliceEngine(header_timeout=timeout)
    with pytest.raises(ValueError, match=r"timeout must be 0\.\.86400 seconds"):
        SpliceEngine(idle_timeout=timeout)
