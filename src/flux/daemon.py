"""fluxd: composition, supervision, signals and shutdown.

Theory of operation
-------------------
``main`` parses the configuration (a bad value is one line on stderr and exit status 2, nothing
started), sets up logging and runs :class:`Daemon` on uvloop.

The daemon is a set of supervised components (see :mod:`flux.supervise`): the lease keeper
holds this host's etcd lease and keeps the host record (and, through the agent, the host's
instances) written on it; the agent and the balancer plug in beside it.  None of them needs
etcd or Docker to be reachable at start: each retries with capped backoff and converges when
the dependency comes back (the original's behaviour, reference §1.8).  Two kinds have a lower
cap, because waiting costs more there: the lease keeper (TTL/3, before the lease runs out) and
the components that follow the service watch (:data:`WATCH_MAX_BACKOFF`).

Shutdown (SIGTERM or SIGINT) runs in a fixed order, each step bounded in time so a dead etcd or
a stuck peer cannot hold the process:

1. stop accepting new connections (listeners close; established connections carry on);
2. remove every iptables rule and jump this fluxd created;
3. stop every component (watches, the agent, the lease keeper);
4. revoke the lease, so this host's records vanish from etcd at once;
5. let proxied connections finish for up to the grace period, then cut the rest;
6. close the store; exit status 0.

SIGQUIT dumps every thread's stack to stderr and keeps running (as the original did).
"""

from __future__ import annotations

import asyncio
import datetime
import faulthandler
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from flux import __version__
from flux.model import Host
from flux.store.base import Store
from flux.supervise import Supervisor

if TYPE_CHECKING:
    from flux.config import ParsedCommand, Settings
    from flux.relay.base import Relay

__all__ = ["WATCH_COMPONENTS", "WATCH_MAX_BACKOFF", "Daemon", "Plugin", "main",
           "raise_descriptor_limit"]

log = logging.getLogger("flux.daemon")

# How long each shutdown step may take before fluxd moves on (the grace period for proxied
# connections is separate and configurable).
STEP_TIMEOUT = 5.0

# The components that follow the store's service watch, and their restart-delay cap.  A watch
# rides out a short etcd outage by itself; after a longer one it fails to the supervisor, and
# with the default cap (30 s) it could come back that long after etcd did, the balancer and the
# agent acting on stale services meanwhile.  A retry is one request to an etcd that is down.
WATCH_COMPONENTS = frozenset({"agent-services", "balancer"})
WATCH_MAX_BACKOFF = 3.0


class Plugin(Protocol):
    """A part of fluxd (agent, balancer, metrics) as the daemon sees it."""

    name: str

    def components(self) -> Sequence[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """Named long-running coroutines for the supervisor."""

    async def stop_accepting(self) -> None:
        """Shutdown step 1: stop taking new work; established work carries on."""

    async def remove_rules(self) -> None:
        """Shutdown step 2: undo changes to the host (iptables)."""

    async def drain(self, grace: float) -> None:
        """Shutdown step 4: let in-flight work finish for up to ``grace`` seconds."""


def raise_descriptor_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the limit in force.

    Each proxied connection holds two sockets (and two pipes while data is in flight), so the
    soft default of 1,024 would cap fluxd at a few hundred connections.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft


@dataclass
class Daemon:
    """One running fluxd."""

    settings: Settings
    store: Store
    plugins: list[Plugin] = field(default_factory=list)
    supervisor: Supervisor = field(default_factory=Supervisor)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def host_address(self) -> str:
        return str(self.settings.host_ip)

    def request_stop(self, signum: int | None = None) -> None:
        if signum is not None and not self.stopping.is_set():
            log.info("received %s; shutting down", signal.Signals(signum).name)
        self.stopping.set()

    async def run(self) -> None:
        """Start every component, wait for a stop request, then shut down in order."""
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        await self.store.register_host(
            Host(address=self.host_address, version=__version__, started=started)
        )
        # Retried at least every keep-alive interval: after an etcd outage longer than the TTL,
        # a keeper still backing off (up to 30 s) would let the lease etcd kept through the
        # outage run out, and every record of this host vanish until the next retry.
        self.supervisor.start(
            "lease",
            lambda: self.store.run_lease(self.settings.host_ttl),
            max_backoff=self.settings.host_ttl / 3,
        )
        for plugin in self.plugins:
            for name, factory in plugin.components():
                cap = WATCH_MAX_BACKOFF if name in WATCH_COMPONENTS else None
                self.supervisor.start(name, factory, max_backoff=cap)
        log.info("fluxd is running on host %s", self.host_address)
        await self.stopping.wait()
        await self.shutdown()

    async def _step(self, what: str, awaitable: Coroutine[Any, Any, Any], timeout: float) -> None:
        try:
            await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            log.warning("shutdown: %s did not finish within %.0f s; moving on", what, timeout)
        except Exception as exc:
            log.warning("shutdown: %s failed: %s", what, exc)

    async def shutdown(self) -> None:
        for plugin in self.plugins:
            await self._step(f"{plugin.name}: stop", plugin.stop_accepting(), STEP_TIMEOUT)
        for plugin in self.plugins:
            await self._step(f"{plugin.name}: rules", plugin.remove_rules(), STEP_TIMEOUT)
        # Components stop before the lease is revoked: a lease keeper still running would grant
        # a fresh lease, and the agent could write instances onto it.
        await self.supervisor.stop()
        await self._step("revoking the lease", self.store.revoke_lease(), STEP_TIMEOUT)
        grace = self.settings.shutdown_grace
        for plugin in self.plugins:
            await self._step(f"{plugin.name}: drain", plugin.drain(grace), grace + STEP_TIMEOUT)
        await self._step("closing the store", self.store.close(), STEP_TIMEOUT)
        log.info("fluxd stopped")


def setup_logging(debug: bool) -> None:
    """One line per event on stderr, UTC timestamps, the component's logger name."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = __import__("time").gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Library chatter (aiohttp access logs, docker client) only when debugging.
    for noisy in ("aiohttp", "asyncio", "aiodocker", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


def _open_store(settings: Settings) -> Store:
    from flux.store.etcd import EtcdStore

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    password = settings.etcd_password
    return EtcdStore(
        [endpoint.url for endpoint in settings.etcd_endpoints],
        ca_file=text(settings.etcd_ca_file),
        cert_file=text(settings.etcd_cert_file),
        key_file=text(settings.etcd_key_file),
        username=settings.etcd_username,
        password=None if password is None else password.get_secret_value(),
    )


def _log_steering(relay: Relay, settings: Settings) -> None:
    """Say once how the engine threads share new connections (-engine-steer)."""
    from flux.config.settings import usable_cpus

    acceptor = relay.acceptor
    if acceptor is None:
        return
    plan = acceptor.steering
    if plan is not None:
        cpus = " | ".join(",".join(str(cpu) for cpu in shard) for shard in plan)
        log.info(
            "engine: %d threads pinned to CPUs %s; each takes the new connections that arrive"
            " on its CPUs (-engine-steer cpu; given back to the hash if one thread takes most"
            " of them or does most of the work)",
            len(plan),
            cpus,
        )
    elif settings.engine_steer == "cpu" and acceptor.shards > 1:
        log.info(
            "engine: %d threads for %d CPUs: -engine-steer cpu needs at most one thread per"
            " CPU, so new connections are spread by the hash of their addresses",
            acceptor.shards,
            usable_cpus(),
        )


def _build_plugins(settings: Settings, store: Store) -> list[Plugin]:
    """The parts of fluxd beside the lease keeper, in start order."""
    from flux.agent.agent import Agent
    from flux.agent.docker import AiodockerClient
    from flux.balancer.balancer import Balancer
    from flux.balancer.iptables import IPTables
    from flux.config import interface_ipv4
    from flux.metrics import Metrics, MetricsPlugin
    from flux.relay import make_relay

    def bridge_ip() -> str | None:
        address = interface_ipv4(settings.bridge)
        return None if address is None else str(address)

    # Without a listener nobody could read the counters: skip the hooks altogether.
    metrics = (
        Metrics(max_clients=settings.metrics_max_clients)
        if settings.listen_prometheus is not None
        else None
    )
    relay = make_relay(
        settings.relay,
        http_header_timeout=settings.http_header_timeout,
        http_idle_timeout=settings.http_idle_timeout,
        shards=settings.engine_threads,
        max_clients=settings.metrics_max_clients,
        **({"steer": settings.engine_steer == "cpu"} if settings.relay == "splice" else {}),
    )
    _log_steering(relay, settings)
    if metrics is not None:
        metrics.sources.append(relay.flush)
        metrics.relay_counters.append(relay.engine_counters)
        if relay.acceptor is not None:  # what the engine counts itself, read at scrape time
            metrics.counters.append(relay.acceptor.counts)
    balancer = Balancer(
        store,
        relay,
        IPTables(
            settings.chain,
            on_sync=metrics.on_iptables_sync if metrics else None,
            on_sync_failure=metrics.on_iptables_sync_failure if metrics else None,
        ),
        bind_ip=bridge_ip,
        bridge=settings.bridge,
        publish_ip=None if settings.publish_ip is None else str(settings.publish_ip),
        connect_timeout=settings.connect_timeout,
        balance=settings.balance,
        on_connection=metrics.on_connection if metrics else None,
        on_done=metrics.on_done if metrics else None,
        on_connect_failure=metrics.on_connect_failure if metrics else None,
        on_exchange=metrics.exchange_observer if metrics else None,
        on_reset=metrics.on_reset if metrics else None,
        on_answered=metrics.on_entry_answered if metrics else None,
        on_retry=metrics.on_retry if metrics else None,
        http_header_timeout=settings.http_header_timeout,
    )
    agent = Agent(
        store,
        lambda: AiodockerClient(settings.docker_host),
        host_ip=str(settings.host_ip),
        network_mode=settings.network_mode,
        reconcile_interval=settings.reconcile_interval,
    )
    plugins: list[Plugin] = [agent, balancer]
    if metrics is not None:
        advertise = settings.advertise_prometheus
        plugins.append(
            MetricsPlugin(
                metrics,
                listen=settings.listen_prometheus,
                host_address=str(settings.host_ip),
                advertise=None if advertise is None else str(advertise),
                store=store,
                balancer=balancer,
                agent=agent,
            )
        )
    return plugins


async def _serve(settings: Settings) -> int:
    store = _open_store(settings)
    daemon = Daemon(settings=settings, store=store, plugins=_build_plugins(settings, store))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, daemon.request_stop, signum)
    await daemon.run()
    return 0


def _log_start(parsed: ParsedCommand, settings: Settings) -> None:
    log.info("fluxd version %s", __version__)
    host_line, *setting_lines = parsed.describe()
    log.info("%s", host_line)
    log.info("effective configuration: %s", " ".join(setting_lines))
    if parsed.resolved is not None:
        log.info("%s", parsed.resolved)
    for warning in settings.warnings:
        log.warning("%s", warning)
    limit = raise_descriptor_limit()
    log.info("descriptor limit: %d", limit)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of the ``fluxd`` command."""
    from flux.config import load_or_exit

    parsed = load_or_exit(
        sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ
    )
    settings = parsed.settings
    assert settings is not None  # load_or_exit exits for help and version: this is a run
    setup_logging(settings.debug)
    faulthandler.register(signal.SIGQUIT, all_threads=True, chain=False)
    if parsed.command == "cleanup":
        from flux.balancer.iptables import cleanup_command

        return cleanup_command(settings)
    _log_start(parsed, settings)
    import uvloop

    return uvloop.run(_serve(settings))


if __name__ == "__main__":
    sys.exit(main())
