"""Type stub for the compiled extension flux._splice (src/flux/_splice.pyx and its rooms).

tests/test_sourcecode.py checks it against the compiled module with mypy.stubtest.
"""

from typing import Literal, NamedTuple, Self

from typing_extensions import disjoint_base

# ---- Relay engine (src/flux/_relay_api.pxi) --------------------------------------------------

RELAY_COUNTERS: tuple[str, ...]
"""The engine's counters by name, in stats()'s order."""

RELAY_LEVELS: frozenset[str]
"""The counters in RELAY_COUNTERS that are levels (held now); every other one only counts up."""


class Completion(NamedTuple):
    """A relayed connection ended (client_fd: -1, or the client handed back after a failed
    connect())."""

    token: int
    bytes_up: int
    bytes_down: int
    errno: int
    duration_ns: int
    answered: int
    client_fd: int


class ExchangeGroup(NamedTuple):
    """The exchanges of one label set (token 0: labelled by service, instance, client_ip)."""

    token: int
    method: int
    status: int
    roundtrips_us: list[int]
    totals_us: list[int]
    service: int
    instance: int
    client_ip: int
    grpc_path: str | None
    grpc_code: int


class HandOver(NamedTuple):
    """A client (or, with client_fd -1, a pause) from a service the engine accepts for."""

    service: int
    client_fd: int
    client_ip: int
    instance: int
    errno: int


class Drained(NamedTuple):
    """Everything drain_all() took."""

    exchanges: list[ExchangeGroup]
    completions: list[Completion]
    established: list[int]
    handed: list[HandOver]
    notices: list[Notice]


class AnsweredCounts(NamedTuple):
    """Requests the engine answered itself: 400, 431, 408 and 421."""

    bad_request: int
    too_large: int
    timeout: int
    misdirected: int


TALLY_OTHER_CLIENT: int


class TallyEntry(NamedTuple):
    """Connections the engine accepted and connected to instance for client_ip."""

    instance: int
    client_ip: int
    connections: int


class ServiceCounts(NamedTuple):
    """What the engine counted for one service."""

    to_instances: int
    to_clients: int
    active: int
    answered: AnsweredCounts
    tally: list[TallyEntry]


@disjoint_base
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
        shard_of: SpliceEngine | None = None,
        max_clients: int = 100,
        cpus: list[int] | None = None,
    ) -> None: ...

    def start(self) -> None: ...

    def add(
        self,
        client_fd: int,
        upstream_fd: int,
        token: int,
        http: bool = False,
        observe: bool = True,
        service: int = -1,
        pin_host: bool = False,
        forwarded: bool = False,
    ) -> None: ...

    def connect(
        self,
        client_fd: int,
        address: bytes,
        token: int,
        timeout: float,
        http: bool = False,
        observe: bool = True,
        service: int = -1,
        pin_host: bool = False,
        preface: bytes | None = None,
        forwarded: bool = False,
    ) -> None: ...

    def listen(
        self,
        service: int,
        fd: int,
        http: bool = False,
        observe: bool = True,
        connect_timeout: float = 3.0,
        proxy_protocol: int = 0,
        forwarded: bool = False,
    ) -> None: ...
    def unlisten(self, service: int) -> None: ...

    def serve(
        self,
        service: int,
        http: bool = False,
        observe: bool = True,
        connect_timeout: float = 3.0,
        proxy_protocol: int = 0,
        forwarded: bool = False,
    ) -> None: ...

    def route(
        self, service: int, names: list[tuple[str, int]], fallback: int = -1, tls: bool = False
    ) -> None: ...

    def set_pool(
        self,
        service: int,
        targets: list[tuple[int, bytes]],
        p2c: bool = False,
        python_at_ns: int = 0,
    ) -> None: ...
    def pause(self, service: int) -> None: ...
    def resume(self, service: int) -> None: ...
    def service_counts(self, service: int) -> ServiceCounts: ...
    def instance_active(self, service: int, instance: int) -> int: ...
    def set_budget(self, limit: int, python_held: int) -> None: ...
    @property
    def held(self) -> int: ...
    def drain(self) -> list[Completion]: ...
    def drain_exchanges(self) -> list[ExchangeGroup]: ...
    def drain_all(self) -> Drained: ...
    def close_all(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def thread_id(self) -> int: ...
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


# ---- Notices (src/flux/_relay_notice.pxi) ---------------------------------------------------

NOTICE_KINDS: tuple[str, ...]
"""What an HTTP connection's data path did on its own, by the engine's kind number."""

NOTICE_REASONS: tuple[str, ...]
"""Notice reasons by number: the framer's reasons, then the engine's own."""


class Notice(NamedTuple):
    """Something an HTTP connection's data path did on its own (token 0: a connection the
    engine accepted, named by service and instance)."""

    kind: str
    reason: str
    status: int
    exchanges: int
    token: int
    service: int
    instance: int
    client_ip: int
    client_port: int
    bytes_up: int
    bytes_down: int
    age_ns: int


# ---- end of Relay engine ---------------------------------------------------------------------

# ---- HTTP framer (src/flux/_http_framer.pxi) -------------------------------------------------


_Side = Literal["request", "response"]
_Bytes = bytes | bytearray | memoryview

HTTP_METHODS: tuple[str, ...]
"""Method labels by the framer's method number; methods it does not know are "OTHER"."""


def forwarded_head(head: _Bytes, client_ip: str) -> bytes:
    """The engine's rewrite of one complete request head for X-Forwarded-For (the twin of
    flux.relay.forwarded.forwarded_head, for the tests)."""


HTTP_ERROR_RESPONSES: dict[int, bytes]
"""The relay's own answers: malformed request (400), oversized head (431), head not received in
time (408), a host other than the connection's first (421); each with Connection: close."""


class HttpEvent(NamedTuple):
    """One event of the HTTP framer: kind is "request", "exchange", "malformed", "reject",
    "opaque" or "head"; pos is a stream offset (see _http_framer.pxi for each kind's fields);
    start: a head's first octet's (0 for the other kinds)."""

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
    start: int = 0


@disjoint_base
class HttpFramerProbe:
    """The relay engine's HTTP/1.x framer, driven from Python (tests, fuzzing, the Python
    relay); ``now``: when the connection opened (the first request's head is timed from it)."""

    # The argument is taken by __cinit__, which Python sees as __new__.
    def __new__(cls, now: int = 0) -> Self: ...
    def pin_host(self) -> None: ...
    def report_heads(self) -> None: ...
    def feed_once(self, side: _Side, data: _Bytes, now: int = 0) -> tuple[int, list[HttpEvent]]: ...
    def feed(self, side: _Side, data: _Bytes, now: int = 0) -> list[HttpEvent]: ...
    def skip(self, side: _Side, n: int, now: int = 0) -> list[HttpEvent]: ...
    def eof(self, side: _Side, now: int = 0) -> list[HttpEvent]: ...
    def body_remaining(self, side: _Side) -> int: ...
    def position(self, side: _Side) -> int: ...
    def lenient(self, side: _Side) -> frozenset[str]: ...
    def unanswered(self) -> list[tuple[str, int, int]]: ...
    @property
    def phase(self) -> Literal["opening", "idle", "head", "busy", "opaque"]: ...
    @property
    def head_started(self) -> int: ...
    @property
    def request_start(self) -> int: ...
    @property
    def open_head(self) -> int | None: ...
    @property
    def blocked(self) -> bool: ...
    @property
    def pending(self) -> int: ...
    @property
    def observing(self) -> bool: ...

# ---- end of HTTP framer ----------------------------------------------------------------------


class H2ObserverEvent(NamedTuple):
    """One event of the HTTP/2 observer: kind is "exchange", "cut", "gave-up" or "untracked";
    grpc_path None when not gRPC ("" past the name table); grpc_status -1: none."""

    kind: str
    stream: int
    method: str
    status: int
    grpc_path: str | None
    grpc_status: int
    t_request_head: int
    t_response_head: int
    pos: int
    reason: str


@disjoint_base
class H2ObserverProbe:
    """The relay engine's HTTP/2 observer, driven from Python (tests, fuzzing); with
    ``collect`` it logs every decoded field (``fields()``)."""

    def __new__(cls, collect: bool = False) -> Self: ...
    def feed(self, side: _Side, data: _Bytes, now: int = 0) -> list[H2ObserverEvent]: ...
    def skip(self, side: _Side, n: int, now: int = 0) -> list[H2ObserverEvent]: ...
    def body_remaining(self, side: _Side) -> int: ...
    def position(self, side: _Side) -> int: ...
    def fields(self) -> list[tuple[bytes, bytes]]: ...
    def table_limit(self, side: _Side) -> int: ...
    @property
    def open_streams(self) -> list[int]: ...
    @property
    def observing(self) -> bool: ...


def steer_by_cpu(fd: int, shard_of_cpu: list[tuple[int, int]]) -> None: ...
def unsteer(fd: int) -> None: ...


def _may_meet_itself(address: bytes) -> bool: ...


def route_probe(
    data: bytes, names: list[tuple[str, int]], fallback: int = -1, tls: bool = False
) -> int: ...
