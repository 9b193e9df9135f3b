"""Type stubs for the compiled extension flux._splice."""

from typing import Literal, NamedTuple

# ---- Relay engine (src/flux/_relay_api.pxi) --------------------------------------------------


# (token, bytes client->upstream, bytes upstream->client, errno, duration ns, status answered,
#  client descriptor handed back after a failed connect() or -1)
_Completion = tuple[int, int, int, int, int, int, int]
# (token, method index into HTTP_METHODS, status, roundtrips µs, totals µs): one per label set
_Exchange = tuple[int, int, int, list[int], list[int]]


class SpliceEngine:
    """The native relay: one thread relaying many socket pairs with epoll and splice(2)."""

    def __init__(
        self,
        pipe_size: int = 1 << 20,
        max_idle_pipes: int = 64,
        small_buffer: int = 16384,
        budget: int = 32,
        header_timeout: float = 0.0,
        idle_timeout: float = 0.0,
    ) -> None: ...
    def start(self) -> None: ...
    def add(self, client_fd: int, upstream_fd: int, token: int, http: bool = ..., observe: bool = ...) -> None: ...  # noqa: E501
    def connect(self, client_fd: int, address: bytes, token: int, timeout: float, http: bool = ..., observe: bool = ...) -> None: ...  # noqa: E501
    def drain(self) -> list[_Completion]: ...
    def drain_exchanges(self) -> list[_Exchange]: ...
    def drain_all(self) -> tuple[list[_Exchange], list[_Completion], list[int]]: ...
    def close_all(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def eventfd(self) -> int: ...
    @property
    def running(self) -> bool: ...
    @property
    def pipe_size(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def pipes_idle(self) -> int: ...
    @property
    def pipes_lent(self) -> int: ...
    @property
    def inflight_bytes(self) -> int: ...
    def stats(self) -> dict[str, int]: ...

# ---- end of Relay engine ---------------------------------------------------------------------

# ---- HTTP framer (src/flux/_http_framer.pxi) -------------------------------------------------


_Side = Literal["request", "response"]
_Bytes = bytes | bytearray | memoryview

HTTP_METHODS: tuple[str, ...]
"""Method labels by the framer's method number; methods it does not know are "OTHER"."""

HTTP_ERROR_RESPONSES: dict[int, bytes]
"""The relay's own answers: malformed request (400), oversized head (431), head not received in
time (408); each with Connection: close."""


class HttpEvent(NamedTuple):
    """One event of the HTTP framer: kind is "request", "exchange", "malformed", "reject" or
    "opaque"; pos is a stream offset (see _http_framer.pxi for each kind's fields)."""

    kind: str
    method: str
    status: int
    t_request_head: int
    t_response_head: int
    t_response_end: int
    pos: int
    close: bool
    switched: bool
    speculative: bool
    reason: str


class HttpFramerProbe:
    """The relay engine's HTTP/1.x framer, driven from Python (tests, fuzzing)."""

    def __init__(self) -> None: ...
    def feed_once(self, side: _Side, data: _Bytes, now: int = 0) -> tuple[int, list[HttpEvent]]: ...
    def feed(self, side: _Side, data: _Bytes, now: int = 0) -> list[HttpEvent]: ...
    def skip(self, side: _Side, n: int, now: int = 0) -> list[HttpEvent]: ...
    def eof(self, side: _Side, now: int = 0) -> list[HttpEvent]: ...
    def body_remaining(self, side: _Side) -> int: ...
    def position(self, side: _Side) -> int: ...
    def lenient(self, side: _Side) -> frozenset[str]: ...
    @property
    def phase(self) -> Literal["idle", "head", "busy", "opaque"]: ...
    @property
    def head_started(self) -> int: ...
    @property
    def request_start(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def observing(self) -> bool: ...

# ---- end of HTTP framer ----------------------------------------------------------------------
