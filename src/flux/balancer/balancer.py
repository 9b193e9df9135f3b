"""The balancer: services in etcd become listeners and iptables rules on this host.

Theory of operation
-------------------
The balancer watches every service with its instances (snapshot, then deltas).  For each update
it asks the pure state machine (:mod:`flux.balancer.services`) what to do, then applies the
actions in phase order:

- *prepare*: open listeners (filled pools first), replace listeners, update pools in place;
- *install* and *remove*: the rule changes of every service in the update, applied together as
  ONE ``iptables-restore`` batch computed from the new states (additions before deletions in
  the batch, so no service is ever without a rule); a snapshot reads the installed rules first,
  a delta plans from what the adapter last read and applied;
- *retire*: close listeners whose rule is gone.  Connections they already handed to the relay
  carry on.

Updates that arrive while one is being applied are merged into one
(:mod:`flux.balancer.coalesce`), so a burst of writes costs a few batches, not one each.

The state survives a broken watch: when etcd goes away the watch fails, the supervisor restarts
it with backoff, and the balancer keeps forwarding with what it knows until a fresh snapshot
arrives (the original's behaviour, reference §1.8).  A listener that cannot be opened is logged
and the service is left absent, to be tried again on its next update.

Two services claiming one address: the balancer keeps every service's view, resolves the
claims over the whole set (:func:`~flux.balancer.services.resolve_conflicts`: the first spec
created keeps it, on every host alike), and treats the others as absent; each is logged once
and shown in :meth:`status` as ``conflict``.  When the holder goes or moves, the next update
hands the address to the next claimant.

Published ports (``-publish-ip``, unless ``none``) follow the same watch: every update goes to
:class:`~flux.balancer.published.PublishedPorts` too, which keeps a listener per entry point
with a pool of its own, outside the VIP state machine (a published port needs no iptables rule,
and a service may be published without an address).  Its listeners are made here, so they take
the same path as a VIP's: the relay, the connect timeout, balancing and the metrics hooks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Literal

from flux.balancer.coalesce import coalesced
from flux.balancer.entrypoints import EntryPoint
from flux.balancer.iptables import IPTables
from flux.balancer.listener import CONNECT_TIMEOUT, Listener
from flux.balancer.pool import Balance, Pool
from flux.balancer.published import PublishedPorts, entry_name
from flux.balancer.rules import Interception, desired_rules
from flux.balancer.services import (
    ABSENT,
    Action,
    ActionKind,
    Conflict,
    Endpoint,
    Phase,
    ServiceState,
    ServiceView,
    State,
    in_phase_order,
    step,
    why_ignored,
)
from flux.model import ConnectionInfo, ProxyProtocol, ServiceInfo, parse_address
from flux.relay import ExchangeObserver, Relay, RelayResult
from flux.relay.base import HTTP_HEADER_TIMEOUT
from flux.store.base import ServiceUpdate, Store

__all__ = ["Balancer", "BridgeError"]

log = logging.getLogger("flux.balancer")


@functools.lru_cache(maxsize=1 << 16)
def _interception(service: str, address: str, listener_port: int | None) -> Interception:
    # Cached: every sync asks for every service's, and parsing and validating the address
    # again each time was a large part of a one-service change among thousands.
    ip, port = parse_address(address)
    return Interception(service, str(ip), port, listener_port)


class BridgeError(RuntimeError):
    """The bridge device has no IPv4 address to bind listeners to."""


class Balancer:
    """Listeners, pools and iptables rules for every service with an address."""

    name = "balancer"

    def __init__(
        self,
        store: Store,
        relay: Relay,
        iptables: IPTables,
        *,
        bind_ip: Callable[[], str | None],
        bridge: str = "docker0",
        publish_ip: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        balance: Balance = "random",
        on_connection: Callable[[ConnectionInfo], None] | None = None,
        on_done: Callable[[ConnectionInfo, RelayResult], None] | None = None,
        on_connect_failure: Callable[[str, str], None] | None = None,
        on_exchange: Callable[[ConnectionInfo], ExchangeObserver] | None = None,
        on_reset: Callable[[str, str], None] | None = None,
        on_answered: Callable[[str, int | str], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
        http_header_timeout: float = HTTP_HEADER_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.relay = relay
        self.iptables = iptables
        self._bind_ip_source = bind_ip
        self._bridge = bridge
        self._connect_timeout = connect_timeout
        self._balance = balance
        self.on_connection = on_connection
        self.on_done = on_done
        self.on_connect_failure = on_connect_failure
        self.on_exchange = on_exchange
        self.on_reset = on_reset
        self.on_retry = on_retry
        self._clock = clock
        self._rng = rng or random.Random()
        self.states: dict[str, ServiceState] = {}
        # Every service's view before conflicts are resolved, and the services refused their
        # address because another one claimed it first (see services.resolve_conflicts).
        self._wanted: dict[str, ServiceView] = {}
        self.conflicts: dict[str, Conflict] = {}
        # Every service as the watch last gave it, with every host's instance records in
        # every state (references to the store's decoded records, for /status).
        self.infos: dict[str, ServiceInfo] = {}
        self.listeners: dict[str, tuple[Endpoint, Listener]] = {}
        self._retiring: dict[tuple[str, Endpoint], Listener] = {}
        self._bind_ip: str | None = None
        self._relay_started = False
        self._chains_ready = False
        self.snapshots = 0  # reset snapshots applied (for /healthz and tests)
        # Published ports, when this host is an entry point (-publish-ip is not "none").
        self.published: PublishedPorts | None = None
        if publish_ip is not None:
            self.published = PublishedPorts(
                publish_ip,
                self._published_listener,
                acceptor=relay.acceptor,
                balance=balance,
                clock=clock,
                rng=self._rng,
                header_timeout=http_header_timeout,
                on_answered=on_answered,
            )

    # -- the plug-in surface the daemon uses ------------------------------------------------

    def components(self) -> Sequence[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        return [("balancer", self.run)]

    async def stop_accepting(self) -> None:
        for _, listener in self.listeners.values():
            listener.close()
        for listener in self._retiring.values():
            listener.close()
        if self.published is not None:
            self.published.close()

    async def remove_rules(self) -> None:
        await self.iptables.stop()
        self._chains_ready = False

    async def drain(self, grace: float) -> None:
        # Clients still waiting for an instance connection are not going to be served.
        for _, listener in self.listeners.values():
            listener.abort_connecting()
        for listener in self._retiring.values():
            listener.abort_connecting()
        if self.published is not None:
            self.published.abort_connecting()
        if self._relay_started:
            await self.relay.close(grace)

    @property
    def ready(self) -> bool:
        """Chains installed and a snapshot of the services applied."""
        return self._chains_ready and self.snapshots > 0

    # -- the component ----------------------------------------------------------------------

    async def run(self) -> None:
        """Set up (once), then follow the service watch; raises for the supervisor to retry."""
        if self._bind_ip is None:
            address = self._bind_ip_source()
            if address is None:
                raise BridgeError(f"no IPv4 address found on bridge device {self._bridge!r}")
            self._bind_ip = address
            log.info("listeners bind to %s (bridge %s)", address, self._bridge)
        if not self._relay_started:
            await self.relay.start()
            self._relay_started = True
        if not self._chains_ready:
            await self.iptables.start()
            self._chains_ready = True
            log.info("iptables chain %s installed (nat and filter)", self.iptables.chain)
        # known_hosts: an instance whose host is not registered gets no traffic (the store
        # logs it once); see flux.store.keys.ServiceTree.  Updates that arrive while one is
        # being applied are merged, so a burst of writes costs a few batches, not one each.
        watch = self.store.watch_services(instances=True, known_hosts=True)
        async with contextlib.aclosing(coalesced(watch)) as updates:
            async for update in updates:
                await self.apply(update)

    async def apply(self, update: ServiceUpdate) -> None:
        """Bring listeners, pools and rules in line with one watch update."""
        if self.published is not None:
            self.published.apply(update)
        infos = {} if update.reset else self.infos
        for name, info in update.services.items():
            if info is None:
                infos.pop(name, None)
            else:
                infos[name] = info
        self.infos = infos
        views = {name: self._view(name, info) for name, info in update.services.items()}
        wanted = {} if update.reset else dict(self._wanted)
        for name, view in views.items():
            if view is None:
                wanted.pop(name, None)
            else:
                wanted[name] = view
        states, actions, conflicts = step(
            self.states, self.conflicts, wanted, None if update.reset else views
        )
        self._report_conflicts(wanted, conflicts)
        self._wanted = wanted
        self.conflicts = conflicts
        failed: set[str] = set()
        rules_changed = False
        retiring: list[Action] = []
        for action in in_phase_order(actions):
            if action.service in failed:
                continue
            if action.kind.phase is Phase.PREPARE:
                if not self._prepare(action):
                    failed.add(action.service)
            elif action.kind.phase in (Phase.INSTALL, Phase.REMOVE):
                rules_changed = True
            else:
                retiring.append(action)
        for name in failed:
            states[name] = ABSENT
        self.states = {name: state for name, state in states.items() if state.state != State.ABSENT}
        try:
            if rules_changed or failed or update.reset:
                # A snapshot reads the tables (and so repairs what someone removed); a delta
                # plans from what that read and our batches since left: the read costs as much
                # as the batch itself.
                await self.iptables.sync(self._desired_rules(), read=update.reset)
        finally:
            # Only now is no rule pointing at these listeners (closed earlier, a client's SYN
            # meets a closed port: "connection refused" from a service that is up).  A failed
            # sync closes them too: they are no longer in the state, so nothing else would.
            for action in retiring:
                self._retire(action)
        if update.reset:
            self.snapshots += 1

    def _report_conflicts(
        self, wanted: Mapping[str, ServiceView], conflicts: Mapping[str, Conflict]
    ) -> None:
        """One line when a service is refused its address, and when that ends."""
        for name, conflict in sorted(conflicts.items()):
            if self.conflicts.get(name) != conflict:
                log.warning(
                    "service %s: %s, which claimed it first; %s is not served until %s"
                    " releases the address",
                    name,
                    conflict,
                    name,
                    conflict.holder,
                )
        for name in sorted(self.conflicts.keys() - conflicts.keys()):
            if name in wanted:
                log.info(
                    "service %s: no longer refused %s", name, self.conflicts[name].address
                )

    def _view(self, name: str, info: ServiceInfo | None) -> ServiceView | None:
        if info is None:
            return None
        reason = why_ignored(info)
        if reason is not None:
            log.debug("%s", reason)
            return None
        return ServiceView.from_info(info)

    def _listener(
        self,
        service: str,
        protocol: str,
        bind_ip: str,
        pool: Pool,
        *,
        port: int = 0,
        entry: str = "vip",
        proxy_protocol: ProxyProtocol | Literal[""] = "",
        forwarded: bool = False,
    ) -> Listener:
        """A listener for ``service`` on this balancer's relay, with its callbacks; ``port``,
        ``entry``, ``proxy_protocol`` and ``forwarded`` are the entry point's own (see
        :class:`Listener`)."""
        return Listener(
            service,
            protocol,
            bind_ip,
            pool,
            self.relay,
            connect_timeout=self._connect_timeout,
            on_connection=self.on_connection,
            on_done=self.on_done,
            on_connect_failure=self.on_connect_failure,
            on_exchange=self.on_exchange,
            on_reset=self.on_reset,
            on_retry=self.on_retry,
            port=port,
            entry=entry,
            proxy_protocol=proxy_protocol,
            forwarded=forwarded,
        )

    def _published_listener(self, entry: EntryPoint, pool: Pool) -> Listener:
        assert self.published is not None
        return self._listener(
            entry.service,
            entry.protocol,
            self.published.bind_ip,
            pool,
            port=entry.port,
            entry=entry_name(entry.port),
            proxy_protocol=entry.proxy_protocol,
            forwarded=entry.forwarded,
        )

    def _new_listener(self, service: str, endpoint: Endpoint, pool: Pool) -> Listener | None:
        assert self._bind_ip is not None
        listener = self._listener(
            service, endpoint.protocol, self._bind_ip, pool,
            proxy_protocol=endpoint.proxy_protocol,
            forwarded=endpoint.forwarded,
        )
        try:
            port = listener.open()
        except OSError as exc:
            log.error(
                "service %s: cannot open a listener on %s: %s", service, self._bind_ip, exc
            )
            return None
        log.info(
            "service %s: forwarding %s (%s) through %s:%d",
            service,
            endpoint.address,
            endpoint.protocol,
            self._bind_ip,
            port,
        )
        return listener

    def _prepare(self, action: Action) -> bool:
        service = action.service
        if action.kind is ActionKind.UPDATE_POOL:
            self.listeners[service][1].pool.update(action.instances or {})
            return True
        if action.kind is ActionKind.OPEN_LISTENER:
            pool = Pool(now=self._clock, rng=self._rng, balance=self._balance)
            pool.update(action.instances or {})
        else:  # REPLACE_LISTENER: the new listener inherits the pool (instances keep health)
            pool = self.listeners[service][1].pool
        listener = self._new_listener(service, action.endpoint, pool)
        if listener is None:
            return False
        if action.kind is ActionKind.REPLACE_LISTENER and action.previous is not None:
            old_endpoint, old = self.listeners[service]
            self._retiring[(service, old_endpoint)] = old
        self.listeners[service] = (action.endpoint, listener)
        return True

    def _retire(self, action: Action) -> None:
        key = (action.service, action.endpoint)
        listener = self._retiring.pop(key, None)
        if listener is None:
            current = self.listeners.get(action.service)
            if current is None or current[0] != action.endpoint:
                return
            listener = current[1]
            del self.listeners[action.service]
        listener.close()
        log.info("service %s: closed listener for %s", action.service, action.endpoint.address)

    def _desired_rules(self) -> Any:
        assert self._bind_ip is not None
        interceptions = []
        for name, state in self.states.items():  # desired_rules sorts
            if state.endpoint is None:
                continue
            listener_port = None
            if state.state is State.FORWARDING:
                listener_port = self.listeners[name][1].port
            interceptions.append(_interception(name, state.endpoint.address, listener_port))
        return desired_rules(self.iptables.chain, self._bind_ip, interceptions)

    def engine_status(self) -> dict[str, Any]:
        """The relay as ``/status`` shows it: its native threads (0 for the Python relay),
        the connections it relays now and the clients each thread accepted itself."""
        acceptor = self.relay.acceptor
        counters = self.relay.engine_counters()
        return {
            "threads": 0 if acceptor is None else acceptor.shards,
            "open_connections": self.relay.active,
            "shard_accepted": [] if counters is None else list(counters.shard_accepted),
            "steering": None if acceptor is None else acceptor.steering,
            "steering_off": None if acceptor is None else acceptor.steering_off,
        }

    def status(self) -> Mapping[str, Any]:
        """What ``/status`` shows of the balancer: each service's state, what its instances get
        of the client's address (``proxy_protocol``: "", "v1" or "v2"; ``forwarded``) and pool
        health."""
        services: dict[str, Any] = {}
        for name, state in sorted(self.states.items()):
            entry: dict[str, Any] = {
                "state": str(state.state),
                "address": state.endpoint.address if state.endpoint else None,
                "protocol": state.endpoint.protocol if state.endpoint else None,
                "proxy_protocol": state.endpoint.proxy_protocol if state.endpoint else "",
                "forwarded": state.endpoint.forwarded if state.endpoint else False,
            }
            if name in self.listeners:
                _, listener = self.listeners[name]
                entry["listener"] = f"{listener.bind_ip}:{listener.port}"
                entry["instances"] = listener.pool.health_report()
            services[name] = entry
        for name, conflict in sorted(self.conflicts.items()):
            wanted = self._wanted[name].endpoint
            services[name] = {
                "state": "conflict",
                "address": conflict.address,
                "protocol": wanted.protocol,
                "proxy_protocol": wanted.proxy_protocol,
                "forwarded": wanted.forwarded,
                "conflict": str(conflict),
                "holder": conflict.holder,
            }
        if self.published is not None:
            for name, published in self.published.status().items():
                entry = services.setdefault(
                    name,
                    {"state": "published", "address": None, "protocol": None},
                )
                entry["published"] = published
                if entry["protocol"] is None and name in self.published.claims:
                    claim = self.published.claims[name]
                    entry["protocol"] = claim.protocol
                    entry["proxy_protocol"] = claim.proxy_protocol
                    entry["forwarded"] = claim.forwarded
        return {
            "services": services,
            "relay_active": self.relay.active,
            "publish_ip": None if self.published is None else self.published.bind_ip,
        }

