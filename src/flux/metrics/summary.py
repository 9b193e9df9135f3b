"""Latency summaries over a sliding window, on flux's HDR histograms.

Theory of operation
-------------------
A Prometheus summary exports quantiles over *recent* observations plus ``_sum`` and ``_count``
since start.  :class:`SlidingSummary` keeps the window as ``age_buckets`` HDR histograms
(:class:`flux._histogram.Histogram`), each covering one *slice* of ``window / age_buckets``
seconds.  An observation goes into the bucket of the current slice only (O(1), one counter).
When the clock enters a new slice, the bucket that slice reuses (the one ``age_buckets``
slices old) is dropped, so the live buckets always hold between ``(N-1)/N`` and all of the last
``window`` seconds: with the defaults (10 minutes, 5 buckets) a quantile covers 8 to 10 minutes,
like the Go client's default ``MaxAge``/``AgeBuckets`` (which reaches the same coverage by
recording into every stream and resetting them in turn; one record per observation is
cheaper).

Quantiles are computed when asked (at scrape time, never on the record path): the live buckets
are merged with ``Histogram.add`` into one scratch histogram, which answers every quantile in
one pass.  An empty window answers NaN, as the Go client does, so a quiet series shows "no
data" rather than a latency of zero.  ``sum`` and ``count`` are exact Python integers over every
observation since start; they never slide.

Memory: buckets are allocated when the first observation of their slice arrives and freed when
they age out, so an idle label set costs two integers.  A busy one holds up to ``age_buckets``
histograms: 26 KB each at 2 significant digits (1 % relative error, the default here) over
1 µs..1 h, 186 KB at 3 digits.  With two summaries per label set and the default 5 buckets that
is about 260 KB (2 digits) against 1.9 MB (3 digits) per busy label set, which is why summaries
use 2 digits.

The clock is injected (seconds, monotonic) so window expiry is tested without sleeping.  A
summary belongs to one thread: it is mutated by :meth:`observe` and by the rotation that
:meth:`quantiles` may do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from flux._histogram import Histogram

__all__ = [
    "DEFAULT_AGE_BUCKETS",
    "DEFAULT_WINDOW",
    "SUMMARY_DIGITS",
    "SUMMARY_HIGHEST_US",
    "SlidingSummary",
    "scratch_histogram",
]

DEFAULT_WINDOW = 600.0
DEFAULT_AGE_BUCKETS = 5
SUMMARY_DIGITS = 2
# One hour in microseconds: a longer exchange (a long poll, a stream) is clamped to it.
SUMMARY_HIGHEST_US = 3_600_000_000


def scratch_histogram(
    significant_digits: int = SUMMARY_DIGITS, highest: int = SUMMARY_HIGHEST_US
) -> Histogram:
    """An empty histogram with the summaries' configuration, to merge windows into."""
    return Histogram(1, highest, significant_digits)


class SlidingSummary:
    """Quantiles over the last ``window`` seconds, exact sum and count since start."""

    __slots__ = (
        "_buckets",
        "_clock",
        "_digits",
        "_epoch",
        "_highest",
        "_scratch",
        "_slice",
        "_start",
        "count",
        "sum",
    )

    def __init__(
        self,
        *,
        window: float = DEFAULT_WINDOW,
        age_buckets: int = DEFAULT_AGE_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
        significant_digits: int = SUMMARY_DIGITS,
        highest: int = SUMMARY_HIGHEST_US,
        scratch: Histogram | None = None,
    ) -> None:
        if not window > 0:
            raise ValueError(f"summary window must be positive, got {window!r}")
        if age_buckets < 1:
            raise ValueError(f"summary age buckets must be at least 1, got {age_buckets!r}")
        if scratch is not None and (
            scratch.significant_digits != significant_digits
            or scratch.highest != highest
            or scratch.lowest != 1
        ):
            raise ValueError(f"scratch histogram {scratch!r} does not match the summary's")
        self._buckets: list[Histogram | None] = [None] * age_buckets
        self._clock = clock
        self._digits = significant_digits
        self._highest = highest
        self._scratch = scratch
        self._slice = window / age_buckets
        self._start = clock()
        self._epoch = 0
        self.count = 0
        self.sum = 0

    @property
    def window(self) -> float:
        """The window's length in seconds."""
        return self._slice * len(self._buckets)

    @property
    def memory_bytes(self) -> int:
        """Native memory held by the age buckets allocated now."""
        return sum(bucket.memory_bytes for bucket in self._buckets if bucket is not None)

    def _rotate(self) -> int:
        """Drop buckets whose slice has aged out; return the current slice's bucket index."""
        n = len(self._buckets)
        epoch = int((self._clock() - self._start) // self._slice)
        if epoch > self._epoch:
            # Every slice entered since the last call reuses a bucket that held a slice now
            # older than the window; after n or more slices, all of them did.
            for entered in range(self._epoch + 1, min(epoch, self._epoch + n) + 1):
                self._buckets[entered % n] = None
            self._epoch = epoch
        # A clock that went backwards keeps recording into the current slice.
        return self._epoch % n

    def observe(self, value: int) -> None:
        """Record one non-negative integer observation (microseconds for flux's summaries)."""
        index = self._rotate()
        bucket = self._buckets[index]
        if bucket is None:
            bucket = self._buckets[index] = Histogram(1, self._highest, self._digits)
        bucket.record(value)
        self.count += 1
        self.sum += value

    def observe_many(self, values: list[int]) -> None:
        """Record a batch of observations made now (one rotation and one native call)."""
        if not values:
            return
        index = self._rotate()
        bucket = self._buckets[index]
        if bucket is None:
            bucket = self._buckets[index] = Histogram(1, self._highest, self._digits)
        bucket.record_many(values)
        self.count += len(values)
        self.sum += sum(values)

    def _merge_into(self, target: Histogram) -> Histogram:
        target.reset()
        self.add_window_to(target)
        return target

    def add_window_to(self, target: Histogram) -> None:
        """Add the observations now in the window to ``target`` (a histogram of the same
        configuration, such as :func:`scratch_histogram`'s), to merge several summaries."""
        self._rotate()
        for bucket in self._buckets:
            if bucket is not None:
                target.add(bucket)

    def window_histogram(self) -> Histogram:
        """A new histogram holding the observations now in the window."""
        return self._merge_into(Histogram(1, self._highest, self._digits))

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Values at quantiles ``qs`` over the window (one pass); NaN each when it is empty."""
        scratch = self._scratch
        if scratch is None:
            scratch = Histogram(1, self._highest, self._digits)
        merged = self._merge_into(scratch)
        if merged.count == 0:
            return [math.nan] * len(qs)
        return [float(value) for value in merged.quantiles(qs)]
