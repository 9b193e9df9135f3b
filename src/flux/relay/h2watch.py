"""HTTP/2 observation for the Python relay: frames followed, header blocks decoded, streams as
exchanges (the contract both relays follow; the engine's twin is in C).

Theory of operation
-------------------
A connection of an HTTP service whose client opened with the HTTP/2 preface
(``PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n``; the HTTP/1.x framer recognises it) is handed to an
:class:`H2Watch`.  It is sans-I/O: the relay shows it every byte it forwards, the client's from
the first one after the preface, the instance's from the first one, and forwards them
unchanged; the watch never holds a byte back and never cuts a connection.

Each direction is a stream of frames (RFC 9113 section 4.1): a 9-byte header (length 24 bits,
type, flags, stream id 31 bits), then the payload.  What is read of a payload:

    frame                 payload                      then
    HEADERS (1)           kept: [pad length] [5 priority bytes] fragment [padding]
    PUSH_PROMISE (5)      kept: [pad length] promised id (4) fragment [padding]
    CONTINUATION (9)      kept: fragment               a header block ends at END_HEADERS
    SETTINGS (4, no ACK)  6-byte entries, one at a time SETTINGS_HEADER_TABLE_SIZE raises the
                                                       other direction's HPACK table maximum
    RST_STREAM (3)        skipped                      the stream's exchange is cut by the sender
    DATA (0)              skipped (never read)         END_STREAM from the instance ends it
    anything else         skipped

A header block (HEADERS or PUSH_PROMISE and its CONTINUATIONs) is decoded whole, in order, by
the direction's own ``hpack.Decoder`` (HPACK is stateful: every block must pass through it,
pushes included).  The fields that matter: ``:method``, ``:path`` and ``content-type`` of a
request, ``:status`` and ``grpc-status`` of a response.

Exchanges, one per client-initiated stream: a client HEADERS block on an odd stream id above
every one the client opened before starts one (at most :data:`MAX_STREAMS` at once; the rest
are counted as untracked and not followed).  The first instance HEADERS block with a
non-informational ``:status`` is the response head; a ``grpc-status`` in any instance block of
the stream is the call's code.  The instance's frame with END_STREAM (HEADERS, or DATA once
its last byte is shown) ends the exchange; RST_STREAM cuts it (by whoever sent it).  Ended
exchanges wait in :attr:`H2Watch.ended` until the relay has written the bytes shown to the
client (the relay reports them then, as it does HTTP/1.x responses).  An exchange that ends
without a response head is cut by the instance.

Giving up: an HPACK decoding error, a CONTINUATION that does not continue the unfinished block
on its stream (or an unfinished block followed by any other frame), a HEADERS or PUSH_PROMISE
whose padding and fixed fields do not fit its payload, a table size over
:data:`MAX_TABLE_SIZE`, a field (name and value) over :data:`MAX_FIELD` octets, a header block
over :data:`MAX_BLOCK` octets.  The watch then forgets the exchanges under way (they are not
counted), counts and logs it once, and ignores the rest of the connection.

Memory per connection: the two HPACK tables (each at most :data:`MAX_TABLE_SIZE` octets of
entries), one header block being gathered per direction (at most :data:`MAX_BLOCK`), and one
small record per tracked stream (at most :data:`MAX_STREAMS`).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from hpack import Decoder, HPACKError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

from flux.relay.base import HTTP_CUT_SIDES, GrpcCall

__all__ = [
    "MAX_BLOCK",
    "MAX_FIELD",
    "MAX_STREAMS",
    "MAX_TABLE_SIZE",
    "PREFACE",
    "H2Counters",
    "H2Exchange",
    "H2Watch",
    "grpc_call",
]

log = logging.getLogger("flux.relay.h2watch")

# The client's connection preface (RFC 9113 section 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Streams followed at once per connection; one beyond is counted (untracked), not followed.
MAX_STREAMS = 256
# The largest HPACK table a SETTINGS_HEADER_TABLE_SIZE may allow; above it, observation ends.
MAX_TABLE_SIZE = 65536
# The largest header field (name and value octets, decoded); above it, observation ends.
MAX_FIELD = 65536
# The largest header block gathered (fragments of HEADERS/PUSH_PROMISE and CONTINUATIONs): the
# Python watch decodes a block whole, so this bounds what it keeps.
MAX_BLOCK = 1 << 20

_FRAME_HEADER = struct.Struct("!HBBBL")  # length (16 + 8 bits), type, flags, R + stream id
_SETTING = struct.Struct("!HL")
_END_STREAM = 0x01
_ACK = 0x01
_END_HEADERS = 0x04
_PADDED = 0x08
_PRIORITY = 0x20
_PRIORITY_BYTES = 5
_PROMISED_ID_BYTES = 4
# HTTP_CUT_SIDES index + 1 of the side that sent a RST_STREAM: 0 client, 1 instance.
_CUT_BY = (1 + HTTP_CUT_SIDES.index("client"), 1 + HTTP_CUT_SIDES.index("instance"))
_GRPC_CONTENT_TYPE = b"application/grpc"


@dataclass(slots=True)
class H2Counters:
    """What the Python relay's HTTP/2 watches counted, by the engine's counter names."""

    http_h2: int = 0  # connections observed as HTTP/2
    http_h2_gave_up: int = 0  # ... whose observation ended (the connection went on)
    http_h2_untracked: int = 0  # streams beyond MAX_STREAMS at once, not followed


@dataclass(slots=True)
class H2Exchange:
    """One client-initiated stream under way (times: the relay's monotonic ns)."""

    method: str
    t_request_head: int
    grpc_path: str | None  # the request's :path when it is a gRPC call
    status: int = 0  # the response head's :status, 0 until it is read
    t_response_head: int = 0
    grpc_code: int = -1


@dataclass(slots=True)
class _Reader:
    """Where one direction's frame stream is: the frame header being read, then its payload."""

    decoder: Decoder
    head: bytearray = field(default_factory=bytearray)
    left: int = -1  # payload octets of the current frame still to come; -1: in a frame header
    kind: int = 0
    flags: int = 0
    stream: int = 0
    payload: bytearray | None = None  # kept payload of a HEADERS/PUSH_PROMISE/CONTINUATION
    setting: bytearray | None = None  # a SETTINGS entry being read (non-ACK SETTINGS only)
    block: bytearray | None = None  # the unfinished header block, its stream, kind, END_STREAM
    block_stream: int = 0
    block_kind: int = 0
    block_ends_stream: bool = False


class _GiveUp(Exception):
    """Observation of the connection cannot go on: ``code`` names why as the engine does
    (its H2_ERR_* names: a notice's reason), the message says it in full."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _decoder() -> Decoder:
    # MAX_BLOCK bounds a block before it is decoded, MAX_FIELD each field after.
    return Decoder(max_header_list_size=1 << 62)


class H2Watch:
    """The HTTP/2 view of one connection (index 0 = client, 1 = instance); see the module
    docstring.  :meth:`feed` takes the bytes shown; :attr:`ended` collects the exchanges that
    ended, with the status to report (a real one, or who cut it: HTTP_CUT_SIDES index + 1),
    until the caller takes them once their bytes are written."""

    __slots__ = ("client_high", "counters", "ended", "following", "methods", "notify",
                 "readers", "streams")

    def __init__(self, counters: H2Counters, notify: Callable[[str, str, int, int], None],
                 methods: tuple[str, ...]) -> None:
        """``notify(kind, reason, status, count)`` writes the connection's notices (a give-up,
        exchanges cut short: flux.relay.notices); ``methods``: the method names reported as
        such (any other is "OTHER")."""
        self.counters = counters
        self.notify = notify
        self.methods = frozenset(methods)
        self.readers = (_Reader(_decoder()), _Reader(_decoder()))
        self.streams: dict[int, H2Exchange] = {}
        self.ended: list[tuple[H2Exchange, int]] = []
        self.client_high = 0  # the highest stream id a client HEADERS block came on
        self.following = True
        counters.http_h2 += 1

    def unfinished(self) -> bool:
        """An exchange is under way (or ended and not yet taken)."""
        return bool(self.streams) or bool(self.ended)

    def cut_all(self) -> list[H2Exchange]:
        """The connection ends: every exchange under way, which it cuts short."""
        cut = [exchange for exchange, _ in self.ended] + list(self.streams.values())
        self.ended.clear()
        self.streams.clear()
        return cut

    def feed(self, index: int, data: bytes | memoryview, now: int) -> None:
        """Follow ``data``, the next bytes of side ``index``'s stream, shown at ``now``."""
        if not self.following:
            return
        try:
            self._follow(index, memoryview(data), now)
        except _GiveUp as why:
            self._give_up(why)

    def _give_up(self, reason: _GiveUp) -> None:
        self.following = False
        self.streams.clear()
        self.ended.clear()
        self.counters.http_h2_gave_up += 1
        self.notify("h2-gave-up", reason.code, 0, 0)
        log.debug("HTTP/2 observation given up: %s", reason)

    def _follow(self, index: int, view: memoryview, now: int) -> None:
        r = self.readers[index]
        at, n = 0, len(view)
        while at < n:
            if r.left < 0:
                take = min(9 - len(r.head), n - at)
                r.head += view[at:at + take]
                at += take
                if len(r.head) < 9:
                    return
                high, low, r.kind, r.flags, stream = _FRAME_HEADER.unpack(r.head)
                r.head.clear()
                r.left = (high << 8) | low
                r.stream = stream & 0x7FFFFFFF
                self._frame_started(index, r)
            else:
                take = min(r.left, n - at)
                chunk = view[at:at + take]
                at += take
                r.left -= take
                if r.payload is not None:
                    r.payload += chunk
                elif r.setting is not None:
                    self._settings(index, r, chunk)
            if r.left == 0:
                r.left = -1
                self._frame_ended(index, r, now)

    def _frame_started(self, index: int, r: _Reader) -> None:
        """A frame header was read: decide what of its payload is kept."""
        r.payload = r.setting = None
        if r.block is not None:
            if r.kind != ContinuationFrame.type or r.stream != r.block_stream:
                raise _GiveUp("sequence",
                              "a header block is not continued by CONTINUATION on its stream")
        elif r.kind == ContinuationFrame.type:
            raise _GiveUp("sequence",
                          "CONTINUATION without an unfinished header block on its stream")
        if r.kind in (HeadersFrame.type, PushPromiseFrame.type, ContinuationFrame.type):
            if (0 if r.block is None else len(r.block)) + r.left > MAX_BLOCK:
                raise _GiveUp("memory", f"a header block over {MAX_BLOCK} octets")
            r.payload = bytearray()
        elif r.kind == SettingsFrame.type and not r.flags & _ACK:
            r.setting = bytearray()

    def _settings(self, index: int, r: _Reader, chunk: memoryview) -> None:
        """SETTINGS entries from side ``index``: its HEADER_TABLE_SIZE is what the other
        direction's encoder may now use (never lowered here: a lower value applies only once
        acknowledged, and the encoder then says so in its blocks)."""
        setting = r.setting
        assert setting is not None
        for octet in chunk:
            setting.append(octet)
            if len(setting) < _SETTING.size:
                continue
            ident, value = _SETTING.unpack(setting)
            setting.clear()
            if ident != SettingsFrame.HEADER_TABLE_SIZE:
                continue
            if value > MAX_TABLE_SIZE:
                raise _GiveUp("table-size",
                              f"a header table size of {value} (over {MAX_TABLE_SIZE})")
            decoder = self.readers[1 - index].decoder
            decoder.max_allowed_table_size = max(decoder.max_allowed_table_size, value)

    def _frame_ended(self, index: int, r: _Reader, now: int) -> None:
        """The current frame's last octet was shown at ``now``."""
        kind = r.kind
        if r.payload is not None:
            payload, r.payload = r.payload, None
            if kind == ContinuationFrame.type:
                assert r.block is not None
                r.block += payload
            else:
                r.block = _fragment(kind, r.flags, payload)
                r.block_stream = r.stream
                r.block_kind = kind
                r.block_ends_stream = kind == HeadersFrame.type and bool(r.flags & _END_STREAM)
            if r.flags & _END_HEADERS:
                block, r.block = r.block, None
                self._header_block(index, r, bytes(block), now)
        elif kind == DataFrame.type:
            if index == 1 and r.flags & _END_STREAM:
                self._end(r.stream, 0)
        elif kind == RstStreamFrame.type:
            self._end(r.stream, _CUT_BY[index])

    def _header_block(self, index: int, r: _Reader, block: bytes, now: int) -> None:
        try:
            fields = r.decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise _GiveUp("hpack", f"HPACK: {exc}") from None
        wanted: dict[bytes, bytes] = {}
        for name, value in fields:
            if len(name) + len(value) > MAX_FIELD:
                raise _GiveUp("hpack", f"a header field over {MAX_FIELD} octets")
            wanted.setdefault(name, value)
            if name == b"grpc-status":
                wanted[name] = value  # the last one counts
        stream = r.block_stream
        if r.block_kind != HeadersFrame.type:
            return  # a push: decoded for the table's sake only
        if index == 0:
            self._request(stream, wanted, now)
            return
        exchange = self.streams.get(stream)
        if exchange is None:
            return
        status = _number(wanted.get(b":status"), 3)
        if exchange.status == 0 and status >= 200:
            exchange.status = status
            exchange.t_response_head = now
        code = _number(wanted.get(b"grpc-status"), 4)
        if code >= 0:
            exchange.grpc_code = code
        if r.block_ends_stream:
            self._end(stream, 0)

    def _request(self, stream: int, fields: dict[bytes, bytes], now: int) -> None:
        """A client header block on ``stream``: a new odd stream opens an exchange."""
        if stream % 2 == 0 or stream <= self.client_high:
            return  # request trailers, or no client-initiated stream
        self.client_high = stream
        if len(self.streams) >= MAX_STREAMS:
            self.counters.http_h2_untracked += 1
            return
        method = fields.get(b":method", b"").decode("ascii", "replace")
        grpc_path = None
        if fields.get(b"content-type", b"").startswith(_GRPC_CONTENT_TYPE):
            grpc_path = fields.get(b":path", b"").decode("utf-8", "replace")
        self.streams[stream] = H2Exchange(
            method if method in self.methods else "OTHER", now, grpc_path
        )

    def _end(self, stream: int, cut: int) -> None:
        """``stream``'s exchange ended (``cut``: 0, or who cut it); unknown streams are not."""
        exchange = self.streams.pop(stream, None)
        if exchange is None:
            return
        if not cut and not exchange.status:
            cut = _CUT_BY[1]  # the instance ended the stream without a response head
        if cut:
            self.notify("cut", HTTP_CUT_SIDES[cut - 1], 0, 1)
        self.ended.append((exchange, cut or exchange.status))


def _fragment(kind: int, flags: int, payload: bytearray) -> bytearray:
    """The header block fragment of a HEADERS or PUSH_PROMISE payload (RFC 9113 sections
    6.2, 6.6): without the pad length, priority or promised stream id, and padding."""
    start, pad = 0, 0
    if flags & _PADDED:
        if not payload:
            raise _GiveUp("padding", "a padded frame without its pad length")
        start, pad = 1, payload[0]
    if kind == HeadersFrame.type and flags & _PRIORITY:
        start += _PRIORITY_BYTES
    elif kind == PushPromiseFrame.type:
        start += _PROMISED_ID_BYTES
    end = len(payload) - pad
    if end < start:
        raise _GiveUp("padding", "padding and fixed fields longer than the frame")
    return payload[start:end]


def _number(value: bytes | None, digits: int) -> int:
    """``value`` as a decimal of at most ``digits`` digits, -1 if it is none."""
    if value is None or not 0 < len(value) <= digits or not value.isdigit():
        return -1
    return int(value)


def grpc_call(exchange: H2Exchange) -> GrpcCall | None:
    """What to report of ``exchange`` as a gRPC call (``None``: it is not one)."""
    if exchange.grpc_path is None:
        return None
    return GrpcCall(exchange.grpc_path, exchange.grpc_code)
