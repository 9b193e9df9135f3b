"""The agent: running containers in, this host's instance records out.

Theory of operation
-------------------
Three long-running components share one :class:`~flux.agent.enrol.Enroller`:

- ``agent-docker``: the :class:`~flux.agent.docker.DockerWatcher` feeds container snapshots and
  deltas into the enroller (it reconnects and resyncs by itself);
- ``agent-services``: the store's service watch (rules included) feeds service snapshots and
  deltas; a service or rule change re-evaluates every known container, a removed service or
  rule takes its instances with it.  If the watch fails, the supervisor restarts it, and the new
  watch starts with a fresh snapshot;
- ``agent-publisher``: the :class:`~flux.agent.publish.Publisher` writes what the enroller
  decided.

The enroller is synchronous and the watchers call it directly, so its state is always current.
The publisher does not consume a queue of updates: it is woken up and publishes the *current*
wanted state of the instances that changed (``dirty``) or, after any reset, of all of them.
So a slow or failed store never makes updates pile up, and a publisher restarted after a store
error (its first step is a full sync against the store) cannot miss anything: the original
needed a "reset request" channel back to its sources for this (reference §3.5).

Each component is a coroutine factory (:meth:`Agent.components`) that a
:class:`~flux.supervise.Supervisor` restarts with backoff when it fails; :meth:`Agent.run` runs
the three under a supervisor of its own for callers that do not have one.  The agent neither
registers the host nor holds the lease: the daemon does both, and instances written before a
lease is granted are kept by the store and written on it once it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from flux.agent.docker import AiodockerClient, DockerClient, DockerWatcher
from flux.agent.enrol import Container, ContainerUpdate, Enroller, InstanceKey, InstanceUpdate
from flux.agent.publish import Publisher
from flux.model import Instance
from flux.store.base import ServiceUpdate, Store, StoreUnavailable
from flux.supervise import Supervisor

__all__ = ["Agent", "run_agent"]

log = logging.getLogger("flux.agent")


class Agent:
    """Enrols this host's containers as service instances and keeps the store in step.

    It is a daemon plugin (``flux.daemon.Plugin``): :meth:`components` for the daemon's
    supervisor, and no-op shutdown steps.  The daemon registers the host and holds the lease.
    """

    name = "agent"

    def __init__(
        self,
        store: Store,
        docker_factory: Callable[[], DockerClient] = AiodockerClient,
        *,
        host_ip: str,
        network_mode: str = "local",
        reconcile_interval: float = 60.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
    ) -> None:
        self._store = store
        self.enroller = Enroller(host_ip, network_mode)
        self.publisher = Publisher(store, self.enroller.host_ip)
        self.docker = DockerWatcher(
            docker_factory,
            reconcile_interval=reconcile_interval,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
        )
        self._backoff = (backoff_initial, backoff_max)
        self._wake = asyncio.Event()
        self._reset_pending = True
        self._dirty: set[InstanceKey] = set()
        self._published = asyncio.Event()

    # -- what the daemon (metrics, /healthz, /status) can look at -------------------------------

    @property
    def instances(self) -> Mapping[InstanceKey, Instance]:
        """The instances this host should have now."""
        return self.enroller.instances

    @property
    def docker_connected(self) -> bool:
        """True while the Docker event stream is up and its snapshot was taken."""
        return self.docker.connected

    @property
    def last_reconcile(self) -> float | None:
        """Unix time of the last full listing of Docker's containers (None before one)."""
        return self.docker.last_reconcile

    @property
    def containers(self) -> Mapping[str, Container]:
        """This host's running containers by ID, as last reported by Docker."""
        return self.docker.containers

    @property
    def in_sync(self) -> bool:
        """True when the store holds what the enroller wants (as far as we know)."""
        return (
            self.enroller.ready
            and not self._reset_pending
            and not self._dirty
            and self.publisher.syncs > 0
        )

    async def wait_synced(self) -> None:
        """Return once the store holds every current instance (useful in tests)."""
        while not self.in_sync:
            self._published.clear()
            await self._published.wait()

    # -- components -------------------------------------------------------------------------------

    def components(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """The agent's components by name, for a supervisor to run and restart."""
        return [
            ("agent-docker", self.watch_docker),
            ("agent-services", self.watch_services),
            ("agent-publisher", self.publish),
        ]

    async def run(self) -> None:
        """Run every component under a supervisor until cancelled."""
        supervisor = Supervisor(initial_backoff=self._backoff[0], max_backoff=self._backoff[1])
        for name, factory in self.components():
            supervisor.start(name, factory)
        try:
            await asyncio.Event().wait()
        finally:
            await supervisor.stop()

    # The daemon's shutdown steps (flux.daemon.Plugin): the agent holds no listeners or rules,
    # and its records go with the lease, which the daemon revokes.

    async def stop_accepting(self) -> None:
        """Nothing to do: the agent accepts no connections."""

    async def remove_rules(self) -> None:
        """Nothing to do: the agent installs no iptables rules."""

    async def drain(self, grace: float) -> None:
        """Nothing to do: the agent has no in-flight work worth waiting for."""

    async def watch_docker(self) -> None:
        """Feed Docker's containers into the enroller (reconnects by itself)."""
        await self.docker.run(self._on_containers)

    async def watch_services(self) -> None:
        """Feed the store's services and rules into the enroller."""
        async for update in self._store.watch_services(rules=True):
            self._on_services(update)
        raise StoreUnavailable("the service watch ended")

    async def publish(self) -> None:
        """Write what the enroller decides; the first step is always a full sync."""
        self._reset_pending = True
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.enroller.ready:
                continue
            try:
                if self._reset_pending:
                    self._reset_pending = False
                    self._dirty.clear()
                    # A copy: the enroller keeps changing while the writes are awaited, and
                    # those changes are marked dirty and published next.
                    await self.publisher.sync(dict(self.enroller.instances))
                elif self._dirty:
                    keys, self._dirty = self._dirty, set()
                    wanted = self.enroller.instances
                    await self.publisher.apply({key: wanted.get(key) for key in keys})
            except BaseException:
                self._reset_pending = True
                raise
            if self.in_sync:
                self._published.set()

    # -- plumbing ---------------------------------------------------------------------------------

    def _on_containers(self, update: ContainerUpdate) -> None:
        self._queue(self.enroller.update_containers(update))

    def _on_services(self, update: ServiceUpdate) -> None:
        self._queue(self.enroller.update_services(update))

    def _queue(self, update: InstanceUpdate | None) -> None:
        if update is None:
            return
        if update.reset:
            self._reset_pending = True
            self._dirty.clear()
        else:
            self._dirty.update(update.instances)
        self._wake.set()


async def run_agent(
    store: Store,
    docker_factory: Callable[[], DockerClient] = AiodockerClient,
    *,
    host_ip: str,
    network_mode: str = "local",
    reconcile_interval: float = 60.0,
) -> None:
    """Run an :class:`Agent` until cancelled."""
    agent = Agent(
        store,
        docker_factory,
        host_ip=host_ip,
        network_mode=network_mode,
        reconcile_interval=reconcile_interval,
    )
    await agent.run()
