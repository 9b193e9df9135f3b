"""Fuzz target: the relay engine's HTTP/1.x framer against h11, with atheris (libFuzzer).

    make fuzz                                   # ten minutes, corpus kept in .var/fuzz/
    .venv/bin/python fuzz/fuzz_http_framer.py -atheris_runs=3000    # what `make test` runs

Each input is decoded into a client's or an instance's byte stream -- a built-in valid stream
mutated at input-chosen places, or the raw input itself -- plus the sizes of the pieces it is
fed in.  The checks are the differential ones of tests/support/framer_oracle.py (which
tests/test_http_framer.py runs too): the same events whatever the split, and h11's verdict (its
boundaries, and whether it rejects) unless the framer names a deliberate difference.  The
framer is C without coverage instrumentation, so h11's parser is instrumented instead: inputs
that reach new corners of the HTTP grammar are the ones worth keeping.  A failed check raises,
which libFuzzer reports with the input that did it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["h11"]):
    import h11  # noqa: F401  (instrumented before the oracle imports it)

from tests.support.framer_oracle import SentRequest, check_request_stream, check_response_stream
from tests.support.http_streams import (
    CHUNKED_HEAD,
    GET,
    MALFORMED_CHUNKS,
    MALFORMED_REQUESTS,
    SAMPLE_REQUESTS,
    SAMPLE_RESPONSES,
    SNIPPETS,
)

REQUEST_SEEDS = [
    SAMPLE_REQUESTS,
    GET * 3,
    CHUNKED_HEAD + b"5;a=b\r\nhello\r\n0\r\nT: x\r\n\r\n" + GET,
    b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc" + GET,
    b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n" + GET,
    *(data for _, data, _, _ in MALFORMED_REQUESTS[::4]),
    *(CHUNKED_HEAD + body for _, body, _, _ in MALFORMED_CHUNKS[::3]),
]
RESPONSE_SEEDS = [
    SAMPLE_RESPONSES,
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * 2,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nA: b\r\n\r\n"
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n\x81\x00",
    b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil close",
]
SENT = [SentRequest(b"GET"), SentRequest(b"HEAD"), SentRequest(b"POST"),
        SentRequest(b"GET", upgrade=True), SentRequest(b"CONNECT")]


def mutate(fdp: atheris.FuzzedDataProvider, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        at = fdp.ConsumeIntInRange(0, len(data))
        op = fdp.ConsumeIntInRange(0, 3)
        if op == 0:
            del data[at:at + fdp.ConsumeIntInRange(1, 8)]
        else:
            if fdp.ConsumeBool():
                snippet = SNIPPETS[fdp.ConsumeIntInRange(0, len(SNIPPETS) - 1)]
            else:
                snippet = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4))
            data[at:at + (len(snippet) if op == 1 else 0)] = snippet
    return bytes(data)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    responses = fdp.ConsumeBool()
    sizes = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    sent = [SENT[fdp.ConsumeIntInRange(0, len(SENT) - 1)]
            for _ in range(fdp.ConsumeIntInRange(1, 6))] if responses else []
    seeds = RESPONSE_SEEDS if responses else REQUEST_SEEDS
    choice = fdp.ConsumeIntInRange(0, len(seeds))
    if choice == len(seeds):
        stream = fdp.ConsumeBytes(atheris.ALL_REMAINING)
    else:
        stream = mutate(fdp, seeds[choice])
    if responses:
        check_response_stream(sent, stream, sizes)
    else:
        check_request_stream(stream, sizes)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
