"""What every relay shares: its roles (typed Protocols), its records and its helpers.

A relay carries bytes both ways between an accepted client socket and an upstream socket.  The
listener accepts a client, connects to an instance, and hands both connected sockets to a relay
with :meth:`Relay.submit`; the returned future resolves with a :class:`RelayResult` once both
sockets are closed.  Two twins implement one behaviour and pass one suite (the ``KINDS`` of
``tests/test_relay.py``, ``tests/test_relay_http.py``, ``tests/test_engine_accept.py``):

- :class:`~flux.relay.engine.SpliceRelay` (the default, :mod:`flux.relay.engine`) wraps the
  compiled engine ``flux._splice.SpliceEngine``: native threads move the bytes without the GIL.
- :class:`~flux.relay.python.PythonRelay` (:mod:`flux.relay.python`) relays on asyncio
  Protocols: the oracle, whose behaviour is defined independently of the extension.

Shared behaviour: EOF from one side becomes a half-close (``shutdown(SHUT_WR)``) towards the
other side while the other direction carries on; both sockets are closed when both directions
have ended.  An error or reset on one side resets the other (``SO_LINGER {1, 0}``).  A slow
reader stalls its writer: each direction buffers a bounded amount.  ``close(grace)`` lets
relayed connections finish for up to ``grace`` seconds, then resets the rest (their results
carry the error ``ECANCELED``).

HTTP (``submit(..., http=True)``): the bytes are still relayed verbatim, but an HTTP/1.x framer
watches them.  Each request/response exchange is reported to the ``observe`` callable given
with the connection, batched per label set as ``(method, status, [roundtrip_us, ...],
[total_us, ...], grpc)`` (``grpc``: ``None`` unless the exchange is a gRPC call): roundtrip
from the request head read to the response head read, total from the request head read to the
response fully written to the client.  A malformed request is answered ``400 Bad Request``
(``431`` for a head over 64 KiB) once the responses to the requests before it are written, and
the connection is closed; a request head that takes longer than ``http_header_timeout`` gets
``408 Request Timeout`` (the first one is timed from the connection's start, and a client that
sent nothing by then is closed without an answer); a keep-alive connection idle for
``http_idle_timeout`` is closed (0 disables either); with ``pin_host``, a request naming another
host than the connection's first is answered ``421 Misdirected Request`` and the connection
closed, as a malformed one is.  ``RelayResult.answered`` names the status
the relay answered itself.  A connection that opens with the HTTP/2 preface is relayed
untouched and observed as HTTP/2 (the instance's bytes from the first, even those sent before
the preface ended; no HTTP timeouts apply): each client-initiated stream is an exchange, from
its request HEADERS to the response frame that ends the stream, a gRPC call (``grpc``: a
:class:`GrpcCall`) when its request's ``content-type`` says so, cut by the side that sends
RST_STREAM; what the observer cannot follow (an HPACK error, a table over 64 KiB, ...) ends its
observation of that connection, never the connection (:mod:`flux.relay.h2watch` states the
rules).  Each of those, a switch to plain relaying (Upgrade,
CONNECT, framing given up), exchanges cut short and an HTTP/2 observation given up is a
*notice*: a log line naming the service, the client and the reason, rate-limited per service
(:mod:`flux.relay.notices`; both relays write the same ones).
Observations are delivered in batches on the event loop (at least every second, and at once
on :meth:`Relay.flush`, which a metrics scrape calls first).

Roles
-----
Like trio's ``abc`` module, the capabilities are stated as types, one Protocol per role:

- :class:`Relay`, what every relay does: start, relay two connected sockets (``submit``),
  flush, close, and say what it counted of its own work (``engine_counters``: the splice
  relay's engine counters; ``None`` from the Python relay, which keeps none).  It also names
  the other roles it takes (:attr:`Relay.connector`, :attr:`Relay.acceptor`: itself, or
  ``None``), so a caller picks its path from those typed values, never by probing for
  attributes.
- :class:`Connector`, a relay that connects to instances itself: it takes the client and only
  the instance's address, and its :class:`ConnectHandler` hears of the connection once it is
  up, when it ends, or gets the client back unread after a failed connect.
- :class:`Acceptor`, a relay that accepts a service's clients itself: it picks from a pool
  snapshot the listener pushes, connects and counts, shares the listeners' descriptor budget,
  and hands its :class:`AcceptHandler` only what is unusual.

The splice relay takes all three roles; the Python relay only the first (the listener accepts
and connects for it, on the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple, Protocol

from flux.model import ConnectionInfo

__all__ = [
    "CUT_TIMEOUT",
    "HTTP_CUT_SIDES",
    "HTTP_HEADER_TIMEOUT",
    "HTTP_IDLE_TIMEOUT",
    "OTHER_CLIENT",
    "AcceptHandler",
    "Acceptor",
    "ConnectHandler",
    "Connector",
    "EngineCounts",
    "ExchangeObserver",
    "GrpcCall",
    "ObserverFactory",
    "Relay",
    "RelayCounters",
    "RelayResult",
    "errno_name",
    "error_name",
    "packed_sockaddr",
    "reset_and_close",
    "set_reset_linger",
    "wait_bounded",
]

# The client label of connections whose client is not named: the metrics name at most
# -metrics-max-clients clients per service (flux.metrics.counters), and so does the engine.
OTHER_CLIENT = "other"


class GrpcCall(NamedTuple):
    """What makes an HTTP/2 exchange a gRPC call (its request's ``content-type`` starts with
    ``application/grpc``): the request's ``:path`` (``/<service>/<method>``) and the call's
    ``grpc-status`` as the instance sent it, -1 = no grpc-status (none came before the
    exchange ended or was cut)."""

    path: str
    code: int


ExchangeObserver = Callable[[str, int, list[int], list[int], GrpcCall | None], None]
"""Called with HTTP exchanges of one connection and label set, in batches:
(method, status, [roundtrip_us, ...], [total_us, ...], grpc).  An exchange cut short comes with
1, 2 or 3 in place of its status (see HTTP_CUT_SIDES).  ``grpc`` is ``None`` for an exchange
that is no gRPC call (every HTTP/1.x one), else its :class:`GrpcCall`: the batch's exchanges
share method, status and grpc."""


# An exchange that did not complete (its connection ended with the request unanswered or the
# response not fully written to the client) is reported with k in place of its status, and
# HTTP_CUT_SIDES[k - 1] names who cut it: the side that failed or closed first with it under
# way, or fluxd (stopping) when neither did.  Its times are the time so far.  Real statuses
# are 100..999, so the two cannot be confused.  The engine's HTTP_CUT_* use the same values.
HTTP_CUT_SIDES = ("client", "instance", "fluxd")

# (instance name, instance address, client IP) -> the observer for that label set
ObserverFactory = Callable[[str, str, str], ExchangeObserver]

# The HTTP timeouts' defaults (``-http-header-timeout``, ``-http-idle-timeout``), in seconds.
HTTP_HEADER_TIMEOUT = 10.0
HTTP_IDLE_TIMEOUT = 60.0
# Completions of connections cut by close() must still arrive; this bounds the wait for them.
CUT_TIMEOUT = 5.0
# SO_LINGER {on, 0 s}: close() then sends RST instead of FIN.
_RESET_LINGER = struct.pack("ii", 1, 0)


class RelayResult(NamedTuple):
    """How one relayed connection ended (a NamedTuple: one is made per connection, and a
    frozen dataclass cost several times as much to build).

    ``to_upstream`` / ``to_client``: bytes delivered each way.  ``error``: ``None`` when both
    directions ended with EOF, else the errno name (``"ECONNRESET"``, ``"EPIPE"``; ``"ECANCELED"``
    when ``close()`` cut it).  ``duration``: seconds from submission to close.  ``answered``:
    for HTTP, the status the relay answered the client itself (400, 431, 408, 421), else 0.
    """

    to_upstream: int
    to_client: int
    error: str | None
    duration: float
    answered: int = 0
    counted: bool = False  # the bytes were already counted live for the connection's service


class EngineCounts(NamedTuple):
    """What the engine counted itself, cumulative, read at scrape time (see
    :meth:`Acceptor.counts`): ``connections`` by (service, protocol, instance, instance
    address, client IP or ``"other"``: the engine names at most ``max_clients`` clients per
    service and shard); ``bytes`` by (service, "to_instance" | "to_client"), of every
    connection relayed for a service; ``active`` by service and ``rejected`` by (service,
    entry point, status) for the connections the engine accepted itself; ``entries`` the
    connections it accepted and connected by (service, entry point: ``vip`` or
    ``published:PORT``)."""

    connections: dict[tuple[str, str, str, str, str], int]
    bytes: dict[tuple[str, str], int]
    active: dict[str, int]
    rejected: dict[tuple[str, str, str], int]
    entries: dict[tuple[str, str], int]


class RelayCounters(NamedTuple):
    """What a relay's engine counted of its own work, by the engine's counter names, summed
    over its shards (see :meth:`Relay.engine_counters`): ``events`` only count up (connections
    submitted, HTTP header timeouts, idle closes, opaque switches, exchange records dropped,
    ...); ``levels`` are what it holds now (idle pipes, in-flight bytes, ...).  Which name is
    which is the engine's to say (``flux._splice.RELAY_LEVELS``); a name it does not list as a
    level is an event.  ``shard_accepted``: the clients each shard (engine thread) accepted
    itself so far, in shard order, to show how the kernel spreads new connections over them
    (empty for a relay that accepts nothing)."""

    events: dict[str, int]
    levels: dict[str, int]
    shard_accepted: tuple[int, ...] = ()


class ConnectHandler(Protocol):
    """Told what became of one :meth:`Connector.connect`."""

    def established(self) -> None:
        """The upstream connection is up; bytes are moving."""

    def ended(self, result: RelayResult) -> None:
        """The relayed connection ended (also when it ended before it was established)."""

    def connect_failed(self, client_fd: int, code: int) -> None:
        """Connecting failed with errno ``code`` (ETIMEDOUT after the timeout); the client's
        descriptor is the caller's again, open and unread."""


class AcceptHandler(Protocol):
    """A listener whose clients the relay accepts (:meth:`Acceptor.listen`)."""

    def handed_over(self, client_fd: int, client_ip: str, instance: int, code: int) -> None:
        """The engine gives a client back: to pick for (``instance`` 0), after a failed
        connect to ``instance`` (errno ``code``), or, with ``client_fd`` -1, to say that it
        stopped accepting (``code`` 0: the descriptor budget is spent, else accept4's errno)."""


class Relay(Protocol):
    """The role every relay takes: what the listener needs from any relay."""

    @property
    def active(self) -> int:
        """Connections submitted and not yet finished."""

    @property
    def inflight_bytes(self) -> int:
        """Bytes read from one side and not yet written to the other, over all connections."""

    @property
    def connector(self) -> Connector | None:
        """This relay in its :class:`Connector` role, or ``None`` if it connects nothing."""

    @property
    def acceptor(self) -> Acceptor | None:
        """This relay in its :class:`Acceptor` role, or ``None`` if it accepts nothing."""

    def engine_counters(self) -> RelayCounters | None:
        """What the relay counted of its own work (read at scrape time), or ``None`` for a
        relay that keeps no such counters."""

    async def start(self) -> None:
        """Get ready to relay; call once from the event loop that will use the relay."""

    def submit(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        http: bool = False,
        observe: ExchangeObserver | None = None,
        info: ConnectionInfo | None = None,
        pin_host: bool = False,
        forwarded: bool = False,
    ) -> asyncio.Future[RelayResult]:
        """Relay between two connected sockets; the relay owns (and will close) both.

        ``http``: follow HTTP/1.x framing and report each exchange to ``observe``; ``info``
        names the service and instance in the connection's notices (log lines).
        ``pin_host`` (HTTP): the client was routed by its first request's ``Host`` (a
        published port shared by host name; that request is still unread in its socket), so a
        later request naming another host is answered ``421 Misdirected Request`` and the
        connection closed, as a malformed one is answered 400.  ``forwarded`` (HTTP): every
        request head goes to the instance with the client's address appended to
        ``X-Forwarded-For`` and ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` set
        (:mod:`flux.relay.forwarded`).
        """

    def flush(self) -> None:
        """Deliver the exchange observations and completions waiting now."""

    async def close(self, grace: float) -> None:
        """Refuse new work, let active connections finish for ``grace`` s, reset the rest."""


class Connector(Protocol):
    """The role of a relay that connects to instances itself (the caller keeps the pool)."""

    def connect(
        self,
        client_fd: int,
        address: bytes,
        timeout: float,
        handler: ConnectHandler,
        *,
        http: bool = False,
        observe: ExchangeObserver | None = None,
        service: int = -1,
        info: ConnectionInfo | None = None,
        pin_host: bool = False,
        preface: bytes = b"",
        forwarded: bool = False,
    ) -> None:
        """Connect to ``address`` (:func:`packed_sockaddr`) within ``timeout`` s and relay the
        client (a descriptor, now the relay's) to it; ``handler`` hears what became of it.
        ``service``: an id from :meth:`Acceptor.listen`, whose byte counters count this
        connection (-1: none); ``info``, ``pin_host`` and ``forwarded`` as for
        :meth:`Relay.submit`;
        ``preface``: bytes the instance gets before the client's (a PROXY protocol header)."""


class Acceptor(Protocol):
    """The role of a relay that accepts a service's clients itself, picks from the pool
    snapshot its listener pushes, connects and counts; it holds connections against the
    listeners' descriptor budget (:meth:`set_budget`, :attr:`held`)."""

    @property
    def shards(self) -> int:
        """How many listening sockets :meth:`listen` takes (one per shard, one port)."""

    @property
    def steering(self) -> list[list[int]] | None:
        """Each shard's CPUs when new connections go to the shard of the CPU they arrive on
        (its thread pinned to them), or None when the kernel's hash spreads them."""

    @property
    def steering_off(self) -> str | None:
        """Why steering by CPU, asked for, is not in effect (refused by the kernel, or stopped
        because one thread took most new connections), else None."""

    @property
    def held(self) -> int:
        """Connections it accepted and holds now (they count against the budget)."""

    def listen(
        self,
        service: str,
        protocol: str,
        sockets: list[socket.socket],
        handler: AcceptHandler,
        *,
        connect_timeout: float,
        observers: ObserverFactory | None = None,
        entry: str = "vip",
        proxy_protocol: int = 0,
        forwarded: bool = False,
    ) -> int:
        """Accept ``service``'s clients on ``sockets`` (now the relay's); ``handler`` gets
        what is unusual; ``entry`` names the entry point they come in by, for the counts;
        ``proxy_protocol`` (1, 2; 0: none): each instance gets that PROXY protocol header
        before the client's bytes; ``forwarded`` (HTTP) as for :meth:`Relay.submit`.
        Returns the service's id, which the other methods take."""

    def serve(
        self,
        service: str,
        protocol: str,
        handler: AcceptHandler,
        *,
        connect_timeout: float,
        observers: ObserverFactory | None = None,
        entry: str = "vip",
        proxy_protocol: int = 0,
        forwarded: bool = False,
    ) -> int:
        """Ready ``service`` for the clients a router sends it (:meth:`route`), as
        :meth:`listen` without sockets; returns its id."""

    def route(
        self, sid: int, names: list[tuple[str, int]], default: int, *, tls: bool = False
    ) -> None:
        """Make ``sid`` a router: a client goes to the service id its first request's Host
        names in ``names`` (host name or ``*.suffix``, id), else ``default`` (-1: none); the
        rest goes to ``sid``'s handler unread."""

    def unlisten(self, sid: int) -> None:
        """Stop accepting for ``sid`` and close its sockets; its connections carry on."""

    def pause(self, sid: int) -> None:
        """Stop accepting for ``sid`` (its clients wait in the backlog)."""

    def resume(self, sid: int) -> None:
        """Accept again for ``sid``."""

    def instance_id(self, name: str, address: str) -> int:
        """A stable small id for an instance (name and address) in pool snapshots."""

    def instance(self, iid: int) -> tuple[str, str]:
        """(name, address) of an instance id."""

    def set_pool(
        self, sid: int, targets: list[tuple[int, bytes]], *, p2c: bool, python_at_ns: int
    ) -> None:
        """What ``sid``'s new clients may go to: (instance id, packed address) pairs, picked
        uniformly or (``p2c``) the less loaded of two; from ``python_at_ns`` (monotonic, 0:
        never) on, every client is handed over until the next snapshot."""

    def instance_active(self, sid: int, name: str, address: str) -> int:
        """Connections up now that the relay picked ``name`` for, in service ``sid``."""

    def submit(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        http: bool = False,
        observe: ExchangeObserver | None = None,
        service: int = -1,
        info: ConnectionInfo | None = None,
        pin_host: bool = False,
        forwarded: bool = False,
    ) -> asyncio.Future[RelayResult]:
        """:meth:`Relay.submit`, with the bytes counted live for ``service`` (an id from
        :meth:`listen`; -1: none)."""

    def set_budget(self, limit: int, python_held: int) -> None:
        """Accept only while what it holds plus ``python_held`` (the listeners') is below
        ``limit``."""

    def counts(self) -> EngineCounts:
        """What it counted itself, by label set (read at scrape time)."""


def packed_sockaddr(ip: str, port: int) -> bytes:
    """``ip``:``port`` as the ``struct sockaddr_in``/``sockaddr_in6`` bytes connect() takes."""
    if ":" in ip:
        return (
            struct.pack("=H", socket.AF_INET6)
            + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, ip)
            + struct.pack("=I", 0)
        )
    return (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_pton(socket.AF_INET, ip)
        + bytes(8)
    )


def set_reset_linger(sock: socket.socket) -> None:
    """Make closing ``sock`` send RST rather than FIN (``SO_LINGER {1, 0}``), so the peer
    learns at once that the connection failed; a socket already gone is left alone."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_LINGER)


def reset_and_close(sock: socket.socket) -> None:
    """Close ``sock`` with RST: its peer learns at once that nothing will serve it."""
    set_reset_linger(sock)
    sock.close()


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, f"E{code}")


def error_name(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno_name(exc.errno)
    return type(exc).__name__


async def wait_bounded(futures: list[asyncio.Future[RelayResult]], timeout: float) -> None:
    """Wait up to ``timeout`` s for ``futures`` (not at all for none, or a timeout of 0)."""
    if futures and timeout > 0:
        await asyncio.wait(futures, timeout=timeout)
