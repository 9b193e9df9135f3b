"""flux.balancer.entrypoints: which service each published port serves (pure); and
flux.balancer.published's bookkeeping of bind failures, with listeners that never bind."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
from typing import cast

import pytest

from flux.balancer.entrypoints import EntryPoint, PortConflict, PublishClaim, resolve_entry_points
from flux.balancer.listener import Listener
from flux.balancer.pool import Pool
from flux.balancer.published import BIND_RETRY_BASE, PublishedPorts
from flux.model import HostRef, Instance, InstanceState, Service, ServiceInfo
from flux.store.base import ServiceUpdate


def test_a_claim_holds_the_published_port_and_the_live_instances_only() -> None:
    live = Instance(host=HostRef(address="10.0.0.2"), address="10.0.0.2:80", state="live")
    info = ServiceInfo(
        name="web",
        spec=Service(publish=8080, protocol="http"),
        created=7,
        instances={
            "a": live,
            "b": live.model_copy(update={"state": InstanceState.DRAINING}),
            "c": Instance(host=HostRef(address="10.0.0.2")),
        },
    )
    claim = PublishClaim.from_info(info)
    assert claim == PublishClaim(8080, "http", {"a": "10.0.0.2:80"}, 7)
    unpublished = ServiceInfo(name="vip", spec=Service(address="10.1.0.1:80"))
    assert PublishClaim.from_info(unpublished) is None


def test_the_first_created_service_holds_a_port_and_the_others_are_in_conflict() -> None:
    claims = {
        "late": PublishClaim(80, "http", created=30),
        "early": PublishClaim(80, "tcp", created=10),
        "same-revision-b": PublishClaim(443, "tcp", created=5),
        "same-revision-a": PublishClaim(443, "tcp", created=5),
        "alone": PublishClaim(8080, "http", created=99),
    }
    entries, conflicts = resolve_entry_points(claims)
    assert entries == {
        80: EntryPoint(80, "early", "tcp"),
        443: EntryPoint(443, "same-revision-a", "tcp"),
        8080: EntryPoint(8080, "alone", "http"),
    }
    assert conflicts == {
        "late": PortConflict("late", 80, "early"),
        "same-revision-b": PortConflict("same-revision-b", 443, "same-revision-a"),
    }
    assert str(conflicts["late"]) == "port 80 is also published by service early"
    # The holder goes: the next claimant takes the port.
    del claims["early"]
    entries, conflicts = resolve_entry_points(claims)
    assert entries[80] == EntryPoint(80, "late", "http") and "late" not in conflicts


class _Unbindable:
    """A listener whose port cannot be had (``code``) until ``free`` is set."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.free = False
        self.opened = 0
        self.closed = False

    def open(self) -> int:
        self.opened += 1
        if not self.free:
            raise OSError(self.code, os.strerror(self.code))
        return 8080

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("code", "state"), [(errno.EADDRINUSE, "busy"), (errno.EADDRNOTAVAIL, "failed")]
)
async def test_a_port_that_cannot_be_bound_is_logged_once_and_retried_with_backoff(
    code: int, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake = _Unbindable(code)
    made: list[EntryPoint] = []

    def make(entry: EntryPoint, pool: Pool) -> Listener:
        made.append(entry)
        return cast(Listener, fake)

    ports = PublishedPorts("127.0.0.9", make, clock=asyncio.get_running_loop().time,
                           rng=random.Random(1))  # fmt: skip
    info = ServiceInfo(name="web", spec=Service(publish=8080, protocol="http"))
    with caplog.at_level(logging.INFO, logger="flux.balancer"):
        ports.apply(ServiceUpdate({"web": info}, reset=True))
        status = ports.status()["web"]
        assert status["state"] == state and status["error"] == os.strerror(code)
        assert 0 < status["retry_in"] <= BIND_RETRY_BASE
        await asyncio.sleep(BIND_RETRY_BASE * 3.5)  # retries at 0.5 s, then 1 s later
        assert fake.opened == 3
        fake.free = True
        await asyncio.sleep(BIND_RETRY_BASE * 4.5)
    assert fake.opened == 4
    assert ports.status()["web"]["state"] == "listening"
    assert made == [EntryPoint(8080, "web", "http")] * 4
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        f"service web: cannot publish port 8080 on 127.0.0.9: {os.strerror(code)};"
        " trying again with backoff",
        "service web: published port 8080 on 127.0.0.9 (http) after 3 failed attempts",
    ]
    # Unpublished: closed, and nothing more is tried.
    ports.apply(ServiceUpdate({"web": None}))
    assert fake.closed and ports.status() == {}


async def test_a_new_proxy_protocol_reopens_the_published_port() -> None:
    made: list[EntryPoint] = []
    fake = _Unbindable(0)
    fake.free = True

    def make(entry: EntryPoint, pool: Pool) -> Listener:
        made.append(entry)
        return cast(Listener, fake)

    ports = PublishedPorts("127.0.0.9", make, clock=asyncio.get_running_loop().time,
                           rng=random.Random(1))  # fmt: skip
    for version in ("", "v1", "v1", "v2"):
        spec = Service(publish=5432, proxyProtocol=version)
        ports.apply(ServiceUpdate({"db": ServiceInfo(name="db", spec=spec)}))
    assert made == [
        EntryPoint(5432, "db", "tcp"),
        EntryPoint(5432, "db", "tcp", "v1"),
        EntryPoint(5432, "db", "tcp", "v2"),
    ]
    ports.close()
