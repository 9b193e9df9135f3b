"""The relay engine's HTTP/1.x framer (flux._splice.HttpFramerProbe).

The framer only observes: it finds message boundaries and the facts metrics need.  h11 is the
oracle: generated exchanges are parsed by an h11 server (requests) and an h11 client
(responses), and the framer, fed the same bytes split anywhere (single bytes included, bodies
partly skipped as the engine splices them), must report the same boundaries, methods and
status codes, with timestamps from the feed that carried each boundary.  Mutated streams check
the other direction: where h11 rejects a request the framer must too, except for the framer's
documented leniencies (which it reports) and its documented extra strictness (which it names).
Rules h11 cannot judge (HTTP/1.0 keep-alive, pipelining depth, protocol switches, rejections,
limits, skipping) are pinned down by tables.

The oracle and the differential checks are in tests/support/framer_oracle.py and the streams in
tests/support/http_streams.py, both shared with the fuzz target (fuzz/fuzz_http_framer.py).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux._splice import HTTP_ERROR_RESPONSES, HttpEvent, HttpFramerProbe
from tests.support.framer_oracle import (
    Run,
    SentRequest,
    check_request_stream,
    check_response_stream,
    h11_requests,
    h11_responses,
    label,
    pieces_of,
    timeless,
)
from tests.support.http_streams import (
    CHUNKED_HEAD,
    GET,
    H2_PREFACE,
    HOST,
    MALFORMED_CHUNKS,
    MALFORMED_REQUESTS,
    SAMPLE_REQUESTS,
    SAMPLE_RESPONSES,
    SNIPPETS,
)

ROOT = Path(__file__).resolve().parent.parent
EVERYTHING = 2**64 - 1
MAX_HEAD = 65536
RING = 32


# ---- table-driven rules --------------------------------------------------------------------

OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def test_a_simple_exchange_with_timestamps_positions_and_phases() -> None:
    p = HttpFramerProbe(7)
    assert (p.phase, p.head_started, p.pending, p.observing) == ("opening", 7, 0, True)
    assert p.feed("request", GET[:5], 10) == []
    assert (p.phase, p.head_started) == ("head", 7)  # the first head: timed from the opening
    [req] = p.feed("request", GET[5:], 11)
    assert (req.kind, req.method, req.pos, req.t_request_head) == ("request", "GET", len(GET), 11)
    assert (p.phase, p.pending) == ("busy", 1)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert p.feed("response", response[:-3], 20) == []
    assert p.body_remaining("response") == 3
    [ex] = p.feed("response", response[-3:], 25)
    assert ex == HttpEvent("exchange", "GET", 200, 11, 20, 25, len(response), False, False,
                           False, "")
    assert (p.phase, p.pending, p.head_started) == ("idle", 0, 0)


def test_bodies_of_known_length_are_skippable() -> None:
    p = HttpFramerProbe()
    head = b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n"
    assert p.feed("request", head + b"x" * 10) == []
    assert p.body_remaining("request") == 990
    assert p.skip("request", 500) == []
    assert p.body_remaining("request") == 490
    [req] = p.skip("request", 490, 7)
    assert (req.kind, req.method, req.pos) == ("request", "POST", len(head) + 1000)
    assert p.body_remaining("request") == 0
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1f4;name=value\r\n"
    assert p.feed("response", chunked) == []
    assert p.body_remaining("response") == 0x1F4
    assert p.skip("response", 0x1F4) == []
    assert p.body_remaining("response") == 0      # the CRLF after the chunk must be shown
    [ex] = p.feed("response", b"\r\n0\r\nTrailer: x\r\n\r\n", 9)
    assert (ex.status, ex.pos, ex.t_response_end) == (200, len(chunked) + 500 + 19, 9)


def test_skipping_past_the_body_stops_observing() -> None:
    p = HttpFramerProbe()
    p.feed("request", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n")
    [event] = p.skip("request", 4)
    assert (event.kind, event.reason) == ("opaque", "skip")
    assert not p.observing and p.body_remaining("request") == EVERYTHING
    q = HttpFramerProbe()
    [event] = q.skip("request", 1)                  # nothing is skippable in a head
    assert event.reason == "skip"


@pytest.mark.parametrize(
    ("request_", "response", "statuses"),
    [
        # HEAD: no body whatever the fields say; the next response follows at once.
        (b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n" + GET,
         b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n" + OK_EMPTY, [200, 200]),
        (b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n" + GET,
         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + OK_EMPTY, [200, 200]),
        (GET + GET, b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n" + OK_EMPTY,
         [204, 200]),
        (GET + GET, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n" + OK_EMPTY,
         [304, 200]),
        # Interim responses do not end the exchange.
        (GET, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
         + OK_EMPTY, [200]),
        # Transfer-Encoding beats Content-Length in a response.
        (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"3\r\nabc\r\n0\r\n\r\n", [200]),
        (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", [200]),
        # A response's repeated or list Content-Length is followed when the values agree
        # (a request's is refused: see MALFORMED_REQUESTS).
        (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc", [200]),
        (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", [200]),
        # Status line without a reason phrase, and with an empty one; LF line ends.
        (GET + GET,
         b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\nHTTP/1.1 404 \nContent-Length: 0\n\n",
         [200, 404]),
    ],
)
def test_response_body_length_rules(request_: bytes, response: bytes, statuses: list[int]) -> None:
    p = HttpFramerProbe()
    p.feed("request", request_)
    exchanges = [e for e in p.feed("response", response) if e.kind == "exchange"]
    assert [e.status for e in exchanges] == statuses
    assert exchanges[-1].pos == len(response)
    assert p.pending == 0 and p.observing


def test_a_response_without_length_runs_until_close() -> None:
    p = HttpFramerProbe()
    p.feed("request", GET)
    assert p.feed("response", b"HTTP/1.1 200 OK\r\n\r\nsome body", 1) == []
    assert p.body_remaining("response") == EVERYTHING
    assert p.skip("response", 10_000) == []
    [ex] = p.eof("response", 9)
    assert (ex.status, ex.close, ex.t_response_head, ex.t_response_end) == (200, True, 1, 9)
    assert ex.pos == len(b"HTTP/1.1 200 OK\r\n\r\nsome body") + 10_000
    # A Transfer-Encoding not ending in chunked is delimited by close as well.
    q = HttpFramerProbe()
    q.feed("request", GET)
    assert q.feed("response", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx") == []
    [ex] = q.eof("response")
    assert ex.close and "te-framing" in q.lenient("response")


def test_eof_inside_a_message_completes_nothing() -> None:
    p = HttpFramerProbe()
    p.feed("request", GET)
    p.feed("response", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    assert p.eof("response") == []
    assert p.feed("response", b"late bytes") == []


@pytest.mark.parametrize(
    ("request_", "response", "close"),
    [
        (GET, OK_EMPTY, False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", OK_EMPTY, True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Foo, CLOSE\r\n\r\n", OK_EMPTY, True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: closed\r\n\r\n", OK_EMPTY, False),
        (GET, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", True),
        # HTTP/1.0 closes unless keep-alive is asked for, on either side.
        (b"GET / HTTP/1.0\r\n\r\n", OK_EMPTY, True),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", OK_EMPTY, False),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
         b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
         b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", False),
        (GET, b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    ],
)
def test_keep_alive_rules(request_: bytes, response: bytes, close: bool) -> None:
    p = HttpFramerProbe()
    p.feed("request", request_)
    [ex] = p.feed("response", response)
    assert ex.close is close


def test_http10_keep_alive_connections_carry_several_exchanges() -> None:
    p = HttpFramerProbe()
    request = b"GET /%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    response = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    events = p.feed("request", b"".join(request % i for i in range(3)))
    assert [e.method for e in events] == ["GET"] * 3
    exchanges = p.feed("response", response * 3)
    assert [(e.status, e.close) for e in exchanges] == [(200, False)] * 3


def test_pipelined_requests_are_answered_in_order() -> None:
    p = HttpFramerProbe()
    requests = (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
                b"HEAD /b HTTP/1.1\r\nHost: a\r\n\r\n"
                b"DELETE /c HTTP/1.1\r\nHost: a\r\n\r\n"
                b"PROPFIND /d HTTP/1.1\r\nHost: a\r\n\r\n")
    for i, byte in enumerate(requests):
        p.feed("request", bytes([byte]), i)
    assert p.pending == 4
    responses = (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
                 b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"
                 b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
                 b"HTTP/1.1 207 Multi-Status\r\nContent-Length: 2\r\n\r\nok")
    exchanges = p.feed("response", responses)
    assert [(e.method, e.status) for e in exchanges] == [
        ("GET", 200), ("HEAD", 200), ("DELETE", 202), ("OTHER", 207)]
    assert exchanges[0].t_request_head < exchanges[1].t_request_head
    assert p.pending == 0


def test_a_pipeline_deeper_than_the_ring_waits_for_a_free_slot_and_loses_nothing() -> None:
    p = HttpFramerProbe()
    stream = GET * (RING + 8)
    events = p.feed("request", stream)
    # The next request's first byte is not taken while RING await their responses.
    assert len(events) == RING and p.pending == RING and p.blocked
    assert p.position("request") == len(GET) * RING and p.phase == "busy"
    taken, events = p.feed_once("request", stream[len(GET) * RING:])
    assert (taken, events) == (0, [])
    for n in range(RING + 8):
        [exchange] = p.feed("response", OK_EMPTY)
        assert (exchange.method, exchange.status) == ("GET", 200)
        assert not p.blocked
        p.feed("request", stream[p.position("request"):])
        assert p.pending == min(RING, RING + 7 - n) and p.observing
    assert p.position("request") == len(stream) and p.pending == 0 and not p.blocked


def test_unanswered_requests_are_what_a_connection_ending_now_cuts_short() -> None:
    p = HttpFramerProbe()
    sent = GET + b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"
    p.feed("request", sent, 10)
    assert p.unanswered() == [("GET", 10, 0), ("HEAD", 10, 0)]
    p.feed("response", b"HTTP/1.1 100 Continue\r\n\r\n", 15)
    assert p.unanswered() == [("GET", 10, 0), ("HEAD", 10, 0)]
    p.feed("response", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", 20)
    assert p.unanswered() == [("GET", 10, 20), ("HEAD", 10, 0)]
    p.feed("response", b"cde", 21)
    assert p.unanswered() == [("HEAD", 10, 0)]
    # The instance is gone: nothing more will be answered, so the client is followed no more.
    assert p.eof("response", 30) == []
    assert p.unanswered() == [("HEAD", 10, 0)] and p.phase == "opaque"
    assert p.feed("request", GET, 31) == [] and p.position("request") == len(sent + GET)


def test_an_instance_that_ends_frees_a_client_waiting_for_a_slot_of_the_ring() -> None:
    p = HttpFramerProbe()
    p.feed("request", GET * (RING + 1))
    assert p.blocked
    p.eof("response")
    assert not p.blocked and len(p.unanswered()) == RING


def test_requests_read_while_speculating_past_a_switch_are_not_unanswered_ones() -> None:
    p = HttpFramerProbe()
    upgrade = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n"
    p.feed("request", upgrade + GET)
    assert p.pending == 2 and p.unanswered() == [("GET", 0, 0)]
    p.feed("response", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\n\r\n")
    assert p.unanswered() == []


def test_the_event_buffer_bounds_one_call() -> None:
    p = HttpFramerProbe()
    p.feed("request", GET * 20)
    stream = OK_EMPTY * 20
    taken, events = p.feed_once("response", stream)
    assert 0 < taken < len(stream) and 0 < len(events) <= 16
    rest = p.feed("response", stream[taken:])
    assert [e.pos for e in events + rest] == [len(OK_EMPTY) * (i + 1) for i in range(20)]


def test_expect_100_continue() -> None:
    p = HttpFramerProbe()
    head = b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    assert p.feed("request", head, 1) == []
    assert p.feed("response", b"HTTP/1.1 100 Continue\r\n\r\n", 2) == []
    assert p.pending == 1
    [req] = p.feed("request", b"data", 3)
    assert req.pos == len(head) + 4
    [ex] = p.feed("response", b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", 4)
    assert (ex.method, ex.status, ex.t_request_head, ex.t_response_head) == ("PUT", 201, 1, 4)


def test_an_upgrade_switches_both_directions_to_plain_relaying() -> None:
    p = HttpFramerProbe()
    upgrade = (b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\n\r\n")
    [req] = p.feed("request", upgrade, 1)
    assert not req.speculative
    # The client does not wait: its next bytes may be WebSocket frames or a request.
    assert p.feed("request", b"\x81\x05hello", 2) == []
    [ex] = p.feed("response", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\n\r\n\x81\x02hi", 3)
    assert (ex.status, ex.switched, ex.t_response_head, ex.t_response_end) == (101, True, 3, 3)
    assert not p.observing and p.phase == "opaque"
    assert p.feed("request", b"GET / HTTP/1.1\r\n\r\n\x00\x00") == []
    assert p.body_remaining("request") == p.body_remaining("response") == EVERYTHING


def test_a_refused_upgrade_confirms_what_followed() -> None:
    p = HttpFramerProbe()
    upgrade = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    events = p.feed("request", upgrade + GET)
    assert [e.speculative for e in events] == [False, True]
    exchanges = p.feed("response", OK_EMPTY + OK_EMPTY)
    assert [e.status for e in exchanges] == [200, 200]
    assert p.observing and p.pending == 0


def test_an_error_while_speculating_waits_for_the_refusal() -> None:
    upgrade = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\n\r\n"
    switched = HttpFramerProbe()
    switched.feed("request", upgrade + b"\x00binary frames")
    events = switched.feed("response", b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert [e.kind for e in events] == ["exchange"]
    refused = HttpFramerProbe()
    refused.feed("request", upgrade + b"\x00binary frames")
    refusal = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno"
    events = refused.feed("response", refusal)
    assert [(e.kind, e.status, e.pos) for e in events] == [
        ("malformed", 400, len(upgrade)), ("exchange", 400, len(refusal)),
        ("reject", 400, len(refusal))]


H2_SETTINGS = bytes.fromhex("000000040000000000")      # an empty SETTINGS frame


def test_the_http2_preface_makes_the_connection_opaque_before_anything_is_judged() -> None:
    window_update = bytes.fromhex("0000040800000000000000ffff")
    stream = H2_PREFACE + H2_SETTINGS + window_update
    for size in (len(stream), 1, 7, 23, 24, 25):
        p = HttpFramerProbe()
        events = [e for piece in pieces_of(stream, [size]) for e in p.feed("request", piece)]
        assert [(e.kind, e.reason) for e in events] == [("opaque", "h2-preface")], size
        assert not p.observing and (p.phase, p.pending) == ("opaque", 0)
        assert p.body_remaining("request") == p.body_remaining("response") == EVERYTHING
        assert p.position("request") == len(stream)
        # The server's frames pass unseen, whatever they look like.
        assert p.feed("response", H2_SETTINGS + b"HTTP/1.1 200 OK\r\n\r\n") == []


def test_an_http2_server_that_speaks_first_makes_the_connection_opaque_too() -> None:
    p = HttpFramerProbe()
    [event] = p.feed("response", H2_SETTINGS)
    assert (event.kind, event.reason) == ("opaque", "unsolicited")
    assert p.feed("request", H2_PREFACE + H2_SETTINGS) == []


def test_a_stalled_http2_preface_is_a_request_head_for_the_timeouts() -> None:
    p = HttpFramerProbe(2)
    assert p.feed("request", H2_PREFACE[:10], 5) == []
    assert (p.phase, p.head_started, p.observing) == ("head", 2, True)
    assert p.body_remaining("request") == 0          # nothing may pass unseen yet


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"PRI / HTTP/1.1\r\n" + HOST + b"\r\n", [("request", "OTHER", 27, "")]),
        (b"PRI * HTTP/1.1\r\n" + HOST + b"\r\n", [("request", "OTHER", 27, "")]),
        (H2_PREFACE[:18] + GET, [("request", "OTHER", 18, ""),
                                 ("request", "GET", 18 + len(GET), "")]),
        (H2_PREFACE[:20] + b"X / HTTP/1.1\r\n" + HOST + b"\r\n",
         [("request", "OTHER", 18, ""), ("request", "OTHER", 45, "")]),
        (H2_PREFACE[:21] + b"X", [("request", "OTHER", 18, ""),
                                  ("malformed", "OTHER", 20, "start-line")]),
        (H2_PREFACE[:23] + b"\x00", [("request", "OTHER", 18, ""),
                                     ("malformed", "OTHER", 20, "start-line")]),
        (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\n\r\nx",
         [("request", "POST", 48, "")]),
        (b"P\x00", [("malformed", "OTHER", 1, "start-line"), ("reject", "OTHER", 0, "")]),
    ],
)
def test_bytes_that_only_begin_like_the_http2_preface_are_read_as_http1(
    stream: bytes, expected: list[tuple[str, str, int, str]]
) -> None:
    # The octets that matched are replayed through the HTTP/1.x readers, wherever the stream
    # was split: the same events as if PREFACE did not exist.
    for size in (len(stream), 1, 2, 5, 19):
        p = HttpFramerProbe()
        events = [e for piece in pieces_of(stream, [size]) for e in p.feed("request", piece)]
        assert [(e.kind, e.method, e.pos, e.reason) for e in events] == expected, size
        assert p.position("request") == len(stream)


@pytest.mark.parametrize("matched", range(len(H2_PREFACE)))
def test_a_stream_that_leaves_the_http2_preface_anywhere_is_judged_like_h11(
    matched: int,
) -> None:
    for odd in (b"X", b"\r\n", b" ", b"\x00", b"/ HTTP/1.1\r\nHost: a\r\n\r\n"):
        check_request_stream(H2_PREFACE[:matched] + odd + GET, [1])


def test_connect_tunnels_after_2xx_and_carries_on_after_a_refusal() -> None:
    connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    p = HttpFramerProbe()
    p.feed("request", connect + b"\x16\x03\x01 tls hello")
    [ex] = p.feed("response", b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03")
    assert (ex.method, ex.status, ex.switched) == ("CONNECT", 200, True)
    assert not p.observing
    q = HttpFramerProbe()
    q.feed("request", connect)
    [ex] = q.feed("response", b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                              b"Content-Length: 3\r\n\r\nno!")
    assert (ex.status, ex.switched, q.observing) == (407, False, True)
    q.feed("request", GET)
    [ex] = q.feed("response", OK_EMPTY)
    assert (ex.method, ex.status) == ("GET", 200)


@pytest.mark.parametrize(
    ("request_", "response", "reason"),
    [
        (b"", OK_EMPTY, "unsolicited"),
        (GET, OK_EMPTY + OK_EMPTY, "unsolicited"),
        (GET, b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected-101"),
        (GET, b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "content-length"),
        (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
         "content-length"),
        (GET, b"HTTP/1.1 200 OK\r\nContent-Length:\r\n 5\r\n\r\n", "obs-fold"),
        (GET, b"HTTP/1.1 099 Odd\r\n\r\n", "start-line"),
        (GET, b"HTTP/1.1 2000 OK\r\n\r\n", "start-line"),
        (GET, b"HTTP/1.1  200 OK\r\n\r\n", "start-line"),
        (GET, b"HTTP/1.1 200 OK\r\n\x00\r\n\r\n", "field"),
        (GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n", "chunk"),
        (GET, b"ICY 200 OK\r\n\r\n", "start-line"),
    ],
)
def test_a_response_the_framer_cannot_follow_makes_it_opaque(
    request_: bytes, response: bytes, reason: str
) -> None:
    p = HttpFramerProbe()
    p.feed("request", request_)
    events = p.feed("response", response)
    assert events[-1].kind == "opaque" and events[-1].reason == reason
    assert not p.observing and p.body_remaining("response") == EVERYTHING


def test_obs_fold_of_other_response_fields_is_followed() -> None:
    p = HttpFramerProbe()
    p.feed("request", GET)
    [ex] = p.feed("response", b"HTTP/1.1 200 OK\r\nX-Long: a\r\n\tb\r\n  c\r\n"
                              b"Content-Length: 1\r\n\r\nz")
    assert ex.status == 200 and p.observing


@pytest.mark.parametrize(
    ("request_", "reason", "h11_rejects"),
    [pytest.param(data, reason, rejects, id=name)
     for name, data, reason, rejects in MALFORMED_REQUESTS],
)
def test_a_malformed_request_head_is_rejected_at_once(
    request_: bytes, reason: str, h11_rejects: bool
) -> None:
    assert (h11_requests(request_).error is not None) is h11_rejects
    for split in (len(request_), 1):
        p = HttpFramerProbe()
        events = [e for piece in pieces_of(request_, [split])
                  for e in p.feed("request", piece)]
        malformed, reject = events
        assert (malformed.kind, malformed.reason, malformed.status) == ("malformed", reason, 400)
        assert malformed.pos < len(request_)
        assert (reject.kind, reject.status, reject.pos) == ("reject", 400, 0)
        assert not p.observing and p.phase == "opaque"
        assert p.feed("request", GET) == [] and p.feed("response", OK_EMPTY) == []


@pytest.mark.parametrize(
    ("body", "reason", "h11_rejects"),
    [pytest.param(data, reason, rejects, id=name)
     for name, data, reason, rejects in MALFORMED_CHUNKS],
)
def test_a_malformed_chunked_body_is_rejected_once_its_response_ended(
    body: bytes, reason: str, h11_rejects: bool
) -> None:
    assert (h11_requests(CHUNKED_HEAD + body).error is not None) is h11_rejects
    p = HttpFramerProbe()
    [malformed] = p.feed("request", CHUNKED_HEAD + body)
    assert (malformed.reason, malformed.status) == (reason, 400)
    assert len(CHUNKED_HEAD) <= malformed.pos < len(CHUNKED_HEAD + body)
    early = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 2\r\n\r\nno"
    exchange, reject = p.feed("response", early)
    assert (exchange.status, reject.kind, reject.status, reject.pos) == (
        413, "reject", 400, len(early))


def test_a_malformed_request_waits_for_the_responses_before_it() -> None:
    p = HttpFramerProbe()
    events = p.feed("request", GET + GET + b"BAD REQUEST\r\n\r\n")
    assert [e.kind for e in events] == ["request", "request", "malformed"]
    assert events[-1].pos == 2 * len(GET) + len(b"BAD REQUEST")
    assert [e.kind for e in p.feed("response", OK_EMPTY)] == ["exchange"]
    events = p.feed("response", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert [(e.kind, e.status) for e in events] == [("exchange", 200), ("reject", 400)]
    assert events[-1].pos == len(OK_EMPTY) + 41
    # After a close-delimited response nothing can be appended: close without answering.
    q = HttpFramerProbe()
    q.feed("request", GET + b"\x00")
    q.feed("response", b"HTTP/1.1 200 OK\r\n\r\nbody")
    events = q.eof("response")
    assert [(e.kind, e.status) for e in events] == [("exchange", 200), ("reject", 0)]
    # Nor after a response the framer cannot follow.
    r = HttpFramerProbe()
    r.feed("request", GET + b"\x00")
    events = r.feed("response", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    assert [(e.kind, e.status) for e in events] == [("opaque", 0), ("reject", 0)]


def test_head_size_is_bounded() -> None:
    def head(size: int) -> bytes:
        start = b"GET / HTTP/1.1\r\nHost: a\r\nX: "
        return start + b"x" * (size - len(start) - 4) + b"\r\n\r\n"

    p = HttpFramerProbe()
    [req] = p.feed("request", head(MAX_HEAD))
    assert req.pos == MAX_HEAD
    q = HttpFramerProbe()
    malformed, reject = q.feed("request", head(MAX_HEAD + 1))
    assert (malformed.reason, malformed.status, malformed.pos) == (
        "head-too-large", 431, MAX_HEAD)
    assert (reject.status, HTTP_ERROR_RESPONSES[431].split(b" ")[1]) == (431, b"431")
    # Trailer sections and chunk-size lines have the same bound.
    r = HttpFramerProbe()
    [malformed] = r.feed("request", CHUNKED_HEAD + b"0\r\nX: " + b"x" * MAX_HEAD)
    assert malformed.reason == "head-too-large"
    s = HttpFramerProbe()
    [malformed] = s.feed("request", CHUNKED_HEAD + b"1;" + b"x" * MAX_HEAD)
    assert malformed.reason == "head-too-large"


def test_empty_lines_before_a_request_are_ignored() -> None:
    p = HttpFramerProbe()
    assert p.feed("request", b"\r\n\n\r\n", 1) == []
    assert (p.phase, p.head_started) == ("head", 0)  # still the first request's time
    [req] = p.feed("request", GET, 2)
    assert req.pos == 5 + len(GET)
    assert p.lenient("request") == {"empty-line"}
    assert h11_requests(b"\r\n" + GET).error is not None   # h11 is stricter here


def test_lenient_transfer_codings_still_frame_by_chunked() -> None:
    for te in (b"Transfer-Encoding: gzip, chunked\r\n",
               b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
               b"Transfer-Encoding: chunked;x=1\r\n"):
        p = HttpFramerProbe()
        [req] = p.feed("request", b"POST / HTTP/1.1\r\n" + HOST + te + b"\r\n"
                                  b"3\r\nabc\r\n0\r\n\r\n")
        assert req.method == "POST" and "te-list" in p.lenient("request")
    accepted = [b"Content-Length: 00000000000000000005\r\n", b"Content-Length:\t5 \r\n"]
    for cl in accepted:
        p = HttpFramerProbe()
        head = b"POST / HTTP/1.1\r\n" + HOST + cl + b"\r\n"
        assert h11_requests(head + b"hello").messages
        [req] = p.feed("request", head + b"hello")
        assert req.pos == len(head) + 5


def test_request_phases_for_the_timeouts() -> None:
    p = HttpFramerProbe(3)
    assert (p.phase, p.head_started) == ("opening", 3)  # nothing sent yet
    p.feed("request", b"POST / HTTP/1.1\r\nHo", 5)
    assert (p.phase, p.head_started) == ("head", 3)     # the first head counts from the opening
    p.feed("request", b"st: a\r\nContent-Length: 2\r\n\r\n", 6)
    assert p.phase == "busy"
    p.feed("request", b"ab", 7)
    assert p.phase == "busy"                         # the response is awaited
    p.feed("response", OK_EMPTY)
    assert (p.phase, p.head_started) == ("idle", 0)
    p.feed("request", b"\r\nGE", 9)
    assert (p.phase, p.head_started) == ("head", 9)     # a later head counts from its first byte
    p.eof("request")
    assert p.phase == "opaque"
    # Empty lines are bytes: the connection is no longer opening, its first head is due.
    q = HttpFramerProbe(4)
    q.feed("request", b"\r\n", 6)
    assert (q.phase, q.head_started) == ("head", 4)
    # The first request's end, EOF, a switch or a response: never "opening" again.
    r = HttpFramerProbe(4)
    r.eof("request")
    assert r.phase == "opaque"


def test_the_open_head_is_where_a_request_not_judged_yet_began() -> None:
    # What the relays hold back: from the first octet of a head to its end, never body,
    # chunk-size lines, trailers, empty lines or bytes after the stream stopped.
    p = HttpFramerProbe()
    assert p.open_head == 0                         # may still be the HTTP/2 preface
    p.feed("request", b"PRI ")
    assert p.open_head == 0
    p.feed("request", b"/")                         # not the preface: a PRI request
    assert p.open_head == 0
    p.feed("request", b" HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n")
    assert p.open_head == 0
    head = b"PRI / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    p.feed("request", b"\r\n3\r\nabc\r\n0\r\nX-Trailer:")
    assert p.open_head is None                      # chunk lines and trailers are no head
    p.feed("request", b" 1\r\n\r\n\r\n")
    assert p.open_head is None                      # between requests
    p.feed("request", b"\r\nGET / HTTP/1.1\r\nHo")
    end = len(head) + len(b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert p.open_head == end + 4                   # after the empty lines
    p.feed("request", b"st: a\r\nContent-Length: 2\r\n\r\na")
    assert p.open_head is None                      # a body
    p.feed("request", b"bGET / HTTP/1.1\r\nBad Field\r\n")
    assert p.open_head is None                      # malformed: nothing more is judged
    q = HttpFramerProbe()
    q.feed("request", H2_PREFACE)
    assert q.open_head is None                      # HTTP/2
    r = HttpFramerProbe()
    r.feed("request", b"GET / HT")
    r.eof("request")
    assert r.open_head is None                      # the stream ended


def test_unknown_side_names_fail_clearly() -> None:
    with pytest.raises(ValueError, match="side must be 'request' or 'response', not 'client'"):
        HttpFramerProbe().feed("client", b"x")


@pytest.mark.parametrize("status", sorted(HTTP_ERROR_RESPONSES))
def test_canned_error_responses_are_valid_http(status: int) -> None:
    verdict = h11_responses([SentRequest()], HTTP_ERROR_RESPONSES[status])
    [response] = verdict.messages
    assert (response.status, response.end) == (status, len(HTTP_ERROR_RESPONSES[status]))
    assert verdict.stopped                          # Connection: close


# ---- generated exchanges, h11 as the oracle ------------------------------------------------

TCHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING = {b"content-length", b"transfer-encoding", b"connection", b"host", b"upgrade",
           b"expect"}
VALUE_OCTETS = bytes(b for b in range(256) if b not in b"\x00\t\n\x0b\x0c\r ")
VCHARS = bytes(range(0x21, 0x7F))


def _alphabet(octets: bytes) -> bytes:
    """A translation table mapping any octet into `octets`: one draw per string rather than
    per octet (generation dominates these tests' time, so strategies are built once, here)."""
    return bytes(octets[i % len(octets)] for i in range(256))


TOKEN_TABLE, VALUE_TABLE, VCHAR_TABLE = (_alphabet(TCHARS), _alphabet(VALUE_OCTETS),
                                         _alphabet(VCHARS))
tokens = st.binary(min_size=1, max_size=10).map(lambda b: b.translate(TOKEN_TABLE))
other_names = tokens.filter(lambda n: n.lower() not in FRAMING)
eols = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])
ows = st.sampled_from([b"", b" ", b" ", b"\t", b"  \t"])
words = st.lists(st.binary(min_size=1, max_size=6).map(lambda b: b.translate(VALUE_TABLE)),
                 max_size=3)
separators = st.sampled_from([b" ", b"\t", b"  "])
cases = st.sampled_from([bytes.lower, bytes.title, bytes.upper])
bodies = st.binary(max_size=40) | st.sampled_from([b"HTTP/1.1 200 OK\r\n\r\n", b"0\r\n\r\n"])
chunks = st.lists(st.binary(min_size=1, max_size=24), max_size=3)
size_styles = st.sampled_from([b"%x", b"%X", b"0%x", b"00%X"])
extensions = st.sampled_from([b"", b";a", b";name=value", b';q="x y"', b" ", b";a=b \t"])
kinds = st.sampled_from(["plain"] * 6 + ["upgrade", "connect"])
methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                           b"TRACE", b"PROPFIND"]) | tokens.filter(lambda m: m != b"CONNECT")
targets = st.binary(max_size=12).map(lambda b: b"/" + b.translate(VCHAR_TABLE))
closes = st.sampled_from([b"close", b"Close", b"keep-alive, close", b"x,close"])
framings = st.sampled_from(["none", "length", "chunked"])
cl_shapes = st.sampled_from(["plain", "zeros", "list", "twice"])
single_cl_shapes = st.sampled_from(["plain", "zeros"])
interims = st.lists(st.sampled_from([100, 102, 103]), max_size=2)
statuses = (st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500])
            | st.integers(200, 999).filter(lambda s: s != 101))
reasons = st.sampled_from([b" OK", b" ", b"", b" Some reason", b" \tx\x80y"])
sizes = st.lists(st.integers(1, 48), min_size=1, max_size=6)
coins = st.lists(st.booleans(), min_size=1, max_size=8)


def line(draw: st.DrawFn, name: bytes, value: bytes) -> bytes:
    return draw(cases)(name) + b":" + draw(ows) + value + draw(ows) + draw(eols)


def extra_fields(draw: st.DrawFn, most: int = 3) -> list[bytes]:
    return [line(draw, name, draw(separators).join(draw(words)))
            for name in draw(st.lists(other_names, max_size=most))]


def chunked_body(draw: st.DrawFn) -> bytes:
    out = b""
    for chunk in [*draw(chunks), b""]:
        out += draw(size_styles) % len(chunk) + draw(extensions) + b"\r\n"
        out += chunk + (b"\r\n" if chunk else b"")
    return out + b"".join(extra_fields(draw, 2)) + draw(eols)


def content_length_fields(draw: st.DrawFn, n: int, *, single: bool = False) -> list[bytes]:
    """A Content-Length of n; repeated or as a list unless `single` (a request's: those are
    refused, see MALFORMED_REQUESTS)."""
    value = b"%d" % n
    shape = draw(single_cl_shapes if single else cl_shapes)
    if shape == "zeros":
        return [line(draw, b"content-length", b"00" + value)]
    if shape == "list":
        return [line(draw, b"content-length", value + b", " + value)]
    return [line(draw, b"content-length", value)] * (2 if shape == "twice" else 1)


@dataclass(frozen=True)
class Exchange:
    request: bytes
    response: bytes
    method: str
    close: bool         # the framer should flag the exchange
    switched: bool
    until_close: bool   # the response ends at EOF
    sent: SentRequest   # what the h11 client must send to read the response


def exchange(draw: st.DrawFn, last: bool) -> Exchange:
    kind = draw(kinds)
    method = b"CONNECT" if kind == "connect" else draw(methods)
    http10 = last and kind == "plain" and draw(st.booleans())
    target = b"example.com:443" if kind == "connect" else draw(targets)
    lines = [method + b" " + target + b" HTTP/1." + (b"0" if http10 else b"1") + draw(eols)]
    fields = extra_fields(draw)
    if not http10 or draw(st.booleans()):
        fields.append(line(draw, b"host", b"example.com"))
    request_close = http10
    if kind == "upgrade":
        fields += [line(draw, b"upgrade", b"websocket"), line(draw, b"connection", b"Upgrade")]
    elif last and not http10 and draw(st.booleans()):
        request_close = True
        fields.append(line(draw, b"connection", draw(closes)))
    elif draw(st.booleans()):
        fields.append(line(draw, b"connection", b"keep-alive"))
        request_close = False
    framing = draw(framings)
    if http10 and framing == "chunked":
        framing = "length"
    body = b""
    if framing == "length":
        body = draw(bodies)
        fields += content_length_fields(draw, len(body), single=True)
    elif framing == "chunked":
        fields.append(line(draw, b"transfer-encoding", b"chunked"))
        body = chunked_body(draw)
    if framing != "none" and not http10 and draw(st.booleans()):
        fields.append(line(draw, b"expect", b"100-continue"))
    request = b"".join(lines + list(draw(st.permutations(fields)))) + draw(eols) + body

    interim = b""
    for code in draw(interims):
        interim += b"HTTP/1.1 %d Interim" % code + draw(eols)
        interim += b"".join(extra_fields(draw, 1)) + draw(eols)
    switched = False
    if kind == "upgrade" and last and draw(st.booleans()):
        status, switched = 101, True
    elif kind == "connect" and last and draw(st.booleans()):
        status, switched = (204 if draw(st.booleans()) else 200), True
    elif kind == "connect":
        status = 407
    else:
        status = draw(statuses)
    http10_response = last and not switched and draw(st.booleans())
    head = b"HTTP/1.%d %d" % (0 if http10_response else 1, status) + draw(reasons) + draw(eols)
    rfields = extra_fields(draw)
    response_close = http10_response
    if last and not switched and draw(st.booleans()):
        rfields.append(line(draw, b"connection", b"close"))
        response_close = True
    elif draw(st.booleans()):
        rfields.append(line(draw, b"connection", b"keep-alive"))
        response_close = False
    if switched and status == 101:
        rfields.append(line(draw, b"upgrade", b"websocket"))
    no_body = switched or method == b"HEAD" or status in (204, 304)
    rframing = draw(framings)
    if rframing == "none" and not (last and not switched):
        rframing = "length"                         # "none": until close, only at the end
    if http10_response and rframing == "chunked":
        rframing = "length"
    rbody = b""
    if rframing == "length":
        rbody = draw(bodies)
        rfields += content_length_fields(draw, len(rbody))
    elif rframing == "chunked":
        rfields.append(line(draw, b"transfer-encoding", b"chunked"))
        rbody = chunked_body(draw)
    else:
        rbody = draw(bodies)
    if no_body:
        rbody = b""
    until_close = rframing == "none" and not no_body
    response = interim + head + b"".join(draw(st.permutations(rfields))) + draw(eols) + rbody
    if switched:
        # The new protocol's bytes, never confused with HTTP.
        request += b"\x00" + draw(st.binary(max_size=20))
        response += draw(st.binary(max_size=20))
    return Exchange(
        request=request,
        response=response,
        method=label(method),
        close=(request_close or response_close or until_close),
        switched=switched,
        until_close=until_close,
        sent=SentRequest(method, kind == "upgrade"),
    )


@st.composite
def conversations(draw: st.DrawFn) -> list[Exchange]:
    n = draw(st.integers(1, 5))
    return [exchange(draw, last=i == n - 1) for i in range(n)]


delivery_styles = st.sampled_from(["random", "bytewise", "requests-first", "lockstep"])


def deliver(run: Run, data: st.DataObject, streams: dict[str, bytes],
            gates: list[int], response_ends: list[int]) -> None:
    """Show both streams in pieces, interleaved, skipping some body bytes as the engine
    splices them; no response byte goes before its gate (the request's head, or all of it)."""
    done = {"request": 0, "response": 0}
    style = data.draw(delivery_styles)
    plan = [1] if style == "bytewise" else data.draw(sizes)
    sides, skips = data.draw(coins), data.draw(coins)
    step = 0
    while done["request"] < len(streams["request"]) or done["response"] < len(
            streams["response"]):
        step += 1
        opened = sum(1 for g in gates if g <= done["request"])
        limit = len(streams["response"]) if opened == len(gates) else (
            response_ends[opened - 1] if opened else 0)
        if done["response"] >= limit:
            side = "request"
        elif done["request"] == len(streams["request"]) or style != "random":
            side = "response"
        else:
            side = "request" if sides[step % len(sides)] else "response"
        end = len(streams[side]) if side == "request" else limit
        if style == "lockstep" and side == "request":
            end = min(end, next((g for g in gates if g > done["request"]), end))
        stop = min(end, done[side] + plan[step % len(plan)])
        remaining = run.probe.body_remaining(side)
        if remaining and skips[step % len(skips)]:
            stop = min(stop, done[side] + remaining)
            run.skip(side, stop - done[side])
        else:
            run.feed(side, streams[side][done[side]:stop])
        done[side] = stop
    run.eof("response")


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(conversation=conversations(), data=st.data())
def test_generated_exchanges_have_the_boundaries_h11_finds(
    conversation: list[Exchange], data: st.DataObject
) -> None:
    streams = {"request": b"".join(x.request for x in conversation),
               "response": b"".join(x.response for x in conversation)}
    last = conversation[-1]
    requests = h11_requests(streams["request"],
                            accept_switch_at=len(conversation) - 1 if last.switched else None)
    responses = h11_responses([x.sent for x in conversation], streams["response"])
    # The generator only writes what h11 accepts, all of it.
    assert requests.error is None and responses.error is None, (requests, responses)
    assert len(requests.messages) == len(responses.messages) == len(conversation)

    run = Run()
    # A response may start once its request head is out; a switch only once the whole request
    # is (the server reads it before it answers 101 or 2xx to CONNECT).
    gates = [r.head_end for r in requests.messages]
    if last.switched:
        gates[-1] = requests.messages[-1].end
    deliver(run, data, streams, gates, [r.end for r in responses.messages])
    assert [e.kind for e in run.events if e.kind not in ("request", "exchange")] == []
    assert run.probe.lenient("request") == run.probe.lenient("response") == frozenset()
    assert [(e.method, e.pos, e.t_request_head) for e in run.of("request")] == [
        (r.method, r.end, run.when("request", r.head_end - 1)) for r in requests.messages]
    expected = []
    for x, req, resp in zip(conversation, requests.messages, responses.messages, strict=True):
        t_head = run.when("response", resp.head_end - 1)
        t_end = run.now if x.until_close else (
            t_head if resp.switched else run.when("response", resp.end - 1))
        expected.append(HttpEvent(
            "exchange", req.method, resp.status, run.when("request", req.head_end - 1), t_head,
            t_end, resp.end, x.close, x.switched, False, ""))
    assert run.of("exchange") == expected
    assert run.probe.observing is not last.switched


SAMPLE_SENT = [SentRequest(b"GET"), SentRequest(b"POST"), SentRequest(b"PUT"),
               SentRequest(b"HEAD"), SentRequest(b"GET", upgrade=True), SentRequest(b"OPTIONS")]


def test_every_split_point_gives_the_same_events() -> None:
    whole = Run()
    whole.feed("request", SAMPLE_REQUESTS)
    whole.feed("response", SAMPLE_RESPONSES)
    whole.eof("response")
    reference = timeless(whole.events)
    assert [(e.kind, e.method, e.status) for e in reference if e.kind == "exchange"] == [
        ("exchange", "GET", 200), ("exchange", "POST", 201), ("exchange", "PUT", 200),
        ("exchange", "HEAD", 200), ("exchange", "GET", 426), ("exchange", "OPTIONS", 200)]
    check_request_stream(SAMPLE_REQUESTS)
    check_response_stream(SAMPLE_SENT, SAMPLE_RESPONSES)
    for side, stream in (("request", SAMPLE_REQUESTS), ("response", SAMPLE_RESPONSES)):
        other = "response" if side == "request" else "request"
        others = SAMPLE_RESPONSES if side == "request" else SAMPLE_REQUESTS
        for k in range(len(stream) + 1):
            run = Run()
            if side == "response":
                run.feed(other, others)
            run.feed(side, stream[:k])
            run.feed(side, stream[k:])
            if side == "request":
                run.feed(other, others)
            run.eof("response")
            assert timeless(run.events) == reference, f"split at {k} of the {side} stream"
    bytewise = Run()
    for i in range(len(SAMPLE_REQUESTS)):
        bytewise.feed("request", SAMPLE_REQUESTS[i:i + 1])
    for i in range(len(SAMPLE_RESPONSES)):
        bytewise.feed("response", SAMPLE_RESPONSES[i:i + 1])
    bytewise.eof("response")
    assert timeless(bytewise.events) == reference


# ---- mutated streams: h11 rejects, the framer must too -------------------------------------

@st.composite
def mutated(draw: st.DrawFn, stream: bytes) -> bytes:
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        if op == "delete":
            del data[at:at + draw(st.integers(1, 4))]
        else:
            snippet = draw(st.sampled_from(SNIPPETS) | st.binary(min_size=1, max_size=3))
            data[at:at + (len(snippet) if op == "replace" else 0)] = snippet
    return bytes(data)


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_requests_are_judged_like_h11(data: st.DataObject) -> None:
    conversation = data.draw(conversations())
    stream = b"".join(x.request for x in conversation if not x.switched)
    mutant = data.draw(mutated(stream or GET))
    check_request_stream(mutant, data.draw(st.lists(st.integers(1, 30), max_size=4)))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_responses_are_judged_like_h11(data: st.DataObject) -> None:
    conversation = data.draw(conversations())
    stream = b"".join(x.response for x in conversation)
    mutant = data.draw(mutated(stream))
    check_response_stream([x.sent for x in conversation], mutant,
                          data.draw(st.lists(st.integers(1, 30), max_size=4)))


# ---- the fuzz target -------------------------------------------------------------------------

def test_the_fuzz_target_runs_briefly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_http_framer.py"), "-atheris_runs=3000",
         "-seed=1", "-timeout=10", f"-artifact_prefix={tmp_path}/"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Done 3000 in" in result.stderr, result.stderr[-3000:]


# ---- a pinned host (a published port shared by host name) ----------------------------------


@pytest.mark.parametrize(
    ("first", "later"),
    [
        (b"www.example.com", b"WWW.Example.COM"),
        (b"www.example.com", b"www.example.com:8080"),
        (b"www.example.com.", b"www.example.com"),
        (b"www.example.com:80", b"  www.example.com.:443 "),
        (b"[::1]:80", b"[::1]"),
    ],
)
def test_a_pinned_connection_takes_later_requests_for_the_same_host(
    first: bytes, later: bytes
) -> None:
    p = HttpFramerProbe()
    p.pin_host()
    for host in (first, later, first):
        events = p.feed("request", b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert [e.kind for e in events] == ["request"], host
        [exchange] = p.feed("response", OK_EMPTY)
        assert exchange.status == 200


@pytest.mark.parametrize(
    ("first", "later"),
    [
        (b"Host: www.example.com\r\n", b"Host: api.example.com\r\n"),
        (b"Host: www.example.com\r\n", b"Host: www.example.co\r\n"),
        (b"Host: a.example.com\r\n", b"Host: b.example.com\r\n"),  # even one service's names
        (b"", b"Host: www.example.com\r\n"),  # HTTP/1.0 without a Host pins "none"
        (b"Host: www.example.com\r\n", b""),
    ],
)
def test_a_pinned_connection_answers_421_to_a_request_for_another_host(
    first: bytes, later: bytes
) -> None:
    p = HttpFramerProbe()
    p.pin_host()
    assert [e.kind for e in p.feed("request", b"GET / HTTP/1.0\r\n" + first + b"Connection: "
                                   b"keep-alive\r\n\r\n")] == ["request"]  # fmt: skip
    later_request = b"GET /x HTTP/1.0\r\n" + later + b"\r\n"
    malformed, = p.feed("request", later_request)
    assert (malformed.kind, malformed.reason, malformed.status) == ("malformed", "misdirected", 421)
    # Answered once the response owed before it is out, as a 400 is.
    exchange, reject = p.feed(
        "response", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    )
    assert (exchange.status, reject.kind, reject.status) == (200, "reject", 421)
    assert HTTP_ERROR_RESPONSES[421].startswith(b"HTTP/1.1 421 Misdirected Request\r\n")


def test_an_unpinned_connection_takes_any_host() -> None:
    p = HttpFramerProbe()
    for host in (b"a.example", b"b.example"):
        assert [e.kind for e in p.feed("request", b"GET / HTTP/1.1\r\nHost: " + host
                                       + b"\r\n\r\n")] == ["request"]  # fmt: skip
        p.feed("response", OK_EMPTY)
