"""HTTP/2 byte streams for tests and the fuzz target: frames built with hyperframe, header
blocks with hpack's encoder (the oracle the engine's libnghttp2 decoding is checked against).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

Headers = Sequence[tuple[str | bytes, str | bytes]]

GRPC_REQUEST_HEADERS: Headers = (
    (":method", "POST"), (":scheme", "http"), (":authority", "svc"),
    ("content-type", "application/grpc"), ("te", "trailers"),
)


def settings(table_size: int | None = None, ack: bool = False) -> bytes:
    if ack:
        return SettingsFrame(0, flags=["ACK"]).serialize()
    values = {SettingsFrame.MAX_CONCURRENT_STREAMS: 100}
    if table_size is not None:
        values[SettingsFrame.HEADER_TABLE_SIZE] = table_size
    return SettingsFrame(0, settings=values).serialize()


def headers(
    stream: int,
    block: bytes,
    end_stream: bool = False,
    pieces: int = 1,
    pad: int = 0,
    priority: bool = False,
) -> bytes:
    """A header block as a HEADERS frame and pieces - 1 CONTINUATION frames."""
    size = -(-len(block) // pieces) if block else 0
    parts = [block[i:i + size] for i in range(0, len(block), size)] if size else [b""]
    parts += [b""] * (pieces - len(parts))
    first = HeadersFrame(stream, parts[0])
    if end_stream:
        first.flags.add("END_STREAM")
    if pad:
        first.flags.add("PADDED")
        first.pad_length = pad
    if priority:
        first.flags.add("PRIORITY")
        first.depends_on, first.stream_weight = 0, 15
    frames: list[Frame] = [first]
    frames += [ContinuationFrame(stream, part) for part in parts[1:]]
    frames[-1].flags.add("END_HEADERS")
    return b"".join(f.serialize() for f in frames)


def data(stream: int, payload: bytes, end_stream: bool = False) -> bytes:
    frame = DataFrame(stream, payload)
    if end_stream:
        frame.flags.add("END_STREAM")
    return frame.serialize()


def rst(stream: int, code: int = 8) -> bytes:
    return RstStreamFrame(stream, code).serialize()


def window_update(stream: int, increment: int = 65535) -> bytes:
    return WindowUpdateFrame(stream, increment).serialize()


class Peer:
    """One endpoint's encoder: header blocks in order, as its HPACK state requires."""

    def __init__(self, huffman: bool = True) -> None:
        self.encoder = Encoder()
        self.huffman = huffman

    def block(self, fields: Iterable[tuple[str | bytes, str | bytes]]) -> bytes:
        return bytes(self.encoder.encode(list(fields), huffman=self.huffman))

    def request(self, stream: int, method: str = "GET", path: str = "/",
                extra: Headers = (), end_stream: bool = True) -> bytes:
        fields = [(":method", method), (":scheme", "http"), (":path", path),
                  (":authority", "svc"), *extra]
        return headers(stream, self.block(fields), end_stream=end_stream)

    def grpc_request(self, stream: int, path: str, message: bytes = b"\0\0\0\0\0") -> bytes:
        block = self.block([GRPC_REQUEST_HEADERS[0], GRPC_REQUEST_HEADERS[1], (":path", path),
                            *GRPC_REQUEST_HEADERS[2:]])
        return headers(stream, block) + data(stream, message, end_stream=True)

    def response(self, stream: int, status: int = 200, body: bytes = b"",
                 extra: Headers = (), trailers: Headers = ()) -> bytes:
        out = headers(stream, self.block([(":status", str(status)), *extra]),
                      end_stream=not body and not trailers)
        if body:
            out += data(stream, body, end_stream=not trailers)
        if trailers:
            out += headers(stream, self.block(trailers), end_stream=True)
        return out
