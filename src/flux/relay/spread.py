"""When steering by CPU does harm, and fluxd stops it.

Steering (``-engine-steer cpu``, see ``_relay_steer.pxi``) sends each new connection to the
engine thread pinned to the CPU its SYN arrived on.  That is the best place for it while
connections, and the work they bring, arrive on every CPU, and the worst when they do not:

- new connections that arrive on one CPU (a NIC with one receive queue and no RSS or RPS, or one
  client process doing all the connecting) load one pinned thread while the others idle;
- a few connections that carry most of the bytes (a bulk stream, a busy HTTP/2 connection) keep
  one thread busy, and pinned it cannot move off a CPU that something else needs.

:class:`SpreadWatch` reads the threads' accept counts (``flux_engine_shard_accepted_total``) and
the CPU time each thread used, once per window, and says when one thread has taken far more than
its share of either for several windows running; the relay then takes the steering program off
every port and unpins the threads, so the kernel's hash spreads new connections over threads free
to run on any CPU from then on (until fluxd restarts).

Pure: it is fed counts, and decides nothing about sockets or threads itself.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SpreadWatch"]

# How often the relay feeds the watch (seconds).
WINDOW = 5.0
# A window with fewer new connections than this says nothing of their spread: one thread copes.
MIN_CONNECTIONS = 1000
# Nor does one in which the threads together used less than this share of a core.
MIN_BUSY = 0.25
# One thread is "far beyond its share" past this many times an even share (two threads: 75 %).
SHARE = 1.5
# Lopsided windows in a row before steering stops (so a burst from one client does not).
WINDOWS = 3


class _Measure:
    """One cumulative per-thread figure, and the run of windows in which it was lopsided."""

    def __init__(self, what: str, least: float) -> None:
        self.what = what
        self.least = least  # the window's total below which it says nothing
        self.last: tuple[float, ...] | None = None
        self.run: list[tuple[int, float, float]] = []  # busiest thread, its part, the total

    def lopsided(self, now: Sequence[float], limit: float) -> bool:
        """Feed the cumulative figures; whether this window made the run one longer."""
        last, self.last = self.last, tuple(now)
        if last is None:
            return False
        new = [a - b for a, b in zip(now, last, strict=True)]
        total, busiest = sum(new), max(new)
        if total < self.least or busiest <= limit * total:
            self.run.clear()
            return False
        self.run.append((new.index(busiest), busiest, total))
        return True


class SpreadWatch:
    """Follows ``shards`` threads' cumulative accept counts and CPU seconds; :meth:`observe`
    returns why steering should stop once ``windows`` windows running each had at least
    ``min_connections`` new connections (or ``min_busy`` of a core in use by the threads) and
    one thread took more than ``share`` times an even share of them (of it), else None."""

    def __init__(
        self,
        shards: int,
        *,
        window: float = WINDOW,
        min_connections: int = MIN_CONNECTIONS,
        min_busy: float = MIN_BUSY,
        share: float = SHARE,
        windows: int = WINDOWS,
    ) -> None:
        if shards < 2:
            raise ValueError(f"a spread needs 2 or more threads, got {shards}")
        self.shards = shards
        self.window = window
        self.min_connections = min_connections
        self.min_busy = min_busy
        self.limit = min(share / shards, 1.0)
        self.windows = windows
        self._accepted = _Measure("new connections", min_connections)
        self._busy = _Measure("CPU time", min_busy * window)

    def observe(self, accepted: Sequence[int], busy: Sequence[float] | None = None) -> str | None:
        """Feed the threads' accept counts so far and, if known, the CPU seconds each has used
        so far (both in thread order), once per window."""
        for figures in (accepted, busy):
            if figures is not None and len(figures) != self.shards:
                raise ValueError(f"need {self.shards} figures, got {len(figures)}")
        measures = [(self._accepted, accepted)] + ([(self._busy, busy)] if busy is not None else [])
        for measure, figures in measures:
            if measure.lopsided(figures, self.limit) and len(measure.run) >= self.windows:
                return self._reason(measure)
        return None

    def _reason(self, measure: _Measure) -> str:
        threads = {thread for thread, _, _ in measure.run}
        who = f"engine thread {threads.pop()}" if len(threads) == 1 else "the busiest engine thread"
        taken = sum(part for _, part, _ in measure.run)
        seen = sum(total for _, _, total in measure.run)
        seconds = len(measure.run) * self.window
        even = f"an even share is {1 / self.shards:.0%}"
        if measure is self._accepted:
            return (
                f"{who} took {taken / seen:.0%} of the last {seconds:g} s's {seen:,.0f}"
                f" new connections ({even})"
            )
        return (
            f"{who} did {taken / seen:.0%} of the engine's work in the last {seconds:g} s"
            f" ({taken:.1f} of {seen:.1f} CPU seconds; {even})"
        )
