"""HTTP/2 connections through both relays: byte-exact frames, streams reported as exchanges.

The HTTP/2 observation contract (one exchange per client-initiated stream, gRPC calls with
their grpc-status, cuts by RST_STREAM or by the connection's end, giving up without cutting)
checked the way tests/test_relay_http.py checks HTTP/1.x: the test is the client and the
instance, builds every frame with ``hyperframe`` and every header block with ``hpack``, and
checks that each side received exactly what the other sent and what the relay reported per
exchange: (method, status, grpc).  Then real clients and servers through the relays: curl and
h2load against nghttpd, and a grpcio client against a grpcio server, all on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

from flux.relay import HTTP_CUT_SIDES, GrpcCall
from flux.relay.h2watch import MAX_BLOCK, MAX_STREAMS, PREFACE, H2Counters, H2Watch
from tests.support.nghttpd import nghttpd
from tests.support.relay_harness import (
    KINDS,
    LOOPBACK,
    Harness,
    Link,
    h2_counts,
    recv_exactly,
    recv_to_eof,
    reset,
    run,
    send,
)

CLIENT = 1 + HTTP_CUT_SIDES.index("client")
INSTANCE = 1 + HTTP_CUT_SIDES.index("instance")
FLUXD = 1 + HTTP_CUT_SIDES.index("fluxd")
SVC = "/pkg.Svc/Method"
Header = tuple[str, str]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Calls:
    """What the relay reported, one (method, status, grpc) per exchange, times beside."""

    seen: list[tuple[str, int, GrpcCall | None]] = field(default_factory=list)
    times: list[tuple[int, int]] = field(default_factory=list)

    def __call__(
        self,
        method: str,
        status: int,
        roundtrips_us: list[int],
        totals_us: list[int],
        grpc: GrpcCall | None,
    ) -> None:
        assert len(roundtrips_us) == len(totals_us) > 0
        for roundtrip, total in zip(roundtrips_us, totals_us, strict=True):
            assert 0 <= roundtrip <= total
            self.seen.append((method, status, grpc))
            self.times.append((roundtrip, total))


async def reported(h: Harness, calls: Calls, count: int, timeout: float = 5.0) -> None:
    """Wait until ``count`` exchanges were reported."""
    await h.reported(calls.seen, count, timeout)


# ---- frames (hyperframe) and header blocks (hpack) --------------------------------------------


def frame(f: Frame, *flags: str) -> bytes:
    for flag in flags:
        f.flags.add(flag)
    return f.serialize()


def headers(stream: int, block: bytes, *flags: str, pad: int = 0, priority: bool = False) -> bytes:
    """A HEADERS frame carrying the whole ``block`` (END_HEADERS) unless flags say otherwise."""
    f = HeadersFrame(stream, block)
    if pad:
        f.flags.add("PADDED")
        f.pad_length = pad
    if priority:
        f.flags.add("PRIORITY")
        f.depends_on, f.stream_weight, f.exclusive = 0, 200, True
    return frame(f, *flags)


def data(stream: int, payload: bytes = b"", *flags: str) -> bytes:
    return frame(DataFrame(stream, payload), *flags)


def settings(values: dict[int, int] | None = None) -> bytes:
    return frame(SettingsFrame(0, settings=values or {}))


SETTINGS_ACK = frame(SettingsFrame(0), "ACK")


def rst(stream: int, code: int = 8) -> bytes:
    return frame(RstStreamFrame(stream, error_code=code))


class H2:
    """One HTTP/2 connection through the relay, both ends driven by the test: an HPACK encoder
    per side, and sends that check the other side receives exactly what was sent."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.client_encoder = Encoder()
        self.server_encoder = Encoder()

    def request_block(self, method: str = "GET", path: str = "/", *, extra: Iterable[Header] = (),
                      huffman: bool = True) -> bytes:
        fields = [(":method", method), (":scheme", "http"), (":path", path),
                  (":authority", "svc"), *extra]
        return bytes(self.client_encoder.encode(fields, huffman=huffman))

    def grpc_block(self, path: str = SVC) -> bytes:
        return self.request_block("POST", path, extra=[("content-type", "application/grpc"),
                                                       ("te", "trailers")])

    def response_block(self, status: int | None = 200, *, extra: Iterable[Header] = (),
                       huffman: bool = True) -> bytes:
        fields = [] if status is None else [(":status", str(status))]
        return bytes(self.server_encoder.encode([*fields, *extra], huffman=huffman))

    def request(self, stream: int, method: str = "GET", path: str = "/", *flags: str) -> bytes:
        return headers(stream, self.request_block(method, path), "END_HEADERS", *flags)

    def response(self, stream: int, status: int = 200, *flags: str) -> bytes:
        return headers(stream, self.response_block(status), "END_HEADERS", *flags)

    async def client_sends(self, *frames: bytes) -> None:
        blob = b"".join(frames)
        await send(self.link.client, blob)
        assert await recv_exactly(self.link.server, len(blob)) == blob

    async def server_sends(self, *frames: bytes) -> None:
        blob = b"".join(frames)
        await send(self.link.server, blob)
        assert await recv_exactly(self.link.client, len(blob)) == blob

    async def close(self) -> None:
        self.link.client.close()
        self.link.server.close()
        result = await self.link.result
        assert result.answered == 0


async def open_h2(h: Harness, calls: Calls, *first: bytes,
                  client_settings: dict[int, int] | None = None,
                  server_settings: dict[int, int] | None = None) -> H2:
    """A connection opened as clients with prior knowledge do: the preface, SETTINGS and the
    ``first`` frames in one write; then the server's SETTINGS and ACK, and the client's ACK."""
    link = await h.open(http=True, observe=calls)
    conn = H2(link)
    await conn.client_sends(PREFACE + settings(client_settings), *first)
    await conn.server_sends(settings(server_settings), SETTINGS_ACK)
    await conn.client_sends(SETTINGS_ACK)
    return conn


# ---- scenarios driven with raw frames --------------------------------------------------------


@pytest.mark.parametrize("huffman", [True, False], ids=["huffman", "plain"])
def test_streams_are_exchanges_with_method_and_status_and_bytes_pass_exactly(
    kind: str, huffman: bool
) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        link = await h.open(http=True, observe=calls)
        conn = H2(link)
        # The first request in the same write as the preface: the relay must see the bytes
        # after the preface in that read.  The same encoder throughout: later blocks refer
        # to the dynamic table the earlier ones filled.
        extra = [("user-agent", "test/1"), ("x-trace", "a" * 40)]
        first = headers(1, conn.request_block("GET", "/a", extra=extra, huffman=huffman),
                        "END_HEADERS", "END_STREAM")
        await conn.client_sends(PREFACE + settings(), first)
        await conn.server_sends(settings(), SETTINGS_ACK)
        ok = conn.response_block(200, extra=[("content-type", "text/plain")], huffman=huffman)
        await conn.server_sends(headers(1, ok, "END_HEADERS"), data(1, b"hello", "END_STREAM"))
        await reported(h, calls, 1)
        for stream, method, status in [(3, "POST", 201), (5, "BREW", 404), (7, "DELETE", 204)]:
            block = conn.request_block(method, "/a", extra=extra, huffman=huffman)
            await conn.client_sends(headers(stream, block, "END_HEADERS"),
                                    data(stream, b"body" * 100, "END_STREAM"))
            answer = conn.response_block(status, extra=[("content-type", "text/plain")],
                                         huffman=huffman)
            await conn.server_sends(headers(stream, answer, "END_HEADERS", "END_STREAM"))
        await reported(h, calls, 4)
        await conn.close()
        assert calls.seen == [("GET", 200, None), ("POST", 201, None), ("OTHER", 404, None),
                              ("DELETE", 204, None)]
        assert h2_counts(h.relay) == (1, 0, 0)

    run(kind, scenario)


def test_an_instance_that_speaks_first_is_followed_from_its_first_byte(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        link = await h.open(http=True, observe=calls)
        conn = H2(link)
        # An HTTP/2 server sends its SETTINGS on accept, here before any client byte, and
        # raises the table the client's encoder may use: the client's first request needs it.
        await conn.server_sends(settings({SettingsFrame.HEADER_TABLE_SIZE: 8192}))
        # The preface's first part is held (it may yet be an HTTP/1.x request head) and goes
        # with the rest.
        await send(link.client, PREFACE[:10])
        await conn.server_sends(frame(SettingsFrame(0), "ACK")[:4])  # a frame in two reads
        conn.client_encoder.header_table_size = 8192
        rest = PREFACE[10:] + settings() + SETTINGS_ACK + conn.request(1, "GET", "/", "END_STREAM")
        await send(link.client, rest)
        assert await recv_exactly(link.server, 10 + len(rest)) == PREFACE[:10] + rest
        await conn.server_sends(SETTINGS_ACK[4:], conn.response(1, 200, "END_STREAM"))
        await reported(h, calls, 1)
        await conn.close()
        assert calls.seen == [("GET", 200, None)]
        assert h2_counts(h.relay) == (1, 0, 0)

    run(kind, scenario)


def test_an_instance_that_speaks_first_to_an_http1_client_is_relayed_unobserved(
    kind: str,
) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        link = await h.open(http=True, observe=calls)
        conn = H2(link)
        await conn.server_sends(b"220 hello\r\n")
        # The client's bytes begin as the preface does, then differ.
        await conn.client_sends(b"PRI * HTTP/1.1\r\nHost: a\r\n\r\n")
        await conn.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await conn.close()
        h.relay.flush()
        assert calls.seen == []
        assert h2_counts(h.relay) == (0, 0, 0)

    run(kind, scenario)


def test_roundtrip_and_total_run_from_the_request_head_to_the_response_head_and_end(
    kind: str,
) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        started = time.monotonic()
        await conn.client_sends(conn.request(1, "GET", "/", "END_STREAM"))
        await asyncio.sleep(0.05)
        await conn.server_sends(conn.response(1))
        await asyncio.sleep(0.1)
        await conn.server_sends(data(1, b"x" * 1000, "END_STREAM"))
        elapsed_us = (time.monotonic() - started) * 1e6
        await reported(h, calls, 1)
        (roundtrip, total), = calls.times
        # Event-loop timers may fire up to a millisecond early.
        assert 48_000 <= roundtrip < 150_000, calls.times
        assert roundtrip + 98_000 <= total <= elapsed_us, (calls.times, elapsed_us)
        await conn.close()

    run(kind, scenario)


def test_frames_split_across_many_reads_are_followed(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        request = headers(1, conn.grpc_block(), "END_HEADERS") + data(1, b"\0\0\0\0\2hi",
                                                                     "END_STREAM")
        answer = (headers(1, conn.response_block(200, extra=[("content-type",
                                                              "application/grpc")]),
                          "END_HEADERS")
                  + data(1, b"\0\0\0\0\2ok")
                  + headers(1, conn.response_block(None, extra=[("grpc-status", "0")]),
                            "END_HEADERS", "END_STREAM"))
        for blob, src, dst in [(request, conn.link.client, conn.link.server),
                               (answer, conn.link.server, conn.link.client)]:
            for at in range(0, len(blob), 3):
                await send(src, blob[at:at + 3])
                await asyncio.sleep(0.001)
            assert await recv_exactly(dst, len(blob)) == blob
        await reported(h, calls, 1)
        await conn.close()
        assert calls.seen == [("POST", 200, GrpcCall(SVC, 0))]

    run(kind, scenario)


def test_header_table_size_updates_and_a_raised_settings_table_size(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        # Each side lets the other's encoder use a 16 KiB table (SETTINGS_HEADER_TABLE_SIZE).
        conn = await open_h2(h, calls, client_settings={1: 16384},
                             server_settings={SettingsFrame.HEADER_TABLE_SIZE: 16384})
        big = [(f"x-big-{i}", "v" * 1000) for i in range(10)]  # ~10 KiB of table entries
        conn.client_encoder.header_table_size = 16384
        conn.server_encoder.header_table_size = 16384
        for stream in (1, 3):  # the second time, all of big comes from the dynamic table
            await conn.client_sends(headers(stream, conn.request_block("GET", "/", extra=big),
                                            "END_HEADERS", "END_STREAM"))
            await conn.server_sends(headers(stream, conn.response_block(200, extra=big),
                                            "END_HEADERS", "END_STREAM"))
        # Shrink to 256 (evicting everything), then back up to 4096: each a table size update
        # at the start of the next block.
        conn.client_encoder.header_table_size = 256
        await conn.client_sends(conn.request(5, "PUT", "/small", "END_STREAM"))
        conn.client_encoder.header_table_size = 4096
        await conn.client_sends(conn.request(7, "PATCH", "/", "END_STREAM"))
        await conn.server_sends(conn.response(7, 202, "END_STREAM"),
                                conn.response(5, 200, "END_STREAM"))
        await reported(h, calls, 4)
        await conn.close()
        assert calls.seen == [("GET", 200, None), ("GET", 200, None), ("PATCH", 202, None),
                              ("PUT", 200, None)]
        assert h2_counts(h.relay) == (1, 0, 0)

    run(kind, scenario)


def test_padding_priority_continuation_and_request_trailers(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        await conn.client_sends(
            headers(1, conn.request_block("GET", "/padded"), "END_HEADERS", "END_STREAM",
                    pad=17),
            headers(3, conn.request_block("GET", "/priority"), "END_HEADERS", "END_STREAM",
                    priority=True),
            headers(5, conn.request_block("HEAD", "/both"), "END_HEADERS", "END_STREAM",
                    pad=255, priority=True),
        )
        # A request split over HEADERS and two CONTINUATIONs, then a body and trailers (a
        # second client block on the stream: no new exchange).
        block = conn.request_block("POST", "/split", extra=[("x-long", "z" * 300)])
        await conn.client_sends(
            headers(7, block[:5], pad=3),
            frame(ContinuationFrame(7, block[5:40])),
            frame(ContinuationFrame(7, block[40:]), "END_HEADERS"),
            data(7, b"payload"),
            headers(7, bytes(conn.client_encoder.encode([("x-checksum", "abc")])),
                    "END_HEADERS", "END_STREAM"),
        )
        answer = conn.response_block(200, extra=[("x-long", "y" * 300)])
        await conn.server_sends(
            headers(1, conn.response_block(200), "END_HEADERS", "END_STREAM", pad=8),
            headers(3, conn.response_block(301), "END_HEADERS", "END_STREAM"),
            headers(5, conn.response_block(200), "END_HEADERS", "END_STREAM", pad=1),
            headers(7, answer[:9]),
            frame(ContinuationFrame(7, answer[9:]), "END_HEADERS"),
            data(7, b"done", "END_STREAM"),
        )
        await reported(h, calls, 4)
        await conn.close()
        assert calls.seen == [("GET", 200, None), ("GET", 301, None), ("HEAD", 200, None),
                              ("POST", 200, None)]

    run(kind, scenario)


def test_informational_responses_are_not_the_response_head(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        await conn.client_sends(
            headers(1, conn.request_block("POST", "/up", extra=[("expect", "100-continue")]),
                    "END_HEADERS"))
        await conn.server_sends(conn.response(1, 100))
        await conn.client_sends(data(1, b"body", "END_STREAM"))
        await conn.server_sends(conn.response(1, 103), conn.response(1, 200),
                                data(1, b"ok", "END_STREAM"))
        await reported(h, calls, 1)
        await conn.close()
        assert calls.seen == [("POST", 200, None)]

    run(kind, scenario)


def test_grpc_calls_carry_their_path_and_grpc_status(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        message = b"\0\0\0\0\5hello"
        grpc_type = [("content-type", "application/grpc")]
        # 1: a normal response (headers, message, trailers with grpc-status 0).
        # 3: trailers-only (grpc-status in the response head, END_STREAM).
        # 5: application/grpc+proto, trailers with grpc-status 16 in a CONTINUATION.
        # 7: a gRPC response that ends with no grpc-status.
        # 9: not gRPC (no content-type), though its response carries a grpc-status.
        await conn.client_sends(
            headers(1, conn.grpc_block("/helloworld.Greeter/SayHello"), "END_HEADERS"),
            data(1, message, "END_STREAM"),
            headers(3, conn.grpc_block("/pkg.Svc/Missing"), "END_HEADERS"),
            data(3, message, "END_STREAM"),
            headers(5, conn.request_block("POST", "/pkg.Svc/Auth", extra=[
                ("content-type", "application/grpc+proto")]), "END_HEADERS", "END_STREAM"),
            headers(7, conn.grpc_block("/pkg.Svc/Silent"), "END_HEADERS", "END_STREAM"),
            conn.request(9, "POST", "/pkg.Svc/Plain", "END_STREAM"),
        )
        # Blocks are encoded in the order they are sent (the decoder's table follows it).
        await conn.server_sends(
            headers(1, conn.response_block(200, extra=grpc_type), "END_HEADERS"),
            data(1, message),
            headers(1, conn.response_block(None, extra=[("grpc-status", "0")]),
                    "END_HEADERS", "END_STREAM"),
            headers(3, conn.response_block(200, extra=[*grpc_type, ("grpc-status", "5"),
                                                       ("grpc-message", "not found")]),
                    "END_HEADERS", "END_STREAM"),
            headers(5, conn.response_block(200, extra=grpc_type), "END_HEADERS"),
        )
        trailers = conn.response_block(None, extra=[("grpc-status", "16"),
                                                    ("grpc-message", "who are you")])
        await conn.server_sends(
            headers(5, trailers[:2], "END_STREAM"),
            frame(ContinuationFrame(5, trailers[2:]), "END_HEADERS"),
            headers(7, conn.response_block(200, extra=grpc_type), "END_HEADERS"),
            data(7, message, "END_STREAM"),
            headers(9, conn.response_block(200, extra=[("grpc-status", "3")]),
                    "END_HEADERS", "END_STREAM"),
        )
        await reported(h, calls, 5)
        await conn.close()
        assert calls.seen == [
            ("POST", 200, GrpcCall("/helloworld.Greeter/SayHello", 0)),
            ("POST", 200, GrpcCall("/pkg.Svc/Missing", 5)),
            ("POST", 200, GrpcCall("/pkg.Svc/Auth", 16)),
            ("POST", 200, GrpcCall("/pkg.Svc/Silent", -1)),
            ("POST", 200, None),
        ]

    run(kind, scenario)


def test_rst_stream_cuts_an_exchange_by_the_side_that_sent_it(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        await conn.client_sends(conn.request(1, "GET", "/a", "END_STREAM"),
                                headers(3, conn.grpc_block(), "END_HEADERS"),
                                conn.request(5, "GET", "/c", "END_STREAM"))
        await conn.server_sends(conn.response(1), data(1, b"partial"))
        await conn.client_sends(rst(1))  # the client cancels a response under way
        await reported(h, calls, 1)
        await conn.server_sends(rst(3, 7))  # the server refuses the gRPC call
        await reported(h, calls, 2)
        # After a reset, frames of the stream change nothing; stream 5 completes.
        await conn.server_sends(data(1, b"late", "END_STREAM"), rst(3),
                                conn.response(5, 200, "END_STREAM"))
        await reported(h, calls, 3)
        await conn.close()
        assert calls.seen == [("GET", CLIENT, None), ("POST", INSTANCE, GrpcCall(SVC, -1)),
                              ("GET", 200, None)]
        (cut_roundtrip, cut_total), (refused_roundtrip, refused_total), _ = calls.times
        assert cut_roundtrip < cut_total  # the response head came before the cut
        assert refused_roundtrip == refused_total  # no response head: roundtrip = total

    run(kind, scenario)


@pytest.mark.parametrize("how", ["client-closes", "instance-closes", "instance-resets"])
def test_a_connection_that_ends_with_streams_open_cuts_them(kind: str, how: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        await conn.client_sends(conn.request(1, "GET", "/done", "END_STREAM"),
                                conn.request(3, "GET", "/head", "END_STREAM"),
                                headers(5, conn.grpc_block(), "END_HEADERS"))
        await conn.server_sends(conn.response(1, 200, "END_STREAM"), conn.response(3, 200),
                                data(3, b"some"))
        await reported(h, calls, 1)
        link = conn.link
        if how == "client-closes":
            link.client.close()
            assert await recv_to_eof(link.server) == b""
            link.server.close()
            side = CLIENT
        elif how == "instance-closes":
            link.server.close()
            assert await recv_to_eof(link.client) == b""
            link.client.close()
            side = INSTANCE
        else:
            reset(link.server)
            with contextlib.suppress(ConnectionResetError):
                await recv_to_eof(link.client)
            link.client.close()
            side = INSTANCE
        await link.result
        await reported(h, calls, 3)
        assert calls.seen == [("GET", 200, None), ("GET", side, None),
                              ("POST", side, GrpcCall(SVC, -1))]

    run(kind, scenario)


def test_a_relay_that_stops_cuts_the_streams_open_as_fluxd(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        await conn.client_sends(conn.request(1, "GET", "/", "END_STREAM"))
        await h.relay.close(grace=0.1)
        await conn.link.result
        await reported(h, calls, 1)
        assert calls.seen == [("GET", FLUXD, None)]

    run(kind, scenario)


def test_interleaved_streams_end_in_the_order_their_responses_end(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        await conn.client_sends(conn.request(1, "GET", "/one", "END_STREAM"),
                                headers(3, conn.request_block("POST", "/three"), "END_HEADERS"),
                                conn.request(5, "DELETE", "/five", "END_STREAM"))
        await conn.client_sends(data(3, b"a" * 5000), data(3, b"b", "END_STREAM"))
        await conn.server_sends(
            conn.response(5, 202), conn.response(1, 200), data(5, b"x" * 3000),
            conn.response(3, 201), data(1, b"y" * 20_000), data(3, b"z", "END_STREAM"),
            data(1, b"", "END_STREAM"), data(5, b"w", "END_STREAM"),
        )
        await reported(h, calls, 3)
        await conn.close()
        assert calls.seen == [("POST", 201, None), ("GET", 200, None), ("DELETE", 202, None)]

    run(kind, scenario)


def test_a_server_push_is_decoded_but_not_counted(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        await conn.client_sends(conn.request(1, "GET", "/page", "END_STREAM"))
        # The promise's block (request fields of the pushed stream) fills the server's
        # dynamic table; the responses after it refer to those entries.
        promised = bytes(conn.server_encoder.encode([
            (":method", "GET"), (":scheme", "http"), (":path", "/style.css"),
            (":authority", "svc"), ("x-pushed-by", "page-" + "p" * 50)]))
        await conn.server_sends(
            frame(PushPromiseFrame(1, promised_stream_id=2, data=promised), "END_HEADERS"),
            headers(2, conn.response_block(200, extra=[("x-pushed-by", "page-" + "p" * 50)]),
                    "END_HEADERS"),
            conn.response(1, 200),
            data(2, b"body{}", "END_STREAM"),
            data(1, b"<html>", "END_STREAM"),
        )
        await conn.client_sends(conn.request(3, "GET", "/next", "END_STREAM"))
        await conn.server_sends(
            headers(3, conn.response_block(200, extra=[("x-pushed-by", "page-" + "p" * 50)]),
                    "END_HEADERS", "END_STREAM"))
        await reported(h, calls, 2)
        await conn.close()
        assert calls.seen == [("GET", 200, None), ("GET", 200, None)]
        assert h2_counts(h.relay) == (1, 0, 0)

    run(kind, scenario)


def test_http_timeouts_do_not_apply_to_an_http2_connection(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        await conn.client_sends(headers(1, conn.request_block("POST", "/slow"), "END_HEADERS"))
        await asyncio.sleep(0.5)  # a request body that takes long, an idle connection
        await conn.client_sends(data(1, b"late", "END_STREAM"))
        await asyncio.sleep(0.5)
        await conn.server_sends(conn.response(1, 200, "END_STREAM"))
        await reported(h, calls, 1)
        await conn.close()
        assert calls.seen == [("POST", 200, None)]

    run(kind, scenario, http_header_timeout=0.2, http_idle_timeout=0.2)


GIVE_UPS = {
    # Names of the cases: what the client sends after one completed and one open exchange.
    "garbage-block": headers(5, b"\x82\x86\x84GET / HTTP/1.1", "END_HEADERS"),
    "index-out-of-table": headers(5, b"\x82\xff\x10", "END_HEADERS"),
    "orphan-continuation": frame(ContinuationFrame(5, b"\x82"), "END_HEADERS"),
    "continuation-on-another-stream": (headers(5, b"\x82")
                                       + frame(ContinuationFrame(7, b"\x84"), "END_HEADERS")),
    "block-broken-by-data": headers(5, b"\x82") + data(5, b"x"),
    "table-size-over-65536": settings({SettingsFrame.HEADER_TABLE_SIZE: 65537}),
    "table-update-above-settings": headers(5, b"\x3f\xe1\x3f\x82", "END_HEADERS"),  # 8192
    # A literal field, name "a" and a value of 65536 octets (length 127 + 1 + 127 * 128 + 3 *
    # 16384): one octet more than a field may have.
    "field-over-64k": headers(5, b"\x00\x01a\x7f\x81\xff\x03" + b"v" * 65536, "END_HEADERS"),
    "padding-longer-than-frame": bytes.fromhex("000002012d00000005") + b"\x09\x82",
}


@pytest.mark.parametrize("bad", list(GIVE_UPS), ids=list(GIVE_UPS))
def test_what_cannot_be_followed_ends_observation_and_the_bytes_flow_on(
    kind: str, bad: str
) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        await conn.client_sends(conn.request(1, "GET", "/", "END_STREAM"),
                                conn.request(3, "GET", "/open", "END_STREAM"))
        await conn.server_sends(conn.response(1, 200, "END_STREAM"), conn.response(3))
        await reported(h, calls, 1)
        await conn.client_sends(GIVE_UPS[bad])
        # Nothing is followed any more (stream 3 is forgotten, not cut), yet every byte
        # passes both ways, frames or not.
        await conn.server_sends(data(3, b"r" * 100_000, "END_STREAM"),
                                conn.response(5, 200, "END_STREAM"))
        await conn.client_sends(conn.request(9, "GET", "/after", "END_STREAM"),
                                os.urandom(50_000))
        await conn.server_sends(conn.response(9, 200, "END_STREAM"), os.urandom(70_000))
        await conn.close()
        h.relay.flush()
        assert calls.seen == [("GET", 200, None)]
        assert h2_counts(h.relay) == (1, 1, 0)

    run(kind, scenario)


def test_a_give_up_is_one_notice_naming_the_reason(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(h: Harness) -> None:
        conn = await open_h2(h, Calls())
        await conn.client_sends(GIVE_UPS["orphan-continuation"], GIVE_UPS["garbage-block"])
        await conn.close()

    with caplog.at_level("INFO", logger="flux.relay"):
        run(kind, scenario)
    lines = [r.getMessage() for r in caplog.records if r.name == "flux.relay"]
    assert len(lines) == 1, lines
    assert "stopped observing HTTP/2 from 127.0.0.1:" in lines[0], lines
    assert lines[0].endswith("(sequence)"), lines


def test_streams_beyond_256_at_once_are_not_followed(kind: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        conn = await open_h2(h, calls)
        streams = range(1, 2 * 300, 2)
        await conn.client_sends(*(conn.request(s, "GET", f"/{s}", "END_STREAM")
                                  for s in streams))
        await conn.server_sends(*(conn.response(s, 200, "END_STREAM") for s in streams))
        await reported(h, calls, MAX_STREAMS)
        # Slots free again as streams end: a later stream is followed.
        await conn.client_sends(conn.request(601, "GET", "/later", "END_STREAM"))
        await conn.server_sends(conn.response(601, 204, "END_STREAM"))
        await reported(h, calls, MAX_STREAMS + 1)
        await conn.close()
        assert calls.seen == [("GET", 200, None)] * MAX_STREAMS + [("GET", 204, None)]
        assert h2_counts(h.relay) == (1, 0, 300 - MAX_STREAMS)

    run(kind, scenario)


# ---- real clients and servers through the relays ---------------------------------------------


@contextlib.asynccontextmanager
async def relaying_to(h: Harness, upstream: str, calls: Calls) -> AsyncIterator[str]:
    """Real clients through the relay: every connection to the address yielded (the harness's
    front listener) is relayed, observed, to ``upstream`` (host:port); on leaving, waits for
    every relayed connection to end."""
    loop = asyncio.get_running_loop()
    host, port = upstream.rsplit(":", 1)
    ended: list[asyncio.Future[object]] = []

    async def accept() -> None:
        while True:
            client, _ = await loop.sock_accept(h.front)
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.setblocking(False)
            try:
                await loop.sock_connect(server, (host, int(port)))
            except BaseException:
                client.close()
                server.close()
                raise
            ended.append(h.relay.submit(client, server, http=True, observe=calls))

    accepting = loop.create_task(accept())
    try:
        front_host, front_port = h.front.getsockname()
        yield f"{front_host}:{front_port}"
    finally:
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
        if ended:
            await asyncio.wait_for(asyncio.gather(*ended), 5)


async def run_tool(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    return out.decode()


@pytest.fixture(scope="module")
def h2c_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    docroot: Path = tmp_path_factory.mktemp("h2c")
    (docroot / "index.html").write_text("over h2c\n")
    with nghttpd(docroot) as address:
        yield address


def test_curl_with_prior_knowledge_through_the_relay(kind: str, h2c_server: str) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        async with relaying_to(h, h2c_server, calls) as front:
            answers = [await run_tool("curl", "-sS", "--noproxy", "*",
                                      "--http2-prior-knowledge", "-o", "/dev/null",
                                      "-w", "%{http_version} %{http_code}",
                                      f"http://{front}/index.html")
                       for _ in range(20)]
        assert answers == ["2 200"] * 20
        await reported(h, calls, 20)
        assert calls.seen == [("GET", 200, None)] * 20
        assert h2_counts(h.relay) == (20, 0, 0)

    run(kind, scenario, deadline=30)


def test_h2load_through_the_relay_is_counted_stream_for_stream(
    kind: str, h2c_server: str
) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        async with relaying_to(h, h2c_server, calls) as front:
            out = await run_tool("h2load", "-n", "200", "-c", "4", "-m", "10",
                                 f"http://{front}/index.html")
        assert "200 succeeded, 0 failed, 0 errored" in out, out
        await reported(h, calls, 200)
        assert calls.seen == [("GET", 200, None)] * 200
        assert h2_counts(h.relay) == (4, 0, 0)

    run(kind, scenario, deadline=30)


# grpcio with raw bytes (no protoc): generic handlers, no serializers.
def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request[::-1]


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(5):
        yield b"%d:%s" % (i, request)


def _missing(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("abort returns only by raising")


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Answers only once the call is over (a deadline cancels it)."""
    while context.is_active():
        time.sleep(0.01)
    return request


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[str]:
    """A grpcio server on a free loopback port (started before a scenario counts descriptors:
    gRPC's core keeps some for the process)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("pkg.Svc", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Missing": grpc.unary_unary_rpc_method_handler(_missing),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
    })])
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    # One call straight to it, so the process's lasting gRPC descriptors exist already.
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        assert channel.unary_unary("/pkg.Svc/Unary")(b"ab", timeout=5) == b"ba"
    try:
        yield f"{LOOPBACK}:{port}"
    finally:
        server.stop(grace=None).wait(5)


def _grpc_calls(front: str) -> list[tuple[str, object]]:
    """The calls the gRPC test makes through the relay, on one channel: what each returned."""
    outcomes: list[tuple[str, object]] = []
    with grpc.insecure_channel(front) as channel:
        for i in range(3):
            outcomes.append(("unary", channel.unary_unary("/pkg.Svc/Unary")(b"%d" % i,
                                                                          timeout=5)))
        outcomes.append(("stream", list(channel.unary_stream("/pkg.Svc/Stream")(b"s",
                                                                               timeout=5))))
        for method, timeout in (("Missing", 5.0), ("Slow", 0.3)):
            try:
                channel.unary_unary(f"/pkg.Svc/{method}")(b"x", timeout=timeout)
            except grpc.RpcError as error:
                outcomes.append((method, error.code()))
    return outcomes


@contextlib.asynccontextmanager
async def delaying_to(target: str, delay: float) -> AsyncIterator[str]:
    """A loopback TCP forwarder to ``target`` (host:port) that holds every byte going there for
    ``delay`` s (the other way at once): its address.  On leaving, it closes everything."""
    loop = asyncio.get_running_loop()
    host, port = target.rsplit(":", 1)
    listener = socket.create_server((LOOPBACK, 0))
    listener.setblocking(False)
    opened: list[socket.socket] = [listener]
    tasks: list[asyncio.Task[None]] = []

    async def read(src: socket.socket, queue: asyncio.Queue[tuple[float, bytes]]) -> None:
        while chunk := await loop.sock_recv(src, 65536):
            queue.put_nowait((loop.time() + delay, chunk))
        queue.put_nowait((loop.time() + delay, b""))

    async def write(dst: socket.socket, queue: asyncio.Queue[tuple[float, bytes]]) -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not chunk:
                dst.shutdown(socket.SHUT_WR)
                return
            await loop.sock_sendall(dst, chunk)

    async def pump(src: socket.socket, dst: socket.socket, hold: float) -> None:
        with contextlib.suppress(OSError):
            if hold:
                queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
                await asyncio.gather(read(src, queue), write(dst, queue))
            else:
                while chunk := await loop.sock_recv(src, 65536):
                    await loop.sock_sendall(dst, chunk)
                dst.shutdown(socket.SHUT_WR)

    async def accept() -> None:
        while True:
            near, _ = await loop.sock_accept(listener)
            near.setblocking(False)
            far = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            far.setblocking(False)
            opened.extend((near, far))
            await loop.sock_connect(far, (host, int(port)))
            tasks.extend((loop.create_task(pump(near, far, delay)),
                          loop.create_task(pump(far, near, 0.0))))

    accepting = loop.create_task(accept())
    try:
        front_host, front_port = listener.getsockname()
        yield f"{front_host}:{front_port}"
    finally:
        for task in (accepting, *tasks):
            task.cancel()
        await asyncio.gather(accepting, *tasks, return_exceptions=True)
        for sock in opened:
            sock.close()


def test_grpc_calls_through_the_relay_are_counted_with_their_codes(
    kind: str, grpc_server: str
) -> None:
    async def scenario(h: Harness) -> None:
        calls = Calls()
        # A deadline is enforced at both ends: the client resets the stream, the server sends
        # grpc-status 4 (DEADLINE_EXCEEDED), at nearly the same moment.  Holding what reaches
        # the server for 0.1 s makes its deadline later than the client's, so the client's
        # reset passes the relay first, every time.
        async with delaying_to(grpc_server, 0.1) as server, \
                relaying_to(h, server, calls) as front:
            outcomes = await asyncio.to_thread(_grpc_calls, front)
        assert outcomes == [
            ("unary", b"0"), ("unary", b"1"), ("unary", b"2"),
            ("stream", [b"0:s", b"1:s", b"2:s", b"3:s", b"4:s"]),
            ("Missing", grpc.StatusCode.NOT_FOUND),
            ("Slow", grpc.StatusCode.DEADLINE_EXCEEDED),
        ]
        await reported(h, calls, 6)
        by_path = sorted(calls.seen, key=lambda call: str(call[2]))
        assert by_path == sorted([
            *[("POST", 200, GrpcCall("/pkg.Svc/Unary", 0))] * 3,
            ("POST", 200, GrpcCall("/pkg.Svc/Stream", 0)),
            ("POST", 200, GrpcCall("/pkg.Svc/Missing", 5)),
            ("POST", CLIENT, GrpcCall("/pkg.Svc/Slow", -1)),
        ], key=lambda call: str(call[2]))
        assert h2_counts(h.relay) == (1, 0, 0)

    run(kind, scenario, deadline=30)


# ---- the Python watch alone --------------------------------------------------------------------


def test_the_python_watch_gives_up_on_a_header_block_over_its_bound() -> None:
    """The Python watch decodes a header block whole, so it keeps at most MAX_BLOCK octets of
    one: a block that CONTINUATIONs make longer ends observation (the engine's inflater
    streams, and has no such bound to state)."""
    counters = H2Counters()
    notices: list[tuple[str, str, int, int]] = []
    watch = H2Watch(counters, lambda *notice: notices.append(notice), ("GET",))
    watch.feed(0, headers(1, b""), 1)
    for _ in range(MAX_BLOCK // 16384):  # exactly MAX_BLOCK octets so far
        watch.feed(0, frame(ContinuationFrame(1, b"\x82" * 16384)), 2)
    assert watch.following and counters.http_h2_gave_up == 0
    watch.feed(0, frame(ContinuationFrame(1, b"\x82"), "END_HEADERS"), 3)
    assert not watch.following
    assert (counters.http_h2, counters.http_h2_gave_up) == (1, 1)
    assert notices == [("h2-gave-up", "memory", 0, 0)]
