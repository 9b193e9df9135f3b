"""When steering by CPU does harm, and fluxd stops it.

Steering (``-engine-steer cpu``, see ``_relay_steer.pxi``) sends each new connection to the
engine thread pinned to the CPU its SYN arrived on.  That is the best place for it while
connections arrive on every CPU, and the worst when they arrive on one: a host whose NIC
delivers on one CPU (one receive queue, no RSS or RPS), or one client process doing all the
connecting, loads one pinned thread while the others idle.  :class:`SpreadWatch` reads the
threads' accept counts (``flux_engine_shard_accepted_total``) once per window and says when one
thread has taken far more than its share for several windows running; the relay then takes the
steering program off every port and unpins the threads, so the kernel's hash spreads new
connections over all of them from then on (until fluxd restarts).

Pure: it is fed counts, and decides nothing about sockets or threads itself.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SpreadWatch"]

# How often the relay feeds the watch (seconds).
WINDOW = 5.0
# A window with fewer new connections than this says nothing: one thread copes with any spread.
MIN_CONNECTIONS = 1000
# One thread is "far beyond its share" past this many times an even share (two threads: 75 %).
SHARE = 1.5
# Lopsided windows in a row before steering stops (so a burst from one client does not).
WINDOWS = 3


class SpreadWatch:
    """Follows ``shards`` threads' cumulative accept counts; :meth:`observe` returns why
    steering should stop once ``windows`` windows running each had at least
    ``min_connections`` new connections and one thread took more than ``share`` times an even
    share of them, else None."""

    def __init__(
        self,
        shards: int,
        *,
        window: float = WINDOW,
        min_connections: int = MIN_CONNECTIONS,
        share: float = SHARE,
        windows: int = WINDOWS,
    ) -> None:
        if shards < 2:
            raise ValueError(f"a spread needs 2 or more threads, got {shards}")
        self.shards = shards
        self.window = window
        self.min_connections = min_connections
        self.limit = min(share / shards, 1.0)
        self.windows = windows
        self._last: tuple[int, ...] | None = None
        # Per lopsided window running: the busiest thread, its count, the count of all.
        self._lopsided: list[tuple[int, int, int]] = []

    def observe(self, accepted: Sequence[int]) -> str | None:
        """Feed the threads' accept counts so far (in thread order), once per window."""
        if len(accepted) != self.shards:
            raise ValueError(f"need {self.shards} counts, got {len(accepted)}")
        last, self._last = self._last, tuple(accepted)
        if last is None:
            return None
        new = [now - before for now, before in zip(accepted, last, strict=True)]
        total = sum(new)
        busiest = max(new)
        if total < self.min_connections or busiest <= self.limit * total:
            self._lopsided.clear()
            return None
        self._lopsided.append((new.index(busiest), busiest, total))
        if len(self._lopsided) < self.windows:
            return None
        threads = {thread for thread, _, _ in self._lopsided}
        who = f"engine thread {threads.pop()}" if len(threads) == 1 else "the busiest engine thread"
        taken = sum(count for _, count, _ in self._lopsided)
        seen = sum(total for _, _, total in self._lopsided)
        return (
            f"{who} took {taken / seen:.0%} of the last"
            f" {len(self._lopsided) * self.window:.0f} s's {seen:,} new connections"
            f" (an even share is {1 / self.shards:.0%})"
        )
