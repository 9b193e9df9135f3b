"""Fuzz target: the relay engine's HTTP/2 observer, with atheris (libFuzzer).

    make fuzz                                        # both targets, corpus kept in .var/fuzz/
    .venv/bin/python fuzz/fuzz_h2_observer.py -atheris_runs=2000    # what `make test` runs

Each input plans a conversation -- streams of plain requests, gRPC calls and resets, answered
in an input-chosen order, header blocks split over CONTINUATION frames, Huffman or not, table
size updates -- built with hyperframe and hpack (tests/support/h2_frames.py), then mutated at
input-chosen places or not, and fed in input-chosen pieces.  Checks:
  - the same events and decoded fields whatever the split;
  - unmutated, observation never gives up, every decoded field is what hpack's decoder reads
    from the same blocks, and the exchanges are exactly the plan's (stream, status, gRPC path
    and status, or who cut it);
  - mutated, that nothing breaks (positions add up, a given-up observer passes all), and that
    the Python relay's watch (flux/relay/h2watch.py, the oracle) agrees: the same exchanges
    ended in the same order, the same streams open, and a give-up for the same reason (an
    HPACK error may come first, or alone, in the engine: it decodes blocks as they arrive).
The observer is C without coverage instrumentation, so hpack's and hyperframe's code (and the
watch's) is instrumented instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["hpack", "hyperframe", "flux.relay.h2watch"]):
    from hpack import Decoder

    from flux.relay.h2watch import H2Counters, H2Watch
    from tests.support.h2_frames import Peer, headers, rst, settings

from flux._splice import HTTP_METHODS, H2ObserverProbe


def plan_conversation(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, bytes, list, list]:
    """(client bytes, instance bytes, the blocks each sent, the exchanges expected)."""
    client, server = Peer(fdp.ConsumeBool()), Peer(fdp.ConsumeBool())
    requests = [settings()]
    responses = [settings(), settings(ack=True)]
    blocks: tuple[list[bytes], list[bytes]] = ([], [])
    expected = []
    streams = [2 * i + 1 for i in range(fdp.ConsumeIntInRange(1, 6))]
    for stream in streams:
        kind = fdp.ConsumeIntInRange(0, 2)
        path = f"/pkg.S{fdp.ConsumeIntInRange(0, 3)}/M{fdp.ConsumeIntInRange(0, 3)}"
        fields = [(":method", "POST" if kind == 1 else "GET"), (":scheme", "http"),
                  (":path", path), (":authority", "svc")]
        if kind == 1:
            fields.append(("content-type", "application/grpc"))
        if fdp.ConsumeBool():
            fields.append(("x-" + fdp.ConsumeUnicodeNoSurrogates(6).encode().hex(),
                           fdp.ConsumeUnicodeNoSurrogates(20).encode().hex()))
        if fdp.ConsumeIntInRange(0, 5) == 0:
            client.encoder.header_table_size = fdp.ConsumeIntInRange(0, 4096)
        block = client.block(fields)
        blocks[0].append(block)
        requests.append(headers(stream, block, end_stream=True,
                                pieces=fdp.ConsumeIntInRange(1, 3)))
        if kind == 2:
            requests.append(rst(stream))
            expected.append(("cut", stream, 1, None, -1))
            continue
        status = fdp.PickValueInList([200, 204, 404, 503])
        code = fdp.ConsumeIntInRange(0, 16)
        answer = [(":status", str(status))]
        if kind == 1:
            answer += [("content-type", "application/grpc"), ("grpc-status", str(code))]
        block = server.block(answer)
        blocks[1].append(block)
        responses.append(headers(stream, block, end_stream=True,
                                 pieces=fdp.ConsumeIntInRange(1, 2)))
        expected.append(("exchange", stream, status, path if kind == 1 else None,
                         code if kind == 1 else -1))
    # The client's stream is fed first: its resets come before every response.
    expected.sort(key=lambda e: e[0] != "cut")
    return b"".join(requests), b"".join(responses), list(blocks), expected


def mutate(fdp: atheris.FuzzedDataProvider, stream: bytes) -> bytes:
    data = bytearray(stream)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        at = fdp.ConsumeIntInRange(0, len(data))
        if fdp.ConsumeBool():
            del data[at:at + fdp.ConsumeIntInRange(1, 4)]
        else:
            data[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4))
    return bytes(data)


def run(requests: bytes, responses: bytes, sizes: list[int]) -> tuple[list, list]:
    probe = H2ObserverProbe(collect=True)
    events = []
    for side, stream in (("request", requests), ("response", responses)):
        at = 0
        i = 0
        while at < len(stream):
            size = sizes[i % len(sizes)] if sizes else len(stream)
            events += probe.feed(side, stream[at:at + size])
            at += size
            i += 1
        assert probe.position(side) == len(stream)
        if not probe.observing:
            assert probe.body_remaining(side) == 2**64 - 1
    return [(e.kind, e.stream, e.status, e.grpc_path, e.grpc_status, e.reason)
            for e in events], probe.fields()


def run_oracle(requests: bytes, responses: bytes, sizes: list[int]) -> tuple[list, list, str]:
    """The same streams through the Python watch: (ended exchanges, open streams, give-up)."""
    notices: list[tuple[str, str, int, int]] = []
    watch = H2Watch(H2Counters(), lambda *n: notices.append(n), HTTP_METHODS)
    for index, stream in enumerate((requests, responses)):
        at = 0
        i = 0
        while at < len(stream):
            size = sizes[i % len(sizes)] if sizes else len(stream)
            watch.feed(index, stream[at:at + size], 0)
            at += size
            i += 1
    ended = [(x.method, status, x.grpc_path, x.grpc_code) for x, status in watch.ended]
    gave_up = [reason for kind, reason, _, _ in notices if kind == "h2-gave-up"]
    return ended, sorted(watch.streams), gave_up[0] if gave_up else ""


def compare_with_oracle(requests: bytes, responses: bytes, sizes: list[int]) -> None:
    probe = H2ObserverProbe()
    events = []
    for side, stream in (("request", requests), ("response", responses)):
        events += probe.feed(side, stream)
    ended, open_streams, gave_up = run_oracle(requests, responses, sizes)
    reasons = [e.reason for e in events if e.kind == "gave-up"]
    engine = reasons[0] if reasons else ""
    if engine or gave_up:
        # The engine reads a frame as it arrives, the watch a header block's frames whole:
        # an HPACK error or a pad length longer than the frame can be the engine's first
        # reason, or its only one (the frame never ended); and the watch alone bounds the
        # block it keeps ("memory", from the frame's length).
        assert (engine == gave_up or engine in ("hpack", "padding")
                or gave_up == "memory"), (events, gave_up)
        return
    assert [(e.method, e.status, e.grpc_path, e.grpc_status) for e in events
            if e.kind in ("exchange", "cut")] == ended, (events, ended)
    assert probe.open_streams == open_streams


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    requests, responses, blocks, expected = plan_conversation(fdp)
    mutated = fdp.ConsumeBool()
    if mutated:
        if fdp.ConsumeBool():
            requests = mutate(fdp, requests)
        else:
            responses = mutate(fdp, responses)
    sizes = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    whole = run(requests, responses, [])
    assert run(requests, responses, sizes) == whole
    compare_with_oracle(requests, responses, sizes)
    if mutated:
        return
    events, fields = whole
    assert [e[:5] for e in events] == expected, (events, expected)
    decoded = []
    for side_blocks in blocks:
        decoder = Decoder()
        for block in side_blocks:
            decoded += [(n, v) for n, v in decoder.decode(block, raw=True)]
    # The probe logs the client's blocks first (fed first), then the instance's.
    assert fields == decoded


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
