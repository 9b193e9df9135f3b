"""Another fluxd host as far as the store can tell, and services on loopback addresses.

Tests that need an instance without a container run a plain TCP server on 127.0.0.1 and
register it through :class:`OtherHost` (its own :class:`~flux.store.etcd.EtcdStore` and lease),
for a service on a random loopback address (:func:`random_loopback_vip`); a fluxd run with
``-bridge lo`` then DNATs that address to its listener (:func:`rules_for`, :func:`listener_of`).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from flux.model import Host, HostRef, Instance, InstanceState, Service
from flux.store.etcd import EtcdStore
from tests.support.fluxd_process import chain_lines

__all__ = ["OtherHost", "listener_of", "random_loopback_vip", "rules_for"]

_T = TypeVar("_T")


def rules_for(chain: str, vip: str, target: str) -> list[str]:
    """The ``-A <chain>`` rules matching ``vip`` whose target is ``target`` (DNAT or REJECT)."""
    return [
        line
        for line in chain_lines(chain)
        if line.startswith(f"-A {chain} ") and f"-d {vip}/32 " in line and f"-j {target}" in line
    ]


def listener_of(chain: str, vip: str) -> tuple[str, int]:
    """Where the DNAT rule for ``vip`` sends connections: (listener IP, listener port)."""
    (rule,) = rules_for(chain, vip, "DNAT")
    found = re.search(r"--to-destination (\S+):(\d+)", rule)
    assert found is not None, rule
    return found.group(1), int(found.group(2))


def random_loopback_vip() -> str:
    return f"127.42.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"


class OtherHost:
    """Another fluxd host as far as the store can tell: its own EtcdStore and lease.

    The store runs on an event loop of its own, in a thread, so the tests stay synchronous
    and the lease is kept alive whatever the test thread is doing.
    """

    def __init__(self, endpoint: str, address: str = "127.0.0.2") -> None:
        # Not 127.0.0.1: fluxd's agent (host 127.0.0.1) removes leftovers of its own host.
        self.address = address
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.store = self.call(self._make_store(endpoint))
        self._lease = asyncio.run_coroutine_threadsafe(self.store.run_lease(30), self._loop)
        self.call(self.store.wait_lease())
        self.call(self.store.register_host(Host(address=address)))

    @staticmethod
    async def _make_store(endpoint: str) -> EtcdStore:
        return EtcdStore(endpoint)

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def add_service(self, name: str, address: str) -> None:
        self.call(self.store.add_service(name, Service(address=address, protocol="tcp")))

    def add_instance(self, service: str, name: str, address: str) -> None:
        instance = Instance(
            host=HostRef(address=self.address),
            address=address,
            labels={},
            state=InstanceState.LIVE,
        )
        self.call(self.store.add_instance(service, name, instance))

    def close(self) -> None:
        try:
            self.call(self.store.revoke_lease())
        finally:
            self._lease.cancel()
            try:
                self.call(self.store.close())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
                self._loop.close()
