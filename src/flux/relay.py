"""Relays: carry bytes both ways between an accepted client socket and an upstream socket.

The listener accepts a client, connects to an instance, and hands both connected sockets to a
relay with :meth:`Relay.submit`; the returned future resolves with a :class:`RelayResult` once
both sockets are closed.  Two implementations share one behaviour (and one test suite):

- :class:`SpliceRelay` (the default) wraps the compiled engine ``flux._splice.SpliceEngine``:
  a native thread with its own epoll loop moves the bytes with ``splice(2)`` through pooled
  pipes (or recv/send for small messages) without the GIL.  The asyncio side only sees
  completions, drained in batches when the engine's eventfd becomes readable.
- :class:`PythonRelay` is the fallback on asyncio Protocols (uvloop or stock asyncio), so the
  behaviour is defined independently of the extension.

Shared behaviour: EOF from one side becomes a half-close (``shutdown(SHUT_WR)``) towards the
other side while the other direction carries on; both sockets are closed when both directions
have ended.  An error or reset on one side resets the other (``SO_LINGER {1, 0}``).  A slow
reader stalls its writer: each direction buffers a bounded amount.  ``close(grace)`` lets
relayed connections finish for up to ``grace`` seconds, then resets the rest (their results
carry the error ``ECANCELED``).

HTTP (``submit(..., http=True)``): the bytes are still relayed verbatim, but an HTTP/1.x framer
watches them.  Each request/response exchange is reported to the ``observe`` callable given
with the connection, batched per label set as ``(method, status, [roundtrip_us, ...],
[total_us, ...])``: roundtrip from the
request head read to the response head read, total from the request head read to the response
fully written to the client.  A malformed request is answered ``400 Bad Request`` (``431`` for
a head over 64 KiB) once the responses to the requests before it are written, and the
connection is closed; a request head that takes longer than ``http_header_timeout`` gets
``408 Request Timeout``; a keep-alive connection idle for ``http_idle_timeout`` is closed
(0 disables either).  ``RelayResult.answered`` names the status the relay answered itself.
Observations are delivered in batches on the event loop (at least every second, and at once
on :meth:`Relay.flush`, which a metrics scrape calls first).

:meth:`SpliceRelay.connect` takes the client and only the instance's address: the engine makes
and connects the upstream socket itself, which saves the event loop a socket, a connect, a
writer registration and a callback per connection (under connection churn the event loop's
thread was the bottleneck).  The caller's :class:`ConnectHandler` hears of the connection once
it is up, when it ends, or, if the connect fails or times out, gets the client socket back
unread to try another instance.

:meth:`SpliceRelay.listen` goes further: the engine's shards accept a service's clients
themselves, pick from the pool snapshot the listener pushes (:meth:`SpliceRelay.set_pool`),
connect and count (:meth:`SpliceRelay.counts`, read at scrape time), and hand the listener only
what is unusual (its :class:`AcceptHandler`); see ``_relay_accept.pxi``.  Bytes of every
connection that names a service are counted as they are delivered, so ``flux_bytes_total``
shows a long-lived connection while it is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol, cast

__all__ = [
    "AcceptHandler",
    "ConnectHandler",
    "EngineCounts",
    "PythonRelay",
    "Relay",
    "RelayResult",
    "SpliceRelay",
    "make_relay",
    "packed_sockaddr",
]

ExchangeObserver = Callable[[str, int, list[int], list[int]], None]
"""Called with HTTP exchanges of one connection and label set, in batches:
(method, status, [roundtrip_us, ...], [total_us, ...])."""

_RESET_LINGER = struct.pack("ii", 1, 0)
# Completions of connections cut by close() must still arrive; this bounds the wait for them.
_CUT_TIMEOUT = 5.0
# Exchange observations wait at most this long for a batch (a scrape flushes them at once).
_FLUSH_INTERVAL = 1.0
# After answering a request itself, how long the relay reads (and drops) what the client still
# sends before closing: closing with unread bytes would reset the answer away.
_LINGER_SECONDS = 2.0


class RelayResult(NamedTuple):
    """How one relayed connection ended (a NamedTuple: one is made per connection, and a
    frozen dataclass cost several times as much to build).

    ``to_upstream`` / ``to_client``: bytes delivered each way.  ``error``: ``None`` when both
    directions ended with EOF, else the errno name (``"ECONNRESET"``, ``"EPIPE"``; ``"ECANCELED"``
    when ``close()`` cut it).  ``duration``: seconds from submission to close.  ``answered``:
    for HTTP, the status the relay answered the client itself (400, 431, 408), else 0.
    """

    to_upstream: int
    to_client: int
    error: str | None
    duration: float
    answered: int = 0
    counted: bool = False  # the bytes were already counted live for the connection's service


class EngineCounts(NamedTuple):
    """What the engine counted itself, cumulative, read at scrape time (see
    :meth:`SpliceRelay.counts`): ``connections`` by (service, protocol, instance, instance
    address, client IP); ``bytes`` by (service, "to_instance" | "to_client"), of every
    connection relayed for a service; ``active`` by service and ``rejected`` by (service,
    status) for the connections the engine accepted itself."""

    connections: dict[tuple[str, str, str, str, str], int]
    bytes: dict[tuple[str, str], int]
    active: dict[str, int]
    rejected: dict[tuple[str, str], int]


class AcceptHandler(Protocol):
    """A listener whose clients the engine accepts (:meth:`SpliceRelay.listen`)."""

    def handed_over(self, client_fd: int, client_ip: str, instance: int, code: int) -> None:
        """The engine gives a client back: to pick for (``instance`` 0), after a failed
        connect to ``instance`` (errno ``code``), or, with ``client_fd`` -1, to say that it
        stopped accepting (``code`` 0: the descriptor budget is spent, else accept4's errno)."""


# (instance name, instance address, client IP) -> the observer for that label set
ObserverFactory = Callable[[str, str, str], ExchangeObserver]


class ConnectHandler(Protocol):
    """Told what became of one :meth:`SpliceRelay.connect`."""

    def established(self) -> None:
        """The upstream connection is up; bytes are moving."""

    def ended(self, result: RelayResult) -> None:
        """The relayed connection ended (also when it ended before it was established)."""

    def connect_failed(self, client_fd: int, code: int) -> None:
        """Connecting failed with errno ``code`` (ETIMEDOUT after the timeout); the client's
        descriptor is the caller's again, open and unread."""


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


class Relay(Protocol):
    """What the listener needs from a relay."""

    @property
    def active(self) -> int:
        """Connections submitted and not yet finished."""

    @property
    def inflight_bytes(self) -> int:
        """Bytes read from one side and not yet written to the other, over all connections."""

    async def start(self) -> None:
        """Get ready to relay; call once from the event loop that will use the relay."""

    def submit(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        http: bool = False,
        observe: ExchangeObserver | None = None,
    ) -> asyncio.Future[RelayResult]:
        """Relay between two connected sockets; the relay owns (and will close) both.

        ``http``: follow HTTP/1.x framing and report each exchange to ``observe``.
        """

    def flush(self) -> None:
        """Deliver the exchange observations and completions waiting now."""

    async def close(self, grace: float) -> None:
        """Refuse new work, let active connections finish for ``grace`` s, reset the rest."""


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, f"E{code}")


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return _errno_name(exc.errno)
    return type(exc).__name__


async def _wait_bounded(futures: list[asyncio.Future[RelayResult]], timeout: float) -> None:
    if futures and timeout > 0:
        await asyncio.wait(futures, timeout=timeout)


class SpliceRelay:
    """The compiled engine behind the :class:`Relay` interface (see the module docstring).

    ``shards`` engines (one native thread each, own epoll loop, pipes and counters) share the
    work: a listener gives each shard its own listening socket (:meth:`listen`), and
    connections the asyncio side hands over are spread round-robin.
    """

    def __init__(
        self,
        *,
        pipe_size: int = 1 << 20,
        max_idle_pipes: int = 64,
        small_buffer: int = 16384,
        http_header_timeout: float = 10.0,
        http_idle_timeout: float = 60.0,
        shards: int = 1,
    ) -> None:
        from flux._splice import HTTP_METHODS, SpliceEngine

        if not 1 <= shards <= 256:
            raise ValueError(f"shards must be 1..256, got {shards}")
        options = {
            "pipe_size": pipe_size,
            "max_idle_pipes": max_idle_pipes,
            "small_buffer": small_buffer,
            "header_timeout": http_header_timeout,
            "idle_timeout": http_idle_timeout,
        }
        first = SpliceEngine(**options)
        self._engines = [first] + [
            SpliceEngine(**options, shard_of=first) for _ in range(shards - 1)
        ]
        self._engine = first
        self._methods: tuple[str, ...] = HTTP_METHODS
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[RelayResult]] = {}
        self._handlers: dict[int, ConnectHandler] = {}
        self._observers: dict[int, ExchangeObserver] = {}
        self._next_token = 1
        self._next_shard = 0
        # Tokens of connections whose bytes a service counts live (their results say so).
        self._counted: set[int] = set()
        self._closing = False
        self._flusher: asyncio.TimerHandle | None = None
        # Services the engine accepts for (ids live as long as the relay: counters stay).
        self._services: list[tuple[str, str]] = [("", "")]  # id -> (service, protocol)
        self._accepting: dict[int, AcceptHandler] = {}
        self._observer_factories: dict[int, ObserverFactory] = {}
        self._label_observers: dict[tuple[int, int, int], ExchangeObserver] = {}
        self._instances: list[tuple[str, str]] = [("", "")]  # id -> (name, address)
        self._instance_ids: dict[tuple[str, str], int] = {}

    @property
    def engine(self) -> Any:
        """The first shard's ``SpliceEngine`` (counters for tests and metrics)."""
        return self._engine

    @property
    def engines(self) -> list[Any]:
        """Every shard's ``SpliceEngine``."""
        return list(self._engines)

    @property
    def shards(self) -> int:
        return len(self._engines)

    @property
    def active(self) -> int:
        return len(self._pending) + len(self._handlers) + int(self._engine.held)

    @property
    def inflight_bytes(self) -> int:
        return sum(int(engine.inflight_bytes) for engine in self._engines)

    async def start(self) -> None:
        """Start the engine threads and watch their completion eventfds."""
        if self._loop is not None:
            raise RuntimeError("SpliceRelay.start() was already called")
        self._loop = asyncio.get_running_loop()
        for engine in self._engines:
            engine.start()
            self._loop.add_reader(engine.eventfd, self._flush_one, engine)

    def _shard(self) -> Any:
        engines = self._engines
        if len(engines) == 1:
            return engines[0]
        index = self._next_shard
        self._next_shard = (index + 1) % len(engines)
        return engines[index]

    def submit(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        http: bool = False,
        observe: ExchangeObserver | None = None,
        service: int = -1,
    ) -> asyncio.Future[RelayResult]:
        """Hand both sockets to the engine (they are detached: the engine closes them).
        ``service``: an id from :meth:`listen`, whose byte counters count this connection."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        token = self._next_token
        self._next_token += 1
        future: asyncio.Future[RelayResult] = self._loop.create_future()
        self._shard().add(
            client.fileno(), upstream.fileno(), token, http, observe is not None, service
        )
        if service >= 0:
            self._counted.add(token)
        # From here the engine owns the descriptors; the socket objects must not close them.
        client.detach()
        upstream.detach()
        self._pending[token] = future
        if http and observe is not None:
            self._observe(token, observe)
        return future

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
    ) -> None:
        """Connect to ``address`` (:func:`packed_sockaddr`) in the engine and relay the client
        (a descriptor, now the relay's) to it; ``handler`` hears what became of it."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        token = self._next_token
        self._next_token += 1
        self._shard().connect(
            client_fd, address, token, timeout, http, observe is not None, service
        )
        if service >= 0:
            self._counted.add(token)
        self._handlers[token] = handler
        if http and observe is not None:
            self._observe(token, observe)

    # -- accepting in the engine ---------------------------------------------------------------

    def listen(
        self,
        service: str,
        protocol: str,
        sockets: list[socket.socket],
        handler: AcceptHandler,
        *,
        connect_timeout: float,
        observers: ObserverFactory | None = None,
    ) -> int:
        """Let the engine accept ``service``'s clients: one listening socket per shard (all
        bound to the same port with SO_REUSEPORT), detached here; returns the id that
        :meth:`set_pool`, :meth:`pause`, :meth:`resume` and :meth:`unlisten` take."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        if len(sockets) != len(self._engines):
            raise ValueError(f"need one listening socket per shard ({len(self._engines)})")
        sid = len(self._services)
        self._services.append((service, protocol))
        self._accepting[sid] = handler
        if observers is not None:
            self._observer_factories[sid] = observers
            if self._flusher is None:
                self._flusher = self._loop.call_later(_FLUSH_INTERVAL, self._tick)
        http = protocol == "http"
        for engine, sock in zip(self._engines, sockets, strict=True):
            engine.listen(sid, sock.fileno(), http, observers is not None, connect_timeout)
            sock.detach()
        return sid

    def unlisten(self, sid: int) -> None:
        """Stop accepting for ``sid`` and close its sockets; its connections carry on."""
        self._accepting.pop(sid, None)
        for engine in self._engines:
            engine.unlisten(sid)

    def instance_id(self, name: str, address: str) -> int:
        """A stable small id for an instance (name and address) in engine snapshots."""
        key = (name, address)
        iid = self._instance_ids.get(key)
        if iid is None:
            iid = self._instance_ids[key] = len(self._instances)
            self._instances.append(key)
        return iid

    def instance(self, iid: int) -> tuple[str, str]:
        """(name, address) of an instance id."""
        return self._instances[iid]

    def set_pool(
        self, sid: int, targets: list[tuple[int, bytes]], *, p2c: bool, python_at_ns: int
    ) -> None:
        """What ``sid``'s new clients may go to (see ``SpliceEngine.set_pool``)."""
        for engine in self._engines:
            engine.set_pool(sid, targets, p2c, python_at_ns)

    def pause(self, sid: int) -> None:
        for engine in self._engines:
            engine.pause(sid)

    def resume(self, sid: int) -> None:
        for engine in self._engines:
            engine.resume(sid)

    def set_budget(self, limit: int, python_held: int) -> None:
        """The descriptor budget the shards accept against (shared by them)."""
        self._engine.set_budget(limit, python_held)

    @property
    def held(self) -> int:
        """Connections the shards accepted and hold now."""
        return int(self._engine.held)

    def instance_active(self, sid: int, name: str, address: str) -> int:
        """Connections up now that the engine picked ``name`` for, in service ``sid``."""
        iid = self._instance_ids.get((name, address))
        if iid is None:
            return 0
        return sum(int(engine.instance_active(sid, iid)) for engine in self._engines)

    def counts(self) -> EngineCounts:
        """Everything the shards counted, summed over shards, by label set."""
        connections: dict[tuple[str, str, str, str, str], int] = {}
        byte_counts: dict[tuple[str, str], int] = {}
        active: dict[str, int] = {}
        rejected: dict[tuple[str, str], int] = {}
        instances = self._instances
        for sid in range(1, len(self._services)):
            service, protocol = self._services[sid]
            up = down = live = 0
            answered = [0, 0, 0]
            for engine in self._engines:
                to_instance, to_client, now, codes, tally = engine.service_counts(sid)
                up += to_instance
                down += to_client
                live += now
                for i, n in enumerate(codes):
                    answered[i] += n
                for iid, ip, n in tally:
                    name, address = instances[iid]
                    key = (service, protocol, name, address, _ipv4(ip))
                    connections[key] = connections.get(key, 0) + n
            for direction, n in (("to_instance", up), ("to_client", down)):
                byte_counts[(service, direction)] = byte_counts.get((service, direction), 0) + n
            active[service] = active.get(service, 0) + live
            for code, n in zip(("400", "431", "408"), answered, strict=True):
                if n:
                    rejected[(service, code)] = rejected.get((service, code), 0) + n
        return EngineCounts(connections, byte_counts, active, rejected)

    def _observe(self, token: int, observe: ExchangeObserver) -> None:
        assert self._loop is not None
        self._observers[token] = observe
        if self._flusher is None:
            self._flusher = self._loop.call_later(_FLUSH_INTERVAL, self._tick)

    def _tick(self) -> None:
        self._flusher = None
        self.flush()
        if (
            (self._observers or self._observer_factories)
            and self._loop is not None
            and not self._loop.is_closed()
        ):
            self._flusher = self._loop.call_later(_FLUSH_INTERVAL, self._tick)

    def flush(self) -> None:
        """Deliver queued exchanges to their observers, then complete finished connections."""
        for engine in self._engines:
            self._flush_one(engine)

    def _flush_one(self, engine: Any) -> None:
        exchanges, completions, established, handed = engine.drain_all()
        handlers = self._handlers
        for token in established:
            handler = handlers.get(token)
            if handler is not None:
                handler.established()
        if exchanges:
            self._deliver(exchanges)
        for token, up, down, code, duration_ns, answered, client_fd in completions:
            self._observers.pop(token, None)
            handler = handlers.pop(token, None)
            if handler is not None and client_fd >= 0:
                self._counted.discard(token)
                handler.connect_failed(client_fd, code)
                continue
            result = RelayResult(
                up,
                down,
                _errno_name(code) if code else None,
                duration_ns / 1e9,
                answered,
                token in self._counted,
            )
            self._counted.discard(token)
            if handler is not None:
                handler.ended(result)
                continue
            future = self._pending.pop(token, None)
            if future is not None and not future.done():
                future.set_result(result)
        for sid, client_fd, ip, iid, code in handed:
            accepting = self._accepting.get(sid)
            if accepting is None:
                if client_fd >= 0:  # its listener closed meanwhile: nothing will serve it
                    _reset_fd(client_fd)
                continue
            accepting.handed_over(client_fd, _ipv4(ip), iid, code)

    def _deliver(self, exchanges: list[Any]) -> None:
        observers = self._observers
        methods = self._methods
        for token, method, status, roundtrips, totals, sid, iid, ip in exchanges:
            if token:
                observe = observers.get(token)
            else:
                key = (sid, iid, ip)
                observe = self._label_observers.get(key)
                if observe is None:
                    factory = self._observer_factories.get(sid)
                    if factory is None:
                        continue
                    name, address = self._instances[iid]
                    observe = self._label_observers[key] = factory(name, address, _ipv4(ip))
            if observe is not None:
                observe(methods[method], status, roundtrips, totals)

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` s for active connections, reset the rest, stop the engine."""
        if self._loop is None or self._closing:
            self._closing = True
            return
        self._closing = True
        await self._settled(grace)
        if self._pending or self._handlers or self.held:
            for engine in self._engines:
                engine.close_all()
            await self._settled(_CUT_TIMEOUT)
        for engine in self._engines:
            self._loop.remove_reader(engine.eventfd)
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        for engine in self._engines:
            engine.stop()
        self.flush()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("the relay engine stopped without a completion"))
        self._pending.clear()
        handlers, self._handlers = self._handlers, {}
        for handler in handlers.values():
            handler.ended(RelayResult(0, 0, "ECANCELED", 0.0))

    async def _settled(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for every submitted, connected and accepted connection to
        end."""
        assert self._loop is not None
        deadline = self._loop.time() + timeout
        await _wait_bounded(list(self._pending.values()), timeout)
        while (self._handlers or self.held) and self._loop.time() < deadline:
            await asyncio.sleep(0.02)


@functools.lru_cache(maxsize=65536)
def _ipv4(value: int) -> str:
    """An IPv4 address the engine reports (network order in a native integer) as text."""
    return socket.inet_ntoa(struct.pack("=I", value))


def _reset_fd(fd: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=fd)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_LINGER)
    sock.close()


class _Side(asyncio.Protocol):
    """One socket of a Python-relayed connection; everything is decided by its `_Flow`."""

    __slots__ = ("flow", "index", "transport")

    def __init__(self, flow: _Flow, index: int) -> None:
        self.flow = flow
        self.index = index
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.flow.forward(self.index, data)

    def eof_received(self) -> bool:
        self.flow.eof(self.index)
        return True

    def pause_writing(self) -> None:
        self.flow.pause_source(self.index)

    def resume_writing(self) -> None:
        self.flow.resume_source(self.index)

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.lost(self.index, exc)


class _HttpWatch:
    """The HTTP framer's view of one Python-relayed connection (the engine's, from Python).

    :meth:`show` is called with bytes just read and returns the part that may be forwarded;
    the flow reports writes with :meth:`written` so exchanges end when their bytes are out.
    """

    __slots__ = ("answer", "exchanges", "last_active", "observe", "probe", "stop")

    _SIDES = ("request", "response")

    def __init__(self, observe: ExchangeObserver | None) -> None:
        from flux._splice import HttpFramerProbe

        self.probe = HttpFramerProbe()
        self.observe = observe
        self.stop: list[int | None] = [None, None]
        self.answer: int | None = None  # what to answer once the responses owed are out
        self.exchanges: list[Any] = []
        self.last_active = time.monotonic_ns()

    def _events(self, events: list[Any]) -> None:
        for ev in events:
            if ev.kind == "exchange":
                self.exchanges.append(ev)
            elif ev.kind == "malformed":
                self.stop[0] = self.probe.request_start
            elif ev.kind == "reject":
                self.stop[1] = ev.pos
                self.answer = ev.status

    def show(self, index: int, data: bytes) -> bytes:
        side = self._SIDES[index]
        base = self.probe.position(side)
        self.last_active = now = time.monotonic_ns()
        self._events(self.probe.feed(side, data, now))
        limit = self.stop[index]
        if limit is not None and limit < base + len(data):
            return data[: max(0, limit - base)]
        return data

    def eof(self, index: int) -> None:
        self._events(self.probe.eof(self._SIDES[index], time.monotonic_ns()))

    def written(self) -> None:
        """Response bytes shown so far are written: their exchanges are complete."""
        if not self.exchanges:
            return
        self.last_active = now = time.monotonic_ns()
        observe = self.observe
        if observe is not None:
            for ev in self.exchanges:
                observe(
                    ev.method,
                    ev.status,
                    [max(0, ev.t_response_head - ev.t_request_head) // 1000],
                    [max(0, now - ev.t_request_head) // 1000],
                )
        self.exchanges.clear()

    def halted(self, index: int) -> bool:
        return self.stop[index] is not None


class _Flow:
    """One client <-> upstream connection relayed by Python Protocols (index 0 = client).

    The two transports are attached one after the other and each starts reading at once, so
    whatever arrives before both exist is held in ``early`` (with reading paused) and replayed
    by ``start()``.
    """

    __slots__ = ("answered", "bytes", "closing", "early", "eofs", "error", "future", "gone",
                 "held", "http", "lingering", "on_done", "ready", "sides", "started")

    def __init__(
        self,
        future: asyncio.Future[RelayResult],
        on_done: Callable[[_Flow], None],
        http: _HttpWatch | None = None,
    ) -> None:
        self.future = future
        self.http = http
        self.answered = 0
        self.lingering = False
        self.on_done = on_done
        self.sides = (_Side(self, 0), _Side(self, 1))
        self.bytes = [0, 0]
        self.eofs = [False, False]
        self.gone = [False, False]
        self.held = [False, False]  # reading paused because the other side's buffer is full
        self.early: list[tuple[int, bytes | None]] = []
        self.ready = False
        self.closing = False
        self.error: str | None = None
        self.started = time.monotonic_ns()

    def transport(self, index: int) -> asyncio.Transport:
        transport = self.sides[index].transport
        assert transport is not None
        return transport

    def start(self) -> None:
        """Both transports exist: replay what arrived early and start relaying."""
        self.ready = True
        if any(self.gone):
            # One side already failed or closed while the other was being attached.
            for index, side in enumerate(self.sides):
                if side.transport is not None and not self.gone[index]:
                    self.reset(side.transport)
            return
        for index, data in self.early:
            if data is None:
                self.eof(index)
            else:
                self.forward(index, data)
        self.early.clear()
        for index in (0, 1):
            self.resume_reading(index)

    def resume_reading(self, index: int) -> None:
        transport = self.sides[index].transport
        if (transport is not None and self.ready and not self.held[index]
                and not self.eofs[index] and not transport.is_closing()):
            transport.resume_reading()

    def forward(self, index: int, data: bytes) -> None:
        if not self.ready:
            self.early.append((index, data))
            self.transport(index).pause_reading()
            return
        http = self.http
        if http is not None:
            if self.lingering or self.closing:
                return  # answered already: the client's bytes are read and dropped
            data = http.show(index, data)
        if data:
            self.bytes[index] += len(data)
            self.transport(1 - index).write(data)
        if http is not None:
            if index == 1:
                http.written()
            self._http_progress()

    def _http_progress(self) -> None:
        """Stop halted sources; answer once every response owed is written."""
        http = self.http
        assert http is not None
        for index in (0, 1):
            if http.halted(index) and not self.eofs[index]:
                self.held[index] = True
                transport = self.sides[index].transport
                if transport is not None and not transport.is_closing():
                    transport.pause_reading()
        if http.answer is not None:
            self.answer(http.answer)

    def answer(self, status: int) -> None:
        """Write the relay's own answer (0: none), close the instance side, linger on the
        client until it closes (or for a moment), so it reads the answer, not a reset."""
        from flux._splice import HTTP_ERROR_RESPONSES

        if self.lingering or self.closing:
            return
        self.lingering = True
        client, upstream = self.transport(0), self.transport(1)
        upstream.close()
        if status:
            self.answered = status
            client.write(HTTP_ERROR_RESPONSES[status])
        if status and not self.eofs[0]:
            client.write_eof()
            self.held[0] = False
            client.resume_reading()
            loop = asyncio.get_running_loop()
            loop.call_later(_LINGER_SECONDS, self._end_linger)
        else:
            self.closing = True
            client.close()

    def _end_linger(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport(0).close()

    def eof(self, index: int) -> None:
        if not self.ready:
            self.early.append((index, None))
            return
        if self.http is not None:
            if self.lingering:
                if index == 0:
                    self._end_linger()
                return
            self.http.eof(index)
            self.http.written()
            if self.http.answer is not None:
                self.eofs[index] = True
                self.answer(self.http.answer)
                return
        self.eofs[index] = True
        if not self.eofs[1 - index]:
            self.transport(1 - index).write_eof()
            return
        # Second EOF: close both (close() flushes what is buffered, then sends FIN).  Calling
        # write_eof() here, on the transport whose eof_received() already returned True, is
        # the pattern that makes uvloop 0.23 abort with a double free.
        self.closing = True
        self.transport(0).close()
        self.transport(1).close()

    def pause_source(self, index: int) -> None:
        # Side `index` cannot take more: stop reading from the side that feeds it.
        self.held[1 - index] = True
        source = self.sides[1 - index].transport
        if source is not None and not source.is_closing():
            source.pause_reading()

    def resume_source(self, index: int) -> None:
        self.held[1 - index] = False
        self.resume_reading(1 - index)

    def lost(self, index: int, exc: Exception | None) -> None:
        self.gone[index] = True
        if exc is not None and self.error is None:
            self.error = _error_name(exc)
        if not self.gone[1 - index]:
            other = self.sides[1 - index].transport
            if other is not None:
                if exc is not None:
                    self.reset(other)
                elif self.lingering and index == 1:
                    pass  # the instance side is closed; the client's lingers on its own
                elif not self.closing:
                    self.closing = True
                    other.close()
        elif not self.future.done():
            self.future.set_result(
                RelayResult(
                    self.bytes[0],
                    self.bytes[1],
                    self.error,
                    (time.monotonic_ns() - self.started) / 1e9,
                    self.answered,
                )
            )
            self.on_done(self)

    def cut(self) -> None:
        """Reset both sides now (close() ran out of grace)."""
        if self.error is None:
            self.error = "ECANCELED"
        for side in self.sides:
            if side.transport is not None:
                self.reset(side.transport)

    @staticmethod
    def reset(transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_LINGER)
        transport.abort()

    @property
    def buffered(self) -> int:
        return sum(
            side.transport.get_write_buffer_size()
            for side in self.sides
            if side.transport is not None
        )


def _same(side: _Side) -> _Side:
    return side


class PythonRelay:
    """The pure-Python fallback relay on asyncio Protocols (see the module docstring)."""

    def __init__(self, *, http_header_timeout: float = 10.0, http_idle_timeout: float = 60.0):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flows: set[_Flow] = set()
        self._setups: set[asyncio.Task[None]] = set()
        self._closing = False
        self._header_ns = int(http_header_timeout * 1e9)
        self._idle_ns = int(http_idle_timeout * 1e9)
        shortest = min((t for t in (self._header_ns, self._idle_ns) if t > 0), default=4e9)
        self._sweep_every = min(max(shortest / 8e9, 0.01), 0.5)
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def active(self) -> int:
        return len(self._flows)

    @property
    def inflight_bytes(self) -> int:
        return sum(flow.buffered for flow in self._flows)

    async def start(self) -> None:
        """Bind the relay to the running event loop."""
        if self._loop is not None:
            raise RuntimeError("PythonRelay.start() was already called")
        self._loop = asyncio.get_running_loop()

    def submit(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        http: bool = False,
        observe: ExchangeObserver | None = None,
    ) -> asyncio.Future[RelayResult]:
        """Wrap both sockets in transports (which then own them) and relay between them."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        for sock in (client, upstream):
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        future: asyncio.Future[RelayResult] = self._loop.create_future()
        flow = _Flow(future, self._flows.discard, _HttpWatch(observe) if http else None)
        if http and self._sweeper is None:
            self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)
        self._flows.add(flow)
        task = self._loop.create_task(self._attach(flow, client, upstream))
        self._setups.add(task)
        task.add_done_callback(self._setups.discard)
        return future

    async def _attach(self, flow: _Flow, client: socket.socket, upstream: socket.socket) -> None:
        assert self._loop is not None
        attached: list[asyncio.Transport] = []
        try:
            for side, sock in zip(flow.sides, (client, upstream), strict=True):
                await self._loop.connect_accepted_socket(functools.partial(_same, side), sock)
                assert side.transport is not None
                attached.append(side.transport)
        except Exception as exc:
            for transport in attached:
                _Flow.reset(transport)
            for sock in (client, upstream)[len(attached):]:
                sock.close()
            self._flows.discard(flow)
            if not flow.future.done():
                flow.future.set_result(RelayResult(0, 0, _error_name(exc), 0.0))
            return
        flow.start()

    def flush(self) -> None:
        """Nothing waits: the Python relay reports each exchange as its bytes are written."""

    def _sweep(self) -> None:
        """Enforce the HTTP header-read and idle timeouts (see the module docstring)."""
        self._sweeper = None
        now = time.monotonic_ns()
        watched = False
        for flow in list(self._flows):
            http = flow.http
            if http is None:
                continue
            watched = True
            if not flow.ready or flow.lingering or flow.closing:
                continue
            if http.halted(0) or http.halted(1):
                continue
            phase = http.probe.phase
            if (phase == "head" and self._header_ns
                    and now - http.probe.head_started >= self._header_ns):
                if http.probe.pending == 0 and flow.buffered == 0:
                    flow.answer(408)
                else:
                    flow.error = "ETIMEDOUT"
                    flow.cut()
            elif (phase == "idle" and self._idle_ns and flow.buffered == 0
                  and now - http.last_active >= self._idle_ns):
                flow.closing = True
                flow.transport(0).close()
                flow.transport(1).close()
        if watched and self._loop is not None and not self._closing:
            self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` s for active connections, then reset the rest."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._setups:
            await asyncio.wait(set(self._setups), timeout=_CUT_TIMEOUT)
        await _wait_bounded([flow.future for flow in self._flows], grace)
        if self._flows:
            for flow in list(self._flows):
                flow.cut()
            await _wait_bounded([flow.future for flow in self._flows], _CUT_TIMEOUT)


def make_relay(kind: Literal["splice", "python"] = "splice", **options: Any) -> Relay:
    """The relay to use: the compiled splice engine by default, or the pure-Python fallback."""
    if kind == "splice":
        return SpliceRelay(**options)
    if kind == "python":
        # One event loop: shards mean nothing to it.
        options.pop("shards", None)
        extra = set(options) - {"http_header_timeout", "http_idle_timeout"}
        if extra:
            raise TypeError(f"the python relay takes only the HTTP timeouts, got {sorted(extra)}")
        return PythonRelay(**options)
    raise ValueError(f"relay kind must be 'splice' or 'python', got {kind!r}")
