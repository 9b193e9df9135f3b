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

``/status`` and its history (the README's "Status JSON" is the contract): the ``fluxd`` block
reads what the parts already keep (the store's endpoint, reachability and lease age, the
Docker watcher's last listing, the relay's threads and connections, the process's
descriptors); the ``services`` rows are joined by :func:`flux.metrics.status.service_rows`.
A second supervised component, ``metrics-history``, takes a sample every
:data:`~flux.metrics.history.INTERVAL` seconds into :class:`~flux.metrics.history.History`:
it reads the counters as a scrape does, on the event loop between two events, and adds nothing
to the connection path.  ``/status/history?since=T`` serves the ring (``&service=NAME``,
repeatable, only those services' records).  With
``?scope=cluster`` either one asks every other advertised fluxd for its own document and merges
(:mod:`flux.metrics.cluster`).  Every route is a GET: nothing here changes fluxd.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import resource
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from flux import __version__
from flux.agent.enrol import Container
from flux.metrics.cluster import HostAnswer, ask_hosts, merge
from flux.metrics.counters import FluxCollector, Metrics
from flux.metrics.history import History, InstanceP99, tally
from flux.metrics.status import service_rows
from flux.metrics.statuspage import add_page_routes, compress
from flux.model import Instance, RecordError, ServiceInfo
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
_JSON_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class MetricsListenError(OSError):
    """The metrics listener could not be opened; the message is one line for people."""


class BalancerView(Protocol):
    """What ``/healthz`` and ``/status`` read from the balancer."""

    @property
    def ready(self) -> bool: ...

    @property
    def infos(self) -> Mapping[str, ServiceInfo]: ...

    def status(self) -> Mapping[str, Any]: ...

    def engine_status(self) -> Mapping[str, int]: ...


class AgentView(Protocol):
    """What ``/healthz``, ``/status`` and ``flux_instances`` read from the agent."""

    @property
    def docker_connected(self) -> bool: ...

    @property
    def instances(self) -> Mapping[tuple[str, str], Instance]: ...

    @property
    def last_reconcile(self) -> float | None: ...

    @property
    def containers(self) -> Mapping[str, Container]: ...


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
        history: History | None = None,
        clock: Callable[[], float] = time.time,
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
        self.history = history if history is not None else History()
        self._clock = clock
        self.started_at = clock()
        self._targets_error: str | None = None  # the last failure to read the targets
        self.instance_p99 = InstanceP99()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.advertised: str | None = None

    # -- the plug-in surface the daemon uses ------------------------------------------------

    def components(self) -> Sequence[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """The HTTP server and the history's sampler, when there is a listen address."""
        if self._listen is None:
            return []
        return [("metrics", self.serve), ("metrics-history", self.sample_forever)]

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

    async def sample_forever(self) -> None:
        """Take a history sample now and every ``interval`` seconds after, until cancelled."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            self.sample()
            # On a schedule, not "interval after the last one": a slow sample does not make
            # the samples drift apart.
            due = max(due + self.history.interval, loop.time())
            await asyncio.sleep(due - loop.time())

    def sample(self) -> None:
        """Take one history sample of the services known now, and refresh a slice of the
        instances' p99."""
        services: dict[str, str | None] = {}
        if self._balancer is not None:
            services = {
                name: str(info.spec.effective_protocol)
                for name, info in self._balancer.infos.items()
            }
        self.history.record(self._clock(), tally(self.metrics, services))
        self.instance_p99.refresh(self.metrics)

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
        now = self._clock()
        balancer = self._balancer.status() if self._balancer is not None else None
        document: dict[str, Any] = {
            "host": self._host_address,
            "version": self._version,
            "healthy": not problems,
            "problems": problems,
            "fluxd": self.fluxd_status(now),
            "services": self._services(now, balancer["services"] if balancer else {}),
        }
        if self._balancer is not None and balancer is not None:
            document["balancer"] = {"ready": self._balancer.ready, **balancer}
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

    def fluxd_status(self, now: float) -> dict[str, Any]:
        """``/status``'s ``fluxd`` block: this process and what it depends on."""
        store = self._store
        engine = self._balancer.engine_status() if self._balancer is not None else None
        fds_used, fds_budget = _descriptors()
        return {
            "version": self._version,
            "started_at": self.started_at,
            "uptime": max(0.0, now - self.started_at),
            "host_ip": self._host_address,
            "now": now,
            "etcd": {
                "reachable": store is not None and store.reachable,
                "endpoint": None if store is None else store.endpoint,
                "lease_age": None if store is None else store.lease_age(),
            },
            "docker": {
                "connected": self._agent is not None and self._agent.docker_connected,
                "last_reconcile": None if self._agent is None else self._agent.last_reconcile,
            },
            "engine": {
                "threads": 0 if engine is None else engine["threads"],
                "open_connections": 0 if engine is None else engine["open_connections"],
                "shard_accepted": [] if engine is None else engine["shard_accepted"],
                "steering": None if engine is None else engine["steering"],
                "steering_off": None if engine is None else engine["steering_off"],
                "fds_used": fds_used,
                "fds_budget": fds_budget,
            },
        }

    def _services(
        self, now: float, balancer_services: Mapping[str, Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """``/status``'s ``services`` rows (see :mod:`flux.metrics.status`)."""
        balancer = self._balancer
        agent = self._agent
        return service_rows(
            balancer_services,
            balancer.infos if balancer is not None else {},
            agent.instances if agent is not None else {},
            {cid: c.image for cid, c in agent.containers.items()} if agent is not None else {},
            self.history,
            self.instance_p99.values,
            now=now,
        )

    async def cluster(
        self, path: str, params: Sequence[tuple[str, str]], own: dict[str, Any]
    ) -> Any:
        """Every host's answer to ``path``: the others asked over HTTP (from their advertised
        targets), this one's ``own`` document from memory (see :mod:`flux.metrics.cluster`)."""
        targets: dict[str, str] = {}
        answers: dict[str, HostAnswer] = {}
        if self._store is not None:
            try:
                targets = await self._store.get_prometheus_targets()
            except StoreError as exc:
                # Once per outage, not at every refresh of a page showing the cluster.
                if str(exc) != self._targets_error:
                    log.warning("cluster status: cannot read the advertised endpoints: %s", exc)
                self._targets_error = str(exc)
            else:
                self._targets_error = None
        targets.pop(self._host_address, None)
        answers.update(await ask_hosts(targets, path, params))
        endpoint = self.advertised
        if endpoint is None and self._listen is not None and self.port is not None:
            endpoint = _show((self._listen[0] or self._host_address, self.port))
        answers[self._host_address] = HostAnswer(endpoint or "", document=own)
        return merge(self._clock(), answers)

    def _application(self) -> web.Application:
        app = web.Application()
        add_page_routes(app.router)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/status", self._handle_status)
        app.router.add_get("/status/history", self._handle_history)
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
        compress(request, response)
        return response

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        problems = self.problems()
        if problems:
            return web.Response(status=503, text="; ".join(problems) + "\n")
        return web.Response(text="ok\n")

    async def _handle_status(self, request: web.Request) -> web.Response:
        scope = _scope(request)
        document = self.status()
        if scope == "cluster":
            return _json(request, await self.cluster("/status", [], document))
        return _json(request, document)

    async def _handle_history(self, request: web.Request) -> web.StreamResponse:
        scope = _scope(request)
        text = request.query.get("since")
        since = None
        if text is not None:
            try:
                since = float(text)
            except ValueError:
                since = math.nan
            if not math.isfinite(since):
                raise web.HTTPBadRequest(
                    text=f"since must be a time in Unix seconds, got {text[:40]!r}\n"
                )
        names = request.query.getall("service", [])
        services = set(names) if names else None
        if scope == "cluster":
            document = self.history.document(self._clock(), since, services)
            params = [("since", text)] if text is not None else []
            params += [("service", name) for name in names]
            return _json(request, await self.cluster("/status/history", params, document))
        return await self._stream_history(request, since, services)

    async def _stream_history(
        self, request: web.Request, since: float | None, services: set[str] | None
    ) -> web.StreamResponse:
        """The history document written sample by sample, the event loop free in between:
        the whole ring of a thousand services is tens of MB of JSON, seconds to build."""
        response = web.StreamResponse(headers=_JSON_HEADERS)
        response.content_type = "application/json"
        if request.method == "HEAD":  # the headers alone: a written body would break the stream
            await response.prepare(request)
            await response.write_eof()
            return response
        compress(request, response)
        await response.prepare(request)
        head = json.dumps(
            {"interval": self.history.interval, "capacity": self.history.capacity,
             "now": self._clock()},
            separators=(",", ":"),
        )  # fmt: skip
        # The head's object stays open for the samples: '{"interval":5.0,...' + ',"samples":['
        await response.write(head[:-1].encode() + b',"samples":[')
        for i, sample in enumerate(self.history.iter_samples(since, services)):
            text = json.dumps(sample, separators=(",", ":"), default=str)
            await response.write((b"," if i else b"") + text.encode())
            await asyncio.sleep(0)
        await response.write(b"]}\n")
        await response.write_eof()
        return response


def _scope(request: web.Request) -> str:
    """The ``scope`` asked for: ``host`` (the default) or ``cluster``; 400 for anything else."""
    scope = request.query.get("scope", "host")
    if scope not in ("host", "cluster"):
        raise web.HTTPBadRequest(text=f"scope must be host or cluster, got {scope[:40]!r}\n")
    return scope


def _json(request: web.Request, document: Any) -> web.Response:
    """A JSON answer (compact: a thousand services are megabytes), gzip-compressed when the
    client takes it."""
    body = json.dumps(document, separators=(",", ":"), default=str)
    response = web.Response(
        text=body + "\n", content_type="application/json", headers=_JSON_HEADERS
    )
    compress(request, response)
    return response


def _descriptors() -> tuple[int | None, int | None]:
    """Descriptors this process holds now, and the most it may (RLIMIT_NOFILE's soft
    limit); None where the system cannot tell."""
    try:
        used: int | None = len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        used = None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return used, None if soft == resource.RLIM_INFINITY else soft
