"""h11 as the oracle for the relay engine's HTTP/1.x framer (flux._splice.HttpFramerProbe).

What an h11 server finds in a client's stream and an h11 client in an instance's stream, a framer
fed piecewise with a clock, and the differential checks that judge the one against the other:
the same events whatever the split, and h11's boundaries and verdicts unless the framer names a
deliberate difference (``STRICTER``) or reports a leniency.  Shared by tests/test_http_framer.py
and the fuzz target fuzz/fuzz_http_framer.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import h11

from flux._splice import HTTP_METHODS, HttpEvent, HttpFramerProbe
from tests.support.http_streams import H2_PREFACE

# h11 buffers whole heads; let it take anything the framer might.
H11_BUFFER = 1 << 22
# Where the framer is deliberately stricter than h11 (reasons it names) and where it accepts
# what h11 rejects (what `lenient` reports): see the theory of operation in _http_framer.pxi.
STRICTER = frozenset({"obs-fold", "te-with-content-length", "te-http10", "chunk-ext-cr",
                      "head-too-large", "content-length-list"})
DECLINE = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"


def label(method: bytes) -> str:
    name = method.decode("latin-1")
    return name if name in HTTP_METHODS and name != "OTHER" else "OTHER"


# ---- the oracle ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OracleRequest:
    method: str
    head_end: int       # offset just after the head
    end: int            # offset just after the message


@dataclass(frozen=True)
class OracleResponse:
    status: int
    head_end: int       # of the final (or switching) response head
    end: int
    switched: bool


@dataclass(frozen=True)
class Verdict:
    messages: tuple[OracleRequest, ...] | tuple[OracleResponse, ...]
    error: str | None   # h11 rejected the message after the last one listed
    stopped: bool       # h11 cannot say more: the connection closes or switched protocols


def h11_requests(data: bytes, accept_switch_at: int | None = None) -> Verdict:
    """The requests an h11 server finds in `data`, answering each: 403, which declines a
    switch of protocols, except at request number `accept_switch_at`."""
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=H11_BUFFER)
    if data:
        server.receive_data(data)                   # (b"" would mean EOF)
    found: list[OracleRequest] = []
    method, head_end = b"", 0
    while True:
        try:
            event = server.next_event()
        except h11.RemoteProtocolError as exc:
            return Verdict(tuple(found), str(exc), False)
        consumed = len(data) - len(server.trailing_data[0])
        if event is h11.NEED_DATA:
            return Verdict(tuple(found), None, False)
        assert event is not h11.PAUSED and not isinstance(event, h11.ConnectionClosed), event
        if isinstance(event, h11.Request):
            method, head_end = event.method, consumed
        elif isinstance(event, h11.EndOfMessage):
            found.append(OracleRequest(label(method), head_end, consumed))
            if (server.their_state is h11.MIGHT_SWITCH_PROTOCOL
                    and len(found) - 1 == accept_switch_at):
                return Verdict(tuple(found), None, True)
            server.send(h11.Response(status_code=403, headers=[("Content-Length", "0")]))
            server.send(h11.EndOfMessage())
            if server.our_state is not h11.DONE or server.their_state is not h11.DONE:
                return Verdict(tuple(found), None, True)
            server.start_next_cycle()


@dataclass(frozen=True)
class SentRequest:
    """What the h11 client must have sent for a response to be read the right way."""

    method: bytes = b"GET"
    upgrade: bool = False

    def wire(self) -> bytes:
        target = b"oracle:1" if self.method == b"CONNECT" else b"/"
        upgrade = b"Upgrade: test\r\nConnection: upgrade\r\n" if self.upgrade else b""
        return b"%s %s HTTP/1.1\r\nHost: oracle\r\n%s\r\n" % (self.method, target, upgrade)


def h11_responses(requests: Sequence[SentRequest], data: bytes, eof: bool = True) -> Verdict:
    """The responses an h11 client finds in `data` after sending `requests` one by one."""
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=H11_BUFFER)
    if data:
        client.receive_data(data)
    if eof:
        client.receive_data(b"")
    found: list[OracleResponse] = []
    for request in requests:
        headers = [("Host", "oracle")]
        if request.upgrade:
            headers += [("Upgrade", "test"), ("Connection", "upgrade")]
        target = b"oracle:1" if request.method == b"CONNECT" else b"/"
        client.send(h11.Request(method=request.method, target=target, headers=headers))
        client.send(h11.EndOfMessage())
        status, head_end = 0, 0
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError as exc:
                if "closed connection" in str(exc) or "ConnectionClosed" in str(exc):
                    return Verdict(tuple(found), None, False)   # cut short, not malformed
                return Verdict(tuple(found), str(exc), False)
            consumed = len(data) - len(client.trailing_data[0])
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return Verdict(tuple(found), None, False)
            assert event is not h11.PAUSED, event
            if isinstance(event, h11.InformationalResponse | h11.Response):
                status, head_end = event.status_code, consumed
                if client.their_state is h11.SWITCHED_PROTOCOL:
                    found.append(OracleResponse(status, head_end, consumed, True))
                    return Verdict(tuple(found), None, True)
            elif isinstance(event, h11.EndOfMessage):
                found.append(OracleResponse(status, head_end, consumed, False))
                if client.trailing_data == (b"", True):
                    return Verdict(tuple(found), None, True)   # it ended at EOF
                break
        if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
            return Verdict(tuple(found), None, True)
        client.start_next_cycle()
    return Verdict(tuple(found), None, False)


# ---- driving the framer --------------------------------------------------------------------

@dataclass
class Run:
    """A framer fed piecewise, with a clock that ticks once per call."""

    probe: HttpFramerProbe = field(default_factory=HttpFramerProbe)
    now: int = 0
    events: list[HttpEvent] = field(default_factory=list)
    calls: dict[str, list[tuple[int, int, int]]] = field(
        default_factory=lambda: {"request": [], "response": []})

    def feed(self, side: str, data: bytes) -> list[HttpEvent]:
        self.now += 1
        start = self.probe.position(side)
        new = self.probe.feed(side, data, self.now)
        self.calls[side].append((start, start + len(data), self.now))
        self.events += new
        return new

    def skip(self, side: str, n: int) -> list[HttpEvent]:
        self.now += 1
        start = self.probe.position(side)
        new = self.probe.skip(side, n, self.now)
        self.calls[side].append((start, start + n, self.now))
        self.events += new
        return new

    def eof(self, side: str) -> list[HttpEvent]:
        self.now += 1
        new = self.probe.eof(side, self.now)
        self.events += new
        return new

    def when(self, side: str, offset: int) -> int:
        """The clock of the call that carried byte `offset` of `side`."""
        for start, end, now in self.calls[side]:
            if start <= offset < end:
                return now
        raise AssertionError(f"byte {offset} of the {side} stream was never shown")

    def of(self, kind: str) -> list[HttpEvent]:
        return [e for e in self.events if e.kind == kind]


def timeless(events: Iterable[HttpEvent]) -> list[HttpEvent]:
    return [e._replace(t_request_head=0, t_response_head=0, t_response_end=0) for e in events]


def by_kind(events: Iterable[HttpEvent]) -> dict[str, list[HttpEvent]]:
    """Events of each kind, in order, without times: what must not depend on the split (the
    interleaving of the two sides' events may, and so may speculation)."""
    out: dict[str, list[HttpEvent]] = {}
    for event in timeless(events):
        out.setdefault(event.kind, []).append(event._replace(speculative=False))
    return out


def pieces_of(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)] if sizes else len(data)
        out.append(data[i:i + max(1, n)])
        i += max(1, n)
        k += 1
    return out


# ---- differential checks -------------------------------------------------------------------

def _diverges(framer: list, oracle: Sequence, h11_error: str | None, h11_stopped: bool,
              framer_error: str | None, lenient: frozenset[str], what: str) -> None:
    """Judge the framer's messages against h11's (see the module docstring)."""
    common = 0
    while (common < min(len(framer), len(oracle)) and framer[common] == oracle[common]):
        common += 1
    context = (f"{what}: framer {framer} (error {framer_error!r}, lenient {set(lenient)}) vs "
               f"h11 {list(oracle)} (error {h11_error!r}, stopped {h11_stopped})")
    if common < min(len(framer), len(oracle)):
        assert lenient, f"different boundaries; {context}"
    elif len(framer) < len(oracle):
        assert framer_error in STRICTER, f"framer stopped early; {context}"
    elif len(framer) > len(oracle):
        assert h11_stopped or lenient, f"framer accepted more; {context}"
    elif h11_error is not None and framer_error is None:
        assert lenient, f"h11 rejected, framer did not; {context}"


def check_request_stream(data: bytes, sizes: Sequence[int] = ()) -> None:
    """Feed a client's stream (answering each request with a 403) and judge it against h11."""
    verdict = h11_requests(data)
    runs = []
    for split in (sizes, ()):
        run = Run()
        for piece in pieces_of(data, split):
            for event in run.feed("request", piece):
                if event.kind == "request":
                    run.feed("response", DECLINE)
        runs.append(run)
    assert by_kind(runs[0].events) == by_kind(runs[1].events), "depends on the split"
    run = runs[0]
    if data.startswith(H2_PREFACE):
        # HTTP/2, not HTTP/1.x: relayed unobserved (_http_framer.pxi), nothing for h11 to judge.
        assert [(e.kind, e.reason) for e in run.events] == [("opaque", "h2-preface")]
        return
    assert not run.of("opaque"), run.events
    malformed = run.of("malformed")
    framer = [(e.method, e.pos) for e in run.of("request")]
    oracle = [(r.method, r.end) for r in verdict.messages]
    _diverges(framer, oracle, verdict.error, verdict.stopped,
              malformed[0].reason if malformed else None, run.probe.lenient("request"),
              "requests")


def check_response_stream(requests: Sequence[SentRequest], data: bytes,
                          sizes: Sequence[int] = ()) -> None:
    """Feed `requests` then an instance's stream (and EOF) and judge it against h11."""
    verdict = h11_responses(requests, data)
    runs = []
    for split in (sizes, ()):
        run = Run()
        run.feed("request", b"".join(r.wire() for r in requests))
        for piece in pieces_of(data, split):
            run.feed("response", piece)
        run.eof("response")
        runs.append(run)
    assert by_kind(runs[0].events) == by_kind(runs[1].events), "depends on the split"
    run = runs[0]
    assert not run.of("malformed"), run.events
    opaque = run.of("opaque")
    framer = [(e.status, e.pos, e.switched) for e in run.of("exchange")]
    oracle = [(r.status, r.end, r.switched) for r in verdict.messages]
    _diverges(framer, oracle, verdict.error, verdict.stopped,
              opaque[0].reason if opaque else None, run.probe.lenient("response"),
              "responses")
