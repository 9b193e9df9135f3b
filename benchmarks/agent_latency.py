"""How fast the agent reflects Docker in etcd, and what a full reconcile costs.

Two measurements against the real Docker engine and a private etcd (started here on free
loopback ports, removed at the end), with the agent in ``local`` mode on host IP 127.0.0.1:

1. **Start latency**: containers are created first, then started one at a time through the
   Docker API; the time from the start request to the instance appearing in etcd (seen by a
   second client's watch) is recorded, and the part of it after the engine's ``start`` event
   (the agent's share: event delivery, inspect, enrol, etcd write, watch delivery).
   Reported: p50, p90, p99 and max.
2. **Reconcile cost**: with ``--running`` containers enrolled and nothing changing, a full
   reconcile (list + inspect every container, re-enrol, read this host's instances from etcd
   and compare) is requested several times.  Reported: wall time per reconcile, the agent's
   store writes and etcd's revision before and after (both must not move).

Containers run busybox ``sleep`` (the test image, built if missing), carry the label
``flux-bench=<random>``, publish port 80 on 127.0.0.1 only, and are removed at the end, also on
failure or Ctrl-C.  Every wait is bounded.

Run as root from the repository: ``.venv/bin/python benchmarks/agent_latency.py
[--containers 100] [--running 200] [--reconciles 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiodocker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the test helpers: the private etcd and the test image

from tests.support.docker_images import ensure_busybox_image  # noqa: E402
from tests.support.etcd_server import EtcdServer  # noqa: E402

from flux.agent.agent import Agent  # noqa: E402
from flux.model import Rule, Service  # noqa: E402
from flux.store.etcd import EtcdStore  # noqa: E402

WAIT = 10.0  # the longest any single step may take
SERVICE = "bench"


class Visibility:
    """When each instance of the service first appeared in etcd, from a watch.

    Times are wall-clock (``time.time()``), comparable with the Docker engine's event times
    because the engine runs on this machine.
    """

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self.seen: dict[str, float] = {}
        self._changed = asyncio.Event()

    async def run(self) -> None:
        async for update in self._store.watch_services(instances=True):
            now = time.time()
            info = update.services.get(SERVICE)
            if info is None:
                continue
            for instance_id in info.instances:
                self.seen.setdefault(instance_id, now)
            self._changed.set()

    async def wait_for(self, instance_id: str, timeout: float = WAIT) -> float:
        async with asyncio.timeout(timeout):
            while instance_id not in self.seen:
                self._changed.clear()
                await self._changed.wait()
        return self.seen[instance_id]


async def create(docker: aiodocker.Docker, image: str, tag: str) -> Any:
    return await docker.containers.create(
        config={
            "Image": image,
            "Cmd": ["sleep", "600"],
            "Labels": {"flux-bench": tag},
            "ExposedPorts": {"80/tcp": {}},
            "HostConfig": {
                "Init": True,
                "PortBindings": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
            },
        }
    )


async def bounded(limit: int, jobs: list[Any]) -> list[Any]:
    slots = asyncio.Semaphore(limit)

    async def one(job: Any) -> Any:
        async with slots:
            return await job

    return await asyncio.gather(*(one(job) for job in jobs))


async def start_events(docker: aiodocker.Docker, tag: str, times: dict[str, float]) -> None:
    """Record the engine's own time of each container's ``start`` event."""
    filters = {"label": [f"flux-bench={tag}"], "event": ["start"], "type": ["container"]}
    subscriber = docker.events.subscribe(filters=json.dumps(filters))
    while (event := await subscriber.get()) is not None:
        times.setdefault(event["Actor"]["ID"], int(event["timeNano"]) / 1e9)


def summary(values: list[float]) -> dict[str, float]:
    """Percentiles in milliseconds."""
    return {
        "p50": round(1000 * quantile(values, 0.50), 1),
        "p90": round(1000 * quantile(values, 0.90), 1),
        "p99": round(1000 * quantile(values, 0.99), 1),
        "max": round(1000 * max(values), 1),
    }


def revision(etcd: EtcdServer) -> int:
    status = json.loads(etcd.etcdctl("endpoint", "status", "-w", "json"))
    return int(status[0]["Status"]["header"]["revision"])


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def measure(args: argparse.Namespace, etcd: EtcdServer, image: str) -> dict[str, Any]:
    tag = f"b{secrets.token_hex(6)}"
    docker = aiodocker.Docker()
    agent_store = EtcdStore(etcd.endpoint)
    reader = EtcdStore(etcd.endpoint)
    tasks: list[asyncio.Task[None]] = []
    try:
        await reader.add_service(SERVICE, Service(instancePort=80))
        await reader.set_rule(SERVICE, "default", Rule(selector={"flux-bench": tag}))
        tasks.append(asyncio.create_task(agent_store.run_lease(30)))
        agent = Agent(agent_store, host_ip="127.0.0.1", network_mode="local",
                      reconcile_interval=3600)
        tasks.append(asyncio.create_task(agent.run()))
        visibility = Visibility(reader)
        tasks.append(asyncio.create_task(visibility.run()))
        event_times: dict[str, float] = {}
        tasks.append(asyncio.create_task(start_events(docker, tag, event_times)))
        async with asyncio.timeout(WAIT):
            while not agent.in_sync:
                await asyncio.sleep(0.01)

        # 1. start latency, one container at a time.
        created = await bounded(8, [create(docker, image, tag) for _ in range(args.containers)])
        latencies, agent_share = [], []
        for container in created:
            started = time.time()
            await container.start()
            visible = await visibility.wait_for(container.id)
            latencies.append(visible - started)
            if container.id in event_times:
                agent_share.append(visible - event_times[container.id])

        # 2. reconcile cost with --running containers, nothing changing.
        extra = max(0, args.running - len(created))
        more = await bounded(8, [create(docker, image, tag) for _ in range(extra)])
        await bounded(8, [container.start() for container in more])
        everyone = {c.id for c in [*created, *more]}
        async with asyncio.timeout(60):
            while not (everyone <= visibility.seen.keys() and agent.in_sync):
                await asyncio.sleep(0.05)
        writes_before, revision_before = agent.publisher.writes, revision(etcd)
        durations = []
        for _ in range(args.reconciles):
            syncs = agent.publisher.syncs
            started = time.perf_counter()
            assert agent.docker.request_reconcile(), "the Docker watcher is not connected"
            async with asyncio.timeout(WAIT * 3):
                while agent.publisher.syncs == syncs or not agent.in_sync:
                    await asyncio.sleep(0.001)
            durations.append(time.perf_counter() - started)
        return {
            "containers_started": len(latencies),
            "start_request_to_etcd_ms": summary(latencies),
            "start_event_to_etcd_ms": summary(agent_share),
            "running_containers": len(everyone),
            "reconcile_ms": {
                "median": round(1000 * statistics.median(durations), 1),
                "max": round(1000 * max(durations), 1),
                "runs": len(durations),
            },
            "reconcile_store_writes": agent.publisher.writes - writes_before,
            "reconcile_etcd_revisions": revision(etcd) - revision_before,
        }
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        leftovers = await docker.containers.list(
            all=True, filters=json.dumps({"label": [f"flux-bench={tag}"]})
        )
        await bounded(8, [c.delete(force=True) for c in leftovers])
        with contextlib.suppress(Exception):
            await agent_store.revoke_lease()
        await agent_store.close()
        await reader.close()
        await docker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=100, help="containers to time")
    parser.add_argument("--running", type=int, default=200, help="containers during reconciles")
    parser.add_argument("--reconciles", type=int, default=5, help="reconciles to time")
    args = parser.parse_args()
    if not (1 <= args.containers <= 1000 and 1 <= args.running <= 1000):
        parser.error("--containers and --running must be between 1 and 1000")
    if not 1 <= args.reconciles <= 100:
        parser.error("--reconciles must be between 1 and 100")
    image = ensure_busybox_image()
    with tempfile.TemporaryDirectory(prefix="flux-bench-etcd-") as scratch:
        etcd = EtcdServer(Path(scratch) / "data")
        etcd.start()
        try:
            results = asyncio.run(measure(args, etcd, image))
        finally:
            etcd.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
