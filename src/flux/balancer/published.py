"""Published ports on this host: a listener per entry point, kept open against busy ports.

Theory of operation
-------------------
The balancer hands every watch update to :meth:`PublishedPorts.apply` as well.  It keeps each
service's :class:`~flux.balancer.entrypoints.PublishClaim`, resolves the claims into entry
points (:func:`~flux.balancer.entrypoints.resolve_entry_points`: one holder per port, the
others in conflict) and brings the listeners in line:

- a port whose entry point is new, or now serves another service, protocol or PROXY protocol
  (fluxctl --proxy-protocol), gets a new
  listener on ``-publish-ip`` with a pool of its own (the old one is closed: stop accepting,
  its connections carry on);
- a port still held as before only has its pool updated with the live instances;
- a port nobody claims any more is closed.

A port that cannot be bound is logged once, naming the port and the service, shown in
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
from dataclasses import dataclass, field
from typing import Any

from flux.balancer.entrypoints import (
    EntryPoint,
    PortConflict,
    PublishClaim,
    resolve_entry_points,
)
from flux.balancer.listener import Listener
from flux.balancer.pool import Balance, Pool, backoff
from flux.store.base import ServiceUpdate

__all__ = ["BIND_RETRY_BASE", "BIND_RETRY_CAP", "PublishedPorts", "entry_name"]

log = logging.getLogger("flux.balancer")

BIND_RETRY_BASE = 0.5  # seconds before the first retry of a port that could not be bound
BIND_RETRY_CAP = 30.0

# (entry point, its pool) -> a listener not yet opened.
MakeListener = Callable[[EntryPoint, Pool], Listener]


def entry_name(port: int) -> str:
    """How metrics and ``/status`` name a published port's entry point."""
    return f"published:{port}"


@dataclass(slots=True, eq=False)
class _Port:
    """One entry point of this host: its listener when bound, else why not and when next."""

    entry: EntryPoint
    pool: Pool
    instances: Mapping[str, str] = field(default_factory=dict)
    listener: Listener | None = None
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
        balance: Balance = "random",
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.bind_ip = bind_ip
        self._make_listener = make_listener
        self._balance = balance
        self._clock = clock
        self._rng = rng
        self.claims: dict[str, PublishClaim] = {}
        self.conflicts: dict[str, PortConflict] = {}
        self.ports: dict[int, _Port] = {}
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
        for port in [p for p, held in self.ports.items() if entries.get(p) != held.entry]:
            self._close(self.ports.pop(port))
        if self._closed:
            return
        for port, entry in sorted(entries.items()):
            instances = claims[entry.service].instances
            held = self.ports.get(port)
            if held is None:
                pool = Pool(now=self._clock, rng=self._rng, balance=self._balance)
                pool.update(instances)
                held = self.ports[port] = _Port(entry, pool, instances)
                self._open(held)
            elif held.instances != instances:
                held.pool.update(instances)
                held.instances = instances

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
        listener = self._make_listener(entry, held.pool)
        try:
            listener.open()
        except OSError as exc:
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
            held.retry = asyncio.get_running_loop().call_later(delay, self._retry, held)
            return
        if held.error is not None:
            log.info(
                "service %s: published port %d on %s (%s) after %d failed attempts",
                entry.service,
                entry.port,
                self.bind_ip,
                entry.protocol,
                held.failures,
            )
        else:
            log.info(
                "service %s: published port %d on %s (%s)",
                entry.service,
                entry.port,
                self.bind_ip,
                entry.protocol,
            )
        held.listener = listener
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
        if held.listener is not None:
            held.listener.close()
            held.listener = None
            log.info(
                "service %s: closed published port %d", held.entry.service, held.entry.port
            )

    def close(self) -> None:
        """Stop accepting on every published port (connections carry on) and stop retrying."""
        self._closed = True
        for held in self.ports.values():
            self._close(held)

    def abort_connecting(self) -> None:
        """Reset clients still waiting for an instance connection (shutdown)."""
        for held in self.ports.values():
            if held.listener is not None:
                held.listener.abort_connecting()

    def status(self) -> dict[str, Any]:
        """Each service's published port as ``/status`` shows it."""
        shown: dict[str, Any] = {}
        for port, held in sorted(self.ports.items()):
            entry: dict[str, Any] = {"port": port, "entry": entry_name(port)}
            if held.listener is not None:
                entry["state"] = "listening"
                entry["listener"] = f"{self.bind_ip}:{port}"
                entry["instances"] = held.pool.health_report()
            else:
                entry["state"] = "busy" if held.busy else "failed"
                entry["error"] = held.error
                entry["retry_in"] = (
                    None if held.retry_at is None else max(0.0, held.retry_at - self._clock())
                )
            shown[held.entry.service] = entry
        for name, conflict in sorted(self.conflicts.items()):
            shown[name] = {
                "port": conflict.port,
                "entry": entry_name(conflict.port),
                "state": "conflict",
                "conflict": str(conflict),
                "holder": conflict.holder,
            }
        return shown
