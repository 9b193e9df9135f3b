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
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

__all__ = [
    "PythonRelay",
    "Relay",
    "RelayResult",
    "SpliceRelay",
    "make_relay",
]

_RESET_LINGER = struct.pack("ii", 1, 0)
# Completions of connections cut by close() must still arrive; this bounds the wait for them.
_CUT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How one relayed connection ended.

    ``to_upstream`` / ``to_client``: bytes delivered each way.  ``error``: ``None`` when both
    directions ended with EOF, else the errno name (``"ECONNRESET"``, ``"EPIPE"``; ``"ECANCELED"``
    when ``close()`` cut it).  ``duration``: seconds from submission to close.
    """

    to_upstream: int
    to_client: int
    error: str | None
    duration: float


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

    def submit(self, client: socket.socket, upstream: socket.socket) -> asyncio.Future[RelayResult]:
        """Relay between two connected sockets; the relay owns (and will close) both."""

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
    """The compiled engine behind the :class:`Relay` interface (see the module docstring)."""

    def __init__(
        self,
        *,
        pipe_size: int = 1 << 20,
        max_idle_pipes: int = 64,
        small_buffer: int = 16384,
    ) -> None:
        from flux._splice import SpliceEngine

        self._engine = SpliceEngine(
            pipe_size=pipe_size, max_idle_pipes=max_idle_pipes, small_buffer=small_buffer
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[RelayResult]] = {}
        self._next_token = 1
        self._closing = False

    @property
    def engine(self) -> Any:
        """The underlying ``SpliceEngine`` (counters for tests and metrics)."""
        return self._engine

    @property
    def active(self) -> int:
        return len(self._pending)

    @property
    def inflight_bytes(self) -> int:
        return int(self._engine.inflight_bytes)

    async def start(self) -> None:
        """Start the engine thread and watch its completion eventfd."""
        if self._loop is not None:
            raise RuntimeError("SpliceRelay.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._engine.start()
        self._loop.add_reader(self._engine.eventfd, self._on_completions)

    def submit(self, client: socket.socket, upstream: socket.socket) -> asyncio.Future[RelayResult]:
        """Hand both sockets to the engine (they are detached: the engine closes them)."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        token = self._next_token
        self._next_token += 1
        future: asyncio.Future[RelayResult] = self._loop.create_future()
        self._engine.add(client.fileno(), upstream.fileno(), token)
        # From here the engine owns the descriptors; the socket objects must not close them.
        client.detach()
        upstream.detach()
        self._pending[token] = future
        return future

    def _on_completions(self) -> None:
        for token, up, down, code, duration_ns in self._engine.drain():
            future = self._pending.pop(token, None)
            if future is not None and not future.done():
                future.set_result(
                    RelayResult(up, down, _errno_name(code) if code else None, duration_ns / 1e9)
                )

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` s for active connections, reset the rest, stop the engine."""
        if self._loop is None or self._closing:
            self._closing = True
            return
        self._closing = True
        await _wait_bounded(list(self._pending.values()), grace)
        if self._pending:
            self._engine.close_all()
            await _wait_bounded(list(self._pending.values()), _CUT_TIMEOUT)
        self._loop.remove_reader(self._engine.eventfd)
        self._engine.stop()
        self._on_completions()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("the relay engine stopped without a completion"))
        self._pending.clear()


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


class _Flow:
    """One client <-> upstream connection relayed by Python Protocols (index 0 = client).

    The two transports are attached one after the other and each starts reading at once, so
    whatever arrives before both exist is held in ``early`` (with reading paused) and replayed
    by ``start()``.
    """

    __slots__ = ("bytes", "closing", "early", "eofs", "error", "future", "gone", "held",
                 "on_done", "ready", "sides", "started")

    def __init__(self, future: asyncio.Future[RelayResult], on_done: Callable[[_Flow], None]):
        self.future = future
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
        self.bytes[index] += len(data)
        self.transport(1 - index).write(data)

    def eof(self, index: int) -> None:
        if not self.ready:
            self.early.append((index, None))
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

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flows: set[_Flow] = set()
        self._setups: set[asyncio.Task[None]] = set()
        self._closing = False

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

    def submit(self, client: socket.socket, upstream: socket.socket) -> asyncio.Future[RelayResult]:
        """Wrap both sockets in transports (which then own them) and relay between them."""
        if self._loop is None or self._closing:
            raise RuntimeError("the relay is not accepting connections (not started or closing)")
        for sock in (client, upstream):
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        future: asyncio.Future[RelayResult] = self._loop.create_future()
        flow = _Flow(future, self._flows.discard)
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

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` s for active connections, then reset the rest."""
        self._closing = True
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
        if options:
            raise TypeError(f"the python relay takes no options, got {sorted(options)}")
        return PythonRelay()
    raise ValueError(f"relay kind must be 'splice' or 'python', got {kind!r}")
