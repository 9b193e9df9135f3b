"""The splice relay: the compiled engine (``flux._splice.SpliceEngine``) behind the relay roles.

:class:`SpliceRelay` takes every role of :mod:`flux.relay.base` (:class:`~flux.relay.base.Relay`,
:class:`~flux.relay.base.Connector`, :class:`~flux.relay.base.Acceptor`); its twin and oracle is
:class:`~flux.relay.python.PythonRelay`.  A native thread with its own epoll loop moves the bytes
with ``splice(2)`` through pooled pipes (or recv/send for small messages) without the GIL.  The
asyncio side only sees completions, drained in batches when the engine's eventfd becomes
readable.

:meth:`SpliceRelay.connect` takes the client and only the instance's address: the engine makes
and connects the upstream socket itself, which saves the event loop a socket, a connect, a
writer registration and a callback per connection (under connection churn the event loop's
thread was the bottleneck).  The caller's :class:`~flux.relay.base.ConnectHandler` hears of the
connection once it is up, when it ends, or, if the connect fails or times out, gets the client
socket back unread to try another instance.

:meth:`SpliceRelay.listen` goes further: the engine's shards accept a service's clients
themselves, pick from the pool snapshot the listener pushes (:meth:`SpliceRelay.set_pool`),
connect and count (:meth:`SpliceRelay.counts`, read at scrape time), and hand the listener only
what is unusual (its :class:`~flux.relay.base.AcceptHandler`); see ``_relay_accept.pxi``.  Bytes
of every connection that names a service are counted as they are delivered, so
``flux_bytes_total`` shows a long-lived connection while it is open.

:meth:`SpliceRelay.engine_counters` sums the shards' own counters (``SpliceEngine.stats()``, by
the names of the engine's table) for the scrape: events (header timeouts, idle closes, opaque
switches, dropped exchange records, ...) and levels (idle pipes, in-flight bytes, ...).

What an HTTP connection's data path did on its own (an answer, a timeout, a switch, exchanges
cut short) comes from the engine as notices (``_relay_notice.pxi``), drained with everything
else; the relay names their service, instance and client (from :meth:`listen`'s service and
instances, or the ``info`` a connection was handed over with) and writes them through its
:class:`~flux.relay.notices.NoticeLimiter`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flux.model import ConnectionInfo
from flux.relay.base import (
    CUT_TIMEOUT,
    HTTP_HEADER_TIMEOUT,
    HTTP_IDLE_TIMEOUT,
    OTHER_CLIENT,
    AcceptHandler,
    ConnectHandler,
    EngineCounts,
    ExchangeObserver,
    GrpcCall,
    ObserverFactory,
    RelayCounters,
    RelayResult,
    errno_name,
    reset_and_close,
    wait_bounded,
)
from flux.relay.notices import NoticeLimiter, NoticeSubject, client_address
from flux.relay.spread import SpreadWatch

if TYPE_CHECKING:
    from flux._splice import ExchangeGroup, Notice, SpliceEngine

__all__ = ["SpliceRelay", "cpu_plan"]

log = logging.getLogger("flux.relay")

# Exchange observations wait at most this long for a batch (a scrape flushes them at once).
_FLUSH_INTERVAL = 1.0
# Observers kept at hand for the exchanges of engine-accepted clients, by (service, instance,
# client IP).  Clients from outside are unbounded, so past this many the cache starts over (an
# observer is only a shortcut to its label sets, which the metrics keep, folded).
_LABEL_OBSERVERS_MAX = 4096


def cpu_plan(shards: int, allowed: set[int] | None = None) -> list[list[int]] | None:
    """Each shard's CPUs for steering: the CPUs this process may run on (``allowed``, by
    default its affinity mask), dealt out in turn (shard i gets the i-th, the i+n-th...); None
    when steering cannot apply: fewer than two shards, or more shards than CPUs (a shard with
    no CPU of its own would get no connection)."""
    if allowed is None:
        try:
            allowed = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return None
    cpus = sorted(allowed)
    if shards < 2 or shards > len(cpus):
        return None
    return [cpus[i::shards] for i in range(shards)]


class SpliceRelay:
    """The compiled engine in every relay role (see the module docstring); the twin of
    :class:`~flux.relay.python.PythonRelay`, the oracle.

    ``shards`` engines (one native thread each, own epoll loop, pipes and counters) share the
    work: a listener gives each shard its own listening socket (:meth:`listen`), and
    connections the asyncio side hands over are spread round-robin.  ``notices`` writes the
    engine's notices (a :class:`~flux.relay.notices.NoticeLimiter` of its own by default).
    ``max_clients``: how many client addresses each shard names per service in its tally (the
    rest are counted as ``"other"``; see :class:`~flux.relay.base.EngineCounts`).
    ``steer``: give each shard its own CPUs (:func:`cpu_plan`; its thread is pinned to them)
    and send each new connection to the shard owning the CPU it arrived on (``_relay_steer.pxi``)
    instead of by the hash of its addresses; it applies when there are at least two shards
    and no more than the CPUs this process may run on (:attr:`steering` says whether it does).
    ``spread``: what decides that steering does harm (one thread taking most new connections or
    doing most of the work),
    whereupon the relay gives them back to the hash for good (:mod:`flux.relay.spread`).
    """

    def __init__(
        self,
        *,
        pipe_size: int = 1 << 20,
        max_idle_pipes: int = 64,
        small_buffer: int = 16384,
        http_header_timeout: float = HTTP_HEADER_TIMEOUT,
        http_idle_timeout: float = HTTP_IDLE_TIMEOUT,
        shards: int = 1,
        notices: NoticeLimiter | None = None,
        max_clients: int = 100,
        steer: bool = False,
        spread: SpreadWatch | None = None,
    ) -> None:
        from flux._splice import (
            HTTP_METHODS,
            RELAY_COUNTERS,
            RELAY_LEVELS,
            TALLY_OTHER_CLIENT,
            SpliceEngine,
        )

        if not 1 <= shards <= 256:
            raise ValueError(f"shards must be 1..256, got {shards}")
        plan = cpu_plan(shards) if steer else None

        def shard(index: int, shard_of: SpliceEngine | None) -> SpliceEngine:
            return SpliceEngine(
                pipe_size=pipe_size,
                max_idle_pipes=max_idle_pipes,
                small_buffer=small_buffer,
                header_timeout=http_header_timeout,
                idle_timeout=http_idle_timeout,
                shard_of=shard_of,
                max_clients=max_clients,
                cpus=None if plan is None else plan[index],
            )

        first = shard(0, None)
        self._engines = [first] + [shard(i, first) for i in range(1, shards)]
        self._plan = plan
        # Why steering asked for is off (the kernel refused it, or the spread watch stopped
        # it), and what it needs to be taken back: each steered port's first socket (by
        # service id; the engine owns them until unlisten) and the CPUs to unpin threads to.
        self._steer_off: str | None = None
        self._steered: dict[int, int] = {}
        self._allowed: set[int] = set(os.sched_getaffinity(0)) if plan is not None else set()
        if plan is not None and spread is None:
            spread = SpreadWatch(shards)
        self._spread = spread if plan is not None else None
        self._spread_timer: asyncio.TimerHandle | None = None
        self._pins_checked = False
        self._engine = first
        self._methods: tuple[str, ...] = HTTP_METHODS
        self._counter_names: tuple[str, ...] = RELAY_COUNTERS
        self._level_names: frozenset[str] = RELAY_LEVELS
        self._tally_other: int = TALLY_OTHER_CLIENT
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[RelayResult]] = {}
        self._handlers: dict[int, ConnectHandler] = {}
        self._observers: dict[int, ExchangeObserver] = {}
        # What the notices of a connection handed over for HTTP name (by token).
        self._infos: dict[int, ConnectionInfo] = {}
        self._notices = notices if notices is not None else NoticeLimiter()
        self._next_token = 1
        self._next_shard = 0
        # Tokens of connections whose bytes a service counts live (their results say so).
        self._counted: set[int] = set()
        self._closing = False
        self._flusher: asyncio.TimerHandle | None = None
        # Services the engine accepts for (ids live as long as the relay: counters stay).
        self._services: list[tuple[str, str]] = [("", "")]  # id -> (service, protocol)
        self._entries: dict[int, str] = {}  # id -> entry point ("vip", "published:PORT")
        self._accepting: dict[int, AcceptHandler] = {}
        self._observer_factories: dict[int, ObserverFactory] = {}
        self._label_observers: dict[tuple[int, int, int], ExchangeObserver] = {}
        self._instances: list[tuple[str, str]] = [("", "")]  # id -> (name, address)
        self._instance_ids: dict[tuple[str, str], int] = {}

    @property
    def engine(self) -> SpliceEngine:
        """The first shard's ``SpliceEngine`` (counters for tests and metrics)."""
        return self._engine

    @property
    def engines(self) -> list[SpliceEngine]:
        """Every shard's ``SpliceEngine``."""
        return list(self._engines)

    @property
    def shards(self) -> int:
        return len(self._engines)

    @property
    def steering(self) -> list[list[int]] | None:
        """Each shard's CPUs when new connections are steered by CPU (``steer``), else None
        (spread by the hash of their addresses)."""
        if self._plan is None or self._steer_off is not None:
            return None
        return [list(cpus) for cpus in self._plan]

    @property
    def steering_off(self) -> str | None:
        """Why steering by CPU, asked for, is not in effect (the kernel refused it, or fluxd
        stopped it because one thread took most new connections); None otherwise."""
        return self._steer_off

    @property
    def connector(self) -> SpliceRelay:
        """The engine connects to instances itself (:meth:`connect`)."""
        return self

    @property
    def acceptor(self) -> SpliceRelay:
        """The engine accepts services' clients itself (:meth:`listen`)."""
        return self

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
        self._notices.attach(self._loop)
        for engine in self._engines:
            engine.start()
            self._loop.add_reader(engine.eventfd, self._flush_one, engine)
        if self._spread is not None:
            self._spread_timer = self._loop.call_later(self._spread.window, self._watch_spread)

    def _shard(self) -> SpliceEngine:
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
        info: ConnectionInfo | None = None,
        pin_host: bool = False,
        forwarded: bool = False,
    ) -> asyncio.Future[RelayResult]:
        """Hand both sockets to the engine (they are detached: the engine closes them).
        ``service``: an id from :meth:`listen`, whose byte counters count this connection;
        ``info``: what its notices name; ``pin_host`` and ``forwarded``: see
        :meth:`Relay.submit`."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        token = self._next_token
        self._next_token += 1
        future: asyncio.Future[RelayResult] = self._loop.create_future()
        self._shard().add(
            client.fileno(),
            upstream.fileno(),
            token,
            http,
            observe is not None,
            service,
            pin_host,
            forwarded,
        )
        if service >= 0:
            self._counted.add(token)
        # From here the engine owns the descriptors; the socket objects must not close them.
        client.detach()
        upstream.detach()
        self._pending[token] = future
        if http and observe is not None:
            self._observe(token, observe)
        if http and info is not None:
            self._infos[token] = info
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
        info: ConnectionInfo | None = None,
        pin_host: bool = False,
        preface: bytes = b"",
        forwarded: bool = False,
    ) -> None:
        """Connect to ``address`` (:func:`packed_sockaddr`) in the engine and relay the client
        (a descriptor, now the relay's) to it; ``handler`` hears what became of it; ``info``:
        what its notices name; ``pin_host`` and ``forwarded``: see :meth:`Relay.submit`;
        ``preface``: what the instance gets first (a PROXY protocol header)."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        token = self._next_token
        self._next_token += 1
        self._shard().connect(
            client_fd,
            address,
            token,
            timeout,
            http,
            observe is not None,
            service,
            pin_host,
            preface or None,
            forwarded,
        )
        if service >= 0:
            self._counted.add(token)
        self._handlers[token] = handler
        if http and observe is not None:
            self._observe(token, observe)
        if http and info is not None:
            self._infos[token] = info

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
        entry: str = "vip",
        proxy_protocol: int = 0,
        forwarded: bool = False,
    ) -> int:
        """Let the engine accept ``service``'s clients: one listening socket per shard (all
        bound to the same port with SO_REUSEPORT), detached here; returns the id that
        :meth:`set_pool`, :meth:`pause`, :meth:`resume` and :meth:`unlisten` take.
        ``proxy_protocol`` (1, 2; 0: none): the engine sends each instance that PROXY protocol
        header first; ``forwarded`` (HTTP): it rewrites each request head for
        X-Forwarded-For (see :meth:`Relay.submit`)."""
        if len(sockets) != len(self._engines):
            raise ValueError(f"need one listening socket per shard ({len(self._engines)})")
        sid = self.serve(
            service,
            protocol,
            handler,
            connect_timeout=connect_timeout,
            observers=observers,
            entry=entry,
            proxy_protocol=proxy_protocol,
            forwarded=forwarded,
        )
        http = protocol == "http"
        if self._steer(sockets):
            self._steered[sid] = sockets[0].fileno()
        for engine, sock in zip(self._engines, sockets, strict=True):
            engine.listen(
                sid,
                sock.fileno(),
                http,
                observers is not None,
                connect_timeout,
                proxy_protocol,
                http and forwarded,
            )
            sock.detach()
        return sid

    def _steer(self, sockets: list[socket.socket]) -> bool:
        """Attach the steering program to the port's reuseport group (sockets in shard order);
        a kernel that refuses it leaves the hash, said once in the log and in :attr:`steering`.
        True if the program is on."""
        if self._plan is None or self._steer_off is not None or len(sockets) < 2:
            return False
        from flux._splice import steer_by_cpu

        pairs = [(cpu, index) for index, cpus in enumerate(self._plan) for cpu in cpus]
        try:
            steer_by_cpu(sockets[0].fileno(), pairs)
        except OSError as error:
            self._stop_steering(f"the kernel refused it ({error})")
            return False
        return True

    def _watch_spread(self) -> None:
        """Every window: stop steering if one thread has been taking most new connections, or
        doing most of the work (:mod:`flux.relay.spread`)."""
        self._spread_timer = None
        if self._spread is None or self._loop is None or self._closing:
            return
        stats = [engine.stats() for engine in self._engines]
        if not self._pins_checked:
            self._pins_checked = True
            self._say_pin_failures([int(counted["pin_failures"]) for counted in stats])
        accepted = [int(counted["accepted"]) for counted in stats]
        used = [_thread_cpu(engine.thread_id) for engine in self._engines]
        known = [seconds for seconds in used if seconds is not None]
        busy = known if len(known) == len(used) else None
        reason = self._spread.observe(accepted, busy)
        if reason is not None:
            self._stop_steering(reason)
            return
        self._spread_timer = self._loop.call_later(self._spread.window, self._watch_spread)

    def _say_pin_failures(self, failures: list[int]) -> None:
        """Once, a window after start: name each thread that could not pin itself (a CPU
        taken away between the plan and the start); it runs wherever the scheduler puts it,
        and the connections that arrive on its CPUs still reach it."""
        if self._plan is None:
            return
        for index, count in enumerate(failures):
            if count:
                cpus = ",".join(map(str, self._plan[index]))
                log.warning(
                    "engine: thread %d could not pin itself to CPUs %s (this process may use"
                    " CPUs %s now); it runs wherever the scheduler puts it, still taking the"
                    " new connections that arrive on CPUs %s",
                    index,
                    cpus,
                    ",".join(map(str, sorted(os.sched_getaffinity(0)))),
                    cpus,
                )

    def _stop_steering(self, reason: str) -> None:
        """Give new connections back to the hash for good: take the program off every steered
        port and let each thread run on any CPU this process may use; said once in the log, in
        ``steering_stopped`` and in :attr:`steering_off`."""
        from flux._splice import unsteer

        self._steer_off = reason
        self._spread = None
        if self._spread_timer is not None:
            self._spread_timer.cancel()
            self._spread_timer = None
        failures = []
        for sid, fd in sorted(self._steered.items()):
            try:
                unsteer(fd)
            except OSError as error:
                failures.append(f"service {self._services[sid][0] or sid}: {error}")
        self._steered.clear()
        for index, engine in enumerate(self._engines):
            tid = engine.thread_id
            try:
                if tid:
                    os.sched_setaffinity(tid, self._allowed)
            except OSError as error:
                failures.append(f"thread {index}: {error}")
        log.warning(
            "engine: steering new connections by CPU stopped: %s; from now on they are spread"
            " by the hash of their addresses over threads free to run on any CPU%s",
            reason,
            "" if not failures else " (not undone: " + "; ".join(failures) + ")",
        )

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
        """Make ``service`` ready for the clients a router sends it (:meth:`route`), as
        :meth:`listen` does without sockets; returns its id."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        sid = len(self._services)
        self._services.append((service, protocol))
        self._entries[sid] = entry
        self._accepting[sid] = handler
        if observers is not None:
            self._observer_factories[sid] = observers
            if self._flusher is None:
                self._flusher = self._loop.call_later(_FLUSH_INTERVAL, self._tick)
        http = protocol == "http"
        for engine in self._engines:
            engine.serve(
                sid, http, observers is not None, connect_timeout, proxy_protocol,
                http and forwarded,
            )  # fmt: skip
        return sid

    def route(
        self, sid: int, names: list[tuple[str, int]], default: int, *, tls: bool = False
    ) -> None:
        """Make ``sid`` (listening) a router: each client goes to the service id its first
        request's Host names in ``names`` (host name or ``*.suffix``, service id), else to
        ``default`` (-1: none); the rest is handed to ``sid``'s handler unread."""
        for engine in self._engines:
            engine.route(sid, names, default, tls)

    def unlisten(self, sid: int) -> None:
        """Stop accepting for ``sid`` and close its sockets; its connections carry on."""
        self._accepting.pop(sid, None)
        self._steered.pop(sid, None)  # the engine closes the socket
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
        rejected: dict[tuple[str, str, str], int] = {}
        entries: dict[tuple[str, str], int] = {}
        instances = self._instances
        for sid in range(1, len(self._services)):
            service, protocol = self._services[sid]
            if not service:
                continue  # a router: it counts nothing of its own (see route)
            entry = (service, self._entries[sid])
            up = down = live = 0
            answered = [0, 0, 0, 0]
            for engine in self._engines:
                counted = engine.service_counts(sid)
                up += counted.to_instances
                down += counted.to_clients
                live += counted.active
                for i, n in enumerate(counted.answered):
                    answered[i] += n
                for iid, ip, n in counted.tally:
                    name, address = instances[iid]
                    client = OTHER_CLIENT if ip == self._tally_other else _ipv4(ip)
                    key = (service, protocol, name, address, client)
                    connections[key] = connections.get(key, 0) + n
                    entries[entry] = entries.get(entry, 0) + n
            for direction, n in (("to_instance", up), ("to_client", down)):
                byte_counts[(service, direction)] = byte_counts.get((service, direction), 0) + n
            active[service] = active.get(service, 0) + live
            for code, n in zip(("400", "431", "408", "421"), answered, strict=True):
                if n:
                    answer = (*entry, code)
                    rejected[answer] = rejected.get(answer, 0) + n
        return EngineCounts(connections, byte_counts, active, rejected, entries)

    def engine_counters(self) -> RelayCounters:
        """Every counter in the engine's table (``RELAY_COUNTERS``), summed over the shards:
        the levels ``RELAY_LEVELS`` names apart, every other one an event (so a counter the
        engine gains is exported as an event without an edit here); and one event of the
        relay's own, ``steering_stopped`` (steering by CPU given back to the hash)."""
        totals = dict.fromkeys(self._counter_names, 0)
        accepted = []
        for engine in self._engines:
            stats = engine.stats()
            for name in totals:
                totals[name] += stats[name]
            accepted.append(stats["accepted"])
        levels = self._level_names
        totals["steering_stopped"] = int(self._steer_off is not None)
        return RelayCounters(
            {name: n for name, n in totals.items() if name not in levels},
            {name: n for name, n in totals.items() if name in levels},
            tuple(accepted),
        )

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

    def _flush_one(self, engine: SpliceEngine) -> None:
        drained = engine.drain_all()
        handlers = self._handlers
        for token in drained.established:
            handler = handlers.get(token)
            if handler is not None:
                handler.established()
        if drained.exchanges:
            self._deliver(drained.exchanges)
        if drained.notices:
            self._notice(drained.notices)
        # Records unpack by position: the fields in Completion's, HandOver's and
        # ExchangeGroup's order (flux/_splice.pyi), at a tuple's cost per record.
        infos = self._infos
        for token, up, down, code, duration_ns, answered, client_fd in drained.completions:
            self._observers.pop(token, None)
            if infos:
                infos.pop(token, None)
            handler = handlers.pop(token, None)
            if handler is not None and client_fd >= 0:
                self._counted.discard(token)
                handler.connect_failed(client_fd, code)
                continue
            result = RelayResult(
                up,
                down,
                errno_name(code) if code else None,
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
        for sid, client_fd, ip, iid, code in drained.handed:
            accepting = self._accepting.get(sid)
            if accepting is None:
                if client_fd >= 0:  # its listener closed meanwhile: nothing will serve it
                    reset_and_close(
                        socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=client_fd)
                    )
                continue
            accepting.handed_over(client_fd, _ipv4(ip), iid, code)

    def _deliver(self, exchanges: Sequence[ExchangeGroup]) -> None:
        """Give each exchange batch (see ``SpliceEngine.drain_all``) to its observer."""
        observers = self._observers
        methods = self._methods
        for token, method, status, roundtrips, totals, sid, iid, ip, path, code in exchanges:
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
                    if len(self._label_observers) >= _LABEL_OBSERVERS_MAX:
                        self._label_observers.clear()
                    observe = self._label_observers[key] = factory(name, address, _ipv4(ip))
            if observe is not None:
                grpc = None if path is None else _grpc_call(path, code)
                observe(methods[method], status, roundtrips, totals, grpc)

    def _notice(self, notices: Sequence[Notice]) -> None:
        """Write each notice (see ``SpliceEngine.drain_all``), naming what its token or its
        service and instance ids stand for."""
        write = self._notices.notice
        for n in notices:
            info = self._infos.get(n.token) if n.token else None
            if info is not None:
                service = info.service
                instance = f"{info.instance} at {info.instance_address}"
            else:
                service = self._services[n.service][0] if n.service else "-"
                name, address = self._instances[n.instance] if n.token == 0 else ("", "")
                instance = f"{name} at {address}" if name else ""
            client = client_address(_ipv4(n.client_ip), n.client_port)
            write(
                NoticeSubject(service, client, instance),
                n.kind,
                n.reason,
                status=n.status,
                count=n.exchanges,
                bytes_up=n.bytes_up,
                bytes_down=n.bytes_down,
                age=n.age_ns / 1e9,
            )

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
            await self._settled(CUT_TIMEOUT)
        for engine in self._engines:
            self._loop.remove_reader(engine.eventfd)
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._spread_timer is not None:
            self._spread_timer.cancel()
            self._spread_timer = None
        for engine in self._engines:
            engine.stop()
        self.flush()
        self._notices.close()
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
        await wait_bounded(list(self._pending.values()), timeout)
        while (self._handlers or self.held) and self._loop.time() < deadline:
            await asyncio.sleep(0.02)


def _thread_cpu(tid: int) -> float | None:
    """The CPU seconds thread ``tid`` of this process has used so far (None if unknown): the
    scheduler's nanoseconds where it keeps them, else the tick counts of its stat line."""
    if tid <= 0:
        return None
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/self/task/{tid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=4096)
def _grpc_call(path: str, code: int) -> GrpcCall:
    """One GrpcCall per (path, code) the engine reports (both come from bounded sets)."""
    return GrpcCall(path, code)


@functools.lru_cache(maxsize=65536)
def _ipv4(value: int) -> str:
    """An IPv4 address the engine reports (network order in a native integer) as text."""
    return socket.inet_ntoa(struct.pack("=I", value))

