"""The instance pool: which instance a new connection goes to.

Theory of operation
-------------------
A pool holds the instances of one service (name -> ``IP:port``) in exactly one of two places:

- the **ready** set: instances believed to accept connections; and
- the **retry queue**: instances whose last connection attempt failed, each with the time at
  which it may be tried again (a min-heap on that time).

``pick()`` chooses uniformly at random among ready instances (or, with ``balance="p2c"``, the
less loaded of two random ready instances, counting the connections reported through
``acquired``/``released``).  An instance that came back from the retry queue still carries its
failure count: it is *on probation*.  Picking it sends it straight back to the queue with the
next backoff before it is returned, so exactly one connection at a time probes a recovering
instance instead of a burst of clients piling onto it.  When nothing is ready the pool still
answers, choosing uniformly among queued instances without changing their schedule: a service
whose instances all failed once keeps being attempted rather than refusing everyone.

``failed(name)`` moves a ready instance to the queue, due after 1 s, 2 s, 4 s ... doubling with
each consecutive failure and capped at 30 s (the original doubled without bound, so an instance
that was down for a while could wait hours after it recovered).  ``succeeded(name)`` clears the
failure count and makes the instance ready.  Due instances move back to ready in
``process_retries()``, which ``pick()`` also runs first, so a caller needs no timer at all;
``next_retry()`` tells one (or ``/status``) when the next instance becomes due.

``update(instances)`` makes the pool hold exactly the given names.  Names already pooled keep
their place and failure count.  A name whose address changed gets the **new** address (the
original kept the stale one) and starts afresh as ready with no failures: its failures were
failures to reach the old address, which says nothing about the new one.

Everything here is pure: time comes from the injected ``now`` and randomness from the injected
``random.Random``, so backoff and distribution are tested without sleeping.  The pool is not
thread-safe; it belongs to one listener on one event loop.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "Balance",
    "Choice",
    "InstanceHealth",
    "Pool",
    "backoff",
]

Balance = Literal["random", "p2c"]

BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0


def backoff(failures: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait after the ``failures + 1``-th consecutive failure: 1, 2, 4 ... capped."""
    if failures < 0:
        raise ValueError(f"failure count must not be negative, got {failures}")
    # Cap the exponent before raising 2 to it: counts can grow without bound.
    return min(cap, base * 2.0 ** min(failures, 64))


class Choice(NamedTuple):
    """The instance a connection should go to."""

    name: str
    address: str


@dataclass(frozen=True, slots=True)
class InstanceHealth:
    """One pooled instance as ``/status`` shows it."""

    name: str
    address: str
    ready: bool
    failures: int
    retry_at: float | None
    active: int


class _Entry:
    __slots__ = ("address", "failures", "retry_at", "token")

    def __init__(self, address: str) -> None:
        self.address = address
        self.failures = 0
        # Set while queued; ``token`` ties the entry to its live heap item (see _queue).
        self.retry_at: float | None = None
        self.token = 0


class _IndexedSet:
    """A set of names with O(1) add, remove and uniform choice, iterated in a stable order.

    A plain ``set`` of strings iterates in hash order, which changes between processes, so a
    seeded rng would not make picks reproducible.
    """

    __slots__ = ("_index", "_items")

    def __init__(self) -> None:
        self._items: list[str] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def items(self) -> list[str]:
        return list(self._items)

    def add(self, name: str) -> None:
        if name not in self._index:
            self._index[name] = len(self._items)
            self._items.append(name)

    def discard(self, name: str) -> None:
        index = self._index.pop(name, None)
        if index is None:
            return
        last = self._items.pop()
        if index < len(self._items):
            self._items[index] = last
            self._index[last] = index

    def choice(self, rng: random.Random, exclude: Collection[str]) -> str | None:
        if not self._items:
            return None
        if not exclude:
            return self._items[rng.randrange(len(self._items))]
        candidates = [name for name in self._items if name not in exclude]
        return candidates[rng.randrange(len(candidates))] if candidates else None

    def two_choices(self, rng: random.Random, exclude: Collection[str]) -> list[str]:
        candidates = self._items if not exclude else [n for n in self._items if n not in exclude]
        if len(candidates) <= 2:
            # Random order even then: ties go to the first, which must be a fair coin.
            return rng.sample(candidates, len(candidates))
        return rng.sample(candidates, 2)


class Pool:
    """The instances of one service, with connect-failure backoff.  See the module docstring."""

    def __init__(
        self,
        *,
        now: Callable[[], float],
        rng: random.Random,
        balance: Balance = "random",
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        if balance not in ("random", "p2c"):
            raise ValueError(f"unknown balance mode {balance!r}: use 'random' or 'p2c'")
        if backoff_base <= 0 or backoff_cap < backoff_base:
            raise ValueError(f"invalid backoff {backoff_base}..{backoff_cap}: need 0 < base <= cap")
        self._now = now
        self._rng = rng
        self._balance: Balance = balance
        self._base = backoff_base
        self._cap = backoff_cap
        self._entries: dict[str, _Entry] = {}
        self._ready = _IndexedSet()
        self._queued = _IndexedSet()
        # (retry_at, token, name); stale items (token no longer the entry's) are skipped.
        self._heap: list[tuple[float, int, str]] = []
        self._tokens = 0
        # Kept apart from entries: connections outlive an instance's removal and re-adding.
        self._active: dict[str, int] = {}
        # Told (with no argument) whenever the ready set or an address changes, so a picker
        # outside the pool (the relay engine) can take a new snapshot().
        self.on_change: Callable[[], None] | None = None
        # Connections counted elsewhere (the engine's own picks), added to active().
        self.active_extra: Callable[[str], int] | None = None

    # -- membership ------------------------------------------------------------------------

    def update(self, instances: Mapping[str, str]) -> None:
        """Hold exactly ``instances`` (name -> address); see the module docstring."""
        for name in [n for n in self._entries if n not in instances]:
            self._remove(name)
        for name, address in instances.items():
            entry = self._entries.get(name)
            if entry is None:
                self._entries[name] = _Entry(address)
                self._ready.add(name)
                self._changed()
            elif entry.address != address:
                entry.address = address
                entry.failures = 0
                self._make_ready(name, entry)

    def _remove(self, name: str) -> None:
        entry = self._entries.pop(name)
        entry.token = 0
        self._ready.discard(name)
        self._queued.discard(name)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def names(self) -> frozenset[str]:
        """Every pooled instance name."""
        return frozenset(self._entries)

    @property
    def ready(self) -> frozenset[str]:
        """Names in the ready set."""
        return frozenset(self._ready.items())

    @property
    def queued(self) -> frozenset[str]:
        """Names in the retry queue."""
        return frozenset(self._queued.items())

    def __len__(self) -> int:
        return len(self._entries)

    def address(self, name: str) -> str | None:
        """The current address of ``name``, or None when it is not pooled."""
        entry = self._entries.get(name)
        return entry.address if entry else None

    # -- choosing --------------------------------------------------------------------------

    def pick(self, exclude: Collection[str] = ()) -> Choice | None:
        """Choose an instance for a new connection, never one named in ``exclude``.

        ``exclude`` lets a listener retry with a *different* instance after a failed connect.
        Returns None when no pooled instance is left to try.
        """
        self.process_retries()
        name = self._choose_ready(exclude)
        if name is not None:
            entry = self._entries[name]
            if entry.failures:
                # On probation: requeue before handing it out, so this connection is the only
                # probe until its outcome (succeeded/failed) or the next retry time.
                self._ready.discard(name)
                self._queue(name, entry)
            return Choice(name, entry.address)
        name = self._queued.choice(self._rng, exclude)
        if name is None:
            return None
        return Choice(name, self._entries[name].address)

    @property
    def balance(self) -> Balance:
        return self._balance

    def now(self) -> float:
        """The pool's clock (as given)."""
        return self._now()

    def snapshot(self) -> tuple[list[Choice], float | None]:
        """What a picker outside the pool may choose from, and until when.

        The ready instances when none of them is on probation (a probe must be chosen here,
        where its outcome is handled), else none; and when the next queued instance is due
        (from then on the pool must pick again), or None."""
        ready = self._ready.items()
        entries = self._entries
        if any(entries[name].failures for name in ready):
            return [], self.next_retry()
        return [Choice(name, entries[name].address) for name in ready], self.next_retry()

    def healthy(self, name: str) -> bool:
        """``name`` is ready and not on probation: its connect outcome changes nothing here
        unless the connect fails."""
        entry = self._entries.get(name)
        return entry is not None and not entry.failures and name in self._ready

    def _choose_ready(self, exclude: Collection[str]) -> str | None:
        if self._balance == "random":
            return self._ready.choice(self._rng, exclude)
        pair = self._ready.two_choices(self._rng, exclude)
        if not pair:
            return None
        if len(pair) == 1:
            return pair[0]
        first, second = pair
        # Ties go to the first, which is itself a uniform choice.
        return second if self.active(second) < self.active(first) else first

    # -- outcomes --------------------------------------------------------------------------

    def failed(self, name: str) -> None:
        """A connection to ``name`` failed: queue it for a retry with backoff.

        An instance that is already queued (a probe, or a pick made when nothing was ready)
        keeps its schedule: one failure is not counted twice.
        """
        entry = self._entries.get(name)
        if entry is None or name not in self._ready:
            return
        self._ready.discard(name)
        self._queue(name, entry)

    def succeeded(self, name: str) -> None:
        """A connection to ``name`` was established: it is healthy and ready."""
        entry = self._entries.get(name)
        if entry is None:
            return
        entry.failures = 0
        self._make_ready(name, entry)

    def _queue(self, name: str, entry: _Entry) -> None:
        delay = backoff(entry.failures, base=self._base, cap=self._cap)
        entry.failures += 1
        entry.retry_at = self._now() + delay
        self._tokens += 1
        entry.token = self._tokens
        heapq.heappush(self._heap, (entry.retry_at, entry.token, name))
        self._queued.add(name)
        self._changed()
        if len(self._heap) > 4 * len(self._queued) + 16:
            # Stale items (requeued, succeeded or removed instances) are normally dropped when
            # they reach the top; under heavy churn, drop them all at once to bound memory.
            self._heap = [
                item
                for item in self._heap
                if (e := self._entries.get(item[2])) is not None and e.token == item[1]
            ]
            heapq.heapify(self._heap)

    def _make_ready(self, name: str, entry: _Entry) -> None:
        entry.retry_at = None
        entry.token = 0
        self._queued.discard(name)
        self._ready.add(name)
        self._changed()

    # -- retries ---------------------------------------------------------------------------

    def process_retries(self) -> list[str]:
        """Move every instance whose retry is due back to ready (on probation); return them."""
        now = self._now()
        moved: list[str] = []
        while self._heap:
            retry_at, token, name = self._heap[0]
            entry = self._entries.get(name)
            if entry is None or entry.token != token:
                heapq.heappop(self._heap)
                continue
            if retry_at > now:
                break
            heapq.heappop(self._heap)
            self._make_ready(name, entry)
            moved.append(name)
        return moved

    def next_retry(self) -> float | None:
        """When the earliest queued instance becomes due (clock of ``now``), or None."""
        while self._heap:
            _, token, name = self._heap[0]
            entry = self._entries.get(name)
            if entry is not None and entry.token == token:
                return self._heap[0][0]
            heapq.heappop(self._heap)
        return None

    # -- load ------------------------------------------------------------------------------

    def acquired(self, name: str) -> None:
        """A proxied connection to ``name`` started (counted for ``balance="p2c"``)."""
        self._active[name] = self._active.get(name, 0) + 1

    def released(self, name: str) -> None:
        """A proxied connection to ``name`` ended."""
        count = self._active.get(name, 0) - 1
        if count > 0:
            self._active[name] = count
        else:
            self._active.pop(name, None)

    def active(self, name: str) -> int:
        """Proxied connections to ``name`` now open."""
        extra = self.active_extra(name) if self.active_extra is not None else 0
        return self._active.get(name, 0) + extra

    # -- status ----------------------------------------------------------------------------

    def health_report(self) -> list[dict[str, object]]:
        """:meth:`health` as ``/status`` shows it (``retry_in``: seconds until the retry)."""
        now = self._now()
        return [
            {
                "name": h.name,
                "address": h.address,
                "ready": h.ready,
                "failures": h.failures,
                "retry_in": None if h.retry_at is None else max(0.0, h.retry_at - now),
                "active": h.active,
            }
            for h in self.health()
        ]

    def health(self) -> list[InstanceHealth]:
        """Every pooled instance with its state, sorted by name (for ``/status``)."""
        return [
            InstanceHealth(
                name=name,
                address=entry.address,
                ready=name in self._ready,
                failures=entry.failures,
                retry_at=entry.retry_at,
                active=self.active(name),
            )
            for name, entry in sorted(self._entries.items())
        ]
