"""Listeners: accept a service's intercepted connections, pick an instance, hand over.

Theory of operation
-------------------
Each forwarding service has one listening socket on the bridge's IPv4 address and an
ephemeral port; the service's DNAT rule sends its floating address there.  The accept path is
a plain reader callback on the event loop: it accepts every pending connection (up to a batch
per wake-up, so one busy service cannot starve the loop) and starts, for each, a non-blocking
connect whose completion (or timeout) arrives as a callback, so the accept path never waits:

1. pick an instance from the pool (never one already tried for this connection);
2. connect to it with a timeout (``-connect-timeout``);
3. on failure, mark the instance failed (the pool backs it off) and try another, up to five
   attempts; when none is left, reset the client's connection at once, so it fails fast instead
   of waiting on a connection that will never be served;
4. on success, relay between the two (the Cython splice engine by default).  From there no
   Python runs per byte.  For an ``http`` service the relay also follows HTTP/1.x framing and
   reports each exchange to an observer made for the connection (``on_exchange``).

With the splice engine, all of it happens in the engine's threads for the common case: the
listener makes one listening socket per engine shard (SO_REUSEPORT, one port) and hands them
over (:meth:`SpliceRelay.listen`); each shard accepts, picks from a snapshot of the pool that
the listener pushes whenever the pool changes (the ready instances, when none is on probation,
and when the next retry is due), connects and counts, with no Python per connection.  What is
unusual comes back to :meth:`Listener.handed_over` and goes through the steps below exactly as
if this listener had accepted the client: no usable snapshot (nothing ready, a probe due, a
retry due), a failed or timed-out connect (the client unread, with the instance tried), or the
engine pausing the service for want of descriptors.  The relay with no engine (the Python
relay) accepts here, on the event loop.

Handed back, steps 2 and 4 still happen in the engine's thread for a healthy instance
(:meth:`SpliceRelay.connect`): the listener hands over the client and the instance's address,
and hears back when the connection is up (counted then), when it ends, or with the client
returned unread when the connect failed, to go on at step 3.  An instance on probation (see
the pool) is connected here, on the event loop, because its outcome must reach the pool at
once; so is everything with the Python relay.

Running out of descriptors
--------------------------
Each proxied connection holds two descriptors, so the descriptor limit caps how many fluxd can
relay; past it, everything else fluxd does (etcd, where its lease is kept alive, Docker,
iptables-restore, /metrics) would fail too: measured, 11,000 clients against 20,000
descriptors let fluxd's etcd lease expire.  So the listeners of a process share a budget
(:class:`ConnectionBudget`): ``(limit - RESERVED_DESCRIPTORS - listening sockets) / 2``
connections, counted from accept until both descriptors are closed (the engine's shards count
the connections they accept against the same budget).  A listener whose budget is spent pauses
accepting: pending connections wait in the kernel's backlog and are accepted when connections
close.

Running out anyway (EMFILE/ENFILE, another process's files, pipes) or out of kernel memory,
while accepting or while making a connection's upstream socket (here or in the engine), pauses
accepting the same way.  A client accepted whose upstream socket could not be made is *parked*,
not reset and not blamed on the instance (the shortage is this process's, the instance may be
fine): every ``PAUSE_SECONDS`` parked clients are tried again (one, then twice as many each
time none came back), and accepting resumes only once none is left, so new clients cannot take
the descriptors a parked one needs (otherwise every descriptor freed by a closing connection
went to a new client that could not be served either, and the whole backlog was reset one
client at a time).  A parked client still waiting after ``-connect-timeout`` is reset.

A shortage is logged once when it starts and once when accepting catches up, at most one such
pair per ``PAUSE_LOG_EVERY`` seconds for all listeners together (the ones in between are
counted in the next report), not once per retry.

Closing a listener closes only the listening socket: connections it already handed to the
relay carry on until they end.

A published port shared by host name is accepted by a router instead
(:mod:`flux.balancer.hostrouter`), which reads each client's first request head and gives the
client to the chosen service's listener with :meth:`Listener.take`; that listener never
opens a socket of its own, and goes on from step 1 above.

Published ports
---------------
A service's published port (:mod:`flux.balancer.entrypoints`) is a listener like any other,
bound to ``-publish-ip`` and a fixed port instead of the bridge and an ephemeral one, and
named by its ``entry`` (``published:PORT``; a VIP's listener is ``vip``), which the metrics
count connections by.  Everything after the bind is the same path: the engine's shards accept,
pick and connect, the pool, retries, the descriptor budget.  A fixed port is taken with a plain
bind first (with ``SO_REUSEADDR``, so a previous run's connections in TIME_WAIT do not hold it)
and only then by the shards' ``SO_REUSEPORT`` sockets: a port another process holds, even one
listening with ``SO_REUSEPORT`` itself, fails that bind with EADDRINUSE instead of being shared.

The PROXY protocol
------------------
A tcp service with ``proxy_protocol`` (fluxctl ``--proxy-protocol v1|v2``) sends its instances
a PROXY protocol header naming the client before the client's bytes, on every path: the engine
makes it for the clients it accepts (``listen``'s ``proxy_protocol``); for a client this
listener picks for, it is made here (:func:`~flux.relay.proxy_protocol.proxy_header`, from the
client socket's peer and local addresses) and handed to the engine's connect to go first, or,
when this listener connected the instance itself, sent on that fresh socket (a hundred bytes
into an empty send buffer: whole, at once) before the relay takes it.

X-Forwarded-For
---------------
An http service with ``forwarded`` (fluxctl ``--forwarded``) has its request heads rewritten
by the relay (:mod:`flux.relay.forwarded`), which learns the client's address from the client
socket itself: this listener only passes the flag on every path (``listen``, ``connect``,
``submit``), for the engine's accepted clients and its own alike.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Literal, TypedDict

from flux.balancer.pool import Pool
from flux.model import ConnectionInfo, ProxyProtocol, parse_address
from flux.relay import (
    Acceptor,
    Connector,
    ExchangeObserver,
    Relay,
    RelayResult,
    packed_sockaddr,
    reset_and_close,
)
from flux.relay.base import ObserverFactory
from flux.relay.proxy_protocol import PROXY_VERSIONS, proxy_header

__all__ = ["ConnectionBudget", "Listener", "process_budget"]

log = logging.getLogger("flux.balancer")

ATTEMPTS = 5
CONNECT_TIMEOUT = 3.0  # seconds, the default of -connect-timeout
ACCEPT_BATCH = 128
PAUSE_SECONDS = 0.1
PAUSE_LOG_EVERY = 10.0
# Descriptors left to everything but proxied connections: the control plane's connections and
# child processes, the engine's pipes (up to 64 idle pairs pooled, more while bytes are in
# flight), the listening sockets.
RESERVED_DESCRIPTORS = 256
BACKLOG = 4096
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Connecting:
    """A client connection on its way to an instance."""

    __slots__ = (
        "_sock",
        "address",
        "client_ip",
        "deadline",
        "fd",
        "info",
        "listener",
        "name",
        "parked_until",
        "pinned",
        "tried",
        "up",
        "upstream",
    )

    def __init__(self, listener: Listener, fd: int, client_ip: str) -> None:
        self.listener = listener
        # The accepted client as a bare descriptor: the engine takes descriptors, and a socket
        # object per connection showed in profiles; one is made only when Python needs it.
        self.fd = fd
        self._sock: socket.socket | None = None
        self.client_ip = client_ip
        self.tried: set[str] = set()
        self.upstream: socket.socket | None = None
        self.name = ""
        self.address = ""
        self.deadline = 0.0
        self.info: ConnectionInfo | None = None  # set when handed to the engine to connect
        self.up = False  # the engine connected it (and the instance counts it as active)
        self.parked_until = 0.0  # waiting for a descriptor: reset if still waiting then
        # Routed by its first request's Host (Listener.take): the relay answers 421 to a later
        # request naming another host.
        self.pinned = False

    @property
    def client(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=self.fd)
        return self._sock

    def take_fd(self) -> int:
        """The client's descriptor, given up by this object (the relay owns it next)."""
        fd = self._sock.detach() if self._sock is not None else self.fd
        self._sock = None
        self.fd = -1
        return fd

    # The relay's ConnectHandler, for connects made in the engine.

    def established(self) -> None:
        self.listener._established(self)

    def ended(self, result: RelayResult) -> None:
        self.listener._ended(self, result)

    def connect_failed(self, client_fd: int, code: int) -> None:
        self.fd = client_fd
        if code in _RESOURCE_ERRORS:
            # The engine could not make the upstream socket: our shortage, not the instance's.
            self.listener._park(self, errno.errorcode.get(code, str(code)))
            return
        self.listener._failed(self.name, self.address, os.strerror(code))
        self.listener._attempt(self)


def _self_connected(sock: socket.socket) -> bool:
    """Connected to itself (a local port nobody listens on, picked as the source port too):
    the engine refuses these the same way (see relay_self_connected)."""
    try:
        return bool(sock.getsockname() == sock.getpeername())
    except OSError:
        return False


class ConnectionBudget:
    """How many connections this process's listeners may hold at once, and how many they do.

    Shared by every listener of the process (descriptors are per process).  The limit is read
    again whenever a listener opens (``refresh``), since it may change while fluxd runs.  The
    budget also rate-limits the shortage reports of all listeners together: a shortage is the
    process's, and a hundred services pausing at once are one event.
    """

    __slots__ = ("_engine", "_held", "_last_report", "_limit", "_unreported", "listening")

    def __init__(self) -> None:
        self._held = 0
        self._limit = 0
        # Listening sockets the listeners hold (one per engine shard per service): they
        # come out of the descriptors left to connections.
        self.listening = 0
        self._last_report = -PAUSE_LOG_EVERY
        self._unreported = 0
        # The relay engine accepting for some listeners: it holds connections of its own
        # against the same budget, and is told the limit and what is held here.
        self._engine: Acceptor | None = None
        self.refresh()

    @property
    def held(self) -> int:
        """Connections held now: by the listeners, and by the engine accepting for them."""
        return self._held + (self._engine.held if self._engine is not None else 0)

    def acquire(self) -> None:
        """A listener took a connection (from accept, or from the engine's hand-over)."""
        self._held += 1
        if self._engine is not None:
            self._engine.set_budget(self._limit, self._held)

    def release(self) -> None:
        """A connection a listener took is closed (or belongs to the engine now)."""
        self._held -= 1
        if self._engine is not None:
            self._engine.set_budget(self._limit, self._held)

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._limit = value
        if self._engine is not None:
            self._engine.set_budget(value, self._held)

    def link(self, engine: Acceptor) -> None:
        """Share the budget with ``engine`` (a relay accepting for some listeners)."""
        self._engine = engine
        engine.set_budget(self._limit, self._held)

    def report_due(self, now: float) -> int | None:
        """At a shortage's start: None when it should not be logged (one was, less than
        ``PAUSE_LOG_EVERY`` s ago), else how many went unlogged since the last report."""
        if now - self._last_report < PAUSE_LOG_EVERY:
            self._unreported += 1
            return None
        unreported, self._unreported = self._unreported, 0
        self._last_report = now
        return unreported

    def refresh(self) -> None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        spare = soft - min(RESERVED_DESCRIPTORS, soft // 4) - self.listening
        self.limit = max(spare // 2, 1)

    @property
    def spent(self) -> bool:
        return self.held >= self._limit


_BUDGET = ConnectionBudget()


def process_budget() -> ConnectionBudget:
    """The budget every listener of this process shares unless given another."""
    return _BUDGET


@functools.lru_cache(maxsize=4096)
def _split(address: str) -> tuple[int, tuple[str, int], bytes]:
    # Cached: parsing with ipaddress on every connection showed in profiles of connection churn.
    ip, port = parse_address(address)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, (str(ip), port), packed_sockaddr(str(ip), port)



def listening_socket(bind_ip: str, port: int) -> socket.socket:
    """A non-blocking TCP socket listening on ``bind_ip:port`` (an ephemeral port for 0).
    Raises OSError (EADDRINUSE: the port is taken) with nothing left open."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_ip, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _EngineOptions(TypedDict):
    connect_timeout: float
    observers: ObserverFactory | None
    entry: str
    proxy_protocol: int
    forwarded: bool


def shard_sockets(bind_ip: str, port: int, shards: int) -> list[socket.socket]:
    """One listening socket per engine shard on ``bind_ip:port`` (an ephemeral port for 0),
    all on one port with SO_REUSEPORT (the kernel spreads new connections over them).  Raises
    OSError (EADDRINUSE: the port is taken) with nothing left open."""
    sockets: list[socket.socket] = []
    shared = shards > 1
    if shared:
        # The port comes from a plain bind: with SO_REUSEPORT set, the kernel may hand out
        # (under port pressure) a port on which another process of the same user already
        # listens with SO_REUSEPORT, and would then share this service's clients with it.
        # A plain bind takes only a port nobody holds.
        # A fixed (published) port is checked the same way: with SO_REUSEPORT alone the
        # shards' bind would succeed beside another process's SO_REUSEPORT listener.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((bind_ip, port))
            port = probe.getsockname()[1]
    try:
        for _ in range(shards):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Before listen(): every client accepted from it inherits the option, so the engine
            # sets none of its own (SpliceEngine.listen checks it is there).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((bind_ip, port))
            port = sock.getsockname()[1]
            sock.listen(BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """One service's listening socket and its connection hand-over."""

    def __init__(
        self,
        service: str,
        protocol: str,
        bind_ip: str,
        pool: Pool,
        relay: Relay,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        on_connection: Callable[[ConnectionInfo], None] | None = None,
        on_done: Callable[[ConnectionInfo, RelayResult], None] | None = None,
        on_connect_failure: Callable[[str, str], None] | None = None,
        on_exchange: Callable[[ConnectionInfo], ExchangeObserver] | None = None,
        on_reset: Callable[[str, str], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
        budget: ConnectionBudget | None = None,
        port: int = 0,
        entry: str = "vip",
        proxy_protocol: ProxyProtocol | Literal[""] = "",
        forwarded: bool = False,
    ) -> None:
        self.service = service
        self.entry = entry
        self._proxy_protocol = PROXY_VERSIONS.get(proxy_protocol, 0)
        self._forwarded = forwarded and protocol == "http"
        self._wanted_port = port
        self.protocol = protocol
        self.bind_ip = bind_ip
        self.pool = pool
        self._relay = relay
        self._connect_timeout = connect_timeout
        self._on_connection = on_connection
        self._on_done = on_done
        self._on_connect_failure = on_connect_failure
        # (service, entry): a client reset because no instance could take it.
        self._on_reset = on_reset
        # (service): another instance tried after a failed connect.
        self._on_retry = on_retry
        self._on_exchange = on_exchange if protocol == "http" else None
        self._http = protocol == "http"
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._budget = budget or _BUDGET
        self._paused = False  # not reading the listening socket (see "Running out of ...")
        self._resumer: asyncio.TimerHandle | None = None
        self._parked: list[_Connecting] = []
        self._retry_batch = 1  # parked clients tried per tick: doubles while none comes back
        self._reparked = 0  # clients parked since the last tick
        self._short_since: float | None = None  # the current shortage began then
        self._short_logged = False  # ... and its start was logged
        self._connecting: set[_Connecting] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        # The relay's roles pick the path (see flux.relay.base): one that connects connects
        # healthy instances itself, one that accepts accepts, picks and counts itself.
        self._connector: Connector | None = relay.connector
        self._acceptor: Acceptor | None = relay.acceptor
        self._sid = -1  # the relay's id for this listener while the engine accepts for it
        # Served by a router in the engine (serve_routed): its clients are pinned to their host.
        self._routed = False
        self._push_due = False
        self._listening = 0  # listening sockets counted in the budget
        self.port = 0

    def open(self) -> int:
        """Bind and listen on ``bind_ip`` with the port given (an ephemeral one for 0); return
        the port.  Raises OSError (EADDRINUSE: the port is taken) with nothing left open."""
        self._loop = asyncio.get_running_loop()
        self._budget.refresh()
        if self._acceptor is not None:
            return self._open_in_engine(self._acceptor)
        sock = listening_socket(self.bind_ip, self._wanted_port)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._loop.add_reader(sock.fileno(), self._accept)
        self._count_listening(1)
        return self.port

    def take(self, client_fd: int, client_ip: str) -> None:
        """Serve a client another socket accepted: a published port shared by host name,
        whose router read the client's first request head (left unread in the socket) and
        picked this service.  From here it goes as if this listener had accepted it (pick,
        connect, retry, hand over); the router took it out of the budget, and this listener
        gives it back when the connection ends.  The listener need not be open."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        c = _Connecting(self, client_fd, client_ip)
        c.pinned = True
        self._attempt(c)

    def _count_listening(self, n: int) -> None:
        """Take this listener's ``n`` listening sockets out of the connection budget."""
        self._listening = n
        self._budget.listening += n
        self._budget.refresh()

    def _open_in_engine(self, relay: Acceptor) -> int:
        """One listening socket per engine shard on one port (SO_REUSEPORT: the kernel
        spreads new connections over them), handed to the engine to accept on."""
        sockets = shard_sockets(self.bind_ip, self._wanted_port, relay.shards)
        port = int(sockets[0].getsockname()[1])
        try:
            self._budget.link(relay)
            self._sid = relay.listen(
                self.service, self.protocol, sockets, self, **self._engine_options()
            )
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self.port = port
        self._count_listening(len(sockets))
        self._track_pool(relay)
        return port

    def serve_routed(self) -> int:
        """This listener's id in the engine as a router's target (a service on a port shared
        by host name, :class:`~flux.balancer.hostrouter.HostRouter`): ready there without a
        socket of its own, its pool's snapshots pushed as a listening one's are, its clients
        pinned to their host.  -1 when the relay does not accept (the router reads every
        client in Python and calls :meth:`take`)."""
        relay = self._acceptor
        if relay is None:
            return -1
        if self._sid < 0:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._routed = True
            self._budget.link(relay)
            self._sid = relay.serve(self.service, self.protocol, self, **self._engine_options())
            self._track_pool(relay)
        return self._sid

    def _engine_options(self) -> _EngineOptions:
        """What the engine needs of this listener's service, listening or routed to."""
        return {
            "connect_timeout": self._connect_timeout,
            "observers": self._observers if self._on_exchange is not None else None,
            "entry": self.entry,
            "proxy_protocol": self._proxy_protocol,
            "forwarded": self._forwarded,
        }

    def _track_pool(self, relay: Acceptor) -> None:
        """Push the pool's snapshot to the engine now and whenever it changes."""
        self.pool.on_change = self._pool_changed
        pool = self.pool
        sid = self._sid
        self.pool.active_extra = lambda name: relay.instance_active(
            sid, name, pool.address(name) or ""
        )
        self._push_pool()

    def _observers(self, name: str, address: str, client_ip: str) -> ExchangeObserver:
        assert self._on_exchange is not None
        return self._on_exchange(
            ConnectionInfo(self.service, self.protocol, name, address, client_ip, self.entry)
        )

    def _pool_changed(self) -> None:
        if not self._push_due and self._loop is not None and self._sid >= 0:
            self._push_due = True
            self._loop.call_soon(self._push_pool)

    def _push_pool(self) -> None:
        """Give the engine the pool's snapshot: what it may pick from, and until when."""
        self._push_due = False
        relay = self._acceptor
        if relay is None or self._sid < 0:
            return
        choices, retry_at = self.pool.snapshot()
        targets = []
        for choice in choices:
            try:
                packed = _split(choice.address)[2]
            except ValueError:
                continue  # the pool's pick fails it with a log line; the engine skips it
            targets.append((relay.instance_id(choice.name, choice.address), packed))
        python_at = 0
        if retry_at is not None:
            python_at = time.monotonic_ns() + max(int((retry_at - self.pool.now()) * 1e9), 1)
        relay.set_pool(
            self._sid, targets, p2c=self.pool.balance == "p2c", python_at_ns=python_at
        )

    def handed_over(self, client_fd: int, client_ip: str, instance: int, code: int) -> None:
        """The engine's hand-back (see :class:`flux.relay.AcceptHandler`)."""
        if client_fd < 0:
            if not self.is_open:
                return
            limit = self._budget.limit
            if code == 0:
                self._pause(f"{limit} connections held, the most its descriptors allow")
            else:
                self._pause(errno.errorcode.get(code, str(code)))
            return
        self._budget.acquire()
        c = _Connecting(self, client_fd, client_ip)
        c.pinned = self._routed
        if instance:
            assert self._acceptor is not None  # only the relay's Acceptor role hands over
            c.name, c.address = self._acceptor.instance(instance)
            c.tried.add(c.name)
            c.connect_failed(client_fd, code)
            return
        self._attempt(c)

    @property
    def is_open(self) -> bool:
        # The engine owns the listening sockets of a listener it accepts for.
        return self._sock is not None or self._sid >= 0

    def close(self) -> None:
        """Stop accepting.  Connections already handed to the relay carry on; clients parked
        for want of a descriptor are reset (nothing will try them again)."""
        if not self.is_open:
            return
        sock, self._sock = self._sock, None
        if self._acceptor is not None and self._sid >= 0:
            self._acceptor.unlisten(self._sid)
            self._sid = -1
            if self.pool.on_change == self._pool_changed:
                self.pool.on_change = None
        elif sock is not None and self._loop is not None and not self._paused:
            self._loop.remove_reader(sock.fileno())
        if self._resumer is not None:
            self._resumer.cancel()
            self._resumer = None
        self._reset_parked()
        if sock is not None:
            sock.close()
        self._budget.listening -= self._listening
        self._listening = 0

    def _reset_parked(self) -> None:
        parked, self._parked = self._parked, []
        for c in parked:
            self._drop(c)

    def _drop(self, c: _Connecting) -> None:
        """Reset a client that will not be served."""
        reset_and_close(c.client)
        self._budget.release()

    def _accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        budget = self._budget
        for _ in range(ACCEPT_BATCH):
            if budget.spent:
                self._pause(f"{budget.limit} connections held, the most its descriptors allow")
                return
            try:
                # _accept(): the descriptor and address without a socket object (see
                # _Connecting); accept4 with SOCK_CLOEXEC, like accept().
                fd, peer = sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._pause(errno.errorcode.get(exc.errno or 0, exc.strerror or ""))
                    return
                raise
            # Left blocking: the relay makes both sockets non-blocking (and sets TCP_NODELAY)
            # itself, and nothing here reads or writes the client.
            budget.acquire()
            self._attempt(_Connecting(self, fd, peer[0]))
            if self._paused:
                return  # its upstream socket could not be made: no new clients for now
        if self._short_since is not None and not self._paused and not self._parked:
            self._shortage_over()

    def _park(self, c: _Connecting, reason: str) -> None:
        """``c`` got no upstream socket for want of descriptors: keep it for a retry."""
        c.tried.discard(c.name)
        if not self.is_open or self._loop is None:
            self._drop(c)  # closed: nothing would try it again
            return
        if not c.parked_until:
            c.parked_until = self._loop.time() + self._connect_timeout
        self._parked.append(c)
        self._reparked += 1
        self._pause(reason)

    def _pause(self, reason: str) -> None:
        loop = self._loop
        assert loop is not None and self.is_open
        if self._short_since is None:
            self._short_since = now = loop.time()
            unlogged = self._budget.report_due(now)
            self._short_logged = unlogged is not None
            if unlogged is not None:
                log.warning(
                    "%s: cannot take more connections (%s); pausing accepts until some close%s",
                    self.service,
                    reason,
                    f" ({unlogged} more shortages since the last report)" if unlogged else "",
                )
        if not self._paused:
            self._paused = True
            if self._acceptor is not None and self._sid >= 0:
                self._acceptor.pause(self._sid)
            else:
                assert self._sock is not None
                loop.remove_reader(self._sock.fileno())
        if self._resumer is None:
            self._resumer = loop.call_later(PAUSE_SECONDS, self._resume)

    def _resume(self) -> None:
        self._resumer = None
        loop = self._loop
        if not self.is_open or loop is None:
            return
        if self._parked:
            # Parked clients first; new ones only once none is left (see the module header).
            # A few at a time while descriptors are still short (each try costs a round trip
            # to the engine), twice as many each tick while they stop coming back.
            self._retry_batch = 1 if self._reparked else min(2 * self._retry_batch, 1 << 16)
            self._reparked = 0
            now = loop.time()
            expired = [c for c in self._parked if c.parked_until <= now]
            waiting = [c for c in self._parked if c.parked_until > now]
            self._parked = waiting[self._retry_batch :]
            for c in waiting[: self._retry_batch]:
                self._attempt(c)
            for c in expired:
                self._drop(c)
            if expired:
                log.warning(
                    "%s: reset %d connections that waited %.0f s for a descriptor",
                    self.service,
                    len(expired),
                    self._connect_timeout,
                )
            if self._resumer is None:
                self._resumer = loop.call_later(PAUSE_SECONDS, self._resume)
            return
        if self._budget.spent:
            self._resumer = loop.call_later(PAUSE_SECONDS, self._resume)
            return
        if self._acceptor is not None and self._sid >= 0:
            self._paused = False
            self._acceptor.resume(self._sid)
            if self._short_since is not None:
                self._shortage_over()
            return
        assert self._sock is not None
        if self._paused:
            self._paused = False
            loop.add_reader(self._sock.fileno(), self._accept)
        self._accept()

    def _shortage_over(self) -> None:
        assert self._loop is not None and self._short_since is not None
        if self._short_logged:
            log.info(
                "%s: accepting connections again after %.1f s",
                self.service,
                self._loop.time() - self._short_since,
            )
        self._short_since = None

    # Connecting is a chain of callbacks rather than a task per connection: a non-blocking
    # connect and a writer callback when it completes; timeouts are found by one sweep over the
    # connections still connecting (every quarter of the timeout), not a timer each.  Under
    # connection churn a task, a future and a timeout context per connection were a visible
    # share of fluxd's CPU.

    def _attempt(self, c: _Connecting) -> None:
        """Start connecting ``c`` to the next untried instance, or give up on it."""
        loop = self._loop
        assert loop is not None
        while len(c.tried) < ATTEMPTS:
            choice = self.pool.pick(exclude=c.tried)
            if choice is None:
                break
            if c.tried and self._on_retry is not None:
                # c.tried holds only attempts that failed (a parked one is taken out).
                self._on_retry(self.service)
            c.tried.add(choice.name)
            try:
                family, target, packed = _split(choice.address)
                if self._connector is not None and self.pool.healthy(choice.name):
                    self._connect_in_engine(self._connector, c, choice.name, choice.address, packed)
                    return
                upstream = socket.socket(family, socket.SOCK_STREAM)
            except (ValueError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRORS:
                    c.name = choice.name
                    self._park(c, errno.errorcode.get(exc.errno or 0, str(exc)))
                    return
                self._failed(choice.name, choice.address, str(exc))
                continue
            upstream.setblocking(False)
            code = upstream.connect_ex(target)
            if code == 0 and _self_connected(upstream):
                code = errno.ECONNREFUSED
            if code == 0:
                self.pool.succeeded(choice.name)
                self._hand_over(
                    c.client, upstream, choice.name, choice.address, c.client_ip, c.pinned
                )
                return
            if code != errno.EINPROGRESS:
                upstream.close()
                self._failed(choice.name, choice.address, os.strerror(code))
                continue
            c.upstream, c.name, c.address = upstream, choice.name, choice.address
            loop.add_writer(upstream.fileno(), self._connected, c)
            c.deadline = loop.time() + self._connect_timeout
            self._connecting.add(c)
            if self._sweeper is None:
                self._sweeper = loop.call_later(self._sweep_every(), self._sweep)
            return
        # A pool with no instance at all is a published port of a service with none live (a
        # VIP's would have a REJECT rule instead): reset quietly, or any client outside could
        # fill the log.
        if c.tried or len(self.pool):
            log.warning(
                "%s: no instance could take the connection from %s (tried %d); resetting it",
                self.service,
                c.client_ip,
                len(c.tried),
            )
        if self._on_reset is not None:
            self._on_reset(self.service, self.entry)
        self._drop(c)

    def _preface(self, client: socket.socket) -> bytes:
        """What the instance gets before ``client``'s bytes: its PROXY protocol header, or
        nothing.  OSError: the client is gone."""
        if not self._proxy_protocol:
            return b""
        peer, local = client.getpeername(), client.getsockname()
        return proxy_header(self._proxy_protocol, peer[:2], local[:2])

    def _connect_in_engine(
        self, connector: Connector, c: _Connecting, name: str, address: str, packed: bytes
    ) -> None:
        try:
            # No socket object for the client unless its header needs the addresses.
            preface = self._preface(c.client) if self._proxy_protocol else b""
        except OSError:
            self._drop(c)  # reset by the client meanwhile
            return
        info = ConnectionInfo(
            self.service, self.protocol, name, address, c.client_ip, self.entry
        )
        observe = self._on_exchange(info) if self._on_exchange is not None else None
        c.name, c.address, c.info = name, address, info
        fd = c.take_fd()
        try:
            connector.connect(
                fd,
                packed,
                self._connect_timeout,
                c,
                http=self._http,
                observe=observe,
                service=self._sid,  # -1 unless the engine accepts for this listener
                info=info,
                pin_host=c.pinned,
                preface=preface,
                forwarded=self._forwarded,
            )
        except RuntimeError:  # the relay is shutting down
            c.fd = fd
            self._drop(c)

    def _established(self, c: _Connecting) -> None:
        self.pool.acquired(c.name)
        if self._on_connection is not None and c.info is not None:
            self._on_connection(c.info)
        c.up = True

    def _ended(self, c: _Connecting, result: RelayResult) -> None:
        self._budget.release()
        if not c.up:
            return  # ended before it was up (the client reset it): nothing was counted
        self.pool.released(c.name)
        if self._on_done is not None and c.info is not None:
            self._on_done(c.info, result)

    def _settle(self, c: _Connecting) -> socket.socket:
        assert self._loop is not None and c.upstream is not None
        upstream, c.upstream = c.upstream, None
        self._loop.remove_writer(upstream.fileno())
        self._connecting.discard(c)
        return upstream

    def _sweep_every(self) -> float:
        return max(self._connect_timeout / 4, 0.01)

    def _sweep(self) -> None:
        """Time out connects past their deadline; come back while any is pending."""
        self._sweeper = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        for c in [c for c in self._connecting if c.deadline <= now]:
            self._timed_out(c)
        if self._connecting:
            self._sweeper = loop.call_later(self._sweep_every(), self._sweep)

    def _connected(self, c: _Connecting) -> None:
        if c.upstream is None:
            return
        upstream = self._settle(c)
        code = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0 and _self_connected(upstream):
            code = errno.ECONNREFUSED
        if code != 0:
            upstream.close()
            self._failed(c.name, c.address, os.strerror(code))
            self._attempt(c)
            return
        self.pool.succeeded(c.name)
        self._hand_over(c.client, upstream, c.name, c.address, c.client_ip, c.pinned)

    def _timed_out(self, c: _Connecting) -> None:
        if c.upstream is None:
            return
        self._settle(c).close()
        self._failed(c.name, c.address, "timed out")
        self._attempt(c)

    def _failed(self, name: str, address: str, reason: str) -> None:
        log.info("%s: connecting to %s: %s", self.service, address, reason)
        self.pool.failed(name)
        if self._on_connect_failure is not None:
            self._on_connect_failure(self.service, name)

    def abort_connecting(self) -> None:
        """Reset clients whose instance connection is still being made (shutdown)."""
        for c in list(self._connecting):
            self._settle(c).close()
            self._drop(c)
        self._reset_parked()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _hand_over(
        self,
        client: socket.socket,
        upstream: socket.socket,
        name: str,
        address: str,
        client_ip: str,
        pinned: bool = False,
    ) -> None:
        try:
            preface = self._preface(client)
            if preface and upstream.send(preface) != len(preface):
                raise BlockingIOError(errno.EAGAIN, "the PROXY protocol header did not fit")
        except OSError:  # the client or the instance is gone already
            reset_and_close(client)
            reset_and_close(upstream)
            self._budget.release()
            return
        info = ConnectionInfo(self.service, self.protocol, name, address, client_ip, self.entry)
        observe = self._on_exchange(info) if self._on_exchange is not None else None
        try:
            if self._acceptor is not None and self._sid >= 0:
                future = self._acceptor.submit(
                    client,
                    upstream,
                    http=self._http,
                    observe=observe,
                    service=self._sid,
                    info=info,
                    pin_host=pinned,
                    forwarded=self._forwarded,
                )
            else:
                future = self._relay.submit(
                    client, upstream, http=self._http, observe=observe, info=info,
                    pin_host=pinned, forwarded=self._forwarded,
                )
        except RuntimeError:  # the relay is shutting down
            reset_and_close(client)
            reset_and_close(upstream)
            self._budget.release()
            return
        self.pool.acquired(name)
        if self._on_connection is not None:
            self._on_connection(info)
        pool = self.pool
        on_done = self._on_done
        budget = self._budget

        def finished(fut: asyncio.Future[RelayResult]) -> None:
            budget.release()
            pool.released(name)
            if on_done is not None and not fut.cancelled() and fut.exception() is None:
                on_done(info, fut.result())

        future.add_done_callback(finished)
