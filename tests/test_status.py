"""The status JSON: the history ring (pure, fake clock), the service rows, the cluster merge,
and the endpoints on a real MetricsPlugin, the cluster scope against a real etcd.

The ring is fed made-up cumulative tallies at made-up times, so rates, resets, capacity and
windows are checked without sleeping; :func:`tally` is checked against a real
:class:`Metrics` fed through its hooks.  The cluster test runs two plugins on loopback ports,
each advertising itself on its own lease in the session's etcd, plus two advertised
endpoints that never answer (a closed port, and a socket that accepts nothing).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import tracemalloc
from array import array
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest

from flux.agent.enrol import Container
from flux.metrics import Metrics, MetricsPlugin
from flux.metrics.cluster import HostAnswer, merge, one_line
from flux.metrics.counters import HTTP_DURATION_BUCKETS
from flux.metrics.history import (
    COUNTERS,
    SAMPLE_FIELDS,
    History,
    InstanceP99,
    Tally,
    bucket_quantile,
    tally,
)
from flux.metrics.status import INSTANCE_STATES, service_rows
from flux.model import ConnectionInfo, HostRef, Instance, InstanceState, Service, ServiceInfo
from flux.relay import RelayResult
from flux.store.etcd import EtcdStore
from flux.store.memory import MemoryStore
from tests.support.etcd_server import EtcdServer
from tests.support.status_fixture import ENGINE_STATUS

BUCKETS = len(HTTP_DURATION_BUCKETS) + 1


def make_tally(
    connections: int = 0,
    classes: tuple[int, int, int, int] = (0, 0, 0, 0),
    byte_count: int = 0,
    failures: int = 0,
    retries: int = 0,
    buckets: Mapping[int, int] | None = None,
    open_now: int = 0,
    http: bool = True,
    instances: dict[str, int] | None = None,
) -> Tally:
    counts = array("q", [connections, *classes, byte_count, failures, retries])
    assert len(counts) == COUNTERS
    latency = array("q", [0] * BUCKETS)
    for index, n in (buckets or {}).items():
        latency[index] = n
    return Tally(counts, latency, open_now, http, instances)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- quantiles from buckets ----------------------------------------------------------------------


def test_bucket_quantile_interpolates_inside_the_bucket_as_prometheus_does() -> None:
    # HTTP_DURATION_BUCKETS starts 0.0005, 0.001, 0.0025, ...
    counts = [0] * BUCKETS
    counts[1] = 100  # all in (0.0005, 0.001]
    assert bucket_quantile(0.5, counts) == pytest.approx(0.00075)
    assert bucket_quantile(0.99, counts) == pytest.approx(0.000995)
    counts[0] = 100  # half now in [0, 0.0005]
    assert bucket_quantile(0.5, counts) == pytest.approx(0.0005)
    assert bucket_quantile(0.25, counts) == pytest.approx(0.00025)
    only_inf = [0] * BUCKETS
    only_inf[-1] = 3
    assert bucket_quantile(0.99, only_inf) == HTTP_DURATION_BUCKETS[-1]
    assert bucket_quantile(0.5, [0] * BUCKETS) is None


# -- the ring ------------------------------------------------------------------------------------


def test_a_sample_holds_the_rates_over_its_interval() -> None:
    history = History()
    history.record(1000.0, {"web": make_tally(connections=10, classes=(5, 0, 1, 0))})
    history.record(
        1005.0,
        {
            "web": make_tally(
                connections=60,
                classes=(55, 5, 11, 5),
                byte_count=5000,
                failures=5,
                retries=10,
                buckets={1: 100},
                open_now=7,
            )
        },
    )
    first, second = history.samples()
    assert first == {
        "t": 1000.0,
        "services": {
            "web": {
                "conn_rate": None, "req_rate": None, "p50": None, "p99": None,
                "bytes_rate": None, "connect_failures_rate": None, "retries_rate": None,
                "connections_open": 0,
            }
        },
    }  # fmt: skip
    web = second["services"]["web"]
    assert second["t"] == 1005.0
    assert web["conn_rate"] == pytest.approx(10.0)
    assert web["req_rate"] == pytest.approx({"2xx": 10.0, "3xx": 1.0, "4xx": 2.0, "5xx": 1.0})
    assert web["p50"] == pytest.approx(0.00075)
    assert web["bytes_rate"] == pytest.approx(1000.0)
    assert web["connect_failures_rate"] == pytest.approx(1.0)
    assert web["retries_rate"] == pytest.approx(2.0)
    assert web["connections_open"] == 7
    assert set(web) == {*SAMPLE_FIELDS[:1], "req_rate", *SAMPLE_FIELDS[5:]}


def test_samples_read_as_the_figures_and_can_be_limited_to_some_services() -> None:
    history = History()
    history.record(0.0, {"web": make_tally(), "db": make_tally(http=False)})
    history.record(10.0, {"web": make_tally(connections=3), "db": make_tally(http=False)})
    # Kept as 32-bit floats, shown without their tail (not 0.30000001192092896).
    assert history.samples()[-1]["services"]["web"]["conn_rate"] == 0.3
    assert [sorted(s["services"]) for s in history.samples(services={"web"})] == [["web"]] * 2
    assert history.document(10.0, services={"nothing"})["samples"][0]["services"] == {}


def test_a_counter_that_went_down_was_reset_and_counts_from_zero() -> None:
    history = History()
    history.record(0.0, {"web": make_tally(connections=1000, byte_count=10**9)})
    history.record(5.0, {"web": make_tally(connections=25, byte_count=500)})
    web = history.samples()[-1]["services"]["web"]
    assert web["conn_rate"] == pytest.approx(5.0)
    assert web["bytes_rate"] == pytest.approx(100.0)
    assert history.figures("web")["now"]["conn_rate"] == pytest.approx(5.0)


def test_a_tcp_service_has_no_request_figures() -> None:
    history = History()
    history.record(0.0, {"db": make_tally(http=False)})
    history.record(5.0, {"db": make_tally(connections=5, http=False)})
    db = history.samples()[-1]["services"]["db"]
    assert db["req_rate"] is None and db["p50"] is None and db["p99"] is None
    assert db["conn_rate"] == pytest.approx(1.0)
    figures = history.figures("db")["now"]
    assert figures["req_rate"] is None and figures["p99"] is None


def test_the_ring_keeps_capacity_samples_and_since_picks_the_newer_ones() -> None:
    history = History(capacity=180)
    for i in range(200):
        history.record(5.0 * i, {"web": make_tally(connections=i)})
    samples = history.samples()
    assert len(samples) == 180
    assert samples[0]["t"] == 5.0 * 20 and samples[-1]["t"] == 5.0 * 199
    assert [s["t"] for s in history.samples(since=980.0)] == [985.0, 990.0, 995.0]
    assert history.samples(since=995.0) == []
    document = history.document(1000.0, since=990.0)
    assert document["interval"] == 5.0 and document["capacity"] == 180
    assert document["now"] == 1000.0 and len(document["samples"]) == 1


def test_a_service_that_vanishes_drops_out_of_later_samples_and_then_the_ring() -> None:
    history = History(capacity=3)
    history.record(0.0, {"web": make_tally(), "gone": make_tally()})
    history.record(5.0, {"web": make_tally(connections=5), "gone": make_tally(connections=5)})
    history.record(10.0, {"web": make_tally(connections=10)})
    assert [sorted(s["services"]) for s in history.samples()] == [
        ["gone", "web"],
        ["gone", "web"],
        ["web"],
    ]
    assert history.figures("gone")["now"]["conn_rate"] is None
    history.record(15.0, {"web": make_tally(connections=15)})
    history.record(20.0, {"web": make_tally(connections=20)})
    assert all("gone" not in s["services"] for s in history.samples())
    # It comes back: measured from its first mark after, not from zero (counters are kept).
    history.record(25.0, {"web": make_tally(), "gone": make_tally(connections=500)})
    assert history.samples()[-1]["services"]["gone"]["conn_rate"] is None
    history.record(30.0, {"web": make_tally(), "gone": make_tally(connections=510)})
    assert history.samples()[-1]["services"]["gone"]["conn_rate"] == pytest.approx(2.0)
    assert history.figures("gone")["now"]["conn_rate"] == pytest.approx(2.0)


def test_figures_cover_the_last_10_s_and_5_min() -> None:
    history = History()
    connections = 0
    t = 0.0
    # 10 min at 10 connections/s, then 20 s at 40/s; requests all 2xx at 1 ms, then 5xx at 2 ms.
    buckets = {1: 0, 2: 0}
    for _ in range(120):
        history.record(t, {"web": make_tally(connections=connections, buckets=dict(buckets))})
        t += 5.0
        connections += 50
        buckets[1] += 50
    for _ in range(4):
        history.record(t, {"web": make_tally(connections=connections, buckets=dict(buckets))})
        t += 5.0
        connections += 200
        buckets[2] += 200
    history.record(t, {"web": make_tally(connections=connections, buckets=dict(buckets))})
    figures = history.figures("web")
    assert figures["now"]["conn_rate"] == pytest.approx(40.0)
    assert figures["now"]["p50"] > 0.001  # only the slow requests of the last 10 s
    # 5 min (to 5.5 min: the marks kept that far back are 30 s apart): mostly 10/s.
    long = figures["5m"]["conn_rate"]
    span = [(50 * n + 800) / (5 * n + 20) for n in range(56, 63)]
    assert min(span) - 1e-9 <= long <= max(span) + 1e-9
    assert figures["5m"]["p50"] < 0.001  # most requests of the last 5 min were fast
    # A young history measures over what it has.
    young = History()
    young.record(0.0, {"web": make_tally()})
    young.record(5.0, {"web": make_tally(connections=50)})
    assert young.figures("web")["5m"]["conn_rate"] == pytest.approx(10.0)
    assert History().figures("web") == {
        "now": dict.fromkeys(
            ("conn_rate", "req_rate", "p50", "p99", "bytes_rate", "connect_failures_rate",
             "retries_rate")
        ),
        "5m": dict.fromkeys(
            ("conn_rate", "req_rate", "p50", "p99", "bytes_rate", "connect_failures_rate",
             "retries_rate")
        ),
    }  # fmt: skip


def test_a_clock_that_stood_still_gives_no_rates() -> None:
    history = History()
    history.record(5.0, {"web": make_tally()})
    history.record(5.0, {"web": make_tally(connections=10)})
    assert history.samples()[-1]["services"]["web"]["conn_rate"] is None
    assert history.figures("web")["now"]["conn_rate"] is None


def test_instance_request_rates_come_from_the_last_10_s() -> None:
    history = History()
    assert history.instance_rates("web") is None
    for i in range(10):
        history.record(5.0 * i, {"web": make_tally(instances={"c1": 10 * i, "c2": 100 * i})})
    assert history.instance_rates("web") == pytest.approx({"c1": 2.0, "c2": 20.0})


def history_bytes(services: int, samples: int, capacity: int) -> int:
    """Bytes the history holds after ``samples`` samples of ``services`` services (with the
    marks' tallies, which are the same whatever the number of samples)."""
    names = [f"service-{i:04d}" for i in range(services)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        history = History(capacity=capacity)
        for n in range(samples):
            history.record(
                5.0 * n,
                {
                    name: make_tally(connections=1000 * n, classes=(n, n, n, n), buckets={3: n})
                    for name in names
                },
            )
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(history.samples()) == min(samples, capacity)
    return held


def test_the_ring_costs_a_few_dozen_bytes_per_service_per_sample() -> None:
    # From 70 samples (350 s) on, the marks are as many as they will be: what grows is the ring.
    services = 50
    full = history_bytes(services, 140, capacity=140)
    start = history_bytes(services, 70, capacity=140)
    per_sample = (full - start) / (70 * services)
    assert per_sample < 64, per_sample  # 11 fields as 32-bit floats: 44 bytes
    # Turning past the capacity does not grow it.
    assert history_bytes(services, 250, capacity=140) < full * 1.1


# -- reading a real Metrics ----------------------------------------------------------------------


def test_tally_reads_the_counters_a_scrape_reads() -> None:
    metrics = Metrics()
    web = ConnectionInfo("web", "http", "c1", "10.0.0.2:80", "10.1.0.1")
    for _ in range(3):
        metrics.on_connection(web)
    metrics.on_done(web, RelayResult(100, 200, None, 0.1))
    metrics.record_exchange(web, "GET", 200, 300, 800)
    metrics.record_exchange(web, "GET", 503, 300, 800)
    metrics.record_exchange(web, "GET", 302, 300, 3000)
    metrics.on_done(web, RelayResult(0, 0, None, 0.1, answered=431))
    metrics.on_connect_failure("web", "c2")
    metrics.on_retry("web")
    metrics.on_connection(ConnectionInfo("db", "tcp", "d1", "10.0.0.3:5432", "10.1.0.1"))
    tallies = tally(metrics, {"web": "http", "db": "tcp", "idle": None})
    assert sorted(tallies) == ["db", "idle", "web"]  # only the services named
    t = tallies["web"]
    assert list(t.counts) == [3, 1, 1, 1, 1, 300, 1, 1]
    assert t.open == 1 and t.http is True
    assert sum(t.buckets) == 3 and t.buckets[1] == 2  # 800 µs twice in (0.5, 1] ms
    assert t.instances == {"c1": 3}
    assert tallies["db"].http is False and tallies["db"].counts[0] == 1
    assert list(tallies["idle"].counts) == [0] * COUNTERS and tallies["idle"].instances is None


def test_instance_quantiles_merge_an_instances_label_sets_over_the_window() -> None:
    clock = Clock(0.0)
    metrics = Metrics(clock=clock)
    a = ConnectionInfo("web", "http", "c1", "10.0.0.2:80", "10.1.0.1")
    b = ConnectionInfo("web", "http", "c1", "10.0.0.2:80", "10.1.0.2")
    other = ConnectionInfo("web", "http", "c2", "10.0.0.3:80", "10.1.0.1")
    observe_a, observe_b = metrics.exchange_observer(a), metrics.exchange_observer(b)
    observe_a("GET", 200, [100] * 99, [1000] * 99)
    observe_b("GET", 500, [100], [90_000])  # another client and code: the slowest one
    metrics.exchange_observer(other)("GET", 200, [100], [5000])
    both = [("web", "c1"), ("web", "c2")]
    p99 = metrics.instance_quantile(0.99, both)
    assert p99[("web", "c1")] == pytest.approx(0.001, rel=0.02)
    assert metrics.instance_quantile(1.0, both)[("web", "c1")] == pytest.approx(0.09, rel=0.02)
    assert p99[("web", "c2")] == pytest.approx(0.005, rel=0.02)
    assert metrics.instance_quantile(0.99, [("web", "c9")]) == {}
    # Refreshed a slice at a time: a budget of one label set takes one instance per call
    # (c1's two label sets go together, over the budget).
    slices = InstanceP99(budget=1)
    slices.refresh(metrics)
    assert set(slices.values) == {("web", "c1")}
    slices.refresh(metrics)
    assert slices.values == pytest.approx(p99)
    clock.now = 700.0  # past the 10 min window: nothing left to tell
    slices.refresh(metrics)
    slices.refresh(metrics)
    assert slices.values == {}


# -- the service rows ----------------------------------------------------------------------------


def pool_row(name: str, *, ready: bool = True, failures: int = 0, retry_in: float | None = None,
             active: int = 0) -> dict[str, Any]:  # fmt: skip
    return {"name": name, "address": "", "ready": ready, "failures": failures,
            "retry_in": retry_in, "active": active}  # fmt: skip


def test_service_rows_join_the_balancer_the_records_the_agent_and_the_history() -> None:
    here, there = HostRef(address="10.0.0.1"), HostRef(address="10.0.0.2")
    web = ServiceInfo(
        name="web",
        spec=Service(address="10.128.0.1:80", protocol="http"),
        instances={
            "c1": Instance(host=here, address="10.0.0.1:32768",
                           labels={"image": "nginx", "tag": "1.25"}),
            "c2": Instance(host=there, address="10.0.0.2:32768",
                           labels={"image": "nginx", "tag": "1.25"}),
            "c3": Instance(host=there, state=InstanceState.PAUSED),
        },
    )  # fmt: skip
    six = ServiceInfo(name="six", spec=Service(address="[fd00::1]:80"))
    bare = ServiceInfo(name="bare", spec=Service())
    balancer = {
        "web": {
            "state": "forwarding", "address": "10.128.0.1:80", "protocol": "http",
            "instances": [pool_row("c1", active=2),
                          pool_row("c2", ready=False, failures=3, retry_in=4.0)],
            "published": {"port": 8080, "entry": "published:8080", "state": "listening",
                          "hostnames": ["a.example"],
                          "instances": [pool_row("c1", active=1)]},
        },
        "dup": {"state": "conflict", "address": "10.128.0.1:80", "protocol": "tcp",
                "conflict": "address 10.128.0.1:80 is also used by service web",
                "holder": "web"},
    }  # fmt: skip
    local = {
        ("web", "c1"): Instance(host=here, address="10.0.0.1:32768",
                                labels={"image": "nginx", "tag": "1.25"}),
        ("web", "c4"): Instance(host=here, state=InstanceState.DRAINING),
    }  # fmt: skip
    history = History()
    history.record(0.0, {"web": make_tally(instances={"c1": 0})})
    history.record(5.0, {"web": make_tally(connections=25, instances={"c1": 50})})
    rows = service_rows(
        balancer,
        {"web": web, "six": six, "bare": bare},
        local,
        {"c4": "busybox"},
        history,
        {("web", "c1"): 0.002, ("dup", "c1"): 0.5},
        now=1000.0,
    )
    assert [row["name"] for row in rows] == ["bare", "dup", "six", "web"]
    by_name = {row["name"]: row for row in rows}
    assert by_name["bare"]["state"] == "absent" and "no address" in by_name["bare"]["reason"]
    assert by_name["six"]["state"] == "absent" and "IPv6" in by_name["six"]["reason"]
    assert by_name["dup"]["state"] == "conflict"
    assert "used by service web" in by_name["dup"]["reason"]
    row = by_name["web"]
    assert row["address"] == "10.128.0.1:80" and row["protocol"] == "http"
    assert row["published"] == [
        {"port": 8080, "hostnames": ["a.example"], "state": "listening", "reason": None}
    ]
    assert row["instances_by_state"] == {
        "live": 1, "no-address": 0, "paused": 1, "unhealthy": 0, "draining": 1, "backoff": 1
    }  # fmt: skip
    assert set(row["instances_by_state"]) == set(INSTANCE_STATES)
    assert row["connections_open"] == 3
    assert row["figures"]["now"]["conn_rate"] == pytest.approx(5.0)
    c1, c2, c3, c4 = row["instances"]
    assert c1 == {
        "name": "c1", "host": "10.0.0.1", "address": "10.0.0.1:32768", "state": "live",
        "reason": None, "retry_at": None, "container_id": "c1", "image": "nginx:1.25",
        "active": 3, "failures": 0, "req_rate": pytest.approx(10.0), "p99": 0.002,
    }  # fmt: skip
    assert c2["state"] == "backoff" and c2["retry_at"] == pytest.approx(1004.0)
    assert c2["failures"] == 3 and c2["host"] == "10.0.0.2" and "3 failed" in c2["reason"]
    assert c2["req_rate"] == 0.0 and c2["p99"] is None
    assert c3["state"] == "paused" and c3["address"] is None and c3["image"] is None
    assert c4["state"] == "draining" and c4["image"] == "busybox"  # the container's own
    # A tcp service has no request rate per instance.
    assert by_name["dup"]["instances"] == []


# -- the cluster merge ---------------------------------------------------------------------------


def test_merge_lists_every_host_sorted_with_the_unreachable_ones_and_self() -> None:
    own = {"host": "10.0.0.9"}
    answers = {
        "10.0.0.10": HostAnswer("10.0.0.10:9000", document={"host": "10.0.0.10"}),
        "10.0.0.9": HostAnswer("10.0.0.9:9000", document=own),
        "fd00::1": HostAnswer("[fd00::1]:9000", error="cannot connect:\nConnection refused"),
        "10.0.0.2": HostAnswer("10.0.0.2:9000", error="no answer within 1 s"),
    }
    merged = merge(1234.5, answers)
    assert merged["now"] == 1234.5
    assert [h["host"] for h in merged["hosts"]] == ["10.0.0.2", "10.0.0.9", "10.0.0.10", "fd00::1"]
    assert merged["hosts"][0] == {
        "host": "10.0.0.2", "endpoint": "10.0.0.2:9000", "reachable": False,
        "error": "no answer within 1 s",
    }  # fmt: skip
    assert merged["hosts"][1] == {
        "host": "10.0.0.9", "endpoint": "10.0.0.9:9000", "reachable": True, "status": own
    }
    assert merged["hosts"][3]["error"] == "cannot connect: Connection refused"
    assert merge(1.0, {}) == {"now": 1.0, "hosts": []}
    assert one_line("x" * 500).endswith("…") and len(one_line("x" * 500)) == 200


# -- the endpoints on a real plugin --------------------------------------------------------------


class Balancer:
    """The balancer as the plugin reads it: one http service with one instance."""

    def __init__(self) -> None:
        self.ready = True
        here = HostRef(address="10.0.0.1")
        self.infos = {
            "web": ServiceInfo(
                name="web",
                spec=Service(address="10.128.0.1:80", protocol="http"),
                instances={"c1": Instance(host=here, address="10.0.0.1:32768")},
            )
        }

    def status(self) -> Mapping[str, Any]:
        return {
            "services": {
                "web": {"state": "forwarding", "address": "10.128.0.1:80", "protocol": "http",
                        "listener": "172.17.0.1:40000", "instances": [pool_row("c1", active=1)]}
            },
            "relay_active": 1,
            "publish_ip": None,
        }  # fmt: skip

    def engine_status(self) -> Mapping[str, Any]:
        return ENGINE_STATUS


class Agent:
    def __init__(self) -> None:
        self.docker_connected = True
        self.last_reconcile: float | None = 990.0
        self.instances: dict[tuple[str, str], Instance] = {}
        self.containers = {"c1": Container(id="c1", image="nginx:1.25")}


@pytest.fixture
async def plugin() -> AsyncIterator[tuple[MetricsPlugin, Clock]]:
    clock = Clock()
    plugin = MetricsPlugin(
        Metrics(), listen=("127.0.0.1", 0), host_address="10.0.0.1",
        balancer=Balancer(), agent=Agent(), version="9.9.9", clock=clock,
    )  # fmt: skip
    await plugin.start()
    try:
        yield plugin, clock
    finally:
        await plugin.close()


async def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, Any, Any]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://{host}:{port}{path}") as response,
    ):
        text = await response.text()
        body = json.loads(text) if response.content_type == "application/json" else text
        return response.status, response.headers, body


async def test_status_has_the_fluxd_block_and_the_service_rows(plugin) -> None:
    plugin, clock = plugin
    web = ConnectionInfo("web", "http", "c1", "10.0.0.1:32768", "10.1.0.1")
    plugin.sample()
    clock.now += 5.0
    for _ in range(50):
        plugin.metrics.on_connection(web)
        plugin.metrics.record_exchange(web, "GET", 200, 100, 700)
    plugin.sample()
    status, headers, document = await get(plugin.port, "/status")
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    for key in ("host", "version", "healthy", "problems", "balancer", "agent"):
        assert key in document
    fluxd = document["fluxd"]
    assert fluxd["version"] == "9.9.9" and fluxd["host_ip"] == "10.0.0.1"
    assert fluxd["started_at"] == 1000.0 and fluxd["uptime"] == 5.0 and fluxd["now"] == 1005.0
    assert fluxd["etcd"] == {"reachable": False, "endpoint": None, "lease_age": None}
    assert fluxd["docker"] == {"connected": True, "last_reconcile": 990.0}
    engine = fluxd["engine"]
    assert engine["threads"] == 2 and engine["open_connections"] == 1
    assert engine["shard_accepted"] == [5, 7] and engine["steering"] == [[0], [1]]
    assert 0 < engine["fds_used"] < engine["fds_budget"]
    [row] = document["services"]
    assert row["name"] == "web" and row["state"] == "forwarding" and row["reason"] is None
    assert row["figures"]["now"]["conn_rate"] == pytest.approx(10.0)
    assert row["figures"]["now"]["req_rate"]["2xx"] == pytest.approx(10.0)
    assert 0.0005 < row["figures"]["now"]["p99"] <= 0.001
    [c1] = row["instances"]
    assert c1["image"] == "nginx:1.25"  # no image label in the record: the container's
    assert c1["req_rate"] == pytest.approx(10.0) and c1["active"] == 1
    assert c1["p99"] == pytest.approx(0.0007, rel=0.02)  # 700 µs, at the summaries' 1 %


async def test_history_serves_the_samples_after_since(plugin) -> None:
    plugin, clock = plugin
    for _ in range(4):
        plugin.sample()
        clock.now += 5.0
    status, headers, document = await get(plugin.port, "/status/history")
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    assert document["interval"] == 5.0 and document["capacity"] == 180
    assert document["now"] == 1020.0
    assert [s["t"] for s in document["samples"]] == [1000.0, 1005.0, 1010.0, 1015.0]
    assert set(document["samples"][-1]["services"]) == {"web"}
    _, _, later = await get(plugin.port, "/status/history?since=1005")
    assert [s["t"] for s in later["samples"]] == [1010.0, 1015.0]
    _, _, some = await get(plugin.port, "/status/history?since=1005&service=db&service=web")
    assert [sorted(s["services"]) for s in some["samples"]] == [["web"], ["web"]]
    _, _, none = await get(plugin.port, "/status/history?service=db")
    assert all(s["services"] == {} for s in none["samples"])
    for bad in ("since=soon", "since=nan", "since=inf", "scope=world"):
        status, _, body = await get(plugin.port, f"/status/history?{bad}")
        assert status == 400 and body.count("\n") == 1, body
    assert (await get(plugin.port, "/status?scope=everything"))[0] == 400


async def test_the_sampler_is_a_component_that_samples_on_a_schedule() -> None:
    plugin = MetricsPlugin(
        Metrics(), listen=("127.0.0.1", 0), host_address="10.0.0.1", balancer=Balancer(),
        history=History(interval=0.05),
    )  # fmt: skip
    [_, (name, sample)] = plugin.components()
    assert name == "metrics-history"
    task = asyncio.create_task(sample())
    try:
        async with asyncio.timeout(10):
            while len(plugin.history.samples()) < 3:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert all(set(s["services"]) == {"web"} for s in plugin.history.samples())


async def test_only_get_routes(plugin) -> None:
    plugin, _ = plugin
    plugin.sample()
    base = f"http://127.0.0.1:{plugin.port}"
    async with aiohttp.ClientSession() as session:  # one keep-alive connection throughout
        for path in ("/status", "/status/history", "/metrics", "/healthz"):
            async with session.post(base + path) as response:
                assert response.status == 405, path
            # HEAD is GET without the body, and leaves the connection usable.
            async with session.head(base + path) as response:
                assert response.status == 200, path
            async with session.get(base + path) as response:
                assert response.status == 200 and await response.read(), path


async def test_without_the_advertised_endpoints_the_cluster_is_this_host_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    plugin = MetricsPlugin(
        Metrics(), listen=("127.0.0.1", 0), host_address="127.0.0.1", store=store,
        balancer=Balancer(), agent=Agent(),
    )  # fmt: skip
    await plugin.start()
    try:
        store.inject_error()
        for _ in range(3):
            status, _, merged = await get(plugin.port, "/status?scope=cluster")
            assert status == 200
            [own] = merged["hosts"]
            assert own["host"] == "127.0.0.1" and own["reachable"] is True
            assert own["endpoint"] == f"127.0.0.1:{plugin.port}"  # not advertised: the listener
        assert caplog.text.count("cannot read the advertised endpoints") == 1
    finally:
        store.clear_error()
        await plugin.close()


# -- the cluster scope against a real etcd -------------------------------------------------------


def closed_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.mark.etcd
async def test_cluster_scope_asks_every_advertised_host_and_shows_the_silent_ones(
    etcd: EtcdServer,
) -> None:
    stores = [EtcdStore([etcd.endpoint]) for _ in range(4)]
    leases = [asyncio.create_task(store.run_lease(30)) for store in stores]
    plugins = [
        MetricsPlugin(
            Metrics(),
            listen=(host, 0),
            host_address=host,
            store=store,
            balancer=Balancer(),
            agent=Agent(),
        )
        for host, store in zip(("127.0.0.1", "127.0.0.2"), stores, strict=False)
    ]
    # An advertised endpoint that refuses, and one that takes connections but never answers.
    refused = f"127.0.0.3:{closed_port('127.0.0.3')}"
    silent = socket.socket()
    silent.bind(("127.0.0.4", 0))
    silent.listen(8)
    try:
        for store in stores:
            await store.wait_lease()
        for plugin in plugins:
            await plugin.start()
            await plugin.advertise()
            plugin.sample()
        await stores[2].set_prometheus_target("127.0.0.3", refused)
        silent_at = f"127.0.0.4:{silent.getsockname()[1]}"
        await stores[3].set_prometheus_target("127.0.0.4", silent_at)
        first = plugins[0]
        assert first.port is not None
        status, _, merged = await get(first.port, "/status?scope=cluster", "127.0.0.1")
        assert status == 200
        hosts = merged["hosts"]
        assert [h["host"] for h in hosts] == ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
        assert [h["reachable"] for h in hosts] == [True, True, False, False]
        assert hosts[0]["endpoint"] == f"127.0.0.1:{first.port}"
        assert hosts[0]["status"]["fluxd"]["host_ip"] == "127.0.0.1"
        assert hosts[0]["status"]["fluxd"]["etcd"]["reachable"] is True
        assert hosts[0]["status"]["fluxd"]["etcd"]["endpoint"] == etcd.endpoint
        assert 0 <= hosts[0]["status"]["fluxd"]["etcd"]["lease_age"] < 30
        assert hosts[1]["status"]["host"] == "127.0.0.2"
        assert hosts[1]["status"]["services"][0]["name"] == "web"
        assert hosts[2]["endpoint"] == refused and "Connection refused" in hosts[2]["error"]
        assert hosts[3]["endpoint"] == silent_at and hosts[3]["error"] == "no answer within 1 s"
        status, _, histories = await get(
            first.port, "/status/history?scope=cluster&since=0", "127.0.0.1"
        )
        assert status == 200
        assert [h["reachable"] for h in histories["hosts"]] == [True, True, False, False]
        assert len(histories["hosts"][1]["status"]["samples"]) == 1
        assert not math.isnan(histories["now"])
    finally:
        silent.close()
        for plugin in plugins:
            await plugin.close()
        for task in leases:
            task.cancel()
        await asyncio.gather(*leases, return_exceptions=True)
        for store in stores:
            await store.revoke_lease()
            await store.close()
