"""The metrics plugin: the status page, ``/metrics``, ``/healthz`` and ``/status``.

Theory of operation
-------------------
:class:`MetricsPlugin` is a daemon plugin (``flux.daemon.Plugin``) with one supervised
component, ``metrics``: it binds the listener, advertises the target in etcd, and serves until
cancelled.  ``/`` is the status page (:mod:`flux.metrics.statuspage`: static files that read
``/status`` from the browser).

The server is an aiohttp ``web.Application`` of our own rather than prometheus-async's
``start_http_server``: that one serves only ``/metrics`` (and ``/``) from the *global*
registry, and its router is frozen once it is running, so neither ``/healthz`` and ``/status``
on the same listener nor a registry owned by the plugin (a fresh one per test) fit it.
``/metrics`` is rendered by prometheus_client (``choose_encoder``: the classic text format, or
OpenMetrics when the scraper asks for it) from the plugin's :class:`CollectorRegistry`.  The
collectors run on the event loop's thread, where the hooks write the counters, so nothing needs
a lock; only the formatting of the families collected (the slow part with many label sets)
runs in a worker thread.

Failing to bind (port in use, address not on this host) raises :class:`MetricsListenError` with
one line naming the address.  The original made it fatal; here the supervisor logs that line
and retries with capped backoff, so fluxd keeps forwarding connections (its real job) and the
endpoint appears as soon as the port is free.

Advertisement: once the listener is up, the target (``-advertise-prometheus``, or the host IP
and the bound port) is written with ``store.set_prometheus_target`` under
``/weave-flux/prometheus-targets/<host IP>`` on this host's lease.  The store keeps it among
the host-owned records, so the lease keeper rewrites it after a lease loss and it vanishes when
the lease is revoked at shutdown or expires after a crash.  prometheus-async's
service-discovery hook is called by its own ``start_http_server`` only, which we do not use
(see above), so the target is written here directly; a store error is logged and never takes
the endpoint down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from flux import __version__
from flux.metrics.counters import FluxCollector, Metrics
from flux.metrics.statuspage import add_page_routes
from flux.model import Instance, RecordError
from flux.store.base import Store, StoreError, StoreUnavailable

__all__ = [
    "AgentView",
    "BalancerView",
    "MetricsListenError",
    "MetricsPlugin",
    "build_registry",
    "health_problems",
]

log = logging.getLogger("flux.metrics")

# A scraper holding a keep-alive connection must not hold up fluxd's shutdown.
_SHUTDOWN_TIMEOUT = 1.0


class MetricsListenError(OSError):
    """The metrics listener could not be opened; the message is one line for people."""


class BalancerView(Protocol):
    """What ``/healthz`` and ``/status`` read from the balancer."""

    @property
    def ready(self) -> bool: ...

    def status(self) -> Mapping[str, Any]: ...


class AgentView(Protocol):
    """What ``/healthz``, ``/status`` and ``flux_instances`` read from the agent."""

    @property
    def docker_connected(self) -> bool: ...

    @property
    def instances(self) -> Mapping[tuple[str, str], Instance]: ...


def build_registry(
    metrics: Metrics, agent: AgentView | None = None, *, process: bool = True
) -> CollectorRegistry:
    """A new registry with flux's collector and, with ``process``, the standard ones."""
    registry = CollectorRegistry()
    instances = None if agent is None else (lambda: agent.instances)
    registry.register(FluxCollector(metrics, instances))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def health_problems(balancer: BalancerView | None, agent: AgentView | None) -> list[str]:
    """Why this fluxd is not healthy (empty when it is); parts not running are not checked."""
    problems = []
    if balancer is not None and not balancer.ready:
        problems.append(
            "balancer not ready: iptables chain not installed or no service snapshot from etcd yet"
        )
    if agent is not None and not agent.docker_connected:
        problems.append("Docker event stream is down")
    return problems


class _Collected(Collector):
    """Families already collected, for an encoder that wants something with ``collect()``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _show(listen: tuple[str, int]) -> str:
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsPlugin:
    """The metrics endpoint as a daemon plugin; see the module docstring."""

    name = "metrics"

    def __init__(
        self,
        metrics: Metrics,
        *,
        listen: tuple[str, int] | None,
        host_address: str,
        advertise: str | None = None,
        store: Store | None = None,
        balancer: BalancerView | None = None,
        agent: AgentView | None = None,
        registry: CollectorRegistry | None = None,
        version: str = __version__,
    ) -> None:
        self.metrics = metrics
        self.registry = registry if registry is not None else build_registry(metrics, agent)
        self._listen = listen
        self._host_address = host_address
        self._advertise = advertise
        self._store = store
        self._balancer = balancer
        self._agent = agent
        self._version = version
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.advertised: str | None = None

    # -- the plug-in surface the daemon uses ------------------------------------------------

    def components(self) -> Sequence[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """The HTTP server, when there is a listen address."""
        return [] if self._listen is None else [("metrics", self.serve)]

    async def stop_accepting(self) -> None:
        """Close the listener (a scrape in progress gets up to a second to finish)."""
        await self.close()

    async def remove_rules(self) -> None:
        """Nothing to do: the metrics plugin installs no rules."""

    async def drain(self, grace: float) -> None:
        """Nothing to do: a scrape is not worth waiting for."""

    # -- the component ----------------------------------------------------------------------

    async def serve(self) -> None:
        """Listen, advertise, serve until cancelled; raises MetricsListenError to be retried."""
        await self.start()
        try:
            await self.advertise()
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def start(self) -> int:
        """Open the listener (once); return the port it is bound to."""
        if self._runner is not None:
            assert self.port is not None
            return self.port
        if self._listen is None:
            raise RuntimeError("the metrics plugin has no listen address")
        host, port = self._listen
        runner = web.AppRunner(
            self._application(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            # An empty host means every interface, which aiohttp spells None.
            await web.TCPSite(runner, host or None, port).start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise MetricsListenError(
                f"cannot listen for Prometheus on {_show(self._listen)}: {reason}"
            ) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info(
            "serving the status page, /metrics, /healthz and /status on %s",
            _show((host, self.port)),
        )
        return self.port

    async def advertise(self) -> None:
        """Write this host's metrics target on its lease (logged, never raised, on failure)."""
        if self._store is None or self.port is None:
            return
        target = self._advertise or _show((self._host_address, self.port))
        try:
            await self._store.set_prometheus_target(self._host_address, target)
        except RecordError as exc:
            log.error("cannot advertise the metrics endpoint %s: %s", target, exc)
            return
        except StoreUnavailable as exc:
            # The store keeps the target among this host's records and writes it when etcd
            # answers again (the lease keeper's resync).
            log.warning("advertising the metrics endpoint %s is delayed: %s", target, exc)
            return
        except StoreError as exc:
            log.error("cannot advertise the metrics endpoint %s: %s", target, exc)
            return
        self.advertised = target
        log.info("advertised the metrics endpoint %s for Prometheus", target)

    async def close(self) -> None:
        """Close the listener; safe to call more than once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- what the endpoint shows ------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why ``/healthz`` says 503 (empty when healthy)."""
        return health_problems(self._balancer, self._agent)

    def status(self) -> dict[str, Any]:
        """The ``/status`` document."""
        problems = self.problems()
        document: dict[str, Any] = {
            "host": self._host_address,
            "version": self._version,
            "healthy": not problems,
            "problems": problems,
        }
        if self._balancer is not None:
            document["balancer"] = {"ready": self._balancer.ready, **self._balancer.status()}
        if self._agent is not None:
            document["agent"] = {
                "docker_connected": self._agent.docker_connected,
                "instances": [
                    {
                        "service": service,
                        "instance": name,
                        "state": str(instance.effective_state),
                        "address": instance.address,
                        "rule": instance.container_rule or None,
                    }
                    for (service, name), instance in sorted(self._agent.instances.items())
                ],
            }
        return document

    def _application(self) -> web.Application:
        app = web.Application()
        add_page_routes(app.router)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/status", self._handle_status)
        return app

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        # Collecting reads the counters the hooks write on this thread, so it runs here;
        # formatting only reads the families collected, and with many label sets it is the
        # slow part (about 0.1 ms per HTTP label set), so it runs in a worker thread where the
        # event loop can take the GIL back every switch interval to accept connections.
        families = _Collected(list(self.registry.collect()))
        response = web.Response(body=await asyncio.to_thread(encoder, families))
        # Set as a header: aiohttp's content_type argument refuses parameters such as version.
        response.headers["Content-Type"] = content_type
        response.enable_compression()
        return response

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        problems = self.problems()
        if problems:
            return web.Response(status=503, text="; ".join(problems) + "\n")
        return web.Response(text="ok\n")

    async def _handle_status(self, request: web.Request) -> web.Response:
        body = json.dumps(self.status(), indent=2, sort_keys=True, default=str)
        return web.Response(text=body + "\n", content_type="application/json")
