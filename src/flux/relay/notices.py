"""Notices: one log line for each thing an HTTP service's data path did on its own, rate-limited
per service.

Theory of operation
-------------------
Both relays report the same events (the splice relay from the records its engine queues,
``_relay_notice.pxi``; the Python relay from its own code paths) as a *notice*: a kind, a reason,
the service, the client's address and, for ``-debug``, the instance and the connection's byte
counts and age.  The kinds are a table (:data:`NOTICE_KINDS`, one row each: the engine's name,
the noun of its summary, the line it makes); the engine's kinds are named in its
``NOTICE_KINDS``, and every one must have a row here.

:class:`NoticeLimiter` writes the lines.  Per service and kind, the first ``burst`` notices of a
window of ``window`` seconds are written in full; the rest are only counted, and when the window
ends (a timer on the event loop, or the next notice after it) one line says how many there were:
``http service web: … 1995 more rejections in the last 60s``.  A burst of a million bad requests
so writes ``burst`` lines and a summary per window, and the counts add up to the exact number
(the engine's and the metrics' counters count every event as well).  ``close()`` writes the
summaries of the windows still open.  The clock is injected (tests); the event loop, for the
summary timer, is attached by the relay when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "NOTICE_BURST",
    "NOTICE_KINDS",
    "NOTICE_WINDOW",
    "ROUTER_KINDS",
    "NoticeKind",
    "NoticeLimiter",
    "NoticeSubject",
    "client_address",
]

log = logging.getLogger("flux.relay")

# Full lines per service and kind in a window, and the window, in seconds.
NOTICE_BURST = 5
NOTICE_WINDOW = 60.0


class NoticeSubject(NamedTuple):
    """Whom a notice is about: the service's name, the client's ``ip:port``, the instance
    (``name at address``, or the address alone; shown under ``-debug``), and the protocol the
    line names the service by (a tcp port shared by TLS server name writes notices too)."""

    service: str
    client: str
    instance: str
    protocol: str = "http"


class NoticeKind(NamedTuple):
    """One kind of notice: ``name`` as the engine names it, ``noun`` (plural) for its summary,
    ``describe(client, reason, status, count)`` the line's text after the service."""

    name: str
    noun: str
    describe: Callable[[str, str, int, int], str]


def _rejected(client: str, reason: str, status: int, count: int) -> str:
    if status:
        return f"answered {status} to {client} ({reason})"
    return f"closed {client} without an answer ({reason})"


_HEADER_TIMEOUT = {
    "head-incomplete": "answered 408 to {} (header timeout)",
    "nothing-sent": "closed {} (header timeout, nothing sent)",
    "responses-owed": "reset {} (header timeout, responses owed)",
    # Only from a published tcp port shared by host name (flux.balancer.hostrouter).
    "hello-incomplete": "reset {} (header timeout, TLS ClientHello incomplete)",
}


def _header_timeout(client: str, reason: str, status: int, count: int) -> str:
    return _HEADER_TIMEOUT[reason].format(client)


def _idle_closed(client: str, reason: str, status: int, count: int) -> str:
    if reason == "nothing-sent":
        return f"closed {client} (idle timeout, nothing sent)"
    return f"closed {client} (idle timeout)"


def _opaque(client: str, reason: str, status: int, count: int) -> str:
    return f"relaying {client} as plain TCP, framing given up ({reason})"


def _switched(client: str, reason: str, status: int, count: int) -> str:
    return f"relaying {client} as plain TCP, switched by {status} ({reason})"


def _cut(client: str, reason: str, status: int, count: int) -> str:
    exchanges = "exchange" if count == 1 else "exchanges"
    who = reason if reason == "fluxd" else f"the {reason}"
    return f"{count} {exchanges} with {client} cut short by {who}"


def _misrouted(client: str, reason: str, status: int, count: int) -> str:
    if status:
        return f"answered {status} to {client} ({reason})"
    return f"closed {client} ({reason})"


def _h2_gave_up(client: str, reason: str, status: int, count: int) -> str:
    return f"stopped observing HTTP/2 from {client} ({reason})"


NOTICE_KINDS: dict[str, NoticeKind] = {
    kind.name: kind
    for kind in (
        NoticeKind("rejected", "rejections", _rejected),
        NoticeKind("header-timeout", "header timeouts", _header_timeout),
        NoticeKind("idle-closed", "idle closes", _idle_closed),
        NoticeKind("opaque", "framing give-ups", _opaque),
        NoticeKind("switched", "protocol switches", _switched),
        NoticeKind("cut", "connections with exchanges cut short", _cut),
        NoticeKind("h2-gave-up", "HTTP/2 give-ups", _h2_gave_up),
        # Only from a published port shared by host name (flux.balancer.hostrouter), before
        # any service is chosen: its "service" is the entry point.
        NoticeKind("misrouted", "clients with no service for their host", _misrouted),
    )
}
"""Every kind of notice, by the engine's name (flux._splice.NOTICE_KINDS), and the kinds
only Python writes (:data:`ROUTER_KINDS`)."""

ROUTER_KINDS = frozenset({"misrouted"})
"""The kinds only a published port's host router writes (no relay has a connection yet)."""


def client_address(ip: str, port: int) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6), as notices name a client."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class _Window:
    __slots__ = ("logged", "protocol", "start", "suppressed")

    def __init__(self, start: float, protocol: str) -> None:
        self.start = start
        self.protocol = protocol
        self.logged = 0
        self.suppressed = 0


class NoticeLimiter:
    """Writes notices as log lines, at most ``burst`` in full per service and kind in each
    ``window`` seconds, then one summary line (see the module docstring)."""

    def __init__(
        self,
        *,
        burst: int = NOTICE_BURST,
        window: float = NOTICE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        if burst < 0 or window <= 0:
            raise ValueError(f"need burst >= 0 and window > 0, got {burst} and {window}")
        self._burst = burst
        self._window = window
        self._clock = clock
        self._log = logger
        self._windows: dict[tuple[str, str], _Window] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write summaries when their windows end, with timers on ``loop``."""
        self._loop = loop

    def notice(
        self,
        subject: NoticeSubject,
        kind: str,
        reason: str,
        *,
        status: int = 0,
        count: int = 0,
        bytes_up: int = 0,
        bytes_down: int = 0,
        age: float = 0.0,
    ) -> None:
        """One event of ``kind`` (a :data:`NOTICE_KINDS` name): written in full, or counted for
        the window's summary.  Under DEBUG the line adds the instance, the bytes delivered to
        it (``bytes_up``) and to the client, and the connection's ``age`` in seconds."""
        row = NOTICE_KINDS[kind]
        now = self._clock()
        key = (subject.service, kind)
        window = self._windows.get(key)
        if window is not None and now - window.start >= self._window:
            self._end(key, window, now)
            window = None
        if window is None:
            window = self._windows[key] = _Window(now, subject.protocol)
        if window.logged >= self._burst:
            window.suppressed += 1
            if window.suppressed == 1:
                self._schedule(window.start + self._window)
            return
        window.logged += 1
        what = row.describe(subject.client, reason, status, count)
        text = f"{subject.protocol} service {subject.service}: {what}"
        if self._log.isEnabledFor(logging.DEBUG):
            text += (
                f" [instance {subject.instance or '?'}, {bytes_up} bytes to it, {bytes_down}"
                f" to the client, {age:.3f} s open]"
            )
        self._log.info("%s", text)

    def summarize(self) -> None:
        """Write the summaries of the windows that ended; keep a timer for the next one."""
        now = self._clock()
        due = None
        for key, window in list(self._windows.items()):
            if now - window.start >= self._window:
                self._end(key, window, now)
            elif window.suppressed:
                end = window.start + self._window
                due = end if due is None else min(due, end)
        if due is not None:
            self._schedule(due)

    def close(self) -> None:
        """Write the summaries of every window still open (the relay is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._clock()
        for key, window in list(self._windows.items()):
            self._end(key, window, now)

    def _end(self, key: tuple[str, str], window: _Window, now: float) -> None:
        del self._windows[key]
        if window.suppressed:
            service, kind = key
            seconds = round(min(now - window.start, self._window), 1)
            self._log.info(
                "%s service %s: … %d more %s in the last %gs",
                window.protocol,
                service,
                window.suppressed,
                NOTICE_KINDS[kind].noun,
                seconds,
            )

    def _schedule(self, at: float) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_later(max(0.0, at - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.summarize()
