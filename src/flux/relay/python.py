"""The Python relay: the splice relay's twin on asyncio Protocols, and the oracle it is checked
against.

:class:`PythonRelay` does what :class:`~flux.relay.engine.SpliceRelay` does (the behaviour stated
in :mod:`flux.relay.base`) with nothing but asyncio (uvloop or stock asyncio) and the engine's
HTTP framer driven from Python, so the behaviour is defined independently of the engine's C;
an HTTP/2 connection is followed by :class:`~flux.relay.h2watch.H2Watch` (the pure-Python
``hyperframe`` and ``hpack``), its counts kept in :attr:`PythonRelay.h2_counters`.
Both pass one behaviour suite on the same inputs (the ``KINDS`` of the relay tests).  It takes
only the :class:`~flux.relay.base.Relay` role: the listener accepts and connects for it on the
event loop.  It is the fallback too (``-relay python``), and for comparison and debugging.
Its notices (:mod:`flux.relay.notices`) come from the same events as the engine's, each where
the engine's hook is (``_relay_notice.pxi`` lists them), through a limiter of the same kind.
A ``forwarded`` connection's request heads go out rewritten by
:func:`~flux.relay.forwarded.forwarded_head` (the framer reports where each complete head lies
in the client's stream: its "head" events), as the engine's ``_relay_forwarded.pxi`` rewrites
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Literal, cast

from flux.model import ConnectionInfo
from flux.relay.base import (
    CUT_TIMEOUT,
    HTTP_CUT_SIDES,
    HTTP_HEADER_TIMEOUT,
    HTTP_IDLE_TIMEOUT,
    Acceptor,
    Connector,
    ExchangeObserver,
    GrpcCall,
    RelayCounters,
    RelayResult,
    error_name,
    set_reset_linger,
    wait_bounded,
)
from flux.relay.forwarded import forwarded_head
from flux.relay.h2watch import PREFACE, H2Counters, H2Watch, grpc_call
from flux.relay.notices import NoticeLimiter, NoticeSubject, client_address

if TYPE_CHECKING:
    from flux._splice import HttpEvent

__all__ = ["PythonRelay"]

# notify(kind, reason, status, count): a notice about the connection (NoticeLimiter.notice).
_Notify = Callable[[str, str, int, int], None]

# After answering a request itself, how long the relay reads (and drops) what the client still
# sends before closing: closing with unread bytes would reset the answer away.
_LINGER_SECONDS = 2.0
# What the instance may send before the client's first bytes are known not to be the HTTP/2
# preface, kept to be judged then (an HTTP/2 server's own preface is a few dozen bytes).
_EARLY_LIMIT = 65536


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
    """The HTTP framer's view of one Python-relayed connection (the engine's, from Python), and
    from the HTTP/2 preface on, the HTTP/2 watch's (:mod:`flux.relay.h2watch`).

    :meth:`show` is called with bytes just read and returns the part that may be forwarded
    (a request head goes only once complete: until then it is ``held``, as the engine holds
    it; with ``forwarded``, the client's address, complete heads go rewritten); the flow
    reports writes with :meth:`written` so exchanges end when their bytes are out.
    """

    __slots__ = ("answer", "cut_side", "early", "exchanges", "forwarded", "h2", "h2_counters",
                 "heads", "held", "kept", "last_active", "notify", "observe", "paused", "probe",
                 "reject_reason", "stop")

    _SIDES: ClassVar[tuple[Literal["request", "response"], ...]] = ("request", "response")

    def __init__(self, observe: ExchangeObserver | None, notify: _Notify,
                 h2_counters: H2Counters, pin_host: bool = False,
                 forwarded: str | None = None) -> None:
        from flux._splice import HttpFramerProbe

        opened = time.monotonic_ns()
        self.probe = HttpFramerProbe(opened)
        if pin_host:
            # The engine's framer judges the host too: 421 comes as a malformed request does.
            self.probe.pin_host()
        # The client's address for X-Forwarded-For (None: heads go as they came), and the
        # request-stream spans (start, end) of the complete heads shown and not forwarded yet.
        self.forwarded = forwarded
        self.heads: list[tuple[int, int]] = []
        if forwarded is not None:
            self.probe.report_heads()
        self.observe = observe
        self.notify = notify
        self.reject_reason = ""  # why the request being answered was malformed
        # Set once the client opened with the HTTP/2 preface; the framer is opaque from then on.
        self.h2: H2Watch | None = None
        self.h2_counters = h2_counters
        # What the instance sent while the client's bytes may still be the HTTP/2 preface (an
        # HTTP/2 server sends its SETTINGS on accept): forwarded at once, shown to the HTTP/2
        # watch if the preface completes, else to the framer (an unsolicited response) before
        # the client's first bytes.  None once that is decided.
        self.early: bytearray | None = bytearray()
        self.stop: list[int | None] = [None, None]
        self.answer: int | None = None  # what to answer once the responses owed are out
        self.exchanges: list[HttpEvent] = []
        self.last_active = opened
        # Client bytes the framer could not take yet (its ring of pipelined requests is full:
        # Pipelining in _http_framer.pxi), and whether the client's reading is paused for it.
        self.kept = b""
        self.paused = False
        # Client bytes of a request head not complete yet: shown, forwarded once it is judged.
        self.held = b""
        self.cut_side = 0  # 1 + the index of the side that ended first with an exchange unfinished

    def _events(self, events: list[HttpEvent]) -> None:
        for ev in events:
            if ev.kind == "exchange":
                self.exchanges.append(ev)
                if ev.switched:
                    self.notify("switched", "upgrade" if ev.status == 101 else "connect",
                                ev.status, 0)
            elif ev.kind == "malformed":
                self.stop[0] = self.probe.request_start
                self.reject_reason = ev.reason
            elif ev.kind == "opaque" and ev.reason == "h2-preface":
                from flux._splice import HTTP_METHODS

                self.h2 = H2Watch(self.h2_counters, self.notify, HTTP_METHODS)
            elif ev.kind == "opaque":
                self.notify("opaque", ev.reason, 0, 0)
            elif ev.kind == "reject":
                self.stop[1] = ev.pos
                self.answer = ev.status
            elif ev.kind == "head":
                self.heads.append((ev.start, ev.pos))

    def show(self, index: int, data: bytes) -> bytes:
        self.last_active = now = time.monotonic_ns()
        if self.h2 is not None:
            self.h2.feed(index, data, now)
            return data
        early = self.early
        if early is not None:
            if index == 1 and len(early) + len(data) <= _EARLY_LIMIT:
                early += data
                return data
            seen = self.probe.position("request")
            if index == 1 or data[:len(PREFACE) - seen] != PREFACE[seen:seen + len(data)]:
                self._judge_early(now)
        return self._frame(index, data, now)

    def _judge_early(self, now: int) -> None:
        """The client's first bytes are not the HTTP/2 preface (or the instance said too much
        before them): the framer judges what the instance sent first, before them."""
        early, self.early = self.early, None
        if early:
            self._events(self.probe.feed("response", bytes(early), now))

    def _frame(self, index: int, data: bytes, now: int) -> bytes:
        """:meth:`show` through the HTTP/1.x framer."""
        side = self._SIDES[index]
        if index == 0 and self.kept:
            data, self.kept = self.kept + data, b""
        base = self.probe.position(side)
        self._events(self.probe.feed(side, data, now))
        if self.h2 is not None:
            # The preface ended in this read, at request-stream offset len(PREFACE): the
            # framer took the rest as opaque.  The HTTP/2 watch follows the instance's bytes
            # from the first (those it sent before the preface ended came first) and the
            # client's from the first after the preface (what was held of the preface goes
            # with this read).
            if self.early:
                self.h2.feed(1, bytes(self.early), now)
            self.early = None
            self.h2.feed(index, memoryview(data)[len(PREFACE) - base:], now)
            data, self.held = self.held + data, b""
            return data
        end = self.probe.position(side)
        if end - base < len(data):
            data, self.kept = data[: end - base], data[end - base :]
        if index == 0:
            base -= len(self.held)
            data, self.held = self.held + data, b""
            head = self.probe.open_head
            if head is not None:
                end = min(end, head)
        limit = self.stop[index]
        if limit is not None:
            end = min(end, limit)  # the rest never goes
        elif index == 0:
            self.held = data[max(0, end - base) :]
        data = data[: max(0, end - base)]
        if index == 0 and self.heads:
            data = self._rewrite_heads(data, base)
        return data

    def _rewrite_heads(self, data: bytes, base: int) -> bytes:
        """``data`` (client bytes from request-stream offset ``base``, about to be forwarded)
        with the complete heads in it rewritten for X-Forwarded-For (every head the framer
        reported lies in it whole: it was held until complete)."""
        assert self.forwarded is not None
        heads, self.heads = self.heads, []
        parts: list[bytes] = []
        at = 0
        for start, end in heads:
            parts.append(data[at : start - base])
            parts.append(forwarded_head(data[start - base : end - base], self.forwarded))
            at = end - base
        parts.append(data[at:])
        return b"".join(parts)

    def releases(self) -> bool:
        """Held bytes are no longer a head to judge (a switch, a give-up, an end): they go."""
        return bool(self.held) and self.probe.open_head is None

    def eof(self, index: int) -> None:
        if self.h2 is None:
            now = time.monotonic_ns()
            if self.early is not None:
                self._judge_early(now)
            self._events(self.probe.eof(self._SIDES[index], now))

    def written(self) -> None:
        """Bytes shown so far are written: the exchanges they ended are complete (and those
        an HTTP/2 stream reset cut)."""
        h2 = self.h2
        if h2 is not None:
            if h2.ended:
                now = time.monotonic_ns()
                observe = self.observe
                if observe is not None:
                    for exchange, status in h2.ended:
                        request_head = exchange.t_request_head
                        observe(
                            exchange.method,
                            status,
                            [max(0, (exchange.t_response_head or now) - request_head) // 1000],
                            [max(0, now - request_head) // 1000],
                            grpc_call(exchange),
                        )
                h2.ended.clear()
            return
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
                    None,
                )
        self.exchanges.clear()

    def halted(self, index: int) -> bool:
        return self.stop[index] is not None

    def unfinished(self) -> bool:
        """An exchange is under way: a request awaits its response, or a response its write."""
        if self.h2 is not None:
            return self.h2.unfinished()
        return bool(self.exchanges) or bool(self.probe.unanswered())

    def cut_by(self, index: int) -> None:
        """Side ``index`` failed or closed: it cuts what is under way, unless a side already did.
        """
        if not self.cut_side:
            self.cut_side = 1 + index

    def count_cut(self) -> None:
        """The connection ended: report the exchanges it cut short, with the time so far and
        who cut them in place of their status (HTTP_CUT_SIDES; the engine's http_count_cut)."""
        cut: list[tuple[str, int, int, GrpcCall | None]]
        if self.h2 is not None:
            cut = [(x.method, x.t_request_head, x.t_response_head, grpc_call(x))
                   for x in self.h2.cut_all()]
        else:
            cut = [(ev.method, ev.t_request_head, ev.t_response_head, None)
                   for ev in self.exchanges]
            cut += [(*unanswered, None) for unanswered in self.probe.unanswered()]
            self.exchanges.clear()
        if not cut:
            return
        status = self.cut_side or len(HTTP_CUT_SIDES)
        self.notify("cut", HTTP_CUT_SIDES[status - 1], 0, len(cut))
        if self.observe is None:
            return
        now = time.monotonic_ns()
        for method, request_head, response_head, grpc in cut:
            self.observe(
                method,
                status,
                [max(0, (response_head or now) - request_head) // 1000],
                [max(0, now - request_head) // 1000],
                grpc,
            )


class _Flow:
    """One client <-> upstream connection relayed by Python Protocols (index 0 = client).

    The two transports are attached one after the other and each starts reading at once, so
    whatever arrives before both exist is held in ``early`` (with reading paused) and replayed
    by ``start()``.
    """

    __slots__ = ("answered", "bytes", "closing", "early", "eofs", "error", "future", "gone",
                 "held", "http", "lingering", "notices", "on_done", "ready", "sides", "started",
                 "subject")

    def __init__(
        self,
        future: asyncio.Future[RelayResult],
        on_done: Callable[[_Flow], None],
        http: bool = False,
        observe: ExchangeObserver | None = None,
        subject: NoticeSubject | None = None,
        notices: NoticeLimiter | None = None,
        h2_counters: H2Counters | None = None,
        pin_host: bool = False,
        forwarded: str | None = None,
    ) -> None:
        self.future = future
        # What this connection's notices name, and who writes them (HTTP only).
        self.subject = subject
        self.notices = notices
        self.http = (
            _HttpWatch(observe, self.notice, h2_counters or H2Counters(), pin_host, forwarded)
            if http
            else None
        )
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

    def notice(self, kind: str, reason: str, status: int = 0, count: int = 0) -> None:
        """Write a notice about this connection (the engine's relay_notice)."""
        if self.notices is None or self.subject is None:
            return
        self.notices.notice(
            self.subject,
            kind,
            reason,
            status=status,
            count=count,
            bytes_up=self.bytes[0],
            bytes_down=self.bytes[1],
            age=(time.monotonic_ns() - self.started) / 1e9,
        )

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
                and not self.eofs[index] and not transport.is_closing()
                and not (index == 0 and self.http is not None and self.http.paused)):
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
            http.written()
            if index == 1 and ((http.kept and not http.probe.blocked) or http.releases()):
                self.forward(0, b"")  # a response freed a slot, or ended a held head
            self._http_progress()

    def _http_progress(self) -> None:
        """Pause the client while the framer's ring is full; stop halted sources; answer once
        every response owed is written."""
        http = self.http
        assert http is not None
        if http.probe.blocked != http.paused:
            http.paused = http.probe.blocked
            if http.paused:
                client = self.sides[0].transport
                if client is not None and not client.is_closing():
                    client.pause_reading()
            else:
                self.resume_reading(0)
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
        if status == 408:
            self.notice("header-timeout", "head-incomplete", 408)
        elif self.http is not None:
            self.notice("rejected", self.http.reject_reason, status)
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

    def close_quietly(self) -> None:
        """Close both sides with a FIN, answering nothing (an HTTP timeout with nothing owed)."""
        self.closing = True
        self.transport(0).close()
        self.transport(1).close()

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
            if self.http.unfinished():
                self.http.cut_by(index)
            if self.http.answer is not None:
                self.eofs[index] = True
                self.answer(self.http.answer)
                return
            if (index == 1 and self.http.paused) or self.http.releases():
                # The instance is done: the framer stopped following the client (what it
                # kept back is forwarded, reading resumes), nothing more will be answered.
                # Or the client is: the head it left unfinished goes as it came.
                self.forward(0, b"")
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
            self.error = error_name(exc)
        if exc is not None and self.http is not None:
            self.http.cut_by(index)
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
            if self.http is not None:
                self.http.count_cut()
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
        """Close ``transport`` with RST (what :func:`~flux.relay.base.reset_and_close` does to
        a socket: the transport's socket is only a view, so the transport closes it)."""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            set_reset_linger(sock)
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


def forwarded_for(client: socket.socket) -> str:
    """The address X-Forwarded-For names for ``client``: its peer's IP as the socket gives it
    (the engine's inet_ntop writes the same), or ``unknown`` when it is gone already or not
    an IP socket (RFC 7239's word for it)."""
    if client.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            return str(client.getpeername()[0])
    return "unknown"


def _subject(
    client: socket.socket, upstream: socket.socket, info: ConnectionInfo | None
) -> NoticeSubject:
    """What an HTTP connection's notices name: its service, client and instance."""
    address = "0.0.0.0:0"  # gone already, or not an IP socket (as the engine names it)
    if client.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            host, port = client.getpeername()[:2]
            address = client_address(host, port)
    if info is None:
        return NoticeSubject("-", address, "")
    return NoticeSubject(info.service, address, f"{info.instance} at {info.instance_address}")


class PythonRelay:
    """The relay on asyncio Protocols: the oracle twin of the splice engine (see the module
    docstring).  It takes the :class:`~flux.relay.base.Relay` role only."""

    def __init__(
        self,
        *,
        http_header_timeout: float = HTTP_HEADER_TIMEOUT,
        http_idle_timeout: float = HTTP_IDLE_TIMEOUT,
        notices: NoticeLimiter | None = None,
    ) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notices = notices if notices is not None else NoticeLimiter()
        self._flows: set[_Flow] = set()
        self._setups: set[asyncio.Task[None]] = set()
        self._closing = False
        self._header_ns = int(http_header_timeout * 1e9)
        self._idle_ns = int(http_idle_timeout * 1e9)
        # The shorter of the timeouts set: a client that sent nothing yet is closed after it
        # (as the engine's http_configure decides); the sweep runs eight times as often.
        self._opening_ns = min((t for t in (self._header_ns, self._idle_ns) if t > 0), default=0)
        self._sweep_every = min(max((self._opening_ns or 4e9) / 8e9, 0.01), 0.5)
        self._sweeper: asyncio.TimerHandle | None = None
        #: What its HTTP/2 watches counted (the engine counts the same under these names).
        self.h2_counters = H2Counters()

    @property
    def active(self) -> int:
        return len(self._flows)

    @property
    def inflight_bytes(self) -> int:
        return sum(flow.buffered for flow in self._flows)

    def engine_counters(self) -> RelayCounters | None:
        """None: this relay keeps no counters of its own (what it answered itself is in each
        connection's RelayResult)."""
        return None

    @property
    def connector(self) -> Connector | None:
        """None: the listener connects for this relay, on the event loop."""
        return None

    @property
    def acceptor(self) -> Acceptor | None:
        """None: the listener accepts for this relay, on the event loop."""
        return None

    async def start(self) -> None:
        """Bind the relay to the running event loop."""
        if self._loop is not None:
            raise RuntimeError("PythonRelay.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._notices.attach(self._loop)

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
        """Wrap both sockets in transports (which then own them) and relay between them;
        ``info``: what the connection's notices name; ``pin_host`` and ``forwarded``: see
        :meth:`~flux.relay.base.Relay.submit`."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        for sock in (client, upstream):
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        future: asyncio.Future[RelayResult] = self._loop.create_future()
        subject = _subject(client, upstream, info) if http else None
        flow = _Flow(future, self._flows.discard, http, observe, subject, self._notices,
                     self.h2_counters, pin_host,
                     forwarded_for(client) if http and forwarded else None)
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
                flow.future.set_result(RelayResult(0, 0, error_name(exc), 0.0))
            return
        flow.start()

    def flush(self) -> None:
        """Nothing waits: the Python relay reports each exchange as its bytes are written."""

    def _sweep(self) -> None:
        """Enforce the HTTP timeouts (the phases of the framer's theory of operation, in
        _http_framer.pxi, as the engine's http_sweep does)."""
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
            if (phase == "opening" and self._opening_ns
                    and now - http.probe.head_started >= self._opening_ns):
                if self._opening_ns == self._header_ns:
                    flow.notice("header-timeout", "nothing-sent")
                else:
                    flow.notice("idle-closed", "nothing-sent")
                flow.close_quietly()
            elif (phase == "head" and self._header_ns
                    and now - http.probe.head_started >= self._header_ns):
                if http.probe.pending == 0 and flow.buffered == 0:
                    flow.answer(408)
                else:
                    flow.notice("header-timeout", "responses-owed")
                    flow.error = "ETIMEDOUT"
                    http.cut_by(0)  # the client was too slow: what is under way is its cut
                    flow.cut()
            elif (phase == "idle" and self._idle_ns and flow.buffered == 0
                  and now - http.last_active >= self._idle_ns):
                flow.notice("idle-closed", "idle")
                flow.close_quietly()
        if watched and self._loop is not None and not self._closing:
            self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` s for active connections, then reset the rest."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._setups:
            await asyncio.wait(set(self._setups), timeout=CUT_TIMEOUT)
        await wait_bounded([flow.future for flow in self._flows], grace)
        if self._flows:
            for flow in list(self._flows):
                flow.cut()
            await wait_bounded([flow.future for flow in self._flows], CUT_TIMEOUT)
        self._notices.close()
