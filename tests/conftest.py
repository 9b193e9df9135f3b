"""Shared fixtures: the real parts the suite runs against.

etcd: one private member per test session, on free loopback ports (``etcd_server``); each test
that uses ``etcd`` starts from an empty keyspace.  ``fluxd_factory`` starts fluxd processes
(tests/support/fluxd_process.py) against it; ``other_host`` registers services and instances as
another host would (tests/support/other_host.py).  A missing etcd fails the tests that need it
(never skips): `make test` installs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.etcd_server import EtcdServer
from tests.support.fluxd_process import Fluxd
from tests.support.other_host import OtherHost


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> EtcdServer:
    """The session's etcd, running and empty."""
    etcd_server.start()
    etcd_server.wipe()
    return etcd_server


@pytest.fixture
def fluxd_factory(etcd: EtcdServer) -> Iterator[Callable[..., Fluxd]]:
    """Start fluxd processes against the session's etcd; each is stopped and cleaned up after."""
    started: list[Fluxd] = []

    def make(*args: str, endpoint: str | None = None, chain: str | None = None) -> Fluxd:
        daemon = Fluxd(endpoint or etcd.endpoint, *args, chain=chain)
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def other_host(etcd: EtcdServer) -> Iterator[OtherHost]:
    """Another host (127.0.0.2) in the session's etcd, with its own lease; revoked after."""
    host = OtherHost(etcd.endpoint)
    try:
        yield host
    finally:
        host.close()
