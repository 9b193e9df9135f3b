"""A published port shared by host name: read each client's first request head, pick the service.

Theory of operation
-------------------
A port that several http services share (or one service with host names,
:mod:`flux.balancer.entrypoints`) cannot be accepted by the engine's shards, which pick an
instance at accept time: the service is only known once the first request's ``Host`` is.  So
a :class:`HostRouter` accepts on the event loop and, per client:

1. waits for the first request head, *peeking* (``MSG_PEEK``): the bytes stay in the socket's
   receive buffer, so the relay later reads them as if nothing had looked, and neither relay
   needs a way to be given bytes already read.  While the head is incomplete the socket's
   ``SO_RCVLOWAT`` is set one byte past what is buffered, so epoll (level-triggered) wakes
   the loop only when more arrives, not for the bytes already peeked; it is set back to 1
   before the client is handed on.  Heads almost always come in one segment: one peek.
   The listening socket defers accepts (``TCP_DEFER_ACCEPT``, ``DEFER_ACCEPT`` seconds), so
   a client usually reaches ``accept`` with its head already in: it is peeked at once and
   handed on without a reader, a timer or an epoll registration of its own.  A client silent
   for longer is accepted anyway and waited for as above, so its header timeout starts up to
   ``DEFER_ACCEPT`` seconds late.
   Bounded: at most ``HEAD_MAX`` bytes (more is answered ``431``), for at most the header
   timeout (``-http-header-timeout``: ``408`` when a head was started, else closed quietly,
   as the relays do);
2. picks the service with :meth:`HostRoutes.pick` from the head's ``Host``
   (:func:`request_host`);
3. hands the client's descriptor to that service's listener (:meth:`Listener.take`), which
   picks an instance, connects and relays exactly as for a client it accepted itself, with
   the request's host, so that the relay answers ``421 Misdirected Request`` to a later
   request on the connection for another host (see :class:`flux.relay.Relay`);
4. or, with no service for that host (none named, no default), answers ``404`` with a
   one-line body naming the host, half-closes, and reads and discards what the client still
   sends for up to ``LINGER`` seconds (so the client reads the answer rather than a reset
   caused by unread bytes), then closes.

A client that opens with the HTTP/2 preface has no ``Host`` to read before its frames (its
``:authority`` is inside an HPACK-compressed HEADERS frame): it goes to the port's default
service, or is closed when there is none.  Each answer or close of its own is counted per
entry point (``on_answered(entry, status)``; closes without an answer are not) and written
as a ``misrouted`` notice (``header-timeout`` for the timeouts; :mod:`flux.relay.notices`),
rate-limited like the relays' own, under the entry point's name (``published:PORT``).

A **tcp** port shared by host name (TLS passthrough) is read the same way, but for the
client's TLS ClientHello instead of a request head
(:func:`~flux.balancer.clienthello.read_server_name`, at most ``HELLO_MAX`` bytes, within the
header timeout): the service is picked by the server
name (SNI) the client asks for, and the untouched socket is handed on, so the instance does the
TLS handshake with its own certificate.  A client that does not speak TLS or names no server
goes to the port's default service; with none, or a name no service has and no default, the
client is closed, counted as ``no-sni-match`` and written as a ``misrouted`` notice.  A client
whose ClientHello is still incomplete at the header timeout is closed (a ``header-timeout``
notice, not counted: nothing was answered).

In the engine
-------------
With a relay that accepts (the splice engine), the port's listening sockets (one per shard,
``SO_REUSEPORT``, deferring accepts) are the engine's, as a *router* service: the router gives
the engine its table of host names with the engine ids of the services' listeners
(:meth:`Listener.serve_routed`: ready there without sockets of their own, their pools' snapshots
pushed), and the engine routes the plain clients itself, with no Python at all: a complete
HTTP/1.x head of at most 4 KiB with one plain ``Host``, or a TLS ClientHello whole in its first
record with a server name, naming a service it has.  Every other client is handed over unread
(:meth:`handed_over`) and read here exactly as above; this reading is the oracle the engine's
is held to (``tests/test_engine_routing.py``).  A descriptor shortage pauses the engine's
accepts for the port and is handed over as well: the router resumes them once the budget has
room.  With the Python relay the router accepts on the event loop itself.

Clients count against the process's descriptor budget from accept; a spent budget pauses
accepting (the kernel's backlog waits), as a listener's does.  Closing the router closes the
listening socket and the clients it is still reading; clients handed on carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Callable, Mapping

from flux.balancer.clienthello import HELLO_MAX, read_server_name
from flux.balancer.entrypoints import HostRoutes, request_host
from flux.balancer.listener import (
    ACCEPT_BATCH,
    PAUSE_SECONDS,
    ConnectionBudget,
    Listener,
    listening_socket,
    process_budget,
    shard_sockets,
)
from flux.model import Protocol
from flux.relay import reset_and_close
from flux.relay.base import HTTP_HEADER_TIMEOUT, Acceptor
from flux.relay.notices import NoticeLimiter, NoticeSubject, client_address

__all__ = ["HEAD_MAX", "LINGER", "NO_SNI_MATCH", "HostRouter", "answer_text"]

log = logging.getLogger("flux.balancer")

HEAD_MAX = 64 * 1024  # the engine's HF_MAX_HEAD: a larger first head is answered 431
LINGER = 2.0  # seconds an answered client may still send before it is closed
# TCP_DEFER_ACCEPT: the kernel completes a client's accept once it has sent something, or
# after about this many seconds of silence (then it is accepted and waited for as before).
DEFER_ACCEPT = 1
NO_SNI_MATCH = "no-sni-match"  # how a tcp port counts a client closed for its server name
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")

_STATUS_TEXT = {404: "Not Found", 408: "Request Timeout", 431: "Request Header Fields Too Large"}


def answer_text(status: int, body: str) -> bytes:
    """The whole response fluxd sends when it answers a client itself, closing after it."""
    data = body.encode("ascii", "replace")
    return (
        f"HTTP/1.1 {status} {_STATUS_TEXT[status]}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + data


def _shown(host: str) -> str:
    """A client's host as fluxd repeats it: printable ASCII, at most 255 characters."""
    return _UNPRINTABLE.sub("?", host[:255])


def _not_found_body(host: str | None, port: int) -> str:
    if host is None:
        return f"no service on port {port} for a request without a Host\n"
    return f"no service on port {port} for host {_shown(host)}\n"


class _Reading:
    """A client whose first request head is awaited."""

    __slots__ = ("ip", "port", "seen", "sock", "timer")

    def __init__(self, sock: socket.socket, ip: str, port: int) -> None:
        self.sock = sock
        self.ip = ip
        self.port = port
        self.seen = 0  # bytes peeked so far
        self.timer: asyncio.TimerHandle | None = None


class HostRouter:
    """The listening socket of a port shared by host name (see the module docstring)."""

    def __init__(
        self,
        bind_ip: str,
        port: int,
        entry: str,
        routes: HostRoutes,
        listeners: Mapping[str, Listener],
        *,
        notices: NoticeLimiter,
        header_timeout: float = HTTP_HEADER_TIMEOUT,
        on_answered: Callable[[str, int | str], None] | None = None,
        budget: ConnectionBudget | None = None,
        protocol: Protocol = "http",
        acceptor: Acceptor | None = None,
    ) -> None:
        self.bind_ip = bind_ip
        self.port = port
        self.entry = entry
        self.routes = routes
        self.listeners = dict(listeners)
        self._notices = notices
        self._header_timeout = header_timeout
        self._on_answered = on_answered
        self._budget = budget or process_budget()
        self.protocol = protocol
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading: set[_Reading] = set()
        self._lingering: set[socket.socket] = set()
        self._paused = False
        self._resumer: asyncio.TimerHandle | None = None
        # The port is accepted and routed in the engine when the relay accepts (see "In the
        # engine" in the module docstring): its id there, and its listening sockets.
        self._acceptor = acceptor
        self._sid = -1
        self._listening = 0

    def update(self, routes: HostRoutes, listeners: Mapping[str, Listener]) -> None:
        """Route new clients by ``routes`` to ``listeners`` (clients handed on carry on)."""
        self.routes = routes
        self.listeners = dict(listeners)
        if self._sid >= 0:
            self._push_routes()

    @property
    def is_open(self) -> bool:
        return self._sock is not None or self._sid >= 0

    def open(self) -> int:
        """Bind and listen; raises OSError (EADDRINUSE: the port is taken) with nothing open."""
        self._loop = asyncio.get_running_loop()
        if self._acceptor is not None:
            return self._open_in_engine(self._acceptor)
        sock = listening_socket(self.bind_ip, self.port)
        # Woken for a client once its first bytes (a request head, a ClientHello) are in, or
        # after DEFER_ACCEPT seconds without any; see _accept.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
        self._sock = sock
        self._budget.listening += 1
        self._budget.refresh()
        self._loop.add_reader(sock.fileno(), self._accept)
        return self.port

    def _open_in_engine(self, relay: Acceptor) -> int:
        """One listening socket per engine shard (SO_REUSEPORT), each deferring accepts, given
        to the engine as a router's: it routes the plain clients itself (accept_by_host) and
        hands the rest over (:meth:`handed_over`)."""
        sockets = shard_sockets(self.bind_ip, self.port, relay.shards)
        try:
            for sock in sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
            self._budget.link(relay)
            self._sid = relay.listen(
                "", self.protocol, sockets, self, connect_timeout=1.0, entry=self.entry
            )
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._listening = len(sockets)
        self._budget.listening += self._listening
        self._budget.refresh()
        self._push_routes()
        return self.port

    def _push_routes(self) -> None:
        """Give the engine the host names and the ids of the services they go to."""
        assert self._acceptor is not None
        ids = {name: listener.serve_routed() for name, listener in self.listeners.items()}
        # A name whose service has no listener stays, as -1: the engine hands its clients over
        # (to be answered 404 here), rather than sending them to a wildcard or the default.
        names = [(host, ids.get(service, -1)) for host, service in self.routes.names]
        default = self.routes.default
        self._acceptor.route(
            self._sid, names, ids.get(default, -1) if default else -1, tls=self.protocol == "tcp"
        )

    def handed_over(self, client_fd: int, client_ip: str, instance: int, code: int) -> None:
        """The engine's hand-over (:class:`flux.relay.AcceptHandler`): a client it did not
        route (read here as if accepted here), or (-1) a shortage of descriptors."""
        if client_fd < 0:
            if self.is_open:
                self._pause()
            return
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=client_fd)
        self._budget.acquire()
        try:
            port = client.getpeername()[1]
        except OSError:
            reset_and_close(client)
            self._budget.release()
            return
        self._begin(client, client_ip, port)

    def close(self) -> None:
        """Stop accepting; close the clients whose first head is still awaited."""
        if self._sid >= 0:
            assert self._acceptor is not None
            self._acceptor.unlisten(self._sid)
            self._sid = -1
            self._budget.listening -= self._listening
            self._listening = 0
        sock, self._sock = self._sock, None
        if sock is not None:
            assert self._loop is not None
            if not self._paused:
                self._loop.remove_reader(sock.fileno())
            sock.close()
            self._budget.listening -= 1
        if self._resumer is not None:
            self._resumer.cancel()
            self._resumer = None
        self._paused = False
        self._budget.refresh()
        for r in list(self._reading):
            self._finish(r)
            reset_and_close(r.sock)
            self._budget.release()
        for client in list(self._lingering):
            self._end_linger(client)

    def abort_connecting(self) -> None:
        """Reset clients still waiting for an instance connection (shutdown)."""
        for listener in self.listeners.values():
            listener.abort_connecting()

    # -- accepting ---------------------------------------------------------------------------

    def _accept(self) -> None:
        sock, loop = self._sock, self._loop
        if sock is None or loop is None:
            return
        for _ in range(ACCEPT_BATCH):
            if self._budget.spent:
                self._pause()
                return
            try:
                client, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                log.warning("published port %d: accepting: %s", self.port, exc.strerror)
                self._pause()
                return
            self._budget.acquire()
            self._begin(client, peer[0], peer[1])

    def _begin(self, client: socket.socket, ip: str, port: int) -> None:
        """Read a new client's first head (or ClientHello)."""
        assert self._loop is not None
        client.setblocking(False)
        r = _Reading(client, ip, port)
        self._reading.add(r)
        # Deferred accept: the first bytes are usually here already, and one peek routes the
        # client with no reader, timer or epoll registration of its own.
        self._readable(r)
        if r not in self._reading:
            return
        if self._header_timeout > 0:
            r.timer = self._loop.call_later(self._header_timeout, self._timed_out, r)
        self._loop.add_reader(client.fileno(), self._readable, r)

    def _pause(self) -> None:
        assert self._loop is not None and self.is_open
        if not self._paused:
            self._paused = True
            if self._sock is not None:
                self._loop.remove_reader(self._sock.fileno())
            # In the engine, the engine paused itself before handing the shortage over.
        if self._resumer is None:
            self._resumer = self._loop.call_later(PAUSE_SECONDS, self._resume)

    def _resume(self) -> None:
        self._resumer = None
        if not self.is_open or self._loop is None:
            return
        if self._budget.spent:
            self._resumer = self._loop.call_later(PAUSE_SECONDS, self._resume)
            return
        self._paused = False
        if self._sid >= 0:
            assert self._acceptor is not None
            self._acceptor.resume(self._sid)
            return
        assert self._sock is not None
        self._loop.add_reader(self._sock.fileno(), self._accept)
        self._accept()

    # -- the first head ----------------------------------------------------------------------

    def _readable(self, r: _Reading) -> None:
        tls = self.protocol == "tcp"
        try:
            data = r.sock.recv(HELLO_MAX if tls else HEAD_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(r)
            return
        if len(data) == r.seen:
            # Readable with nothing new: the client closed its side (or failed) before its
            # head was complete.  Nothing was asked, or nothing that can be answered.
            self._drop(r)
            return
        r.seen = len(data)
        if tls:
            done, name = read_server_name(data)
            if done:
                self._route_tls(r, name)
            else:
                self._wait_for_more(r)
            return
        body = data.lstrip(b"\r\n")  # empty lines before a start line are ignored (RFC 9112)
        if _H2_PREFACE.startswith(body[: len(_H2_PREFACE)]):
            if len(body) < len(_H2_PREFACE):
                self._wait_for_more(r)
                return
            self._route(r, None, http2=True)
            return
        end = _HEAD_END.search(body)
        if end is None:
            if len(data) >= HEAD_MAX:
                self._answer(r, 431, "request head too large", "head too large")
                return
            self._wait_for_more(r)
            return
        self._route(r, request_host(body[: end.end()]))

    def _wait_for_more(self, r: _Reading) -> None:
        # Level-triggered: without this the loop would wake at once for the bytes peeked.
        try:
            r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, r.seen + 1)
        except OSError:
            self._drop(r)

    def _timed_out(self, r: _Reading) -> None:
        r.timer = None
        if r not in self._reading:
            return
        if r.seen == 0:
            self._notice(r, "nothing-sent", 0, kind="header-timeout")
            self._drop(r, quietly=True)
            return
        if self.protocol == "tcp":
            self._notice(r, "hello-incomplete", 0, kind="header-timeout")
            self._drop(r)
            return
        self._answer(r, 408, "request timeout", "head-incomplete", kind="header-timeout")

    def _route(self, r: _Reading, host: str | None, *, http2: bool = False) -> None:
        service = self.routes.default if http2 else self.routes.pick(host)
        listener = self.listeners.get(service) if service is not None else None
        if listener is None:
            if http2:
                self._notice(r, "HTTP/2, no default service", 0)
                self._drop(r)
                return
            reason = "no Host" if host is None else f"unknown host {_shown(host)}"
            self._answer(r, 404, _not_found_body(host, self.port), reason)
            return
        self._hand_on(r, listener)

    def _route_tls(self, r: _Reading, name: str | None) -> None:
        service = self.routes.pick(name)
        listener = self.listeners.get(service) if service is not None else None
        if listener is None:
            reason = "no server name" if name is None else f"unknown server name {_shown(name)}"
            self._notice(r, reason, 0)
            if self._on_answered is not None:
                self._on_answered(self.entry, NO_SNI_MATCH)
            self._drop(r)
            return
        self._hand_on(r, listener)

    def _hand_on(self, r: _Reading, listener: Listener) -> None:
        """Give ``r`` (its first bytes unread) to the listener of the service picked."""
        self._finish(r)
        try:
            r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            reset_and_close(r.sock)
            self._budget.release()
            return
        listener.take(r.sock.detach(), r.ip)

    # -- fluxd's own answers -----------------------------------------------------------------

    def _finish(self, r: _Reading) -> None:
        """Stop reading ``r`` for its head (it is answered, handed on or closed)."""
        self._reading.discard(r)
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None
        if self._loop is not None and r.sock.fileno() >= 0:
            self._loop.remove_reader(r.sock.fileno())

    def _drop(self, r: _Reading, *, quietly: bool = False) -> None:
        self._finish(r)
        if quietly:
            r.sock.close()
        else:
            reset_and_close(r.sock)
        self._budget.release()

    def _notice(self, r: _Reading, reason: str, status: int, *, kind: str = "misrouted") -> None:
        """Write the notice (its service: the entry point) and count an answer."""
        self._notices.notice(
            NoticeSubject(self.entry, client_address(r.ip, r.port), "", self.protocol),
            kind,
            reason,
            status=status,
        )
        if status and self._on_answered is not None:
            self._on_answered(self.entry, status)

    def _answer(
        self, r: _Reading, status: int, body: str, reason: str, *, kind: str = "misrouted"
    ) -> None:
        """Answer ``status`` with ``body`` (one line), then linger and close."""
        self._finish(r)
        self._notice(r, reason, status, kind=kind)
        sock = r.sock
        try:
            sock.recv(r.seen)  # what was peeked: consumed, so closing does not reset
            sock.send(answer_text(status, body if body.endswith("\n") else body + "\n"))
            sock.shutdown(socket.SHUT_WR)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            reset_and_close(sock)
            self._budget.release()
            return
        assert self._loop is not None
        self._lingering.add(sock)
        self._loop.add_reader(sock.fileno(), self._discard, sock)
        self._loop.call_later(LINGER, self._end_linger, sock)

    def _discard(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end_linger(sock)

    def _end_linger(self, sock: socket.socket) -> None:
        if sock not in self._lingering:
            return
        self._lingering.discard(sock)
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
        sock.close()
        self._budget.release()
