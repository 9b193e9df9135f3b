"""The engine's HTTP/2 observer (_h2_observer.pxi), driven through H2ObserverProbe.

Its HPACK decoding (libnghttp2's inflater, fed fragment by fragment as bytes arrive) is checked
against an oracle, the pure-Python ``hpack`` package, on generated header blocks: Huffman or
not, dynamic table insertions and evictions, size updates, blocks split over CONTINUATION
frames and over reads.  Its exchanges (one per client stream) are checked on hand-made
conversations, and the fuzz target (fuzz/fuzz_h2_observer.py) is run briefly.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from flux._splice import H2ObserverProbe
from tests.support.h2_frames import Peer, data, headers, rst, window_update
from tests.support.h2_frames import settings as settings_frame

ROOT = Path(__file__).resolve().parent.parent


def feed_in_pieces(probe: H2ObserverProbe, side: str, stream: bytes, sizes: list[int],
                   now: int = 0) -> list:
    """Show `stream` in pieces of the given sizes (cycled); returns the events."""
    events = []
    at = 0
    i = 0
    while at < len(stream):
        size = sizes[i % len(sizes)] if sizes else len(stream)
        events += probe.feed(side, stream[at:at + size], now)
        at += size
        i += 1
    return events


# ---- HPACK against the oracle ------------------------------------------------------------------

NAMES = [":method", ":path", ":status", "content-type", "user-agent", "accept", "cookie",
         "grpc-status", "x-custom", "x-trace-id", "authorization"]
field = st.tuples(
    st.sampled_from(NAMES) | st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
    | st.sampled_from(["GET", "/", "200", "application/grpc", "x" * 300]),
    st.integers(0, 9),
)
block_plan = st.tuples(
    st.lists(field, min_size=1, max_size=12),
    st.booleans(),                                           # huffman
    st.sampled_from([None, None, None, 0, 64, 256, 4096]),   # a size update before the block
    st.integers(1, 3),                                       # HEADERS + CONTINUATION frames
)


@settings(max_examples=150, deadline=None)
@given(st.lists(block_plan, min_size=1, max_size=8), st.lists(st.integers(1, 40), max_size=4))
def test_header_blocks_decode_as_the_hpack_oracle_decodes_them(
    plan: list, sizes: list[int]
) -> None:
    encoder = Encoder()
    oracle = Decoder()
    probe = H2ObserverProbe(collect=True)
    stream_bytes = b""
    expected = []
    for i, (fields, huffman, size_update, pieces) in enumerate(plan):
        if size_update is not None:
            encoder.header_table_size = size_update
        raw = [NeverIndexedHeaderTuple(n, v) if k == 0 else (n, v) for n, v, k in fields]
        block = bytes(encoder.encode(raw, huffman=huffman))
        expected += [(n.encode() if isinstance(n, str) else n,
                      v.encode() if isinstance(v, str) else v)
                     for n, v in oracle.decode(block, raw=True)]
        stream_bytes += headers(2 * i + 1, block, end_stream=True, pieces=pieces)
    feed_in_pieces(probe, "request", stream_bytes, sizes)
    assert probe.observing
    assert probe.fields() == expected


def test_a_larger_table_allowed_by_settings_is_followed_and_evicts_as_the_oracle() -> None:
    encoder = Encoder()
    oracle = Decoder()
    oracle.max_allowed_table_size = 16384
    probe = H2ObserverProbe(collect=True)
    # The instance allows the client a 16 KiB table: the client's decoder follows it.
    probe.feed("response", settings_frame(table_size=16384))
    assert probe.table_limit("request") == 16384
    encoder.header_table_size = 16384
    rng = random.Random(7)
    stream_bytes = b""
    expected = []
    for i in range(60):
        fields = [(f"x-field-{rng.randrange(200)}", "v" * rng.randrange(1, 400))
                  for _ in range(5)]
        block = bytes(encoder.encode(fields))
        expected += [(n.encode(), v.encode()) for n, v in fields]
        assert [(n, v) for n, v in oracle.decode(block, raw=True)] == expected[-5:]
        stream_bytes += headers(2 * i + 1, block, end_stream=True)
    probe.feed("request", stream_bytes)
    assert probe.observing
    assert probe.fields() == expected


def test_a_table_over_64_kib_ends_observation_and_bytes_still_pass() -> None:
    probe = H2ObserverProbe()
    events = probe.feed("response", settings_frame(table_size=1 << 20))
    assert [(e.kind, e.reason) for e in events] == [("gave-up", "table-size")]
    assert not probe.observing
    assert probe.body_remaining("request") == 2**64 - 1


# ---- exchanges ---------------------------------------------------------------------------------

def conversation(probe: H2ObserverProbe, client: Peer, server: Peer) -> None:
    probe.feed("request", settings_frame())
    probe.feed("response", settings_frame() + settings_frame(ack=True))


def test_each_stream_is_one_exchange_timed_from_its_heads() -> None:
    probe = H2ObserverProbe()
    client, server = Peer(), Peer()
    conversation(probe, client, server)
    assert probe.feed("request", client.request(1, "GET", "/a"), now=10) == []
    assert probe.feed("request", client.request(3, "DELETE", "/b"), now=11) == []
    assert probe.open_streams == [1, 3]
    events = probe.feed("response", server.response(3, 404), now=20)
    events += probe.feed("response", server.response(1, 200, b"hello"), now=30)
    assert [(e.kind, e.stream, e.method, e.status, e.t_request_head, e.t_response_head,
             e.grpc_path) for e in events] == [
        ("exchange", 3, "DELETE", 404, 11, 20, None),
        ("exchange", 1, "GET", 200, 10, 30, None),
    ]
    assert probe.open_streams == []


def test_informational_responses_padding_and_priority_are_passed_over() -> None:
    probe = H2ObserverProbe()
    client, server = Peer(huffman=False), Peer()
    conversation(probe, client, server)
    block = client.block([(":method", "PUT"), (":scheme", "http"), (":path", "/up"),
                          (":authority", "svc")])
    probe.feed("request", headers(1, block, pad=7, priority=True, pieces=3)
               + data(1, b"x" * 100, end_stream=True), now=5)
    early = headers(1, server.block([(":status", "100")]))
    events = probe.feed("response", early, now=6)
    assert events == []
    events = probe.feed("response", server.response(1, 201, b"made"), now=9)
    assert [(e.kind, e.method, e.status, e.t_response_head) for e in events] == [
        ("exchange", "PUT", 201, 9)]


def test_data_payloads_may_pass_unseen() -> None:
    probe = H2ObserverProbe()
    client, server = Peer(), Peer()
    conversation(probe, client, server)
    probe.feed("request", client.request(1))
    head = headers(1, server.block([(":status", "200")]))
    body = data(1, b"z" * 1000, end_stream=True)
    probe.feed("response", head + body[:9])
    assert probe.body_remaining("response") == 1000
    assert probe.skip("response", 600) == []
    assert probe.body_remaining("response") == 400
    events = probe.skip("response", 400, now=50)
    assert [(e.kind, e.status, e.pos) for e in events] == [
        ("exchange", 200, probe.position("response"))]
    assert probe.body_remaining("response") == 0


def test_grpc_calls_carry_their_path_and_status_from_trailers_or_trailers_only() -> None:
    probe = H2ObserverProbe()
    client, server = Peer(), Peer()
    conversation(probe, client, server)
    probe.feed("request", client.grpc_request(1, "/pkg.Greeter/Hello")
               + client.grpc_request(3, "/pkg.Greeter/Missing"))
    ok = server.response(1, 200, b"\0\0\0\0\2hi", extra=[("content-type", "application/grpc")],
                         trailers=[("grpc-status", "0")])
    # Trailers-only: one HEADERS block with :status, grpc-status and END_STREAM.
    missing = headers(3, server.block([(":status", "200"), ("content-type", "application/grpc"),
                                       ("grpc-status", "5"), ("grpc-message", "no")]),
                      end_stream=True)
    events = probe.feed("response", ok + missing)
    assert [(e.stream, e.status, e.grpc_path, e.grpc_status) for e in events] == [
        (1, 200, "/pkg.Greeter/Hello", 0), (3, 200, "/pkg.Greeter/Missing", 5)]


def test_a_reset_stream_is_cut_by_the_side_that_reset_it() -> None:
    probe = H2ObserverProbe()
    client, server = Peer(), Peer()
    conversation(probe, client, server)
    probe.feed("request", client.grpc_request(1, "/a.B/C") + client.request(3), now=1)
    events = probe.feed("request", rst(1, 8), now=2)   # CANCEL: a client's deadline
    events += probe.feed("response", headers(3, server.block([(":status", "200")])), now=3)
    events += probe.feed("response", rst(3, 2), now=4)
    assert [(e.kind, e.stream, e.status, e.grpc_path) for e in events] == [
        ("cut", 1, 1, "/a.B/C"), ("cut", 3, 2, None)]
    # A reset of a stream that already ended, or was never followed, changes nothing.
    assert probe.feed("request", rst(1) + rst(99)) == []


def test_request_trailers_and_server_pushes_are_decoded_but_not_counted() -> None:
    probe = H2ObserverProbe(collect=True)
    client, server = Peer(), Peer()
    conversation(probe, client, server)
    probe.feed("request", client.request(1, "POST", "/p", end_stream=False)
               + data(1, b"body") + headers(1, client.block([("x-checksum", "1")]),
                                            end_stream=True))
    assert probe.open_streams == [1]
    push_block = server.block([(":method", "GET"), (":path", "/style.css"),
                               (":scheme", "http"), (":authority", "svc")])
    promise = (len(push_block) + 4).to_bytes(3, "big") + b"\x05\x04" + (1).to_bytes(4, "big")
    promise += (2).to_bytes(4, "big") + push_block
    events = probe.feed("response", promise + server.response(2, 200, b"css")
                        + server.response(1, 200, b"ok"))
    assert [(e.kind, e.stream) for e in events] == [("exchange", 1)]
    assert (b":path", b"/style.css") in probe.fields()


def test_streams_past_the_cap_are_counted_untracked() -> None:
    probe = H2ObserverProbe()
    client = Peer()
    conversation(probe, client, Peer())
    events = probe.feed("request", b"".join(client.request(2 * i + 1) for i in range(300)))
    assert [e.kind for e in events] == ["untracked"] * 44
    assert len(probe.open_streams) == 256


def test_what_cannot_be_followed_ends_observation_without_cutting() -> None:
    client = Peer()
    block = client.block([(":method", "GET"), (":path", "/")])
    cases = {
        "hpack": headers(1, b"\xff\xff\xff\xff\xff\x7f"),
        "sequence": headers(1, block, pieces=2)[:-(9 + len(block) // 2 + 1)] + window_update(0),
        "padding": b"\x00\x00\x02\x01\x0c\x00\x00\x00\x01\x09\x00",
    }
    for reason, stream in cases.items():
        probe = H2ObserverProbe()
        events = probe.feed("request", stream)
        assert [(e.kind, e.reason) for e in events] == [("gave-up", reason)], reason
        assert not probe.observing
        assert probe.feed("request", b"\x00" * 100) == []
        assert probe.body_remaining("response") == 2**64 - 1


def test_the_fuzz_target_runs_briefly(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_h2_observer.py"), "-atheris_runs=2000",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 2000 in" in done.stderr, done.stderr[-3000:]
