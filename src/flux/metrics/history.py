"""The history behind the status page's charts and figures: a bounded ring of samples.

Theory of operation
-------------------
Every ``interval`` seconds (5 by default) the metrics plugin reads the cumulative counters of
:class:`~flux.metrics.counters.Metrics` into one :class:`Tally` per service (:func:`tally`:
connections, requests by status class, bytes, connect failures, retries, the latency histogram's
bucket counts, connections open, and HTTP requests per instance) and hands them to
:meth:`History.record` with the time.  The ring itself is pure: the time is an argument, so
it is tested with a fake clock and made-up tallies.

Two things are kept:

- the **ring**: at most ``capacity`` samples (180: 15 minutes at 5 s), oldest dropped first.
  A sample is the *rates* over its interval, one record per service: a fixed row of
  :data:`SAMPLE_FIELDS` as 32-bit floats (NaN for "no figure") in one ``array`` per sample, and
  the names of the services in one tuple that consecutive samples share while the set of
  services stays the same.  So a service costs about 4 bytes per field per sample (measured with
  tracemalloc in the tests and stated in the README), and a service that is gone is in no later
  sample: it drops out of the history as the ring turns.
- the **marks**: the cumulative tallies themselves, packed in one array of 64-bit integers
  per mark (27 per service), kept at the last few samples and, thinned to one every
  ``checkpoint`` seconds (30), as far back as ``long_window`` (5 min).  The
  figures of ``/status`` over the last ``short_window`` (10 s) and ``long_window`` come from
  the difference between the newest mark and the newest one at least that old (or the oldest
  there is, so a young fluxd shows what it has): rates exactly as Prometheus' ``rate()``
  would give them, and p50/p99 from the histogram's buckets over that span (interpolated
  inside a bucket as ``histogram_quantile`` does).  A request rate per instance comes from the
  short window's marks only; older marks drop their per-instance counts.

Each instance's p99 is not kept per sample: :class:`InstanceP99` merges the sliding summaries
of its label sets (8 to 10 minutes), a bounded slice of instances per sample.

Rates are differences of cumulative counters divided by the time between them.  A counter
that went *down* was reset (fluxd's own only grow, but a reset read as a difference would be
a huge negative rate): the difference is then its new value, as Prometheus takes it.  A service
new since the older mark is measured from the first mark that has it, never from zero (its
counters may predate its appearance: label sets are kept for good).  A span of no time (the
clock stood still or stepped back) gives no rates at all rather than infinite ones.
"""

from __future__ import annotations

import math
import operator
from array import array
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flux.metrics.counters import HTTP_DURATION_BUCKETS, Metrics

__all__ = [
    "CAPACITY",
    "CHECKPOINT",
    "INTERVAL",
    "LONG_WINDOW",
    "P99_LABEL_SETS",
    "SAMPLE_FIELDS",
    "SHORT_WINDOW",
    "History",
    "InstanceP99",
    "Tally",
    "bucket_quantile",
    "tally",
]

INTERVAL = 5.0
CAPACITY = 180
SHORT_WINDOW = 10.0
LONG_WINDOW = 300.0
CHECKPOINT = 30.0
# Label sets merged per sample for the instances' p99 (see InstanceP99): about 15 ms.
P99_LABEL_SETS = 2000

# Status classes of requests, by the first digit of the code.
CLASSES = ("2xx", "3xx", "4xx", "5xx")
# The cumulative counters of a tally, in this order.
_CONNECTIONS, _R2, _R3, _R4, _R5, _BYTES, _FAILURES, _RETRIES = range(8)
COUNTERS = 8
# One sample's record of a service: the rates over its interval, then the gauge.
SAMPLE_FIELDS = (
    "conn_rate",
    "req_2xx",
    "req_3xx",
    "req_4xx",
    "req_5xx",
    "p50",
    "p99",
    "bytes_rate",
    "connect_failures_rate",
    "retries_rate",
    "connections_open",
)
_NAN = math.nan


@dataclass(slots=True)
class Tally:
    """One service's cumulative counts at one instant (what a mark holds).

    ``counts``: :data:`COUNTERS` cumulative counters (connections, requests 2xx..5xx, bytes
    both ways, connect failures, retries).
    ``buckets``: requests per latency bucket (:data:`HTTP_DURATION_BUCKETS` then +Inf, not
    cumulative over buckets).  ``http``: the service speaks HTTP (else request figures are
    null).  ``instances``: HTTP requests per instance name.
    """

    counts: array[int] = field(default_factory=lambda: array("q", bytes(8 * COUNTERS)))
    buckets: array[int] = field(
        default_factory=lambda: array("q", bytes(8 * (len(HTTP_DURATION_BUCKETS) + 1)))
    )
    open: int = 0
    http: bool = False
    instances: dict[str, int] | None = None


def tally(metrics: Metrics, services: Mapping[str, str | None]) -> dict[str, Tally]:
    """The cumulative counts of ``services`` (name -> protocol, None when unknown) in
    ``metrics``, read as a scrape reads them (what the relay queued is pulled first).  A
    service with no counts yet has zeros; counts of services not named are left out."""
    metrics.pull()
    tallies = {name: Tally(http=protocol == "http") for name, protocol in services.items()}
    # Connections by entry point, not by client: the same sums from far fewer label sets.
    for (service, _), n in metrics.entry_totals().items():
        t = tallies.get(service)
        if t is not None:
            t.counts[_CONNECTIONS] += n
    byte_counts, active, rejected = metrics.service_totals()
    for (service, _), n in byte_counts.items():
        t = tallies.get(service)
        if t is not None:
            t.counts[_BYTES] += n
    for service, n in active.items():
        t = tallies.get(service)
        if t is not None:
            t.open = n
    for (service, _), n in metrics.connect_failures.items():
        t = tallies.get(service)
        if t is not None:
            t.counts[_FAILURES] += n
    retries = metrics.retries
    for name, t in tallies.items():
        t.counts[_RETRIES] = retries.get(name, 0)
    for (service, _, code), n in rejected.items():
        t = tallies.get(service)
        if t is not None:
            _count_class(t, code, n)
    for (service, _, code), buckets in metrics.http_durations.items():
        t = tallies.get(service)
        if t is None:
            continue
        _count_class(t, code, buckets.count)
        t.buckets = array("q", map(operator.add, t.buckets, buckets.counts))
    for exchange, summaries in metrics.exchanges.items():
        t = tallies.get(exchange[5])
        if t is None:
            continue
        if t.instances is None:
            t.instances = {}
        name = exchange[0]
        t.instances[name] = t.instances.get(name, 0) + summaries.total.count
    return tallies


def _count_class(t: Tally, code: str, n: int) -> None:
    digit = code[:1]
    if len(code) == 3 and "2" <= digit <= "5":
        t.counts[_R2 + int(digit) - 2] += n


def bucket_quantile(
    q: float, counts: Sequence[int], bounds: Sequence[float] = HTTP_DURATION_BUCKETS
) -> float | None:
    """The ``q`` quantile of observations counted per bucket (``counts``: one per bound, then
    +Inf), interpolated linearly inside its bucket as Prometheus' ``histogram_quantile`` does
    (the first bucket starts at 0; in the +Inf bucket the answer is the highest bound).
    None when nothing was counted."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        if n > 0 and running + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = 0.0 if i == 0 else float(bounds[i - 1])
            return lower + (float(bounds[i]) - lower) * max(0.0, rank - running) / n
        running += n
    return float(bounds[-1])


def _diff(new: int, old: int) -> int:
    """How much a cumulative counter grew; its new value when it was reset meanwhile."""
    return new - old if new >= old else new


# A mark's row per service: the counters, the latency buckets, the connections open, and 1
# for an http service.
_BUCKETS = len(HTTP_DURATION_BUCKETS) + 1
_ROW = COUNTERS + _BUCKETS + 2


@dataclass(slots=True)
class _Mark:
    """The cumulative tallies at one sample, packed: one row of ints per service in one array
    (the service -> row index shared by the marks of one set of services)."""

    t: float
    index: Mapping[str, int]
    rows: array[int]
    instances: dict[str, dict[str, int]] | None
    checkpoint: bool

    def tally(self, name: str) -> Tally | None:
        """The service's tally at this mark, or None if it was not known then."""
        i = self.index.get(name)
        if i is None:
            return None
        row = self.rows[i * _ROW : (i + 1) * _ROW]
        return Tally(
            row[:COUNTERS],
            row[COUNTERS : COUNTERS + _BUCKETS],
            row[-2],
            bool(row[-1]),
            None if self.instances is None else self.instances.get(name),
        )


@dataclass(frozen=True, slots=True)
class _Sample:
    t: float
    names: tuple[str, ...]
    values: array[float]


def _span(new: Tally, old: Tally, seconds: float) -> dict[str, Any]:
    """The figures of one service between two of its tallies ``seconds`` apart."""
    c, o = new.counts, old.counts
    rate = [_diff(c[i], o[i]) / seconds for i in range(COUNTERS)]
    buckets = [_diff(a, b) for a, b in zip(new.buckets, old.buckets, strict=True)]
    http = new.http
    return {
        "conn_rate": rate[_CONNECTIONS],
        "req_rate": (
            {name: rate[_R2 + i] for i, name in enumerate(CLASSES)} if http else None
        ),
        "p50": bucket_quantile(0.5, buckets) if http else None,
        "p99": bucket_quantile(0.99, buckets) if http else None,
        "bytes_rate": rate[_BYTES],
        "connect_failures_rate": rate[_FAILURES],
        "retries_rate": rate[_RETRIES],
    }


def _row(figures: Mapping[str, Any], open_now: int) -> list[float]:
    """A sample's record of one service (SAMPLE_FIELDS), NaN for null."""
    req = figures["req_rate"]

    def num(value: float | None) -> float:
        return _NAN if value is None else value

    return [
        num(figures["conn_rate"]),
        *(_NAN if req is None else req[name] for name in CLASSES),
        num(figures["p50"]),
        num(figures["p99"]),
        num(figures["bytes_rate"]),
        num(figures["connect_failures_rate"]),
        num(figures["retries_rate"]),
        float(open_now),
    ]


def _shown(values: array[float]) -> list[float | None]:
    """A sample's values as JSON shows them: null for NaN, rounded to the millionth (so a
    32-bit float's tail, 0.30000001192092896, reads 0.3)."""
    return [None if v != v else round(v, 6) for v in values]


def _record(v: Sequence[float | None]) -> dict[str, Any]:
    """A sample's record of one service (SAMPLE_FIELDS, shown) as JSON."""
    open_now = v[10]
    return {
        "conn_rate": v[0],
        "req_rate": None if v[1] is None else {"2xx": v[1], "3xx": v[2], "4xx": v[3], "5xx": v[4]},
        "p50": v[5],
        "p99": v[6],
        "bytes_rate": v[7],
        "connect_failures_rate": v[8],
        "retries_rate": v[9],
        "connections_open": None if open_now is None else int(open_now),
    }


NULL_FIGURES: dict[str, Any] = {
    "conn_rate": None,
    "req_rate": None,
    "p50": None,
    "p99": None,
    "bytes_rate": None,
    "connect_failures_rate": None,
    "retries_rate": None,
}


class History:
    """The ring of samples and the marks behind the figures; see the module docstring."""

    def __init__(
        self,
        *,
        interval: float = INTERVAL,
        capacity: int = CAPACITY,
        short_window: float = SHORT_WINDOW,
        long_window: float = LONG_WINDOW,
        checkpoint: float = CHECKPOINT,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"history interval must be positive, got {interval!r}")
        if capacity < 1:
            raise ValueError(f"history capacity must be at least 1, got {capacity!r}")
        self.interval = interval
        self.capacity = capacity
        self.windows = {"now": short_window, "5m": long_window}
        self._checkpoint = checkpoint
        self._samples: deque[_Sample] = deque(maxlen=capacity)
        self._marks: list[_Mark] = []
        self._names: tuple[str, ...] = ()
        self._index: dict[str, int] = {}
        # What the readers computed since the last sample (a page polls faster than 5 s).
        self._figures: dict[str, dict[str, dict[str, Any]]] = {}
        self._rates: dict[str, dict[str, float] | None] = {}

    # -- recording ------------------------------------------------------------------------

    def record(self, now: float, tallies: Mapping[str, Tally]) -> None:
        """Take one sample at ``now`` from the cumulative ``tallies`` of the services known
        now: a ring record per service (rates since the previous mark), and a new mark."""
        previous = self._marks[-1] if self._marks else None
        names = tuple(sorted(tallies))
        if names != self._names:
            self._names = names
            self._index = {name: i for i, name in enumerate(names)}
        values: array[float] = array("f")
        rows: array[int] = array("q")
        instances: dict[str, dict[str, int]] = {}
        seconds = None if previous is None else now - previous.t
        for name in self._names:
            new = tallies[name]
            old = None if previous is None else previous.tally(name)
            if old is None or seconds is None or seconds <= 0:
                values.extend(_row(NULL_FIGURES, new.open))
            else:
                values.extend(_row(_span(new, old, seconds), new.open))
            rows.extend(new.counts)
            rows.extend(new.buckets)
            rows.append(new.open)
            rows.append(int(new.http))
            if new.instances:
                instances[name] = new.instances
        self._samples.append(_Sample(now, self._names, values))
        last_checkpoint = next((m.t for m in reversed(self._marks) if m.checkpoint), None)
        checkpoint = last_checkpoint is None or now - last_checkpoint >= self._checkpoint
        self._marks.append(_Mark(now, self._index, rows, instances, checkpoint))
        self._prune(now)
        self._figures.clear()
        self._rates.clear()

    def _prune(self, now: float) -> None:
        """Keep the marks a window may start at: every mark from the newest one at least
        short_window old; checkpoints from the newest one at least long_window old."""
        short = self._base_index(now, self.windows["now"])
        long_base = self._base_index(now, self.windows["5m"], checkpoints=True)
        kept = []
        for i, mark in enumerate(self._marks):
            if i >= short:
                kept.append(mark)
            elif mark.checkpoint and i >= long_base:
                mark.instances = None  # too old for the short window: not needed
                kept.append(mark)
        self._marks = kept

    def _base_index(self, now: float, window: float, *, checkpoints: bool = False) -> int:
        """The index of the newest mark (checkpoint) at least ``window`` old (half an
        interval's slack for a late timer), else of the oldest one."""
        oldest = 0
        for i in range(len(self._marks) - 1, -1, -1):
            mark = self._marks[i]
            if checkpoints and not mark.checkpoint:
                continue
            oldest = i
            if now - mark.t >= window - self.interval / 2:
                return i
        return oldest

    # -- reading --------------------------------------------------------------------------

    @property
    def now(self) -> float | None:
        """The time of the newest sample."""
        return self._marks[-1].t if self._marks else None

    def samples(
        self, since: float | None = None, services: Collection[str] | None = None
    ) -> list[dict[str, Any]]:
        """The samples with ``t > since`` (all when None), oldest first, as JSON; only the
        records of ``services`` when given (a page charting the services it shows)."""
        return list(self.iter_samples(since, services))

    def iter_samples(
        self, since: float | None = None, services: Collection[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """:meth:`samples` one at a time, so a server can do other work in between: the
        samples there were when it started (a sample, once taken, never changes)."""
        width = len(SAMPLE_FIELDS)
        for sample in list(self._samples):
            if since is not None and sample.t <= since:
                continue
            if services is None:
                values = _shown(sample.values)
                records = {
                    name: _record(values[i * width : (i + 1) * width])
                    for i, name in enumerate(sample.names)
                }
            else:
                records = {}
                for i, name in enumerate(sample.names):
                    if name in services:
                        values = _shown(sample.values[i * width : (i + 1) * width])
                        records[name] = _record(values)
            yield {"t": sample.t, "services": records}

    def document(
        self, now: float, since: float | None = None, services: Collection[str] | None = None
    ) -> dict[str, Any]:
        """``/status/history``: the ring's shape and the samples after ``since`` (of
        ``services`` only, when given)."""
        return {
            "interval": self.interval,
            "capacity": self.capacity,
            "now": now,
            "samples": self.samples(since, services),
        }

    def figures(self, service: str) -> dict[str, dict[str, Any]]:
        """``{"now": figures, "5m": figures}`` of ``service`` (every figure null when there
        is not yet a span of time to measure over; the same object until the next sample)."""
        cached = self._figures.get(service)
        if cached is not None:
            return cached
        result = {}
        for label, window in self.windows.items():
            spanned = self._spanned(service, window)
            if spanned is None:
                result[label] = dict(NULL_FIGURES)
            else:
                new, old, seconds = spanned
                result[label] = _span(new, old, seconds)
        self._figures[service] = result
        return result

    def instance_rates(self, service: str) -> dict[str, float] | None:
        """HTTP requests per second of each of ``service``'s instances over the short window
        (an instance with no request counted is not listed); None for a service not measured
        over a span of time yet."""
        if service in self._rates:
            return self._rates[service]
        spanned = self._spanned(service, self.windows["now"])
        rates = None
        if spanned is not None:
            new, old, seconds = spanned
            before = old.instances or {}
            rates = {
                name: _diff(count, before.get(name, 0)) / seconds
                for name, count in (new.instances or {}).items()
            }
        self._rates[service] = rates
        return rates

    def _spanned(self, service: str, window: float) -> tuple[Tally, Tally, float] | None:
        """The service's newest tally, the one it is measured from over ``window``, and the
        seconds between them; None when there is no such span."""
        if not self._marks:
            return None
        end = self._marks[-1]
        new = end.tally(service)
        if new is None:
            return None
        base = self._base_index(end.t, window, checkpoints=window > self.windows["now"])
        for mark in self._marks[base:-1]:
            old = mark.tally(service)
            if old is not None and end.t > mark.t:
                return new, old, end.t - mark.t
        return None


class InstanceP99:
    """Each HTTP instance's p99 over its summaries' sliding window
    (:meth:`~flux.metrics.counters.Metrics.instance_quantile`), refreshed a slice at a time.

    A merge costs a few microseconds per busy label set (instance x client x method x code),
    and they can number hundreds of thousands; so each :meth:`refresh` (one per sample) merges
    about ``budget`` label sets, taking the instances in turn, and an instance's figure is at
    most ``label sets / budget`` samples old (it covers 8 to 10 minutes anyway).
    """

    def __init__(self, budget: int = P99_LABEL_SETS) -> None:
        self.budget = budget
        self.values: dict[tuple[str, str], float] = {}
        self._due: deque[tuple[str, str]] = deque()

    def refresh(self, metrics: Metrics) -> None:
        """Work out the next slice of instances (a new round once every one was done)."""
        if not self._due:
            self._due.extend(metrics.instance_exchanges)
        batch = []
        spent = 0
        while self._due and spent < self.budget:
            key = self._due.popleft()
            batch.append(key)
            spent += len(metrics.instance_exchanges.get(key, ()))
        found = metrics.instance_quantile(0.99, batch)
        for key in batch:
            value = found.get(key)
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = value

