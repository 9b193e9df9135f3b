"""Metrics: sliding summaries, collectors, the HTTP endpoint, advertisement, and the real path.

Collectors are read from a fresh registry per test with ``get_sample_value``.  The sliding
summary is checked against the `hdrhistogram` oracle (same answers) and against exact
quantiles (within the histogram's precision), with a fake clock for the window.  The endpoint
runs on 127.0.0.1 with an ephemeral port; its exposition must pass ``promtool check metrics``
(Debian's `prometheus` package: the test fails when promtool is missing).  The end-to-end tests
drive a real balancer (memory store, real iptables, own chain, VIPs in 127.42.0.0/16) and a
real fluxd process against the session's etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import aiohttp
import pytest
from hdrh.histogram import HdrHistogram
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from flux._splice import HTTP_ERROR_RESPONSES, RELAY_COUNTERS, RELAY_LEVELS
from flux.agent.enrol import Container
from flux.balancer.balancer import Balancer
from flux.balancer.iptables import IPTables
from flux.balancer.listener import ConnectionBudget, Listener
from flux.balancer.pool import Pool
from flux.config import Settings
from flux.daemon import _build_plugins
from flux.metrics import (
    FluxCollector,
    Metrics,
    MetricsListenError,
    MetricsPlugin,
    SlidingSummary,
    build_registry,
)
from flux.metrics.counters import (
    GRPC_CODES,
    GRPC_METHODS_PER_SERVICE,
    GRPC_PATH_LIMIT,
    HTTP_DURATION_BUCKETS,
    BucketCounts,
    grpc_code_label,
    grpc_method_labels,
)
from flux.metrics.summary import SUMMARY_HIGHEST_US
from flux.model import (
    ConnectionInfo,
    Host,
    HostRef,
    Instance,
    InstanceState,
    Service,
    ServiceInfo,
)
from flux.relay import (
    HTTP_CUT_SIDES,
    OTHER_CLIENT,
    EngineCounts,
    GrpcCall,
    PythonRelay,
    RelayCounters,
    RelayResult,
    SpliceRelay,
    make_relay,
)
from flux.store.memory import MemoryBackend, MemoryStore
from tests.support.etcd_server import EtcdServer
from tests.support.relay_harness import Harness, recv_exactly, recv_to_eof, run, send
from tests.support.status_fixture import ENGINE_STATUS

QS = (0.5, 0.9, 0.99, 0.999)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def conn(
    service: str = "web",
    instance: str = "c0ffee",
    address: str = "10.0.0.2:8080",
    client: str = "192.168.1.9",
    protocol: str = "tcp",
) -> ConnectionInfo:
    return ConnectionInfo(service, protocol, instance, address, client)


def exact_quantile(values: list[int], q: float) -> int:
    """The value HdrHistogram's rank rule picks, from the sorted raw values."""
    ordered = sorted(values)
    rank = max(1, int(q * 100.0 * len(ordered) / 100.0 + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


# -- the sliding summary ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=SUMMARY_HIGHEST_US), min_size=1, max_size=300))
def test_summary_quantiles_match_the_oracle_and_exact_values(values: list[int]) -> None:
    clock = FakeClock()
    summary = SlidingSummary(clock=clock)
    oracle = HdrHistogram(1, SUMMARY_HIGHEST_US, 2)
    for i, value in enumerate(values):
        # Spread over the window's slices: the merge must give what one histogram would.
        clock.now = 1000.0 + (i % 5) * 120.0
        summary.observe(value)
        oracle.record_value(value)
    answers = summary.quantiles(QS)
    assert answers == [float(oracle.get_value_at_percentile(q * 100)) for q in QS]
    for q, answer in zip(QS, answers, strict=True):
        exact = exact_quantile(values, q)
        # 2 significant digits: a counter is at most 1/128 of the values it holds wide.
        assert exact <= answer <= exact * (1 + 1 / 128) + 1, (q, exact, answer)
    assert summary.count == len(values)
    assert summary.sum == sum(values)


def test_summary_window_expires_slice_by_slice() -> None:
    clock = FakeClock(0.0)
    summary = SlidingSummary(window=600.0, age_buckets=5, clock=clock)
    summary.observe(1000)  # slice 0: [0, 120)
    clock.now = 130.0
    summary.observe(5000)  # slice 1
    assert summary.window_histogram().count == 2
    clock.now = 599.9  # slice 4: both still in the window
    assert summary.window_histogram().count == 2
    assert summary.quantiles([0.0])[0] == pytest.approx(1000, rel=0.01)
    clock.now = 600.0  # slice 5 reuses slice 0's bucket: the 1000 is gone
    assert summary.window_histogram().count == 1
    assert summary.quantiles([0.5]) == [pytest.approx(5000, rel=0.01)]
    clock.now = 720.0  # slice 6: the 5000 is gone too
    assert all(math.isnan(v) for v in summary.quantiles(QS))
    assert summary.memory_bytes == 0  # aged-out buckets are freed
    # _sum and _count never slide.
    assert (summary.count, summary.sum) == (2, 6000)


def test_summary_jump_past_the_whole_window_clears_everything() -> None:
    clock = FakeClock(0.0)
    summary = SlidingSummary(window=10.0, age_buckets=5, clock=clock)
    for i in range(10):
        clock.now = i * 1.0
        summary.observe(100 + i)
    assert summary.window_histogram().count == 10
    clock.now = 9.0 + 10.0 * 7  # seven windows later, in the middle of a slice
    assert summary.window_histogram().count == 0
    summary.observe(42)
    assert summary.quantiles([0.5, 1.0]) == [42.0, 42.0]
    assert summary.count == 11 and summary.sum == sum(range(100, 110)) + 42


def test_summary_sum_is_exact_for_clamped_values_and_empty_window_is_nan() -> None:
    summary = SlidingSummary(clock=FakeClock())
    assert all(math.isnan(v) for v in summary.quantiles(QS))
    huge = 10 * SUMMARY_HIGHEST_US
    summary.observe(huge)
    summary.observe(7)
    assert summary.sum == huge + 7 and summary.count == 2
    assert summary.window_histogram().clamped == 1
    assert summary.quantiles([1.0])[0] >= SUMMARY_HIGHEST_US


def test_summary_memory_at_two_and_three_digits() -> None:
    summary = SlidingSummary(clock=FakeClock())
    summary.observe(1)
    one_bucket = summary.memory_bytes
    assert 20_000 < one_bucket < 40_000  # 2 digits over 1 µs .. 1 h: about 26 KB
    three = SlidingSummary(clock=FakeClock(), significant_digits=3)
    three.observe(1)
    assert three.memory_bytes > 6 * one_bucket


def test_summary_refuses_bad_configuration() -> None:
    from flux.metrics.summary import scratch_histogram

    with pytest.raises(ValueError, match="window must be positive"):
        SlidingSummary(window=0)
    with pytest.raises(ValueError, match="age buckets must be at least 1"):
        SlidingSummary(age_buckets=0)
    with pytest.raises(ValueError, match="does not match"):
        SlidingSummary(significant_digits=2, scratch=scratch_histogram(3))


# -- the collectors ------------------------------------------------------------------------------


class FakeBalancer:
    def __init__(self) -> None:
        self.ready = True
        self.infos: dict[str, ServiceInfo] = {}

    def engine_status(self) -> Mapping[str, Any]:
        return ENGINE_STATUS

    def status(self) -> Mapping[str, Any]:
        return {
            "services": {
                "web": {
                    "state": "forwarding",
                    "address": "10.128.0.1:80",
                    "protocol": "tcp",
                    "listener": "172.17.0.1:40000",
                    "instances": [
                        {
                            "name": "c1",
                            "address": "10.0.0.2:80",
                            "ready": True,
                            "failures": 0,
                            "retry_in": None,
                            "active": 1,
                        },
                        {
                            "name": "c2",
                            "address": "10.0.0.3:80",
                            "ready": False,
                            "failures": 2,
                            "retry_in": 1.5,
                            "active": 0,
                        },
                    ],
                }
            },
            "relay_active": 1,
        }


class FakeAgent:
    def __init__(self) -> None:
        self.docker_connected = True
        self.last_reconcile: float | None = None
        self.containers: dict[str, Container] = {}
        host = HostRef(address="10.0.0.1")
        self.instances: dict[tuple[str, str], Instance] = {
            ("web", "c1"): Instance(host=host, address="10.0.0.1:32768", container_rule="r1"),
            ("web", "c2"): Instance(host=host, address="10.0.0.1:32769",
                                    state=InstanceState.DRAINING),
            ("web", "c3"): Instance(host=host),  # no address
            ("db", "c4"): Instance(host=host, address="10.0.0.1:5432",
                                   state=InstanceState.UNHEALTHY),
        }  # fmt: skip


def test_connections_are_counted_once_with_the_original_labels() -> None:
    metrics = Metrics()
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    first, second = conn(), conn(client="192.168.1.10", protocol="http")
    for info in (first, first, second):
        metrics.on_connection(info)
    labels = {"individual": "c0ffee", "src": "192.168.1.9", "dst": "10.0.0.2",
              "protocol": "tcp", "service": "web"}  # fmt: skip
    assert registry.get_sample_value("flux_connections_total", labels) == 2
    assert (
        registry.get_sample_value(
            "flux_connections_total", {**labels, "src": "192.168.1.10", "protocol": "http"}
        )
        == 1
    )
    assert registry.get_sample_value("flux_active_connections", {"service": "web"}) == 3
    # Ending a connection adds its bytes and never counts it again.
    metrics.on_done(first, RelayResult(100, 2000, None, 0.5))
    metrics.on_done(second, RelayResult(7, 0, "ECONNRESET", 0.1))
    assert registry.get_sample_value("flux_connections_total", labels) == 2
    assert registry.get_sample_value("flux_active_connections", {"service": "web"}) == 1
    assert (
        registry.get_sample_value(
            "flux_bytes_total", {"service": "web", "direction": "to_instance"}
        )
        == 107
    )
    assert (
        registry.get_sample_value("flux_bytes_total", {"service": "web", "direction": "to_client"})
        == 2000
    )


def test_ipv6_instance_address_gives_a_bare_dst() -> None:
    metrics = Metrics()
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    metrics.on_connection(conn(address="[fd00::2]:80", client="fd00::9"))
    assert registry.get_sample_value(
        "flux_connections_total",
        {"individual": "c0ffee", "src": "fd00::9", "dst": "fd00::2", "protocol": "tcp",
         "service": "web"},
    ) == 1  # fmt: skip


def test_connect_failures_iptables_sync_histogram_and_failures() -> None:
    metrics = Metrics()
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    for _ in range(3):
        metrics.on_connect_failure("web", "c1")
    metrics.on_connect_failure("web", "c2")
    assert (
        registry.get_sample_value(
            "flux_connect_failures_total", {"service": "web", "instance": "c1"}
        )
        == 3
    )
    assert registry.get_sample_value("flux_iptables_sync_seconds_count") == 0
    for seconds in (0.0008, 0.003, 0.003, 2.0, 30.0):
        metrics.on_iptables_sync(seconds)

    def bucket(le: str) -> float | None:
        return registry.get_sample_value("flux_iptables_sync_seconds_bucket", {"le": le})

    assert (bucket("0.001"), bucket("0.0025"), bucket("0.005")) == (1, 1, 3)
    assert (bucket("1.0"), bucket("2.5"), bucket("10.0"), bucket("+Inf")) == (3, 4, 4, 5)
    assert registry.get_sample_value("flux_iptables_sync_seconds_count") == 5
    assert registry.get_sample_value("flux_iptables_sync_seconds_sum") == pytest.approx(32.0068)
    assert registry.get_sample_value("flux_iptables_sync_failures_total") == 0
    metrics.on_iptables_sync_failure()
    metrics.on_iptables_sync_failure()
    assert registry.get_sample_value("flux_iptables_sync_failures_total") == 2
    assert registry.get_sample_value("flux_iptables_sync_seconds_count") == 5


def test_bucket_bounds_are_inclusive() -> None:
    counts = BucketCounts((0.1, 1.0))
    for value in (0.1, 0.10001, 1.0, 5.0):
        counts.observe(value)
    assert counts.buckets() == [("0.1", 1.0), ("1.0", 3.0), ("+Inf", 4.0)]


def test_instances_gauge_counts_this_hosts_instances_per_state() -> None:
    agent = FakeAgent()
    registry = build_registry(Metrics(), agent, process=False)

    def gauge(service: str, state: str) -> float | None:
        return registry.get_sample_value("flux_instances", {"service": service, "state": state})

    assert gauge("web", "live") == 1
    assert gauge("web", "draining") == 1
    assert gauge("web", "no address") == 1
    assert gauge("web", "paused") == 0  # every state is listed, so series do not vanish
    assert gauge("db", "unhealthy") == 1 and gauge("db", "live") == 0
    del agent.instances[("web", "c2")]
    assert gauge("web", "draining") == 0  # read at scrape time


def test_http_exchanges_give_counters_summaries_and_a_histogram() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    info = conn(protocol="http")
    roundtrips = list(range(1000, 101_000, 1000))  # 100 exchanges, 1 ms .. 100 ms
    for roundtrip in roundtrips:
        metrics.record_exchange(info, "GET", 200, roundtrip, roundtrip + 500)
    metrics.record_exchange(info, "POST", "503", 40, 90)
    labels = {"individual": "c0ffee", "src": "192.168.1.9", "dst": "10.0.0.2",
              "method": "GET", "code": "200", "service": "web"}  # fmt: skip
    assert registry.get_sample_value("flux_http_total", labels) == 100
    assert (
        registry.get_sample_value("flux_http_total", {**labels, "method": "POST", "code": "503"})
        == 1
    )
    assert registry.get_sample_value("flux_http_roundtrip_usec_count", labels) == 100
    assert registry.get_sample_value("flux_http_roundtrip_usec_sum", labels) == sum(roundtrips)
    assert registry.get_sample_value("flux_http_total_usec_sum", labels) == sum(roundtrips) + 50_000
    for q in QS:
        value = registry.get_sample_value(
            "flux_http_roundtrip_usec", {**labels, "quantile": str(q)}
        )
        exact = exact_quantile(roundtrips, q)
        assert value is not None and exact <= value <= exact * 1.01, (q, value)
    # Ten minutes later the window is empty: NaN quantiles, sums unchanged.
    clock.now += 601
    value = registry.get_sample_value("flux_http_total_usec", {**labels, "quantile": "0.5"})
    assert value is not None and math.isnan(value)
    assert registry.get_sample_value("flux_http_total_usec_count", labels) == 100
    # The aggregatable histogram, in seconds, per service, method and code.
    duration = {"service": "web", "method": "GET", "code": "200"}
    assert (
        registry.get_sample_value(
            "flux_http_request_duration_seconds_bucket", {**duration, "le": "0.01"}
        )
        == 9
    )  # totals 1.5 ms .. 9.5 ms
    assert registry.get_sample_value("flux_http_request_duration_seconds_count", duration) == 100


def test_an_exchange_cut_short_is_code_aborted_and_counted_by_who_cut_it() -> None:
    metrics = Metrics(clock=FakeClock())
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    observe = metrics.exchange_observer(conn(protocol="http"))
    observe("GET", 1 + HTTP_CUT_SIDES.index("instance"), [30_000, 40_000], [2_000_000, 900])
    observe("POST", 1 + HTTP_CUT_SIDES.index("client"), [10], [20])
    observe("GET", 200, [5], [7])
    labels = {"individual": "c0ffee", "src": "192.168.1.9", "dst": "10.0.0.2",
              "method": "GET", "code": "aborted", "service": "web"}  # fmt: skip
    assert registry.get_sample_value("flux_http_total", labels) == 2
    assert registry.get_sample_value("flux_http_total_usec_sum", labels) == 2_000_900
    assert registry.get_sample_value(
        "flux_http_request_duration_seconds_count",
        {"service": "web", "method": "GET", "code": "aborted"}) == 2
    assert registry.get_sample_value("flux_http_total", {**labels, "code": "200"}) == 1
    aborted = {side: registry.get_sample_value(
        "flux_http_aborted_total", {"service": "web", "side": side}) for side in HTTP_CUT_SIDES}
    assert aborted == {"client": 1, "instance": 2, "fluxd": None}


GREETER = "/helloworld.Greeter/SayHello"


def grpc_sample(
    registry: CollectorRegistry, name: str, grpc_service: str, grpc_method: str, **labels: str
) -> float | None:
    return registry.get_sample_value(
        name,
        {"service": "web", "grpc_service": grpc_service, "grpc_method": grpc_method, **labels},
    )


def test_grpc_calls_are_counted_per_method_and_code_besides_http() -> None:
    metrics = Metrics(clock=FakeClock())
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    observe = metrics.exchange_observer(conn(protocol="http"))
    observe("POST", 200, [100, 200, 300], [400, 6_000, 2_000_000], GrpcCall(GREETER, 0))
    observe("POST", 200, [10], [20], GrpcCall(GREETER, 5))
    observe("POST", 200, [10], [30], GrpcCall(GREETER, -1))  # no grpc-status came
    observe("POST", 200, [10], [40], GrpcCall(GREETER, 99))
    observe("POST", 200, [10], [50], GrpcCall(GREETER, 17))
    # Cut short: "aborted", whatever grpc-status came before the cut.
    observe("POST", 1 + HTTP_CUT_SIDES.index("client"), [10], [60], GrpcCall(GREETER, 0))
    observe("POST", 1 + HTTP_CUT_SIDES.index("instance"), [10], [70], GrpcCall(GREETER, -1))
    observe("POST", 200, [10], [80])  # a plain HTTP exchange: no gRPC series

    def calls(code: str) -> float | None:
        return grpc_sample(registry, "flux_grpc_total", "helloworld.Greeter", "SayHello", code=code)

    counts = {code: calls(code) for code in ("OK", "NOT_FOUND", "none", "UNKNOWN", "aborted")}
    assert counts == {"OK": 3, "NOT_FOUND": 1, "none": 1, "UNKNOWN": 2, "aborted": 2}
    assert calls("CANCELLED") is None
    # Every call is an HTTP exchange too (7 completed calls and the plain exchange).
    http = {"individual": "c0ffee", "src": "192.168.1.9", "dst": "10.0.0.2",
            "method": "POST", "code": "200", "service": "web"}  # fmt: skip
    assert registry.get_sample_value("flux_http_total", http) == 8
    assert registry.get_sample_value("flux_http_total", {**http, "code": "aborted"}) == 2
    # One histogram per method, over every code, from the total times.
    histogram = "flux_grpc_duration_seconds"
    assert grpc_sample(registry, f"{histogram}_count", "helloworld.Greeter", "SayHello") == 9
    assert grpc_sample(registry, f"{histogram}_sum", "helloworld.Greeter", "SayHello") == (
        pytest.approx((400 + 6_000 + 2_000_000 + 20 + 30 + 40 + 50 + 60 + 70) / 1e6)
    )
    buckets = {
        le: grpc_sample(registry, f"{histogram}_bucket", "helloworld.Greeter", "SayHello", le=le)
        for le in ("0.0005", "0.01", "2.5", "+Inf")
    }
    assert buckets == {"0.0005": 7, "0.01": 8, "2.5": 9, "+Inf": 9}
    assert grpc_sample(registry, "flux_grpc_folded_total", "other", "other") is None


def test_grpc_status_codes_have_their_canonical_names() -> None:
    canonical = [
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    ]  # fmt: skip
    assert [grpc_code_label(200, code) for code in range(17)] == canonical == list(GRPC_CODES)
    assert grpc_code_label(200, -1) == "none"
    for code in (17, 100, 2**31 - 1, -2):
        assert grpc_code_label(200, code) == "UNKNOWN"
    for cut in range(1, len(HTTP_CUT_SIDES) + 1):
        assert grpc_code_label(cut, 0) == grpc_code_label(cut, -1) == "aborted"


@pytest.mark.parametrize(
    ("path", "labels"),
    [
        (GREETER, ("helloworld.Greeter", "SayHello")),
        ("/grpc.health.v1.Health/Check", ("grpc.health.v1.Health", "Check")),
        ("/Svc/M_1", ("Svc", "M_1")),
        ("/", ("other", "other")),
        ("", ("other", "other")),
        ("/index.html", ("other", "other")),
        ("helloworld.Greeter/SayHello", ("other", "other")),
        ("//SayHello", ("other", "other")),
        ("/helloworld.Greeter/", ("other", "other")),
        ("/a/b/c", ("other", "other")),
        ("/a b/c", ("other", "other")),
        ("/a/b\n", ("other", "other")),
        ("/grüß/gott", ("other", "other")),
        ("/a/\udcff", ("other", "other")),  # not even encodable: would break the scrape
        ("/s/" + "m" * (GRPC_PATH_LIMIT - 3), ("s", "m" * (GRPC_PATH_LIMIT - 3))),
        ("/s/" + "m" * (GRPC_PATH_LIMIT - 2), ("other", "other")),
    ],
)
def test_grpc_method_labels_come_from_a_path_of_the_form_service_method(
    path: str, labels: tuple[str, str]
) -> None:
    assert grpc_method_labels(path) == labels


def test_grpc_methods_beyond_the_cap_fold_into_other_and_are_counted() -> None:
    metrics = Metrics(clock=FakeClock())
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    # Several connections (observers) of one service share its cap.
    observers = [metrics.exchange_observer(conn(client=f"10.1.0.{i}", protocol="http"))
                 for i in range(3)]  # fmt: skip
    for i in range(GRPC_METHODS_PER_SERVICE):
        observers[i % 3]("POST", 200, [1], [2], GrpcCall(f"/pkg.S{i}/Call", 0))
    for i in range(GRPC_METHODS_PER_SERVICE, GRPC_METHODS_PER_SERVICE + 50):
        observers[i % 3]("POST", 200, [1, 1], [2, 3], GrpcCall(f"/pkg.S{i}/Call", 14))
    observers[0]("POST", 200, [1], [2], GrpcCall("/pkg.S0/Call", 14))  # one of the first 100
    observers[1]("POST", 200, [1], [2], GrpcCall("not a path", 0))  # other, but not folded
    # Another service has its own cap.
    metrics.exchange_observer(conn(service="api", protocol="http"))(
        "POST", 200, [1], [2], GrpcCall("/pkg.S999/Call", 0)
    )
    assert grpc_sample(registry, "flux_grpc_total", "pkg.S99", "Call", code="OK") == 1
    assert grpc_sample(registry, "flux_grpc_total", "pkg.S0", "Call", code="UNAVAILABLE") == 1
    assert grpc_sample(registry, "flux_grpc_total", "pkg.S100", "Call", code="UNAVAILABLE") is None
    assert grpc_sample(registry, "flux_grpc_total", "other", "other", code="UNAVAILABLE") == 100
    assert grpc_sample(registry, "flux_grpc_total", "other", "other", code="OK") == 1
    assert grpc_sample(registry, "flux_grpc_duration_seconds_count", "other", "other") == 101
    assert registry.get_sample_value("flux_grpc_folded_total", {"service": "web"}) == 100
    assert registry.get_sample_value("flux_grpc_folded_total", {"service": "api"}) is None
    assert registry.get_sample_value(
        "flux_grpc_total",
        {"service": "api", "grpc_service": "pkg.S999", "grpc_method": "Call", "code": "OK"},
    ) == 1
    methods = {(key[0], key[1]) for key in metrics.grpc_calls if key[0] == "web"}
    assert len(methods) == GRPC_METHODS_PER_SERVICE + 1  # and "other"


def test_an_observer_keeps_slots_only_for_bounded_label_sets() -> None:
    """Folded or unrecognised paths and undefined codes are unboundedly many: an observer must
    not keep a slot for each (it lives as long as its label set), yet count them all."""
    metrics = Metrics(clock=FakeClock())
    observe = metrics.exchange_observer(conn(protocol="http"))
    slots = next(cell.cell_contents for cell in observe.__closure__ or ()
                 if isinstance(cell.cell_contents, dict))  # fmt: skip
    for i in range(GRPC_METHODS_PER_SERVICE):
        observe("POST", 200, [1], [2], GrpcCall(f"/pkg.S{i}/Call", i % 17))
        observe("POST", 200, [1], [2], GrpcCall(f"/pkg.S{i}/Call", i % 17))
    assert len(slots) == GRPC_METHODS_PER_SERVICE
    for i in range(1000):
        observe("POST", 200, [1], [2], GrpcCall(f"/pkg.More{i}/Call", 0))
        observe("POST", 200, [1], [2], GrpcCall(f"/junk{i}", 0))
        observe("POST", 200, [1], [2], GrpcCall(GREETER.replace("pkg", "x"), 17 + i))
    assert len(slots) == GRPC_METHODS_PER_SERVICE
    calls = {key: counts.count for key, counts in metrics.grpc_calls.items()}
    assert calls[("web", "other", "other", "OK")] == 2000
    assert calls[("web", "other", "other", "UNKNOWN")] == 1000
    assert metrics.grpc_folded == {"web": 2000}


def test_record_exchange_takes_the_grpc_call_too() -> None:
    metrics = Metrics(clock=FakeClock())
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    info = conn(protocol="http")
    metrics.record_exchange(info, "POST", 200, 100, 1500, GrpcCall(GREETER, 4))
    metrics.record_exchange(info, "POST", 200, 100, 1500)
    assert grpc_sample(
        registry, "flux_grpc_total", "helloworld.Greeter", "SayHello", code="DEADLINE_EXCEEDED"
    ) == 1
    assert grpc_sample(
        registry, "flux_grpc_duration_seconds_bucket", "helloworld.Greeter", "SayHello", le="0.0025"
    ) == 1
    assert len(metrics.grpc_calls) == 1


def test_bucket_counts_add_up_only_with_the_same_bounds() -> None:
    a, b = BucketCounts(HTTP_DURATION_BUCKETS), BucketCounts(HTTP_DURATION_BUCKETS)
    a.observe_us([100, 20_000])
    b.observe_us([100, 90_000_000])
    a.add(b)
    assert (a.count, a.buckets()[0], a.buckets()[-1]) == (4, ("0.0005", 2.0), ("+Inf", 4.0))
    assert a.sum == pytest.approx(90.0202)
    with pytest.raises(ValueError, match="bucket bounds differ"):
        a.add(BucketCounts((1, 2)))


def test_registry_has_the_standard_collectors() -> None:
    registry = build_registry(Metrics())
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    assert registry.get_sample_value("process_open_fds") is not None
    text = generate_latest(registry).decode()
    assert "python_info{" in text
    assert "python_gc_objects_collected_total" in text


def busy_metrics() -> Metrics:
    metrics = Metrics()
    for i in range(3):
        info = conn(instance=f"c{i}", protocol="http")
        metrics.on_connection(info)
        metrics.on_done(info, RelayResult(10 * i, 20 * i, None, 0.1))
        metrics.record_exchange(info, "GET", 200, 1000 + i, 2000 + i)
        metrics.record_exchange(info, "POST", 200, 1000 + i, 2000 + i, GrpcCall(GREETER, i - 1))
        metrics.record_exchange(info, "POST", 1, 10, 20, GrpcCall(f"/s.S{i}/M", 0))
    observe = metrics.exchange_observer(conn(protocol="http"))
    for i in range(GRPC_METHODS_PER_SERVICE + 1):  # past the cap: the last ones are folded
        observe("POST", 200, [5], [9], GrpcCall(f"/pkg.S{i}/Call", 0))
    metrics.on_connect_failure("web", "c9")
    metrics.on_iptables_sync(0.004)
    return metrics


def promtool_check(exposition: bytes) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool is not None, (
        "promtool is missing: install Debian's 'prometheus' package (scripts/setup-system.sh)"
    )
    return subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition.decode(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_exposition_passes_promtool() -> None:
    metrics = busy_metrics()
    metrics.relay_counters.append(SpliceRelay(shards=2).engine_counters)  # every engine name
    registry = build_registry(metrics, FakeAgent())
    result = promtool_check(generate_latest(registry))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_catches_what_it_should() -> None:
    # The check above could pass vacuously if promtool accepted anything.
    bad = b"# TYPE flux_bad counter\nflux_bad 1\n"
    assert promtool_check(bad).returncode != 0


# -- the HTTP endpoint ---------------------------------------------------------------------------


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[MetricsPlugin, FakeBalancer, FakeAgent]]:
    balancer, agent = FakeBalancer(), FakeAgent()
    plugin = MetricsPlugin(
        busy_metrics(),
        listen=("127.0.0.1", 0),
        host_address="10.0.0.1",
        balancer=balancer,
        agent=agent,
        version="9.9.9",
    )
    await plugin.start()
    try:
        yield plugin, balancer, agent
    finally:
        await plugin.close()


async def fetch(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,  # trust_env=False: no proxy
        session.get(f"http://127.0.0.1:{port}{path}", headers=headers or {}) as response,
    ):
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def test_metrics_endpoint_serves_the_registry(endpoint) -> None:
    plugin, _, _ = endpoint
    assert plugin.port
    status, content_type, body = await fetch(plugin.port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert 'flux_connections_total{dst="10.0.0.2",individual="c1",protocol="http"' in body
    assert 'flux_bytes_total{direction="to_client",service="web"} 60.0' in body
    assert "process_cpu_seconds_total" in body
    # Hooks called after a scrape show in the next one.
    plugin.metrics.on_connect_failure("web", "c9")
    _, _, body = await fetch(plugin.port, "/metrics")
    assert 'flux_connect_failures_total{instance="c9",service="web"} 2.0' in body
    result = promtool_check(body.encode())
    assert result.returncode == 0, result.stdout + result.stderr


async def test_metrics_endpoint_speaks_openmetrics_when_asked(endpoint) -> None:
    plugin, _, _ = endpoint
    status, content_type, body = await fetch(
        plugin.port, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert "# TYPE flux_http_roundtrip_usec summary" in body
    assert "# TYPE flux_grpc counter" in body and "# TYPE flux_grpc_folded counter" in body
    assert "# TYPE flux_grpc_duration_seconds histogram" in body


async def test_healthz_follows_the_chain_and_the_event_stream(endpoint) -> None:
    plugin, balancer, agent = endpoint
    assert await fetch(plugin.port, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    agent.docker_connected = False
    status, _, body = await fetch(plugin.port, "/healthz")
    assert status == 503 and body == "Docker event stream is down\n"
    balancer.ready = False
    status, _, body = await fetch(plugin.port, "/healthz")
    assert status == 503 and body.count("\n") == 1
    assert "iptables chain not installed" in body and "Docker event stream is down" in body
    agent.docker_connected = True
    balancer.ready = True
    assert (await fetch(plugin.port, "/healthz"))[0] == 200


async def test_status_is_json_with_services_pools_and_instances(endpoint) -> None:
    plugin, balancer, _ = endpoint
    status, content_type, body = await fetch(plugin.port, "/status")
    assert status == 200 and content_type.startswith("application/json")
    document = json.loads(body)
    assert document["host"] == "10.0.0.1" and document["version"] == "9.9.9"
    assert document["healthy"] is True and document["problems"] == []
    assert document["balancer"]["ready"] is True
    pool = document["balancer"]["services"]["web"]["instances"]
    assert [(i["name"], i["ready"], i["retry_in"]) for i in pool] == [
        ("c1", True, None),
        ("c2", False, 1.5),
    ]
    assert document["agent"]["docker_connected"] is True
    assert document["agent"]["instances"] == [
        {"service": "db", "instance": "c4", "state": "unhealthy", "address": "10.0.0.1:5432",
         "rule": None},
        {"service": "web", "instance": "c1", "state": "live", "address": "10.0.0.1:32768",
         "rule": "r1"},
        {"service": "web", "instance": "c2", "state": "draining", "address": "10.0.0.1:32769",
         "rule": None},
        {"service": "web", "instance": "c3", "state": "no address", "address": None,
         "rule": None},
    ]  # fmt: skip
    balancer.ready = False
    document = json.loads((await fetch(plugin.port, "/status"))[2])
    assert document["healthy"] is False and len(document["problems"]) == 1


async def test_a_port_in_use_is_one_clear_error_and_retried() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        plugin = MetricsPlugin(Metrics(), listen=("127.0.0.1", port), host_address="10.0.0.1")
        with pytest.raises(MetricsListenError) as caught:
            await plugin.serve()
        message = str(caught.value)
        assert (
            message == f"cannot listen for Prometheus on 127.0.0.1:{port}: Address already in use"
        )
        assert plugin.port is None
    finally:
        holder.close()
    # The supervisor runs serve() again; with the port free it comes up.
    task = asyncio.create_task(plugin.serve())
    try:
        async with asyncio.timeout(5):
            while plugin.port is None:
                await asyncio.sleep(0.01)
        assert (await fetch(port, "/healthz"))[0] == 200
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch(port, "/healthz")


async def test_stop_accepting_closes_the_listener(endpoint) -> None:
    plugin, _, _ = endpoint
    port = plugin.port
    assert (await fetch(port, "/"))[0] == 200
    await plugin.stop_accepting()
    await plugin.remove_rules()
    await plugin.drain(1.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch(port, "/metrics")
    await plugin.close()  # twice is fine


def test_no_listen_address_means_no_component() -> None:
    plugin = MetricsPlugin(Metrics(), listen=None, host_address="10.0.0.1")
    assert plugin.components() == []
    listening = MetricsPlugin(Metrics(), listen=("", 9000), host_address="10.0.0.1")
    assert [name for name, _ in listening.components()] == ["metrics", "metrics-history"]


# -- advertisement -------------------------------------------------------------------------------


async def run_until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.01)


async def test_target_is_advertised_on_the_lease_and_rewritten_after_a_loss() -> None:
    backend = MemoryBackend()
    store = MemoryStore(backend)
    lease = asyncio.create_task(store.run_lease(30))
    plugin = MetricsPlugin(
        Metrics(), listen=("127.0.0.1", 0), host_address="127.0.0.1", store=store
    )
    server = asyncio.create_task(plugin.serve())
    try:
        await store.wait_lease()

        async def advertised() -> bool:
            return await store.get_prometheus_targets() == {"127.0.0.1": f"127.0.0.1:{plugin.port}"}

        await run_until(advertised)
        key = "/weave-flux/prometheus-targets/127.0.0.1"
        assert backend.lease_of(key) == store.lease_id
        # The lease is lost (etcd outage longer than the TTL): the keeper rewrites the target.
        old = store.lease_id
        assert old is not None
        backend.expire_lease(old)
        await run_until(advertised)
        assert backend.lease_of(key) not in (0, old)
        # Revoking the lease at shutdown (after the keeper stopped, as the daemon does) takes
        # the target with it.
        lease.cancel()
        await asyncio.gather(lease, return_exceptions=True)
        await store.revoke_lease()
        assert await store.get_prometheus_targets() == {}
    finally:
        for task in (server, lease):
            task.cancel()
        await asyncio.gather(server, lease, return_exceptions=True)


async def test_explicit_advertise_address_and_store_errors_do_not_stop_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    lease = asyncio.create_task(store.run_lease(30))
    await store.wait_lease()
    plugin = MetricsPlugin(
        Metrics(), listen=("127.0.0.1", 0), host_address="10.1.2.3",
        advertise="192.168.42.221:9000", store=store,
    )  # fmt: skip
    named = MetricsPlugin(
        Metrics(), listen=("127.0.0.1", 0), host_address="10.1.2.4",
        advertise="metrics.example:9000", store=store,
    )  # fmt: skip
    try:
        for p in (plugin, named):
            await p.start()
            await p.advertise()
        assert await store.get_prometheus_targets() == {"10.1.2.3": "192.168.42.221:9000"}
        assert plugin.advertised == "192.168.42.221:9000" and named.advertised is None
        assert "cannot advertise the metrics endpoint metrics.example:9000" in caplog.text
        store.inject_error()
        await plugin.advertise()  # etcd down: logged, not raised
        assert "is delayed" in caplog.text
        assert (await fetch(named.port, "/healthz"))[0] == 200
    finally:
        store.clear_error()
        for p in (plugin, named):
            await p.close()
        lease.cancel()
        await asyncio.gather(lease, return_exceptions=True)


# -- the daemon's wiring -------------------------------------------------------------------------


def test_build_plugins_wires_the_hooks_only_when_listening() -> None:
    store = MemoryStore()
    settings = Settings(host_ip="10.1.2.3", chain="FLUXTW", listen_prometheus=":9100")
    agent, balancer, plugin = _build_plugins(settings, store)
    assert isinstance(plugin, MetricsPlugin) and plugin.name == "metrics"
    metrics = plugin.metrics
    assert isinstance(balancer, Balancer)
    assert balancer.on_connection == metrics.on_connection
    assert balancer.on_done == metrics.on_done
    assert balancer.on_connect_failure == metrics.on_connect_failure
    assert balancer.on_reset == metrics.on_reset
    assert balancer.iptables._on_sync == metrics.on_iptables_sync
    assert balancer.iptables._on_sync_failure == metrics.on_iptables_sync_failure
    assert plugin._listen == ("", 9100)
    assert plugin._advertise == "10.1.2.3:9100"  # derived: host IP + listen port
    assert plugin._balancer is balancer and plugin._agent is agent
    assert metrics.relay_counters == [balancer.relay.engine_counters]
    quiet = _build_plugins(Settings(host_ip="10.1.2.3", chain="FLUXTW"), store)
    assert [p.name for p in quiet] == ["agent", "balancer"]
    assert quiet[1].on_connection is None and quiet[1].iptables._on_sync is None
    assert quiet[1].iptables._on_sync_failure is None


# -- end to end: the real balancer ---------------------------------------------------------------


class EchoBackend:
    """Echoes whatever a client sends until the client half-closes, then closes."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> EchoBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def exchange(vip: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(vip, port), 5)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nat_rules(chain: str) -> str:
    return subprocess.run(
        ["iptables", "-w", "-t", "nat", "-S", chain], capture_output=True, text=True, timeout=30
    ).stdout


@pytest.mark.iptables
async def test_real_connections_through_the_balancer_are_counted() -> None:
    chain = "FLUXT" + secrets.token_hex(3).upper()
    backend = MemoryBackend()
    admin, host = MemoryStore(backend), MemoryStore(backend)
    metrics = Metrics()
    relay = make_relay()
    assert relay.acceptor is not None
    metrics.counters.append(relay.acceptor.counts)  # what the engine counts, as fluxd wires it
    balancer = Balancer(
        MemoryStore(backend),
        relay,
        IPTables(chain, on_sync=metrics.on_iptables_sync),
        bind_ip=lambda: "127.0.0.1",
        bridge="lo",
        connect_timeout=1.0,
        on_connection=metrics.on_connection,
        on_done=metrics.on_done,
        on_connect_failure=metrics.on_connect_failure,
        on_retry=metrics.on_retry,
    )
    plugin = MetricsPlugin(
        metrics, listen=("127.0.0.1", 0), host_address="127.0.0.1", balancer=balancer
    )
    echo = await EchoBackend().start()
    n = secrets.randbelow(200)
    vip, dead_vip = f"127.42.77.{n + 1}", f"127.42.78.{n + 1}"
    await host.register_host(Host(address="127.0.0.1"))  # only registered hosts are served
    tasks = [asyncio.create_task(host.run_lease(30)), asyncio.create_task(balancer.run())]

    async def until(predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate():
                for task in tasks:
                    if task.done():
                        task.result()
                await asyncio.sleep(0.01)

    try:
        await plugin.start()
        await host.wait_lease()
        await until(lambda: balancer.ready)
        await admin.add_service("echo", Service(address=f"{vip}:7000"))
        await admin.add_service("dead", Service(address=f"{dead_vip}:7000"))
        live = Instance(host=HostRef(address="127.0.0.1"), address=f"127.0.0.1:{echo.port}")
        gone = Instance(host=HostRef(address="127.0.0.1"), address=f"127.0.0.1:{closed_port()}")
        await host.add_instance("echo", "e0", live)
        await host.add_instance("dead", "d0", gone)
        also_gone = gone.model_copy(update={"address": f"127.0.0.1:{closed_port()}"})
        await host.add_instance("dead", "d1", also_gone)
        await until(
            lambda: f"-d {vip}/32" in nat_rules(chain) and f"-d {dead_vip}/32" in nat_rules(chain)
        )
        sizes = [1, 1000, 65536, 300_000, 17, 4096, 0, 123_456]
        replies = await asyncio.gather(*(exchange(vip, 7000, b"x" * s) for s in sizes))
        assert [len(r) for r in replies] == sizes
        await until(lambda: metrics.totals()[2].get("echo") == 0)
        with pytest.raises(OSError):
            await exchange(dead_vip, 7000, b"hello")
        # Both instances were tried: one failed connect, then one retry on the other.
        await until(
            lambda: metrics.retries.get("dead", 0) >= 1
            and metrics.connect_failures.get(("dead", "d0"), 0) >= 1
            and metrics.connect_failures.get(("dead", "d1"), 0) >= 1
        )

        _, _, body = await fetch(plugin.port, "/metrics")
        registry = plugin.registry
        labels = {"individual": "e0", "src": "127.0.0.1", "dst": "127.0.0.1",
                  "protocol": "tcp", "service": "echo"}  # fmt: skip
        assert registry.get_sample_value("flux_connections_total", labels) == len(sizes)
        total = sum(value for key, value in metrics.totals()[0].items() if key[-1] == "echo")
        assert total == len(sizes)
        for direction in ("to_instance", "to_client"):
            assert registry.get_sample_value(
                "flux_bytes_total", {"service": "echo", "direction": direction}
            ) == sum(sizes)
        assert (
            registry.get_sample_value(
                "flux_connect_failures_total", {"service": "dead", "instance": "d0"}
            )
            >= 1
        )
        assert registry.get_sample_value("flux_connect_retries_total", {"service": "dead"}) >= 1
        assert registry.get_sample_value("flux_iptables_sync_seconds_count") >= 2
        assert 'flux_connections_total{dst="127.0.0.1",individual="e0"' in body
        assert (await fetch(plugin.port, "/healthz"))[0] == 200
        document = json.loads((await fetch(plugin.port, "/status"))[2])
        assert document["balancer"]["services"]["echo"]["state"] == "forwarding"
    finally:
        await plugin.close()
        await balancer.stop_accepting()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await balancer.remove_rules()
        await balancer.drain(1.0)
        await echo.stop()
        await IPTables(chain).cleanup()


# -- end to end: a fluxd process -----------------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str) -> tuple[int, str]:
    try:
        with _OPENER.open(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def fluxd(etcd: EtcdServer) -> Iterator[tuple[subprocess.Popen[str], int, list[str], str]]:
    port = closed_port()
    chain = "FLUXT" + secrets.token_hex(3).upper()
    args = ["-host-ip", "127.0.0.1", "-bridge", "lo", "-chain", chain, "-host-ttl", "10",
            "-listen-prometheus", f"127.0.0.1:{port}"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "flux", *args],
        env={**os.environ, "ETCD_ADDRESS": etcd.endpoint},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    try:
        yield process, port, lines, chain
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        subprocess.run(
            [sys.executable, "-m", "flux", "cleanup", "-chain", chain, "-host-ip", "127.0.0.1"],
            capture_output=True,
            timeout=60,
        )


@pytest.mark.etcd
@pytest.mark.docker
@pytest.mark.iptables
def test_fluxd_serves_metrics_health_and_advertises(etcd: EtcdServer, fluxd) -> None:
    process, port, lines, _ = fluxd
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    health: tuple[int, str] = (0, "")
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            health = http(base + "/healthz")
            if health[0] == 200:
                break
        time.sleep(0.1)
    assert health == (200, "ok\n"), "\n".join(lines[-30:])
    key = "/weave-flux/prometheus-targets/127.0.0.1"
    assert etcd.get(key) == json.dumps(f"127.0.0.1:{port}")
    status, body = http(base + "/metrics")
    assert status == 200
    assert "flux_iptables_sync_seconds_count" in body and "process_open_fds" in body
    document = json.loads(http(base + "/status")[1])
    assert document["healthy"] is True and document["agent"]["docker_connected"] is True
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert etcd.get(key) is None  # on the lease, which shutdown revokes
    with pytest.raises(OSError):
        http(base + "/healthz")


@given(st.lists(st.integers(min_value=0, max_value=200_000_000), min_size=1, max_size=300))
@settings(max_examples=60, deadline=None)
def test_batched_exchanges_equal_one_by_one(values: list[int]) -> None:
    """The relay's batches (per connection and label set) record what single calls record."""
    info = ConnectionInfo("web", "http", "c1", "10.0.0.2:80", "10.0.0.9")
    one_by_one, batched = Metrics(clock=lambda: 0.0), Metrics(clock=lambda: 0.0)
    for value in values:
        one_by_one.record_exchange(info, "GET", 200, value // 2, value)
    observe = batched.exchange_observer(info)
    observe("GET", 200, [value // 2 for value in values[:7]], values[:7])
    observe("GET", 200, [value // 2 for value in values[7:]], values[7:])
    (a,), (b,) = one_by_one.exchanges.values(), batched.exchanges.values()
    for x, y in ((a.roundtrip, b.roundtrip), (a.total, b.total)):
        assert (x.count, x.sum) == (y.count, y.sum)
        assert x.count == len(values)
        assert x.quantiles(QS) == y.quantiles(QS)
    (da,), (db,) = one_by_one.http_durations.values(), batched.http_durations.values()
    assert da.counts == db.counts
    assert da.count == db.count == len(values)
    assert math.isclose(da.sum, db.sum, rel_tol=1e-9)


def test_scrape_pulls_from_the_sources_first() -> None:
    metrics = Metrics()
    info = ConnectionInfo("web", "http", "c1", "10.0.0.2:80", "10.0.0.9")
    observe = metrics.exchange_observer(info)
    queued = [("GET", 200, [10, 20], [30, 40])]
    metrics.sources.append(lambda: [observe(*batch) for batch in queued] and queued.clear())
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    text = generate_latest(registry).decode()
    assert "flux_http_roundtrip_usec_count" in text
    assert registry.get_sample_value(
        "flux_http_total",
        {"individual": "c1", "src": "10.0.0.9", "dst": "10.0.0.2", "method": "GET",
         "code": "200", "service": "web"},
    ) == 2.0


def test_requests_answered_by_fluxd_are_counted_per_code() -> None:
    metrics = Metrics()
    info = ConnectionInfo("web", "http", "c1", "10.0.0.2:80", "10.0.0.9")
    for answered in (400, 400, 431, 408, 0):
        metrics.on_connection(info)
        metrics.on_done(info, RelayResult(10, 20, None, 0.1, answered))
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    value = registry.get_sample_value
    assert value("flux_http_rejected_total", {"service": "web", "code": "400"}) == 2.0
    assert value("flux_http_rejected_total", {"service": "web", "code": "431"}) == 1.0
    assert value("flux_http_rejected_total", {"service": "web", "code": "408"}) == 1.0
    assert value("flux_http_rejected_total", {"service": "web", "code": "0"}) is None


def test_requests_answered_by_fluxd_are_counted_per_entry_point() -> None:
    metrics = Metrics()
    vip = ConnectionInfo("web", "http", "c1", "10.0.0.2:80", "10.0.0.9")
    published = vip._replace(entry="published:8080")
    for info, answered in ((vip, 400), (published, 400), (published, 408), (published, 0)):
        metrics.on_connection(info)
        metrics.on_done(info, RelayResult(10, 20, None, 0.1, answered))
    # The engine's own answers come per entry point as well, and add up with these.
    engine = EngineCounts({}, {}, {}, {("web", "published:8080", "400"): 3}, {})
    metrics.counters.append(lambda: engine)
    # Clients reset because no instance could take them: code "reset", not an HTTP rejection.
    metrics.on_reset("web", "published:8080")
    metrics.on_reset("web", "published:8080")
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    value = registry.get_sample_value
    answered = "flux_entry_answered_total"
    assert value(answered, {"service": "web", "entry": "vip", "code": "400"}) == 1.0
    assert value(answered, {"service": "web", "entry": "published:8080", "code": "400"}) == 4.0
    assert value(answered, {"service": "web", "entry": "published:8080", "code": "408"}) == 1.0
    assert value(answered, {"service": "web", "entry": "vip", "code": "408"}) is None
    assert value(answered, {"service": "web", "entry": "published:8080", "code": "reset"}) == 2.0
    assert value("flux_http_rejected_total", {"service": "web", "code": "reset"}) is None
    assert value("flux_http_rejected_total", {"service": "web", "code": "400"}) == 5.0
    assert value("flux_http_rejected_total", {"service": "web", "code": "408"}) == 1.0


def test_a_shared_ports_answers_are_counted_under_the_router_or_the_service_chosen() -> None:
    metrics = Metrics()
    # The host router answers before any service is chosen: service="".
    for status in (404, 404, 408, 431):
        metrics.on_entry_answered("published:80", status)
    # A 421 comes from the relay of the service the connection went to, once.
    www = ConnectionInfo("www", "http", "c1", "10.0.0.2:80", "10.0.0.9", "published:80")
    metrics.on_connection(www)
    metrics.on_done(www, RelayResult(10, 20, None, 0.1, 421))
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    value = registry.get_sample_value
    answered = "flux_entry_answered_total"
    router = {"service": "", "entry": "published:80"}
    assert value(answered, {**router, "code": "404"}) == 2.0
    assert value(answered, {**router, "code": "408"}) == 1.0
    assert value(answered, {**router, "code": "431"}) == 1.0
    assert value(answered, {**router, "code": "421"}) is None
    assert value(answered, {"service": "www", "entry": "published:80", "code": "421"}) == 1.0
    assert value("flux_http_rejected_total", {"service": "www", "code": "421"}) == 1.0
    assert value("flux_http_rejected_total", {"service": "", "code": "404"}) is None


# -- client addresses: at most max_clients per service -------------------------------------------


def src_values(registry: CollectorRegistry, family: str, service: str) -> set[str]:
    return {
        sample.labels["src"]
        for metric in registry.collect()
        if metric.name == family
        for sample in metric.samples
        if sample.labels.get("service") == service
    }


def test_clients_beyond_max_clients_are_folded_into_other_per_service() -> None:
    metrics = Metrics(clock=FakeClock(), max_clients=3)
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    clients = [f"192.0.2.{i}" for i in range(1, 8)]
    for client in clients + clients[:2]:  # the first two come back once named
        info = conn(client=client, protocol="http")
        metrics.on_connection(info)
        metrics.record_exchange(info, "GET", 200, 100, 200)
        metrics.on_done(info, RelayResult(1, 2, None, 0.1))
    # Another service names its own first clients, whatever "web" named.
    metrics.on_connection(conn(service="db", client=clients[6]))
    named = {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
    for family in ("flux_connections", "flux_http", "flux_http_roundtrip_usec",
                   "flux_http_total_usec"):
        assert src_values(registry, family, "web") == named | {"other"}, family
    assert src_values(registry, "flux_connections", "db") == {"192.0.2.7"}
    labels = {"individual": "c0ffee", "dst": "10.0.0.2", "protocol": "http", "service": "web"}
    count = registry.get_sample_value
    assert count("flux_connections_total", {**labels, "src": "192.0.2.1"}) == 2
    assert count("flux_connections_total", {**labels, "src": "other"}) == 4
    http = {"individual": "c0ffee", "dst": "10.0.0.2", "method": "GET", "code": "200",
            "service": "web"}  # fmt: skip
    assert count("flux_http_total", {**http, "src": "other"}) == 4
    assert count("flux_http_roundtrip_usec_count", {**http, "src": "other"}) == 4
    # Every connection is still counted: folding moves counts, it loses none.
    total = sum(
        count("flux_connections_total", {**labels, "src": src}) or 0.0
        for src in named | {"other"}
    )
    assert total == 9


def test_engine_tallies_are_folded_into_the_same_clients() -> None:
    """The engine's clients (and its own "other") share the service's set with the Python
    path's: a client the engine named after the set filled up is counted as other."""
    metrics = Metrics(max_clients=2)
    metrics.on_connection(conn(client="192.0.2.1"))
    engine = EngineCounts(
        {
            ("web", "tcp", "c0ffee", "10.0.0.2:8080", "192.0.2.1"): 5,
            ("web", "tcp", "c0ffee", "10.0.0.2:8080", "192.0.2.2"): 1,
            ("web", "tcp", "c0ffee", "10.0.0.2:8080", "192.0.2.3"): 2,
            ("web", "tcp", "c0ffee", "10.0.0.2:8080", OTHER_CLIENT): 7,
        },
        {}, {}, {}, {},
    )  # fmt: skip
    metrics.counters.append(lambda: engine)
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    labels = {"individual": "c0ffee", "dst": "10.0.0.2", "protocol": "tcp", "service": "web"}
    count = registry.get_sample_value
    assert src_values(registry, "flux_connections", "web") == {"192.0.2.1", "192.0.2.2", "other"}
    assert count("flux_connections_total", {**labels, "src": "192.0.2.1"}) == 6
    assert count("flux_connections_total", {**labels, "src": "192.0.2.2"}) == 1
    assert count("flux_connections_total", {**labels, "src": "other"}) == 9
    # A second scrape counts the same, with the same names.
    assert count("flux_connections_total", {**labels, "src": "other"}) == 9


def test_max_clients_zero_names_no_client() -> None:
    metrics = Metrics(max_clients=0)
    metrics.on_connection(conn())
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    assert src_values(registry, "flux_connections", "web") == {"other"}


def test_100000_distinct_clients_leave_memory_flat() -> None:
    """100,000 client addresses, each with a connection and an HTTP exchange: once the first
    thousand have filled the service's names and its "other" label sets, the other 99,000
    allocate nothing that stays (tracemalloc) and the process's RSS does not grow by more than
    what a few label sets would cost."""
    metrics = Metrics(clock=FakeClock())
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))

    def clients(first: int, last: int) -> None:
        for i in range(first, last):
            info = conn(client=f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", protocol="http")
            metrics.on_connection(info)
            metrics.record_exchange(info, "GET", 200, 100 + i % 1000, 200 + i % 1000)
            metrics.on_done(info, RelayResult(10, 20, None, 0.01))

    clients(0, 1000)
    generate_latest(registry)
    tracemalloc.start()
    try:
        rss_before = rss_bytes()
        before = tracemalloc.take_snapshot()
        clients(1000, 100_000)
        generate_latest(registry)
        after = tracemalloc.take_snapshot()
        rss_after = rss_bytes()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, after.compare_to(before, "lineno")[:10]
    assert rss_after - rss_before < 4 * 1024 * 1024, (rss_before, rss_after)
    assert len(metrics.clients["web"]) == 100
    assert len(src_values(registry, "flux_connections", "web")) == 101
    assert len(src_values(registry, "flux_http_roundtrip_usec", "web")) == 101
    assert len(metrics.exchanges) == 101
    other = {"individual": "c0ffee", "dst": "10.0.0.2", "protocol": "http", "service": "web",
             "src": "other"}  # fmt: skip
    assert registry.get_sample_value("flux_connections_total", other) == 99_900


def loopback_clients(count: int) -> Iterator[str]:
    """``count`` distinct addresses of 127.0.0.0/8 (every one is this host's, on lo), from
    127.2.0.1 on, skipping .0 and the last octets above 250."""
    produced = 0
    for second in range(2, 255):
        for third in range(256):
            for fourth in range(1, 251):
                if produced == count:
                    return
                yield f"127.{second}.{third}.{fourth}"
                produced += 1


async def test_100000_real_client_addresses_through_the_engine_leave_memory_flat() -> None:
    """100,000 clients, each from its own address of 127.0.0.0/8, connect through a listener
    whose engine accepts them (two shards) to an instance: every connection is counted, under
    at most 100 named client addresses and "other", the engine's tallies stay bounded, and the
    process's RSS is about what it was after the first 2,000 (loopback only; 500 connections at
    a time, each closed with a reset, so nothing lingers in TIME_WAIT)."""
    total, batch = 100_000, 500
    relay = SpliceRelay(shards=2, max_clients=100)
    await relay.start()
    metrics = Metrics(max_clients=100)
    metrics.sources.append(relay.flush)
    metrics.counters.append(relay.counts)
    metrics.relay_counters.append(relay.engine_counters)
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    instance = socket.create_server(("127.0.0.1", 0), backlog=4096)
    held: list[socket.socket] = []
    accepting = threading.Event()
    accepting.set()

    def accept_forever() -> None:  # the instance: takes connections, keeps them until told
        instance.settimeout(0.2)
        while accepting.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(instance.accept()[0])

    acceptor = threading.Thread(target=accept_forever, daemon=True)
    acceptor.start()
    loop = asyncio.get_running_loop()
    pool = Pool(now=loop.time, rng=random.Random(9))
    pool.update({"c0ffee": f"127.0.0.1:{instance.getsockname()[1]}"})
    # A client handed over before the engine has the pool goes the Python way: counted there.
    listener = Listener("edge", "tcp", "127.0.0.1", pool, relay, connect_timeout=5.0,
                        budget=ConnectionBudget(), on_connection=metrics.on_connection,
                        on_done=metrics.on_done)  # fmt: skip
    port = listener.open()
    addresses = loopback_clients(total)
    rss_warm = 0
    try:
        for done in range(0, total, batch):
            clients = []
            for address in itertools.islice(addresses, batch):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.bind((address, 0))
                client.connect(("127.0.0.1", port))
                clients.append(client)
            deadline = time.monotonic() + 20
            while len(held) < len(clients):  # every one reached the instance: counted
                assert time.monotonic() < deadline, (done, len(held))
                await asyncio.sleep(0.005)
            for sock in clients + held:
                sock.close()
            held.clear()
            if done + batch == 2000:
                generate_latest(registry)
                rss_warm = rss_bytes()
            elif (done + batch) % 20_000 == 0:
                generate_latest(registry)  # scrapes along the way, as Prometheus would
        generate_latest(registry)
        rss_end = rss_bytes()
        named = src_values(registry, "flux_connections", "edge")
        assert len(named) == 101 and "other" in named
        counted = sum(
            registry.get_sample_value(
                "flux_connections_total",
                {"individual": "c0ffee", "src": src, "dst": "127.0.0.1", "protocol": "tcp",
                 "service": "edge"},
            ) or 0.0
            for src in named
        )  # fmt: skip
        assert counted == total
        for engine in relay.engines:  # each shard named at most 100 clients, plus "other"
            assert len(engine.service_counts(1).tally) <= 101
        # Every client was accepted by one shard or the other (those handed over too), and
        # SO_REUSEPORT spread them: each shard's count is exported under its number.
        shards = [
            registry.get_sample_value("flux_engine_shard_accepted_total", {"shard": str(i)})
            for i in range(3)
        ]
        assert shards[2] is None and sum(shards[:2]) == total, shards
        assert min(shards[:2]) > total * 0.3, shards
        assert rss_end - rss_warm < 8 * 1024 * 1024, (rss_warm, rss_end)
    finally:
        accepting.clear()
        acceptor.join(5)
        listener.close()
        await relay.close(1.0)
        instance.close()
        for sock in held:
            sock.close()


def rss_bytes() -> int:
    """This process's resident set size now (not its peak), from /proc."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the engine's own counters -------------------------------------------------------------------


def engine_sample(registry: CollectorRegistry, family: str, label: str, name: str) -> float | None:
    return registry.get_sample_value(family, {label: name})


def test_engine_counters_are_exported_by_name_whatever_the_names() -> None:
    metrics = Metrics()
    shard = RelayCounters({"http_idle_closed": 2, "a_counter_added_later": 7}, {"pipes_idle": 3})
    metrics.relay_counters += [lambda: shard, lambda: shard, lambda: None]
    registry = CollectorRegistry()
    registry.register(FluxCollector(metrics))
    text = generate_latest(registry).decode()
    assert "# TYPE flux_engine_events_total counter" in text
    assert "# TYPE flux_engine_levels gauge" in text
    events, levels = "flux_engine_events_total", "flux_engine_levels"
    assert engine_sample(registry, events, "event", "http_idle_closed") == 4
    assert engine_sample(registry, events, "event", "a_counter_added_later") == 14
    assert engine_sample(registry, levels, "level", "pipes_idle") == 6
    assert engine_sample(registry, events, "event", "pipes_idle") is None


def test_the_engine_says_which_counters_are_levels_and_every_other_is_an_event() -> None:
    assert RELAY_LEVELS.issubset(RELAY_COUNTERS)  # a renamed level must not become an event
    assert {"inflight_bytes", "pipes_idle", "buffers_idle"} <= RELAY_LEVELS
    counted = SpliceRelay(shards=3).engine_counters()
    assert set(counted.levels) == RELAY_LEVELS
    # ... and one event the relay counts itself: steering by CPU given back to the hash.
    assert set(counted.events) == set(RELAY_COUNTERS) - RELAY_LEVELS | {"steering_stopped"}
    assert PythonRelay().engine_counters() is None  # the oracle keeps no engine counters
    metrics = Metrics()
    metrics.relay_counters.append(PythonRelay().engine_counters)
    assert metrics.engine_counters() == RelayCounters({}, {})


def test_engine_timeouts_and_idle_closes_are_exported_exactly() -> None:
    """Through the real engine (two shards, summed): an idle keep-alive connection closed,
    then a request head that never completes answered 408; each raises its counter by one."""
    get = b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def scenario(h: Harness) -> None:
        assert isinstance(h.relay, SpliceRelay)
        metrics = Metrics()
        metrics.sources.append(h.relay.flush)
        metrics.relay_counters.append(h.relay.engine_counters)
        registry = CollectorRegistry()
        registry.register(FluxCollector(metrics))

        def events() -> dict[str, float | None]:
            return {
                name: engine_sample(registry, "flux_engine_events_total", "event", name)
                for name in ("http_idle_closed", "http_header_timeouts", "http_answered",
                             "http_opaque", "exchanges_dropped")
            }  # fmt: skip

        assert set(events().values()) == {0.0}
        idle = await h.open(http=True)
        await send(idle.client, get)
        assert await recv_exactly(idle.server, len(get)) == get
        await send(idle.server, ok)
        assert await recv_exactly(idle.client, len(ok)) == ok
        assert await recv_to_eof(idle.client) == b""  # closed once idle for 0.3 s
        assert await recv_to_eof(idle.server) == b""
        idle.client.close()
        idle.server.close()
        await idle.result
        assert events() == {"http_idle_closed": 1, "http_header_timeouts": 0,
                            "http_answered": 0, "http_opaque": 0, "exchanges_dropped": 0}

        slow = await h.open(http=True)
        await send(slow.client, b"GET / HTTP/1.1\r\nHost:")
        assert await recv_to_eof(slow.client) == HTTP_ERROR_RESPONSES[408]
        slow.client.close()
        slow.server.close()
        assert (await slow.result).answered == 408
        assert events() == {"http_idle_closed": 1, "http_header_timeouts": 1,
                            "http_answered": 1, "http_opaque": 0, "exchanges_dropped": 0}

        # Both shards took a connection; what is exported is their sum.
        assert [engine.stats()["submitted"] for engine in h.relay.engines] == [1, 1]
        assert engine_sample(registry, "flux_engine_events_total", "event", "submitted") == 2
        assert engine_sample(registry, "flux_engine_levels", "level", "inflight_bytes") == 0
        result = promtool_check(generate_latest(registry))
        assert result.returncode == 0, result.stdout + result.stderr

    run("splice", scenario, shards=2, http_header_timeout=0.3, http_idle_timeout=0.3)
