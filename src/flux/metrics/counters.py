"""What fluxd counts, and the Prometheus collector that exports it at scrape time.

Theory of operation
-------------------
The balancer, the iptables adapter and the relay report events through plain callables:
:meth:`Metrics.on_connection`, :meth:`Metrics.on_done`, :meth:`Metrics.on_connect_failure`,
:meth:`Metrics.on_retry`, :meth:`Metrics.on_iptables_sync` (and ``_failure``), and per HTTP
exchange the observer that
:meth:`Metrics.exchange_observer` makes for each connection.  Each one updates Python dicts of
integers (or one :class:`~flux.metrics.summary.SlidingSummary` per HTTP label set): no
prometheus_client object, no lock and no string formatting on the connection path.  All of
them, and the scrape, run on the event loop's thread, so the dicts need no lock either.

:class:`FluxCollector` is a prometheus_client custom collector: at scrape time it builds metric
families from those dicts (and quantiles from the summaries, one merge and one pass per label
set).  So the cost of a metric is paid once per scrape, not once per connection.  The relay
engine queues exchanges in batches; a scrape first pulls what is queued (:attr:`Metrics.sources`),
so the counts are exact at the instant of the scrape.  What the relay's engine counted of its
own work (:meth:`~flux.relay.base.Relay.engine_counters`: header timeouts, idle closes, opaque
switches, dropped exchange records, idle pipes, ...) is read at the scrape too and exported
under the engine's own counter names, whatever they are: its events as
``flux_engine_events_total{event}``, its levels as ``flux_engine_levels{level}`` (the engine
says which is which), so a counter the engine gains appears without an edit here.

Connections are also counted per entry point (``flux_entry_connections_total{service,entry}``:
``entry="vip"`` for the service address, ``entry="published:PORT"`` for a published port), in a
family of their own rather than as a label of ``flux_connections_total``: that family's labels
are the original's, and a client's connection comes in by one entry point whatever its
instance, so the per-entry count needs no client or instance labels.

Labels are those of the original (reference §4.9) plus ``service``: ``individual`` is the
instance name (the container ID), ``src`` the client's IP, ``dst`` the instance's IP without
its port.  Label sets are never forgotten (as in the original): a series for an instance that
is gone keeps its last value until fluxd restarts, which is what a Prometheus counter promises.

That promise and clients from outside (a published port) do not mix: every new client address
would be a new series of every family with a ``src`` label, kept for good, and a summary pair
costs kilobytes.  So each service names at most ``max_clients`` (``-metrics-max-clients``)
client addresses in ``src``, the first ones seen (:meth:`Metrics.client_label`); every other
client is counted under ``src="other"``, so 100,000 client addresses cost what 100 do.  The
engine folds likewise in its own tally (each shard names at most as many, the rest come as
``TALLY_OTHER_CLIENT``), and what it names is folded again here, into the same per-service set.

What fluxd answered itself (400, 431, 408, and 421 on a connection routed by host name) is
counted per service in ``flux_http_rejected_total`` and per entry point in
``flux_entry_answered_total{service, entry, code}``: an edge host wants to see which door the
bad requests come in by.  The same family counts the clients fluxd reset because no instance
could take them (``code="reset"``: none live, as on a published port whose service has no
instance, or every attempt failed; fed by the listener, :meth:`Metrics.on_reset`), and what the
router of a port shared by host name answered before any service was chosen (404, 408, 431;
``service=""``; fed by the router, :meth:`Metrics.on_entry_answered`).

An HTTP/2 exchange that carried a gRPC call (the relay passes a :class:`~flux.relay.GrpcCall`)
is also counted per gRPC method and code (``flux_grpc_total``, ``flux_grpc_duration_seconds``).
Its method comes from the request's ``:path``, which the client chooses, so the label values
are bounded: at most :data:`GRPC_METHODS_PER_SERVICE` methods per service get their own, the
calls to any other are folded into ``other``/``other`` and counted
(``flux_grpc_folded_total``), and a path not of the form ``/service/method`` is
``other``/``other`` too.  For the same reason an observer keeps at hand only the label sets of
methods with their own labels and of the codes gRPC defines: the rest (folded, unrecognised, a
code outside 0..16) cost a parse per batch instead of a slot each.

``flux_instances{service,state}`` comes from the agent's view of *this host's* instances (every
state, not only live ones): each fluxd exports its own containers, so summing the gauge over
hosts gives the cluster's numbers.  The balancer's watch sees every host's instances but keeps
only live ones, and exporting the whole cluster from every host would count each instance once
per host.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from flux.metrics.summary import (
    DEFAULT_AGE_BUCKETS,
    DEFAULT_WINDOW,
    SUMMARY_DIGITS,
    SlidingSummary,
    scratch_histogram,
)
from flux.model import ConnectionInfo, Instance, InstanceState
from flux.relay import (
    HTTP_CUT_SIDES,
    OTHER_CLIENT,
    EngineCounts,
    GrpcCall,
    RelayCounters,
    RelayResult,
)

__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "GRPC_CODES",
    "GRPC_METHODS_PER_SERVICE",
    "GRPC_PATH_LIMIT",
    "HTTP_DURATION_BUCKETS",
    "IPTABLES_SYNC_BUCKETS",
    "QUANTILES",
    "BucketCounts",
    "FluxCollector",
    "Metrics",
    "grpc_code_label",
    "grpc_method_labels",
]

QUANTILES = (0.5, 0.9, 0.99, 0.999)
# iptables-restore of a small batch takes a few ms; thousands of rules or a held xtables lock
# take seconds (the adapter waits up to 10 s for the lock).
IPTABLES_SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HTTP_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)

CONNECTION_LABELS = ("individual", "src", "dst", "protocol", "service")
HTTP_LABELS = ("individual", "src", "dst", "method", "code", "service")
HTTP_DURATION_LABELS = ("service", "method", "code")
GRPC_LABELS = ("service", "grpc_service", "grpc_method", "code")
GRPC_DURATION_LABELS = ("service", "grpc_service", "grpc_method")

# The canonical names of the gRPC status codes, indexed by code (0..16).
GRPC_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# (grpc_service, grpc_method) pairs with their own label values, per service; calls to any
# other method are folded into _GRPC_OTHER.
GRPC_METHODS_PER_SERVICE = 100
# A longer :path is not taken as a method name (a label value is kept until fluxd restarts,
# and the client chooses it); real ones are a few dozen characters.
GRPC_PATH_LIMIT = 256
_GRPC_OTHER = ("other", "other")
DEFAULT_MAX_CLIENTS = 100


class BucketCounts:
    """A cumulative Prometheus histogram kept as plain counters (``le`` bucket bounds)."""

    __slots__ = ("_bounds_us", "bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(float(b) for b in bounds))
        # The same bounds in whole microseconds, for batches of integer microseconds.
        self._bounds_us = tuple(round(b * 1e6) for b in self.bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= it."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def observe_us(self, values_us: list[int]) -> None:
        """Count a batch of durations given in integer microseconds (bounds in seconds)."""
        counts = self.counts
        bounds = self._bounds_us
        for value in values_us:
            counts[bisect.bisect_left(bounds, value)] += 1
        self.count += len(values_us)
        self.sum += sum(values_us) / 1e6

    def add(self, other: BucketCounts) -> None:
        """Add ``other``'s counts (the same bounds) to these."""
        if other.bounds != self.bounds:
            raise ValueError(f"bucket bounds differ: {self.bounds} and {other.bounds}")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.sum += other.sum

    def buckets(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs, ending with ``+Inf``, as Prometheus wants."""
        pairs = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append((_label_float(bound), float(running)))
        return pairs


def _label_float(value: float) -> str:
    """A float as Prometheus label values spell it (``1.0``, ``0.005``, ``+Inf``)."""
    return "+Inf" if value == math.inf else repr(float(value))


@dataclass(slots=True)
class _Exchanges:
    roundtrip: SlidingSummary
    total: SlidingSummary


class _Slot(NamedTuple):
    """Where one batch of exchanges is counted (one label set of every family it feeds)."""

    exchanges: _Exchanges
    durations: BucketCounts
    # A gRPC call's total times, for flux_grpc_total (its count) and the method's histogram.
    grpc: BucketCounts | None
    # The call's method was folded into "other" (flux_grpc_folded_total).
    folded: bool
    # An observer may keep the slot under the batch's own (method, status, grpc): false when
    # unboundedly many of those share its label set (a folded or unrecognised path, a code
    # gRPC does not define).
    reusable: bool


class _Observe(Protocol):
    """What :meth:`Metrics.exchange_observer` makes: an ExchangeObserver whose ``grpc``
    argument may be left out (a plain HTTP exchange)."""

    def __call__(
        self,
        method: str,
        status: int,
        roundtrips: list[int],
        totals: list[int],
        grpc: GrpcCall | None = None,
    ) -> None: ...


def grpc_code_label(status: int, code: int) -> str:
    """``flux_grpc_total``'s ``code`` for a call that ended with HTTP ``status`` and
    ``grpc-status`` ``code``: ``"aborted"`` when it was cut short (a status below 100, see
    HTTP_CUT_SIDES), ``"none"`` when no grpc-status came (-1), else the canonical name, with
    ``"UNKNOWN"`` for a number gRPC does not define."""
    if status < 100:
        return "aborted"
    if code == -1:
        return "none"
    return GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else "UNKNOWN"


def grpc_method_labels(path: str) -> tuple[str, str]:
    """``(grpc_service, grpc_method)`` from a gRPC ``:path`` ``/package.Service/Method``;
    ``("other", "other")`` for a path not of that form: not two non-empty names after
    slashes, longer than GRPC_PATH_LIMIT, or with anything but printable ASCII and no
    spaces (what a label value can be without surprising a reader)."""
    service, slash, method = path[1:].partition("/")
    if (
        not path.startswith("/")
        or not slash
        or not service
        or not method
        or "/" in method
        or len(path) > GRPC_PATH_LIMIT
        or not (path.isascii() and path.isprintable())
        or " " in path
    ):
        return _GRPC_OTHER
    return service, method


def _host_of(address: str) -> str:
    """``10.0.0.2:8080`` → ``10.0.0.2``, ``[fd00::2]:80`` → ``fd00::2``."""
    host, sep, _ = address.rpartition(":")
    if not sep:
        return address
    return host[1:-1] if host.startswith("[") else host


class Metrics:
    """fluxd's counters, fed by the hooks below; exported by :class:`FluxCollector`."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        summary_window: float = DEFAULT_WINDOW,
        summary_age_buckets: int = DEFAULT_AGE_BUCKETS,
        summary_digits: int = SUMMARY_DIGITS,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self._clock = clock
        self.max_clients = max_clients
        # The client addresses with a src label of their own, per service (the first
        # max_clients seen); the others are OTHER_CLIENT.
        self.clients: dict[str, set[str]] = {}
        self._summary_window = summary_window
        self._summary_age_buckets = summary_age_buckets
        self._summary_digits = summary_digits
        # One scratch histogram for every summary's scrape-time merge (all on one thread).
        self._scratch = scratch_histogram(summary_digits)
        self.connections: dict[tuple[str, str, str, str, str], int] = {}
        # Connections by (service, entry point): flux_entry_connections_total.
        self.entries: dict[tuple[str, str], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}
        self.active: dict[str, int] = {}
        self.connect_failures: dict[tuple[str, str], int] = {}
        # Connects tried on another instance after a failed one, by service.
        self.retries: dict[str, int] = {}
        self.iptables_sync = BucketCounts(IPTABLES_SYNC_BUCKETS)
        self.iptables_sync_failures = 0
        self.exchanges: dict[tuple[str, str, str, str, str, str], _Exchanges] = {}
        # The same summaries by (service, instance), for its quantiles (instance_quantile).
        self.instance_exchanges: dict[tuple[str, str], list[_Exchanges]] = {}
        self.http_durations: dict[tuple[str, str, str], BucketCounts] = {}
        # Requests fluxd answered itself, by (service, entry point, status).
        self.rejected: dict[tuple[str, str, str], int] = {}
        # Clients reset because no instance could take them, by (service, entry point).
        self.resets: dict[tuple[str, str], int] = {}
        # What the router of a port shared by host name answered before any service was
        # chosen, by (entry point, status): 404 (no service for the host), 408 / 431 (a first
        # head not read in time, or too large).  Counted under service="".
        self.unrouted: dict[tuple[str, str], int] = {}
        # Exchanges cut short, by (service, side): flux_http_aborted_total.
        self.aborted: dict[tuple[str, str], int] = {}
        # gRPC calls' total times by (service, grpc_service, grpc_method, code): their counts
        # are flux_grpc_total, and summed per method at scrape time flux_grpc_duration_seconds.
        self.grpc_calls: dict[tuple[str, str, str, str], BucketCounts] = {}
        # The (grpc_service, grpc_method) pairs with their own labels, per service.
        self.grpc_methods: dict[str, set[tuple[str, str]]] = {}
        # Calls folded into "other" because their service had its fill of methods, by service.
        self.grpc_folded: dict[str, int] = {}
        # Called before each scrape: deliver what the relay has queued (SpliceRelay.flush).
        self.sources: list[Callable[[], None]] = []
        # Read at each scrape: what the relay engine counted itself (SpliceRelay.counts).
        self.counters: list[Callable[[], EngineCounts]] = []
        # Read at each scrape: what the relay counted of its own work (Relay.engine_counters).
        self.relay_counters: list[Callable[[], RelayCounters | None]] = []

    def pull(self) -> None:
        """Take in everything queued by the sources (called at scrape time)."""
        for source in self.sources:
            source()

    # -- hooks (called on the event loop, once per event) -----------------------------------

    def client_label(self, service: str, client: str) -> str:
        """``src`` for ``client``'s connections to ``service``: its address while the service
        names fewer than ``max_clients`` or already names it, else ``"other"``."""
        named = self.clients.get(service)
        if named is None:
            named = self.clients[service] = set()
        if client in named:
            return client
        if len(named) < self.max_clients and client != OTHER_CLIENT:
            named.add(client)
            return client
        return OTHER_CLIENT

    def on_connection(self, info: ConnectionInfo) -> None:
        """A connection was handed to the relay: count it (once) and as active."""
        key = (
            info.instance,
            self.client_label(info.service, info.client_address),
            _host_of(info.instance_address),
            info.protocol,
            info.service,
        )
        self.connections[key] = self.connections.get(key, 0) + 1
        entry = (info.service, info.entry)
        self.entries[entry] = self.entries.get(entry, 0) + 1
        self.active[info.service] = self.active.get(info.service, 0) + 1

    def on_done(self, info: ConnectionInfo, result: RelayResult) -> None:
        """A relayed connection ended: its bytes each way, and one fewer active."""
        service = info.service
        self.active[service] = max(0, self.active.get(service, 0) - 1)
        if not result.counted:  # else the relay counted them live, as they were delivered
            to_instance = (service, "to_instance")
            to_client = (service, "to_client")
            self.bytes[to_instance] = self.bytes.get(to_instance, 0) + result.to_upstream
            self.bytes[to_client] = self.bytes.get(to_client, 0) + result.to_client
        if result.answered:
            key = (service, info.entry, str(result.answered))
            self.rejected[key] = self.rejected.get(key, 0) + 1

    def on_entry_answered(self, entry: str, status: int | str) -> None:
        """The router of a port shared by host name answered a client at ``entry`` itself,
        before any service was chosen (404, 408, 431; ``no-sni-match`` for a TLS client
        closed on a tcp port).  A 421 is a service's, counted by
        :meth:`on_done` as the relays' other answers are."""
        key = (entry, str(status))
        self.unrouted[key] = self.unrouted.get(key, 0) + 1

    def totals(
        self,
    ) -> tuple[
        dict[tuple[str, str, str, str, str], int],
        dict[tuple[str, str], int],
        dict[str, int],
        dict[tuple[str, str, str], int],
    ]:
        """Connections, bytes, active and rejected (by service, entry point and status): this
        object's counts plus the engine's, the engine's clients folded as :meth:`on_connection`
        folds them."""
        connections = dict(self.connections)
        for source in self.counters:
            for (service, protocol, name, address, client), n in source().connections.items():
                key = (
                    name,
                    self.client_label(service, client),
                    _host_of(address),
                    protocol,
                    service,
                )
                connections[key] = connections.get(key, 0) + n
        return connections, *self.service_totals()

    def service_totals(
        self,
    ) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[tuple[str, str, str], int]]:
        """Bytes, active and rejected as :meth:`totals` gives them, without the connections
        by client (the costly part; the history reads these every few seconds)."""
        byte_counts = dict(self.bytes)
        active = dict(self.active)
        rejected = dict(self.rejected)
        for source in self.counters:
            counts = source()
            for key2, n in counts.bytes.items():
                byte_counts[key2] = byte_counts.get(key2, 0) + n
            for service, n in counts.active.items():
                active[service] = active.get(service, 0) + n
            for key3, n in counts.rejected.items():
                rejected[key3] = rejected.get(key3, 0) + n
        return byte_counts, active, rejected

    def entry_totals(self) -> dict[tuple[str, str], int]:
        """Connections by (service, entry point): this object's counts plus the engine's."""
        entries = dict(self.entries)
        for source in self.counters:
            for key, n in source().entries.items():
                entries[key] = entries.get(key, 0) + n
        return entries

    def engine_counters(self) -> RelayCounters:
        """The relays' own counters (:attr:`relay_counters`), summed by name."""
        events: dict[str, int] = {}
        levels: dict[str, int] = {}
        shards: tuple[int, ...] = ()
        for source in self.relay_counters:
            counted = source()
            if counted is None:
                continue
            for name, n in counted.events.items():
                events[name] = events.get(name, 0) + n
            for name, n in counted.levels.items():
                levels[name] = levels.get(name, 0) + n
            shards += counted.shard_accepted
        return RelayCounters(events, levels, shards)

    def instance_quantile(
        self, q: float, instances: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], float]:
        """The ``q`` quantile of the total times, in seconds, of each of ``instances``
        ((service, instance) pairs) over the summaries' sliding window, its label sets
        (clients, methods, codes) merged; an instance with nothing in the window is left out.
        Not for the record path: one histogram merge per busy label set."""
        scratch = self._scratch
        result = {}
        for instance in instances:
            scratch.reset()
            for exchanges in self.instance_exchanges.get(instance, ()):
                exchanges.total.add_window_to(scratch)
            if scratch.count:
                result[instance] = scratch.value_at_quantile(q) / 1e6
        return result

    def on_reset(self, service: str, entry: str) -> None:
        """A client of ``service`` that came in by ``entry`` was reset: no instance could take
        it."""
        key = (service, entry)
        self.resets[key] = self.resets.get(key, 0) + 1

    def on_connect_failure(self, service: str, instance: str) -> None:
        """Connecting to ``instance`` failed (refused, unreachable or timed out)."""
        key = (service, instance)
        self.connect_failures[key] = self.connect_failures.get(key, 0) + 1

    def on_retry(self, service: str) -> None:
        """A client of ``service`` is tried on another instance after a failed connect."""
        self.retries[service] = self.retries.get(service, 0) + 1

    def on_iptables_sync(self, seconds: float) -> None:
        """One iptables sync (read, plan, apply) took ``seconds``."""
        self.iptables_sync.observe(seconds)

    def on_iptables_sync_failure(self) -> None:
        """One iptables sync or setup of the chains failed (iptables-save or -restore gave an
        error)."""
        self.iptables_sync_failures += 1

    def record_exchange(
        self,
        connection: ConnectionInfo,
        method: str,
        code: int | str,
        roundtrip_us: int,
        total_us: int,
        grpc: GrpcCall | None = None,
    ) -> None:
        """One HTTP request/response exchange on ``connection`` (``grpc``: the gRPC call it
        carried, if any).

        ``roundtrip_us``: request head read → response head read; ``total_us``: request head
        read → response fully written to the client (microseconds).
        """
        self.exchange_observer(connection)(
            method, int(code), [max(0, int(roundtrip_us))], [max(0, int(total_us))], grpc
        )

    def exchange_observer(self, connection: ConnectionInfo) -> _Observe:
        """A callable recording batches of ``connection``'s exchanges ``(method, status,
        [roundtrip_us, ...], [total_us, ...], grpc=None)``, ``grpc`` the
        :class:`~flux.relay.GrpcCall` the batch's exchanges carried; it keeps its label sets
        at hand, so a batch costs one dict lookup and three native calls (four for gRPC)."""
        base = (
            connection.instance,
            self.client_label(connection.service, connection.client_address),
            _host_of(connection.instance_address),
        )
        service = connection.service
        slots: dict[tuple[str, int, GrpcCall | None], _Slot] = {}

        def observe(
            method: str,
            status: int,
            roundtrips: list[int],
            totals: list[int],
            grpc: GrpcCall | None = None,
        ) -> None:
            key = (method, status, grpc)
            slot = slots.get(key)
            if slot is None:
                slot = self._exchange_slot(base, service, method, status, grpc)
                if slot.reusable:
                    slots[key] = slot
            exchanges, durations, calls, folded, _ = slot
            exchanges.roundtrip.observe_many(roundtrips)
            exchanges.total.observe_many(totals)
            durations.observe_us(totals)
            if calls is not None:
                calls.observe_us(totals)
                if folded:
                    self.grpc_folded[service] = self.grpc_folded.get(service, 0) + len(totals)
            if status < 100:
                # Cut short (HTTP_CUT_SIDES): code "aborted", and who cut it.
                cut = (service, HTTP_CUT_SIDES[status - 1])
                self.aborted[cut] = self.aborted.get(cut, 0) + len(totals)

        return observe

    def _exchange_slot(
        self,
        base: tuple[str, str, str],
        service: str,
        method: str,
        status: int,
        grpc: GrpcCall | None,
    ) -> _Slot:
        code = "aborted" if status < 100 else str(status)
        key = (*base, method, code, service)
        exchanges = self.exchanges.get(key)
        if exchanges is None:
            exchanges = self.exchanges[key] = _Exchanges(self._summary(), self._summary())
            self.instance_exchanges.setdefault((service, base[0]), []).append(exchanges)
        duration_key = (service, method, code)
        durations = self.http_durations.get(duration_key)
        if durations is None:
            durations = self.http_durations[duration_key] = BucketCounts(HTTP_DURATION_BUCKETS)
        if grpc is None:
            return _Slot(exchanges, durations, None, False, True)
        labels, folded = self._grpc_method(service, grpc_method_labels(grpc.path))
        grpc_key = (service, *labels, grpc_code_label(status, grpc.code))
        calls = self.grpc_calls.get(grpc_key)
        if calls is None:
            calls = self.grpc_calls[grpc_key] = BucketCounts(HTTP_DURATION_BUCKETS)
        reusable = labels != _GRPC_OTHER and -1 <= grpc.code < len(GRPC_CODES)
        return _Slot(exchanges, durations, calls, folded, reusable)

    def _grpc_method(self, service: str, labels: tuple[str, str]) -> tuple[tuple[str, str], bool]:
        """The labels a call to method ``labels`` of ``service`` is counted under, and whether
        it was folded: its own while the service has fewer than GRPC_METHODS_PER_SERVICE
        methods or it is one of them, else ``("other", "other")``."""
        if labels == _GRPC_OTHER:
            return labels, False
        methods = self.grpc_methods.get(service)
        if methods is None:
            methods = self.grpc_methods[service] = set()
        if labels in methods:
            return labels, False
        if len(methods) < GRPC_METHODS_PER_SERVICE:
            methods.add(labels)
            return labels, False
        return _GRPC_OTHER, True

    def _summary(self) -> SlidingSummary:
        return SlidingSummary(
            window=self._summary_window,
            age_buckets=self._summary_age_buckets,
            clock=self._clock,
            significant_digits=self._summary_digits,
            scratch=self._scratch,
        )


InstancesSource = Callable[[], Mapping[tuple[str, str], Instance]]


class FluxCollector(Collector):
    """Builds flux's metric families from a :class:`Metrics` at scrape time."""

    def __init__(self, metrics: Metrics, instances: InstancesSource | None = None) -> None:
        self.metrics = metrics
        self.instances = instances

    def describe(self) -> Iterable[Metric]:
        """The families without samples: lets a registry refuse a duplicate name."""
        return list(_Families().all())

    def collect(self) -> Iterator[Metric]:
        """Every family, filled from the current counters."""
        m = self.metrics
        m.pull()
        f = _Families()
        connections, byte_counts, actives, rejected = m.totals()
        for connection, count in connections.items():
            f.connections.add_metric(connection, count)
        for entry, count in m.entry_totals().items():
            f.entries.add_metric(entry, count)
        for direction, count in byte_counts.items():
            f.bytes.add_metric(direction, count)
        for service, active in actives.items():
            f.active.add_metric((service,), active)
        for target, count in m.connect_failures.items():
            f.connect_failures.add_metric(target, count)
        for service, count in m.retries.items():
            f.connect_retries.add_metric((service,), count)
        if self.instances is not None:
            for service_state, count in _count_instances(self.instances()):
                f.instances.add_metric(service_state, count)
        f.iptables_sync.add_metric((), m.iptables_sync.buckets(), m.iptables_sync.sum)
        f.iptables_sync_failures.add_metric((), m.iptables_sync_failures)
        quantile_names = [_label_float(q) for q in QUANTILES]
        for exchange, summaries in m.exchanges.items():
            f.http_total.add_metric(exchange, summaries.roundtrip.count)
            base = dict(zip(HTTP_LABELS, exchange, strict=True))
            for family, summary in (
                (f.http_roundtrip, summaries.roundtrip),
                (f.http_total_usec, summaries.total),
            ):
                values = summary.quantiles(QUANTILES)
                for name, value in zip(quantile_names, values, strict=True):
                    family.add_sample(family.name, {**base, "quantile": name}, value)
                family.add_metric(exchange, summary.count, summary.sum)
        for duration, buckets in m.http_durations.items():
            f.http_duration.add_metric(duration, buckets.buckets(), buckets.sum)
        per_service: dict[tuple[str, str], int] = {}
        for answer, count in rejected.items():
            f.entry_answered.add_metric(answer, count)
            service_code = (answer[0], answer[2])
            per_service[service_code] = per_service.get(service_code, 0) + count
        for answered, count in per_service.items():
            f.http_rejected.add_metric(answered, count)
        for service_entry, count in m.resets.items():
            f.entry_answered.add_metric((*service_entry, "reset"), count)
        for entry_code, count in m.unrouted.items():
            f.entry_answered.add_metric(("", *entry_code), count)
        engine = m.engine_counters()
        for name, count in sorted(engine.events.items()):
            f.engine_events.add_metric((name,), count)
        for name, level in sorted(engine.levels.items()):
            f.engine_levels.add_metric((name,), level)
        for shard, count in enumerate(engine.shard_accepted):
            f.engine_shard_accepted.add_metric((str(shard),), count)
        for cut, count in m.aborted.items():
            f.http_aborted.add_metric(cut, count)
        grpc_durations: dict[tuple[str, str, str], BucketCounts] = {}
        for calls_key, calls in m.grpc_calls.items():
            f.grpc_total.add_metric(calls_key, calls.count)
            method_key = calls_key[:3]
            durations = grpc_durations.get(method_key)
            if durations is None:
                durations = grpc_durations[method_key] = BucketCounts(HTTP_DURATION_BUCKETS)
            durations.add(calls)
        for method_key, durations in grpc_durations.items():
            f.grpc_duration.add_metric(method_key, durations.buckets(), durations.sum)
        for service, count in m.grpc_folded.items():
            f.grpc_folded.add_metric((service,), count)
        return iter(f.all())


def _count_instances(
    instances: Mapping[tuple[str, str], Instance],
) -> list[tuple[tuple[str, str], int]]:
    """``((service, state), count)`` with every state listed for every service seen."""
    counts: dict[str, dict[str, int]] = {}
    for (service, _), instance in instances.items():
        per_state = counts.get(service)
        if per_state is None:
            per_state = counts[service] = {str(state): 0 for state in InstanceState}
        per_state[str(instance.effective_state)] += 1
    return [
        ((service, state), value)
        for service, per_state in sorted(counts.items())
        for state, value in per_state.items()
    ]


class _Families:
    """One scrape's metric families (fresh each time: families accumulate samples)."""

    def __init__(self) -> None:
        self.connections = CounterMetricFamily(
            "flux_connections_total",
            "Connections proxied to an instance, counted once when handed to the relay.",
            labels=CONNECTION_LABELS,
        )
        self.entries = CounterMetricFamily(
            "flux_entry_connections_total",
            "Connections proxied to an instance, by the entry point they came in by: vip (the"
            " service address) or published:PORT.",
            labels=("service", "entry"),
        )
        self.bytes = CounterMetricFamily(
            "flux_bytes_total",
            "Bytes relayed, per direction (counted as they are delivered; the Python relay"
            " counts a connection's bytes when it ends).",
            labels=("service", "direction"),
        )
        self.active = GaugeMetricFamily(
            "flux_active_connections",
            "Connections being relayed now.",
            labels=("service",),
        )
        self.connect_failures = CounterMetricFamily(
            "flux_connect_failures_total",
            "Failed attempts to connect to an instance (refused, unreachable, timed out).",
            labels=("service", "instance"),
        )
        self.connect_retries = CounterMetricFamily(
            "flux_connect_retries_total",
            "Connects tried on another instance after a failed one (each also counted in"
            " flux_connect_failures_total).",
            labels=("service",),
        )
        self.instances = GaugeMetricFamily(
            "flux_instances",
            "This host's instances, per service and state.",
            labels=("service", "state"),
        )
        self.iptables_sync = HistogramMetricFamily(
            "flux_iptables_sync_seconds",
            "Time to bring the iptables chains in line (read, plan, apply).",
            labels=(),
        )
        self.iptables_sync_failures = CounterMetricFamily(
            "flux_iptables_sync_failures_total",
            "iptables syncs (and setups of the chains) that failed; the balancer restarts with"
            " backoff and tries again.",
            labels=(),
        )
        self.http_total = CounterMetricFamily(
            "flux_http_total",
            "HTTP request/response exchanges.",
            labels=HTTP_LABELS,
        )
        self.http_roundtrip = SummaryMetricFamily(
            "flux_http_roundtrip_usec",
            "Microseconds from request head read to response head read"
            " (quantiles over a sliding window).",
            labels=HTTP_LABELS,
        )
        self.http_total_usec = SummaryMetricFamily(
            "flux_http_total_usec",
            "Microseconds from request head read to response fully written to the client"
            " (quantiles over a sliding window).",
            labels=HTTP_LABELS,
        )
        self.http_duration = HistogramMetricFamily(
            "flux_http_request_duration_seconds",
            "Seconds from request head read to response fully written to the client.",
            labels=HTTP_DURATION_LABELS,
        )
        self.http_rejected = CounterMetricFamily(
            "flux_http_rejected_total",
            "HTTP requests fluxd answered itself and closed: 400 malformed, 431 head too large,"
            " 408 head not received in time, 421 a later request for another host on a connection"
            " routed by host name.",
            labels=("service", "code"),
        )
        self.entry_answered = CounterMetricFamily(
            "flux_entry_answered_total",
            "What fluxd answered itself, by the entry point it came in by (vip or"
            " published:PORT): the requests of flux_http_rejected_total by status; code=\"reset\""
            " for the clients reset because no instance could take them; and, with service=\"\","
            " what the router of a port shared by host name answered before choosing a service:"
            " 404 no service for the host, 408 / 431 a first request head not read in time or"
            " too large.",
            labels=("service", "entry", "code"),
        )
        self.engine_events = CounterMetricFamily(
            "flux_engine_events_total",
            "What the relay engine did, by its counter name (header timeouts, idle closes,"
            " opaque switches, dropped exchange records, connections, pipes, system calls...).",
            labels=("event",),
        )
        self.engine_levels = GaugeMetricFamily(
            "flux_engine_levels",
            "What the relay engine holds now, by its counter name (idle and lent pipes and"
            " copy buffers, bytes in flight).",
            labels=("level",),
        )
        self.engine_shard_accepted = CounterMetricFamily(
            "flux_engine_shard_accepted_total",
            "Clients each engine thread (shard) accepted itself, by shard number: how the"
            " kernel spreads new connections over the shards.",
            labels=("shard",),
        )
        self.http_aborted = CounterMetricFamily(
            "flux_http_aborted_total",
            "HTTP exchanges cut short (also in flux_http_total as code=\"aborted\"), by who cut"
            " them: the client or the instance (closed or reset first), or fluxd (stopping).",
            labels=("service", "side"),
        )
        self.grpc_total = CounterMetricFamily(
            "flux_grpc_total",
            "gRPC calls carried by HTTP/2 exchanges (also in flux_http_total), by method and"
            " grpc-status name; \"none\" when no grpc-status came, \"aborted\" when cut short.",
            labels=GRPC_LABELS,
        )
        self.grpc_duration = HistogramMetricFamily(
            "flux_grpc_duration_seconds",
            "Seconds from a gRPC call's request head read to its response fully written to the"
            " client (every code, an aborted call's time so far).",
            labels=GRPC_DURATION_LABELS,
        )
        self.grpc_folded = CounterMetricFamily(
            "flux_grpc_folded_total",
            "gRPC calls counted under grpc_service=\"other\", grpc_method=\"other\" because"
            f" their service had {GRPC_METHODS_PER_SERVICE} methods with their own labels.",
            labels=("service",),
        )

    def all(self) -> list[Metric]:
        return [
            self.connections,
            self.entries,
            self.bytes,
            self.active,
            self.connect_failures,
            self.connect_retries,
            self.instances,
            self.iptables_sync,
            self.iptables_sync_failures,
            self.http_total,
            self.http_roundtrip,
            self.http_total_usec,
            self.http_duration,
            self.http_rejected,
            self.entry_answered,
            self.engine_events,
            self.engine_levels,
            self.engine_shard_accepted,
            self.http_aborted,
            self.grpc_total,
            self.grpc_duration,
            self.grpc_folded,
        ]
