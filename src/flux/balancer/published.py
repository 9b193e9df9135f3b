"""Published ports on this host: a listener per entry point, kept open against busy ports.

Theory of operation
-------------------
The balancer hands every watch update to :meth:`PublishedPorts.apply` as well.  It keeps each
service's :class:`~flux.balancer.entrypoints.PublishClaim`, resolves the claims into entry
points (:func:`~flux.balancer.entrypoints.resolve_entry_points`: one holder per port, the
others in conflict) and brings the listeners in line:

- a port whose entry point is new, or now serves another service, protocol, PROXY protocol
  (fluxctl --proxy-protocol) or X-Forwarded-For setting (fluxctl --forwarded), gets a new
  listener on ``-publish-ip`` with a pool of its own
  (the old one is closed: stop accepting, its connections carry on);
- a port still held as before only has its pool updated with the live instances;
- a port nobody claims any more is closed.

A port shared by host name (the entry point has routes: http services by ``Host``, tcp
services by TLS server name) is accepted by a :class:`~flux.balancer.hostrouter.HostRouter`
instead, with a pool and a listener (never opened: it takes the clients the router hands it,
with its service's PROXY protocol or X-Forwarded-For, if any) per service routed to.
Services joining or leaving such a port, or their host names changing, only change the
router's table and the pools: the socket stays open.  A port that turns from one service
into a shared one (or back) is closed and opened again, like any change of holder.

A port closed here to be opened again in another form (one service <-> shared by host name)
may still be held for a moment by the engine's shards, which close their sockets on their own
thread: EADDRINUSE within ``RELEASE_GRACE`` of that close is retried quietly and quickly.
Otherwise, a port that cannot be bound is logged once, naming the port and the service, shown in
:meth:`status` as ``busy`` (another process holds it: EADDRINUSE) or ``failed`` (any other
error: ``-publish-ip`` is not an address of this host, a port below 1024 without the
capability) with the error, and tried again after 0.5 s, doubling up to 30 s,
until it binds (one more line then) or is no longer wanted.  Nothing else waits on it: every
other entry point and every VIP keeps working.  A service refused its port for another's
claim is logged once when that starts and once when it ends, and shown as ``conflict``.

With ``-publish-ip none`` the balancer makes no :class:`PublishedPorts` at all.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flux.balancer.entrypoints import (
    EntryPoint,
    PortConflict,
    PublishClaim,
    resolve_entry_points,
)
from flux.balancer.hostrouter import HostRouter
from flux.balancer.listener import Listener
from flux.balancer.pool import Balance, Pool, backoff
from flux.relay.base import HTTP_HEADER_TIMEOUT, Acceptor
from flux.relay.notices import NoticeLimiter
from flux.store.base import ServiceUpdate

__all__ = ["BIND_RETRY_BASE", "BIND_RETRY_CAP", "PublishedPorts", "entry_name"]

log = logging.getLogger("flux.balancer")

BIND_RETRY_BASE = 0.5  # seconds before the first retry of a port that could not be bound
BIND_RETRY_CAP = 30.0
# A port this host closed to open it again in another form (one service <-> shared by host
# name): the engine closes its shards' sockets on its own thread, a moment later, so a bind
# may still find them.  EADDRINUSE that soon after is retried quietly every RELEASE_RETRY s.
RELEASE_GRACE = 2.0
RELEASE_RETRY = 0.02

# (entry point, its pool) -> a listener not yet opened.
MakeListener = Callable[[EntryPoint, Pool], Listener]


def entry_name(port: int) -> str:
    """How metrics and ``/status`` name a published port's entry point."""
    return f"published:{port}"


def _kind(entry: EntryPoint | None) -> tuple[object, ...] | None:
    """What a port's socket depends on: a change of it closes the socket and opens a new one
    (a shared port's routes change in place)."""
    if entry is None:
        return None
    return (
        entry.port,
        entry.protocol,
        entry.shared,
        None if entry.shared else entry.service,
        entry.proxy_protocol,
        entry.forwarded,
    )


def _routed(entry: EntryPoint) -> tuple[str, ...]:
    """The services an entry point's connections may go to."""
    return entry.routes.services if entry.routes is not None else (entry.service,)


@dataclass(slots=True, eq=False)
class _Port:
    """One entry point of this host: its listener (or router) when bound, else why not and
    when next; a pool per service it routes to, with the instances last given to it."""

    entry: EntryPoint
    pools: dict[str, Pool] = field(default_factory=dict)
    instances: dict[str, Mapping[str, str]] = field(default_factory=dict)
    listener: Listener | None = None
    router: HostRouter | None = None
    routed: dict[str, Listener] = field(default_factory=dict)  # shared: per service
    # Their client address settings: (PROXY protocol, X-Forwarded-For).
    routed_proxy: dict[str, tuple[str, bool]] = field(default_factory=dict)
    error: str | None = None
    busy: bool = False  # the last error was EADDRINUSE
    failures: int = 0
    retry: asyncio.TimerHandle | None = None
    retry_at: float | None = None


class PublishedPorts:
    """The listeners of every published port this host serves (see the module docstring)."""

    def __init__(
        self,
        bind_ip: str,
        make_listener: MakeListener,
        *,
        acceptor: Acceptor | None = None,
        balance: Balance = "random",
        clock: Callable[[], float],
        rng: random.Random,
        header_timeout: float = HTTP_HEADER_TIMEOUT,
        on_answered: Callable[[str, int | str], None] | None = None,
        notices: NoticeLimiter | None = None,
    ) -> None:
        self.bind_ip = bind_ip
        self._make_listener = make_listener
        self._acceptor = acceptor  # the relay's, when its engine accepts (routers route there)
        self._header_timeout = header_timeout
        self._on_answered = on_answered
        self._notices = notices if notices is not None else NoticeLimiter()
        self._notices_attached = False
        self._balance = balance
        self._clock = clock
        self._rng = rng
        self.claims: dict[str, PublishClaim] = {}
        self.conflicts: dict[str, PortConflict] = {}
        self.ports: dict[int, _Port] = {}
        self._released: dict[int, float] = {}  # port -> when this host last closed it
        self._closed = False

    def apply(self, update: ServiceUpdate) -> None:
        """Bring the entry points in line with one watch update (see the module docstring)."""
        claims = {} if update.reset else dict(self.claims)
        for name, info in update.services.items():
            claim = None if info is None else PublishClaim.from_info(info)
            if claim is None:
                claims.pop(name, None)
            else:
                claims[name] = claim
        entries, conflicts = resolve_entry_points(claims)
        self._report_conflicts(claims, conflicts)
        self.claims, self.conflicts = claims, conflicts
        for port in [
            p for p, held in self.ports.items() if _kind(entries.get(p)) != _kind(held.entry)
        ]:
            self._close(self.ports.pop(port))
        if self._closed:
            return
        for port, entry in sorted(entries.items()):
            held = self.ports.get(port)
            if held is None:
                held = self.ports[port] = _Port(entry)
                self._sync_pools(held, claims)
                self._open(held)
            else:
                held.entry = entry
                self._sync_pools(held, claims)
                if held.router is not None and entry.routes is not None:
                    held.router.update(entry.routes, held.routed)

    def _sync_pools(self, held: _Port, claims: Mapping[str, PublishClaim]) -> None:
        """A pool (and, shared, a listener) per service ``held`` routes to, with its live
        instances; those of services no longer routed to are let go (their connections
        carry on)."""
        entry = held.entry
        wanted = _routed(entry)
        for gone in [name for name in held.pools if name not in wanted]:
            del held.pools[gone]
            del held.instances[gone]
            dropped = held.routed.pop(gone, None)
            if dropped is not None:
                dropped.close()  # out of the engine, if it was there (its connections go on)
            held.routed_proxy.pop(gone, None)
        for name in wanted:
            instances = claims[name].instances
            pool = held.pools.get(name)
            if pool is None:
                pool = Pool(now=self._clock, rng=self._rng, balance=self._balance)
                held.pools[name] = pool
                pool.update(instances)
                held.instances[name] = instances
            elif held.instances[name] != instances:
                pool.update(instances)
                held.instances[name] = instances
            claim = claims[name]
            options = (claim.proxy_protocol, claim.forwarded)
            if entry.shared and (name not in held.routed or held.routed_proxy[name] != options):
                # The port as this one service serves it (the router picked it), with the
                # service's own PROXY protocol (tcp) or X-Forwarded-For (http); a new one when
                # either changes.
                alone = replace(
                    entry,
                    service=name,
                    routes=None,
                    proxy_protocol=claim.proxy_protocol,
                    forwarded=claim.forwarded,
                )
                replaced = held.routed.get(name)
                if replaced is not None:
                    replaced.close()
                held.routed[name] = self._make_listener(alone, pool)
                held.routed_proxy[name] = options

    def _report_conflicts(
        self, claims: Mapping[str, PublishClaim], conflicts: Mapping[str, PortConflict]
    ) -> None:
        for name, conflict in sorted(conflicts.items()):
            if self.conflicts.get(name) != conflict:
                log.warning(
                    "service %s: %s, which claimed it first; %s is not published until %s"
                    " releases the port",
                    name,
                    conflict,
                    name,
                    conflict.holder,
                )
        for name in sorted(self.conflicts.keys() - conflicts.keys()):
            if name in claims:
                log.info("service %s: no longer refused port %d", name, self.conflicts[name].port)

    def _open(self, held: _Port) -> None:
        held.retry = held.retry_at = None
        entry = held.entry
        opened: Listener | HostRouter
        if entry.routes is not None:
            if not self._notices_attached:
                self._notices.attach(asyncio.get_running_loop())
                self._notices_attached = True
            opened = HostRouter(
                self.bind_ip,
                entry.port,
                entry_name(entry.port),
                entry.routes,
                held.routed,
                notices=self._notices,
                header_timeout=self._header_timeout,
                on_answered=self._on_answered,
                protocol=entry.protocol,
                acceptor=self._acceptor,
            )
        else:
            opened = self._make_listener(entry, held.pools[entry.service])
        try:
            opened.open()
        except OSError as exc:
            loop = asyncio.get_running_loop()
            released = self._released.get(entry.port)
            if (
                exc.errno == errno.EADDRINUSE
                and released is not None
                and self._clock() - released < RELEASE_GRACE
            ):
                held.retry = loop.call_later(RELEASE_RETRY, self._retry, held)
                return
            error = exc.strerror or str(exc)
            if held.error is None:
                log.warning(
                    "service %s: cannot publish port %d on %s: %s; trying again with backoff",
                    entry.service,
                    entry.port,
                    self.bind_ip,
                    error,
                )
            held.error = error
            held.busy = exc.errno == errno.EADDRINUSE
            delay = backoff(held.failures, base=BIND_RETRY_BASE, cap=BIND_RETRY_CAP)
            held.failures += 1
            held.retry_at = self._clock() + delay
            held.retry = loop.call_later(delay, self._retry, held)
            return
        self._released.pop(entry.port, None)
        if held.error is not None:
            log.info(
                "service %s: published port %d on %s (%s%s) after %d failed attempts",
                entry.service,
                entry.port,
                self.bind_ip,
                entry.protocol,
                ", by host name" if entry.shared else "",
                held.failures,
            )
        else:
            log.info(
                "service %s: published port %d on %s (%s%s)",
                entry.service,
                entry.port,
                self.bind_ip,
                entry.protocol,
                ", by host name" if entry.shared else "",
            )
        if isinstance(opened, HostRouter):
            held.router = opened
        else:
            held.listener = opened
        held.error = None
        held.failures = 0

    def _retry(self, held: _Port) -> None:
        held.retry = None
        if not self._closed and self.ports.get(held.entry.port) is held:
            self._open(held)

    def _close(self, held: _Port) -> None:
        if held.retry is not None:
            held.retry.cancel()
            held.retry = held.retry_at = None
        opened = held.listener or held.router
        if opened is not None:
            opened.close()
            held.listener = held.router = None
            now = self._clock()
            self._released = {
                port: at for port, at in self._released.items() if now - at < RELEASE_GRACE
            }
            self._released[held.entry.port] = now
            log.info(
                "service %s: closed published port %d", held.entry.service, held.entry.port
            )

    def close(self) -> None:
        """Stop accepting on every published port (connections carry on) and stop retrying."""
        self._closed = True
        for held in self.ports.values():
            self._close(held)
        self._notices.close()

    def abort_connecting(self) -> None:
        """Reset clients still waiting for an instance connection (shutdown)."""
        for held in self.ports.values():
            if held.listener is not None:
                held.listener.abort_connecting()
            for listener in held.routed.values():
                listener.abort_connecting()

    def status(self) -> dict[str, Any]:
        """Each service's published port as ``/status`` shows it."""
        shown: dict[str, Any] = {}
        for port, held in sorted(self.ports.items()):
            routes = held.entry.routes
            for name in _routed(held.entry):
                entry: dict[str, Any] = {"port": port, "entry": entry_name(port)}
                if routes is not None:
                    entry["hostnames"] = [host for host, to in routes.names if to == name]
                    entry["default"] = routes.default == name
                if held.listener is not None or held.router is not None:
                    entry["state"] = "listening"
                    entry["listener"] = f"{self.bind_ip}:{port}"
                    entry["instances"] = held.pools[name].health_report()
                else:
                    entry["state"] = "busy" if held.busy else "failed"
                    entry["error"] = held.error
                    entry["retry_in"] = (
                        None
                        if held.retry_at is None
                        else max(0.0, held.retry_at - self._clock())
                    )
                shown[name] = entry
        for name, conflict in sorted(self.conflicts.items()):
            shown[name] = {
                "port": conflict.port,
                "entry": entry_name(conflict.port),
                "state": "conflict",
                "conflict": str(conflict),
                "holder": conflict.holder,
            }
        return shown
