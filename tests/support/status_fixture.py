"""Generated ``/status`` documents in the full shape (README "The status page"), and a server.

:func:`status_document` makes a host's document with ``services`` services of
``instances_per`` instances each, every field filled, deterministic for a seed; ``figures``
shifts the rates so a later document differs from an earlier one in every figure, as fluxd's
would from one refresh to the next.  :func:`history_document` makes the matching
``/status/history``.  :class:`FixtureServer` serves the page's real files (the same routes as
fluxd, :func:`flux.metrics.statuspage.add_page_routes`) with these documents on 127.0.0.1
(compact and gzip-compressed as fluxd sends them, the history's ``since`` and ``service``
applied), in a thread with its own event loop, so a synchronous Selenium test can change what
it serves or make it fail.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from typing import Any

from aiohttp import web

from flux.metrics.statuspage import add_page_routes, compress

__all__ = ["ENGINE_STATUS", "FixtureServer", "history_document", "status_document"]

# What a fake balancer's engine_status() answers in the tests of /status and of the metrics
# endpoint: two engine threads, one connection, each thread's accepts, steered by CPU.
ENGINE_STATUS: dict[str, Any] = {
    "threads": 2,
    "open_connections": 1,
    "shard_accepted": [5, 7],
    "steering": [[0], [1]],
    "steering_off": None,
}

STATES = ("live", "live", "live", "backoff", "draining", "paused", "unhealthy", "no-address")


def _figures(rng: random.Random, scale: float, http: bool) -> dict[str, Any]:
    return {
        "conn_rate": round(rng.uniform(0, 50) * scale, 3),
        "req_rate": {code: round(rng.uniform(0, 100) * scale * weight, 3)
                     for code, weight in (("2xx", 1), ("3xx", 0.05), ("4xx", 0.1), ("5xx", 0.02))}
        if http else None,
        "p50": round(rng.uniform(0.001, 0.02), 5) if http else None,
        "p99": round(rng.uniform(0.02, 0.5), 5) if http else None,
        "bytes_rate": round(rng.uniform(0, 2e6) * scale, 1),
        "connect_failures_rate": round(rng.uniform(0, 0.5), 3),
        "retries_rate": round(rng.uniform(0, 0.5), 3),
    }  # fmt: skip


def status_document(
    services: int,
    instances_per: int,
    *,
    seed: int = 1,
    figures: float = 1.0,
    now: float = 1_800_000_000.0,
    hosts: int = 3,
) -> dict[str, Any]:
    """A full ``/status`` of host 10.0.0.1 (instances spread over ``hosts`` hosts)."""
    rng = random.Random(seed)
    listed = []
    for number in range(services):
        name = f"svc-{number:04d}"
        http = number % 2 == 0
        instances = []
        for index in range(instances_per):
            state = STATES[(number + index) % len(STATES)]
            instances.append({
                "name": f"{name}-i{index}",
                "host": f"10.0.0.{1 + index % hosts}",
                "address": None if state == "no-address" else f"10.1.{number % 250}.{index}:8080",
                "state": state,
                "reason": "connect refused" if state in ("backoff", "unhealthy") else None,
                "retry_at": now + 12.5 if state == "backoff" else None,
                "container_id": f"{number:06x}{index:06x}" + "ab" * 26,
                "image": f"registry.example/team/{name}:v{index}",
                "active": rng.randrange(50),
                "failures": rng.randrange(3),
                "req_rate": round(rng.uniform(0, 20) * figures, 3) if http else None,
                "p99": round(rng.uniform(0.01, 0.3), 5) if http else None,
            })  # fmt: skip
        by_state: dict[str, int] = {}
        for instance in instances:
            by_state[instance["state"]] = by_state.get(instance["state"], 0) + 1
        listed.append({
            "name": name,
            "address": f"10.128.{number // 250}.{number % 250}:80",
            "protocol": "http" if http else "tcp",
            "published": [{"port": 8000 + number, "hostnames": [f"{name}.example"],
                           "state": "listening", "reason": None}] if number % 5 == 0 else [],
            "state": "forwarding" if by_state.get("live") else "rejecting",
            "reason": None,
            "instances_by_state": by_state,
            "connections_open": sum(instance["active"] for instance in instances),
            "figures": {"now": _figures(rng, figures, http), "5m": _figures(rng, figures, http)},
            "instances": instances,
        })  # fmt: skip
    return {
        "host": "10.0.0.1",
        "version": "0.1.0",
        "healthy": True,
        "problems": [],
        "fluxd": {
            "version": "0.1.0", "started_at": now - 93_784, "uptime": 93_784.0,
            "host_ip": "10.0.0.1", "now": now,
            "etcd": {"reachable": True, "endpoint": "http://10.0.0.9:2379", "lease_age": 4.2},
            "docker": {"connected": True, "last_reconcile": now - 31},
            "engine": {"threads": 2, "open_connections": 1234, "fds_used": 2540,
                       "fds_budget": 65536},
        },
        "services": listed,
    }  # fmt: skip


def history_document(
    document: dict[str, Any],
    samples: int = 180,
    *,
    interval: float = 5.0,
    since: float | None = None,
) -> dict[str, Any]:
    """``/status/history`` for ``document``'s services: ``samples`` samples up to its ``now``."""
    now = float(document["fluxd"]["now"])
    rng = random.Random(7)
    kept = []
    for index in range(samples):
        t = now - (samples - 1 - index) * interval
        if since is not None and t <= since:
            continue
        wave = 1 + 0.8 * ((index % 36) / 36)
        per_service = {}
        for service in document["services"]:
            http = service["protocol"] == "http"
            per_service[service["name"]] = {
                **_figures(rng, wave, http),
                "connections_open": service["connections_open"],
            }
        kept.append({"t": t, "services": per_service})
    return {"interval": interval, "capacity": 180, "now": now, "samples": kept}


class FixtureServer:
    """The page and fixed JSON documents on 127.0.0.1 (an ephemeral port), in a thread.

    ``history`` defaults to one without samples; ``failing`` makes the JSON routes answer 503.
    """

    def __init__(self, document: dict[str, Any], history: dict[str, Any] | None = None) -> None:
        self.document: dict[str, Any] | None = document
        self.history = history if history is not None else {"interval": 5.0, "samples": []}
        self.failing = False
        self.requests: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FixtureServer:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the fixture server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        add_page_routes(app.router)
        app.router.add_get("/status", self._status)
        app.router.add_get("/status/history", self._history)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _json(self, request: web.Request, document: dict[str, Any] | None) -> web.Response:
        if self.failing or document is None:
            return web.Response(status=503, text="gone\n")
        # Serialized and compressed as fluxd does, so sizes measured here are fluxd's.
        body = json.dumps(document, separators=(",", ":"))
        response = web.Response(text=body + "\n", content_type="application/json")
        compress(request, response)
        return response

    async def _status(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        return self._json(request, self.document)

    async def _history(self, request: web.Request) -> web.Response:
        """The history as fluxd answers it: ``since`` and ``service`` (repeatable) apply."""
        self.requests.append(request.path_qs)
        since = request.query.get("since")
        names = set(request.query.getall("service", []))
        samples = self.history.get("samples", [])
        if since is not None:
            samples = [sample for sample in samples if sample["t"] > float(since)]
        if names:
            samples = [
                {**sample, "services": {name: record for name, record
                                        in sample["services"].items() if name in names}}
                for sample in samples
            ]  # fmt: skip
        return self._json(request, {**self.history, "samples": samples})
