"""flux.balancer.entrypoints: which service each published port serves (pure); and
flux.balancer.published's bookkeeping of bind failures, with listeners that never bind."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import socket
from typing import cast

import pytest
from pydantic import ValidationError

from flux.balancer.entrypoints import (
    EntryPoint,
    HostRoutes,
    PortConflict,
    PublishClaim,
    request_host,
    resolve_entry_points,
)
from flux.balancer.listener import Listener
from flux.balancer.pool import Pool
from flux.balancer.published import BIND_RETRY_BASE, PublishedPorts
from flux.model import (
    HostRef,
    Instance,
    InstanceState,
    RecordError,
    Service,
    ServiceInfo,
    normalise_hostname,
)
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
        "late": PortConflict("late", 80, "early", protocol="tcp"),
        "same-revision-b": PortConflict("same-revision-b", 443, "same-revision-a"),
    }
    assert str(conflicts["same-revision-b"]) == (
        "port 443 is also published by service same-revision-a"
    )
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
        EntryPoint(5432, "db", "tcp", proxy_protocol="v1"),
        EntryPoint(5432, "db", "tcp", proxy_protocol="v2"),
    ]
    ports.close()


async def test_forwarded_turned_on_or_off_reopens_the_published_port() -> None:
    made: list[EntryPoint] = []
    fake = _Unbindable(0)
    fake.free = True

    def make(entry: EntryPoint, pool: Pool) -> Listener:
        made.append(entry)
        return cast(Listener, fake)

    ports = PublishedPorts("127.0.0.9", make, clock=asyncio.get_running_loop().time,
                           rng=random.Random(1))  # fmt: skip
    for forwarded in (False, True, True, False):
        spec = Service(publish=8080, protocol="http", forwarded=forwarded)
        ports.apply(ServiceUpdate({"web": ServiceInfo(name="web", spec=spec)}))
    assert made == [
        EntryPoint(8080, "web", "http"),
        EntryPoint(8080, "web", "http", forwarded=True),
        EntryPoint(8080, "web", "http"),
    ]
    ports.close()


def recording_ports() -> tuple[PublishedPorts, int, list[tuple[EntryPoint, _Unbindable]]]:
    """Published ports on a free loopback port whose listeners are fakes, recorded as made
    with the entry point each was made for (call from a running event loop)."""
    made: list[tuple[EntryPoint, _Unbindable]] = []

    def make(entry: EntryPoint, pool: Pool) -> Listener:
        fake = _Unbindable(0)
        made.append((entry, fake))
        return cast(Listener, fake)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ports = PublishedPorts("127.0.0.1", make, clock=asyncio.get_running_loop().time,
                           rng=random.Random(1))  # fmt: skip
    return ports, port, made


async def test_each_service_of_a_shared_http_port_has_its_own_forwarded() -> None:
    ports, port, made = recording_ports()

    def web(name: str, forwarded: bool, created: int) -> ServiceInfo:
        spec = Service(publish=port, protocol="http", hostnames=(f"{name}.example.test",),
                       forwarded=forwarded)  # fmt: skip
        return ServiceInfo(name=name, spec=spec, created=created)

    ports.apply(ServiceUpdate({"a": web("a", True, 1), "b": web("b", False, 2)}, reset=True))
    ports.apply(ServiceUpdate({"b": web("b", True, 2)}))  # a new listener for b
    ports.apply(ServiceUpdate({"b": web("b", True, 2)}))  # the same: kept
    assert [entry for entry, _ in made] == [
        EntryPoint(port, "a", "http", forwarded=True),
        EntryPoint(port, "b", "http"),
        EntryPoint(port, "b", "http", forwarded=True),
    ]
    router = ports.ports[port].router
    assert router is not None and router.is_open and router.protocol == "http"
    assert router.listeners == {"a": made[0][1], "b": made[2][1]}
    ports.close()


async def test_each_service_of_a_shared_tcp_port_has_its_own_proxy_protocol() -> None:
    ports, port, made = recording_ports()

    def tls(name: str, version: str, created: int) -> ServiceInfo:
        spec = Service(publish=port, hostnames=(f"{name}.example.test",), proxyProtocol=version)
        return ServiceInfo(name=name, spec=spec, created=created)

    ports.apply(ServiceUpdate({"a": tls("a", "v1", 1), "b": tls("b", "", 2)}, reset=True))
    ports.apply(ServiceUpdate({"a": tls("a", "v2", 1)}))  # a new listener for a
    ports.apply(ServiceUpdate({"a": tls("a", "v2", 1)}))  # the same: kept
    assert [entry for entry, _ in made] == [
        EntryPoint(port, "a", "tcp", proxy_protocol="v1"),
        EntryPoint(port, "b", "tcp"),
        EntryPoint(port, "a", "tcp", proxy_protocol="v2"),
    ]
    router = ports.ports[port].router
    assert router is not None and router.is_open and router.protocol == "tcp"
    assert router.listeners == {"a": made[2][1], "b": made[1][1]}
    assert ports.status()["b"]["hostnames"] == ["b.example.test"]
    ports.close()
    assert not router.is_open


# -- ports shared by host name ---------------------------------------------------------------


def test_http_services_with_host_names_share_a_port_and_the_first_created_wins_a_clash() -> None:
    claims = {
        "web": PublishClaim(80, "http", created=10, hostnames=("www.example.com",)),
        "api": PublishClaim(80, "http", created=11, hostnames=("api.example.com",)),
        "fallback": PublishClaim(80, "http", created=12),
        "apps": PublishClaim(80, "http", created=13, hostnames=("*.apps.example.com",)),
        # Refused: a name web has, a second default, a tcp service on an http port.
        "copy": PublishClaim(80, "http", created=14, hostnames=("www.example.com", "x.org")),
        "other-default": PublishClaim(80, "http", created=15),
        "raw": PublishClaim(80, "tcp", created=16),
    }
    entries, conflicts = resolve_entry_points(claims)
    routes = HostRoutes(
        (
            ("*.apps.example.com", "apps"),
            ("api.example.com", "api"),
            ("www.example.com", "web"),
        ),
        "fallback",
    )
    assert entries == {80: EntryPoint(80, "web", "http", routes)}
    assert entries[80].shared
    assert routes.services == ("api", "apps", "fallback", "web")
    assert conflicts == {
        "copy": PortConflict("copy", 80, "web", hostname="www.example.com"),
        "other-default": PortConflict("other-default", 80, "fallback"),
        "raw": PortConflict("raw", 80, "web", protocol="http"),
    }
    assert str(conflicts["copy"]) == (
        "host name www.example.com on port 80 is also claimed by service web"
    )
    assert str(conflicts["other-default"]) == "port 80 is also published by service fallback"
    assert str(conflicts["raw"]) == (
        "port 80 is published by http service web (tcp and http services cannot share a port)"
    )
    # The clash's winner goes: the other is admitted whole.
    del claims["web"]
    entries, conflicts = resolve_entry_points(claims)
    assert "copy" not in conflicts
    assert entries[80].routes is not None
    assert entries[80].routes.pick("www.example.com") == "copy"
    # Two tcp services without host names: one port, one holder.
    tcp = {
        "a": PublishClaim(443, "tcp", created=1),
        "b": PublishClaim(443, "tcp", created=2),
    }
    entries, conflicts = resolve_entry_points(tcp)
    assert entries == {443: EntryPoint(443, "a", "tcp")}
    assert conflicts == {"b": PortConflict("b", 443, "a")}


def test_tcp_services_share_a_port_by_tls_server_name() -> None:
    claims = {
        "default": PublishClaim(443, "tcp", created=1, proxy_protocol="v1"),
        "a": PublishClaim(443, "tcp", created=2, hostnames=("a.example.com",)),
        "apps": PublishClaim(443, "tcp", created=3, hostnames=("*.apps.example.com",)),
        # Refused: a name a has, a second default, an http service on a tcp port.
        "copy": PublishClaim(443, "tcp", created=4, hostnames=("a.example.com",)),
        "second": PublishClaim(443, "tcp", created=5),
        "web": PublishClaim(443, "http", created=6, hostnames=("w.example.com",)),
    }
    entries, conflicts = resolve_entry_points(claims)
    routes = HostRoutes((("*.apps.example.com", "apps"), ("a.example.com", "a")), default="default")
    # A shared port's entry point has no PROXY protocol of its own: each service's listener
    # has its service's.
    assert entries == {443: EntryPoint(443, "default", "tcp", routes)}
    assert conflicts == {
        "copy": PortConflict("copy", 443, "a", hostname="a.example.com"),
        "second": PortConflict("second", 443, "default"),
        "web": PortConflict("web", 443, "default", protocol="tcp"),
    }
    # Without a default, names only: an unknown name has no service.
    del claims["default"], claims["second"]
    entries, conflicts = resolve_entry_points(claims)
    assert entries[443].routes == HostRoutes(routes.names, default=None)
    assert entries[443].routes.pick("x.apps.example.com") == "apps"
    assert entries[443].routes.pick("b.example.com") is None


def test_a_spec_with_host_names_claims_its_port_with_them() -> None:
    info = ServiceInfo(name="tls", spec=Service(publish=443, hostnames=("a.example.com",)))
    claim = PublishClaim.from_info(info)
    assert claim is not None and claim.protocol == "tcp"
    assert claim.hostnames == ("a.example.com",)
    http = info.model_copy(update={"spec": Service(publish=80, protocol="http",
                                                   hostnames=("a.example.com",))})  # fmt: skip
    claim = PublishClaim.from_info(http)
    assert claim is not None and claim.hostnames == ("a.example.com",)


@pytest.mark.parametrize(
    ("host", "service"),
    [
        ("www.example.com", "web"),
        ("a.apps.example.com", "apps"),  # one label under the wildcard
        ("exact.apps.example.com", "exact"),  # an exact name wins over a wildcard
        ("apps.example.com", None),  # the wildcard needs a label
        ("a.b.apps.example.com", None),  # ... exactly one
        ("example.com", None),
        (None, None),
    ],
)
def test_routes_pick_exact_names_then_one_label_wildcards_then_the_default(
    host: str | None, service: str | None
) -> None:
    names = (("*.apps.example.com", "apps"), ("exact.apps.example.com", "exact"),
             ("www.example.com", "web"))  # fmt: skip
    assert HostRoutes(names).pick(host) == service
    assert HostRoutes(names, "default").pick(host) == (service or "default")


@pytest.mark.parametrize(
    ("head", "host"),
    [
        (b"GET / HTTP/1.1\r\nHost: WWW.Example.COM\r\n\r\n", "www.example.com"),
        (b"GET / HTTP/1.1\r\nhost:www.example.com:8080\r\n\r\n", "www.example.com"),
        (b"GET / HTTP/1.1\r\nHOST:  www.example.com.:80 \r\n\r\n", "www.example.com"),
        (b"GET / HTTP/1.1\nHost: a.example\n\n", "a.example"),
        (b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", "[::1]"),
        (b"GET / HTTP/1.1\r\nX-Host: a\r\nAccept: */*\r\n\r\n", None),
        (b"GET / HTTP/1.0\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", None),
    ],
)
def test_the_request_host_is_case_insensitive_without_port_or_trailing_dot(
    head: bytes, host: str | None
) -> None:
    assert request_host(head) == host


@pytest.mark.parametrize(
    ("names", "stored"),
    [
        (["WWW.Example.com."], ("www.example.com",)),
        (["b.example", "*.A.example", "b.example"], ("*.a.example", "b.example")),
        (["localhost"], ("localhost",)),
    ],
)
def test_host_names_are_stored_in_lower_case_sorted_once(
    names: list[str], stored: tuple[str, ...]
) -> None:
    assert Service.model_validate({"hostnames": names}).hostnames == stored


@pytest.mark.parametrize(
    "name",
    ["", ".", "a..b", "-a.example", "a-.example", "a_b.example", "*", "*.", "a.*.example",
     "**.example", "a b", "é.example", "a" * 64 + ".example", ("a" * 60 + ".") * 5 + "com"],
)  # fmt: skip
def test_bad_host_names_are_refused_with_a_sentence_naming_them(name: str) -> None:
    with pytest.raises(RecordError, match="invalid host name"):
        normalise_hostname(name)
    with pytest.raises(ValidationError):
        Service.model_validate({"hostnames": [name]})


class _Releasing:
    """A listener whose port is still held (EADDRINUSE) for its first ``busy`` opens, as when
    the engine has not yet closed the sockets of the listener just closed."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.opened = 0
        self.closed = False

    def open(self) -> int:
        self.opened += 1
        if self.opened <= self.busy:
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        return 8080

    def close(self) -> None:
        self.closed = True


async def test_a_port_reopened_in_another_form_is_retried_quietly_while_still_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made: dict[str, _Releasing] = {}

    def make(entry: EntryPoint, pool: Pool) -> Listener:
        if entry.service not in made:
            made[entry.service] = _Releasing(0 if entry.service == "first" else 3)
        return cast(Listener, made[entry.service])

    ports = PublishedPorts("127.0.0.9", make, clock=asyncio.get_running_loop().time,
                           rng=random.Random(1))  # fmt: skip
    first = ServiceInfo(name="first", spec=Service(publish=8080), created=1)
    second = ServiceInfo(name="second", spec=Service(publish=8080), created=2)
    with caplog.at_level(logging.INFO, logger="flux.balancer"):
        ports.apply(ServiceUpdate({"first": first}, reset=True))
        ports.apply(ServiceUpdate({"first": None, "second": second}))
        assert made["first"].closed
        await asyncio.sleep(0.3)
    assert made["second"].opened == 4
    assert ports.status()["second"]["state"] == "listening"
    assert [r.getMessage() for r in caplog.records if "cannot publish" in r.getMessage()] == []
    ports.close()
