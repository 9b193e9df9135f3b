"""A fluxd with published ports on a random loopback address, and what tests ask of it.

Shared by the tests of published ports (tests/test_published.py) and of what instances learn
of their clients (tests/test_forwarded.py): each test runs its own fluxd (``-host-ip 127.0.0.1
-bridge lo``, its own chain, metrics on a free loopback port) with ``-publish-ip`` on a random
loopback address (127.44.0.0/16), so a published port is never bound to anything but loopback.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from flux.model import Service
from tests.support.fluxd_process import HOST, Fluxd, http_get, wait_until
from tests.support.other_host import OtherHost

__all__ = ["Published", "free_port", "publish_ip", "start_published"]


def free_port(ip: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


def publish_ip() -> str:
    return f"127.44.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"


class Published:
    """A fluxd with published ports on ``ip``, and what the tests ask of it."""

    def __init__(
        self, daemon: Fluxd, ip: str, metrics_port: int, host: OtherHost, *, engine: bool = True
    ) -> None:
        self.daemon = daemon
        self.engine = engine  # the splice engine relays (else -relay python)
        self.ip = ip
        self.metrics_port = metrics_port
        self.host = host

    def service(self, name: str, **spec: object) -> None:
        self.host.call(self.host.store.add_service(name, Service.model_validate(spec)))

    def remove(self, name: str) -> None:
        self.host.call(self.host.store.remove_service(name))

    def status(self) -> dict[str, object]:
        document = json.loads(http_get(f"http://{HOST}:{self.metrics_port}/status"))
        services: dict[str, object] = document["balancer"]["services"]
        return services

    def published(self, name: str) -> dict[str, object]:
        entry = self.status().get(name)
        return {} if not isinstance(entry, dict) else entry.get("published", {})

    def wait_state(self, name: str, state: str, timeout: float = 15.0) -> dict[str, object]:
        wait_until(
            lambda: self.published(name).get("state") == state
            or self.daemon.process.poll() is not None,
            timeout,
            f"service {name}'s published port to be {state}",
        )
        assert self.daemon.process.poll() is None, "\n".join(self.daemon.lines[-30:])
        return self.published(name)

    def total(self, name: str, **labels: str) -> float:
        text = http_get(f"http://{HOST}:{self.metrics_port}/metrics")
        wanted = set(labels.items())
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and wanted <= set(sample.labels.items())
        )

    def get(self, port: int, path: str = "/", ip: str | None = None) -> str:
        return http_get(f"http://{ip or self.ip}:{port}{path}")


def start_published(
    fluxd_factory: Callable[..., Fluxd], host: OtherHost, extra: tuple[str, ...] = ()
) -> Published:
    """A fluxd publishing on a random loopback address (``extra``: more flags), running."""
    ip = publish_ip()
    metrics_port = free_port()
    daemon = fluxd_factory(
        "-host-ttl", "10", "-listen-prometheus", f"{HOST}:{metrics_port}", "-publish-ip", ip,
        *extra,
    )
    daemon.wait_logged("installed (nat and filter)")
    return Published(daemon, ip, metrics_port, host, engine="python" not in extra)
