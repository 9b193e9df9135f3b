# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""flux's HDR-style latency histogram (its own extension module, flux._histogram).

The metrics collectors record into it from Python and turn it into Prometheus summaries; the
relay engine (flux._splice) never touches it.  Its types are in _histogram.pxd.
"""

# Theory of operation
# ===================
#
# Layout.  Values are unsigned 64-bit integers without a unit (the metrics record the
# microseconds of the engine's exchange records).  `lowest` fixes the finest resolution, the
# *unit* 2**floor(log2(lowest)).  `significant_digits` d fixes the sub-bucket count, the
# smallest power of two >= 2 * 10**d.  The first sub-bucket-count counters are one unit wide
# and start at 0; after that each power of two gets sub-bucket-count / 2 linear counters, each
# twice as wide as the ones of the power below.  Any counter is therefore at most 10**-d of the
# values it holds.  This is HdrHistogram's layout (the `hdrhistogram` package is the tests'
# oracle), trimmed to end at the counter that holds `highest`.  The counters are one zeroed
# array allocated at creation: fixed memory, and nothing on the record path allocates.  A
# counter is named by its index i and covers [hist_lowest_at(i), hist_highest_at(i)].
#
# Out-of-range values.  A value above `highest` is recorded as `highest` (the top counter) and
# counted in `clamped`.  Values below `lowest`, 0 included, are *not* out of range: `lowest` is a
# resolution, not a floor, so they land in the first unit-wide counters (absolute error below one
# unit), exactly as HdrHistogram records them, and `clamped` keeps meaning "this value was moved
# by more than the promised precision".  `sum`, `min` and `max` are exact and taken over the raw
# values, before clamping.  The sum is 128 bits wide (two words) so that it cannot wrap: at a
# million 1 ms requests a second, a 64-bit nanosecond sum would wrap in about 200 days.
#
# Quantiles.  Same semantics as HdrHistogram's get_value_at_percentile, with q = percentile / 100:
# the rank is max(1, round-half-up(q * count)), computed with HdrHistogram's own floating-point
# steps so that results are equal to the oracle's, not merely close; the answer is the highest
# value equivalent to the counter holding that rank (the lowest one for q = 0); an empty
# histogram answers 0.  All requested quantiles are found in one ascending pass.
#
# Threads.  A histogram has one owner thread, the only one that mutates it (hist_record*,
# hist_reset, hist_add into it): in flux the asyncio thread, which records what the relay
# engine's exchange records carry (the engine itself never records).  Other threads read it
# (hist_add *from* it, hist_quantiles, the Python accessors) without any lock, and the record
# path takes none:
#   - every field is an aligned 64-bit word written by one thread, and such stores are
#     single-copy atomic on the 64-bit targets we build for, so a reader sees each word either
#     before or after an update, never half of one;
#   - counters, count, clamped and the sum only grow between resets, so a reader that races a
#     record sees that sample either wholly, partly (e.g. in its counter but not yet in the
#     total) or not at all: a torn read costs at most the samples in flight;
#   - the one multi-word value, the sum, is guarded by a sequence counter that the writer bumps
#     only when the high word changes (a carry, or a merge): readers retry across that update
#     instead of seeing the low word wrapped and the high word not yet carried;
#   - rank targets come from the total read before the pass; if the counters seen fall short of
#     it (a record in flight), the missing quantiles take the highest non-empty counter.
# Resetting (or otherwise mutating) a histogram from a thread other than its owner while the
# owner records is *not* supported: a sliding window rotates its age buckets on the owner thread,
# or hands a filled bucket over before resetting it.  Merging age buckets into a scratch
# histogram with hist_add is a read of each bucket, so a collector may do it at scrape time.

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_RawCalloc, PyMem_RawFree
from cpython.number cimport PyNumber_Index
from libc.stdint cimport INT64_MAX, UINT64_MAX, uint64_t
from libc.string cimport memset

cdef extern from *:
    """
    /* GCC/Clang builtins behind plain names.  The fences order the sum's sequence counter
       against the sum's words; on x86-64 they compile to nothing but a compiler barrier. */
    #define flux_hist_clz64(x) __builtin_clzll(x)
    #define flux_hist_acquire_fence() __atomic_thread_fence(__ATOMIC_ACQUIRE)
    #define flux_hist_release_fence() __atomic_thread_fence(__ATOMIC_RELEASE)
    """
    int flux_hist_clz64(unsigned long long x) nogil
    void flux_hist_acquire_fence() nogil
    void flux_hist_release_fence() nogil


cdef inline int _hist_sub_bucket_count_magnitude(int digits) noexcept nogil:
    # 2 * 10**d rather than 10**d: only the upper half of each power's sub-buckets is new, and
    # that half alone must still number 10**d counters.
    cdef uint64_t largest_single_unit = 2
    cdef int _
    for _ in range(digits):
        largest_single_unit *= 10
    return 64 - flux_hist_clz64(largest_single_unit - 1)


cdef inline size_t hist_index(const HistogramData* h, uint64_t value) noexcept nogil:
    """Index of the counter holding `value`, which must be <= h.highest."""
    # OR-ing the mask in puts every small value in power 0, the unit-wide counters.
    cdef int bucket = (
        64 - flux_hist_clz64(value | h.sub_bucket_mask)
        - h.unit_magnitude - h.sub_bucket_half_count_magnitude - 1
    )
    cdef uint64_t sub_bucket = value >> (bucket + h.unit_magnitude)
    return (
        ((<size_t>(bucket + 1)) << h.sub_bucket_half_count_magnitude)
        + sub_bucket - h.sub_bucket_half_count
    )


cdef inline uint64_t hist_lowest_at(const HistogramData* h, size_t index) noexcept nogil:
    """Lowest value that counter `index` holds."""
    cdef int bucket = <int>(index >> h.sub_bucket_half_count_magnitude) - 1
    cdef uint64_t sub_bucket = (
        (index & (h.sub_bucket_half_count - 1)) + h.sub_bucket_half_count
    )
    if bucket < 0:
        sub_bucket -= h.sub_bucket_half_count
        bucket = 0
    return sub_bucket << (bucket + h.unit_magnitude)


cdef inline uint64_t hist_highest_at(const HistogramData* h, size_t index) noexcept nogil:
    """Highest value that counter `index` holds."""
    cdef int bucket = <int>(index >> h.sub_bucket_half_count_magnitude) - 1
    if bucket < 0:
        bucket = 0
    return hist_lowest_at(h, index) + ((<uint64_t>1) << (bucket + h.unit_magnitude)) - 1


cdef int hist_init(HistogramData* h, uint64_t lowest, uint64_t highest,
                   int significant_digits) noexcept nogil:
    """Lay out and allocate an empty histogram; HIST_OK, HIST_EINVAL or HIST_ENOMEM.

    The Python constructor validates first, with messages; this check is the backstop for
    native callers.  Free with hist_free (also after a failure).
    """
    cdef int magnitude
    memset(h, 0, sizeof(HistogramData))
    if (significant_digits < HIST_MIN_DIGITS or significant_digits > HIST_MAX_DIGITS
            or lowest < 1 or highest > <uint64_t>INT64_MAX or highest // 2 < lowest):
        return HIST_EINVAL
    magnitude = _hist_sub_bucket_count_magnitude(significant_digits)
    h.unit_magnitude = 63 - flux_hist_clz64(lowest)
    # Keeps the mask, and every index computation on values <= highest, inside 63 bits.
    if h.unit_magnitude + magnitude > 63:
        return HIST_EINVAL
    h.lowest = lowest
    h.highest = highest
    h.significant_digits = significant_digits
    h.sub_bucket_half_count_magnitude = magnitude - 1
    h.sub_bucket_half_count = (<uint64_t>1) << (magnitude - 1)
    h.sub_bucket_mask = (((<uint64_t>1) << magnitude) - 1) << h.unit_magnitude
    h.min_value = UINT64_MAX
    h.counts_len = hist_index(h, highest) + 1
    # Raw allocator: callable without the GIL, from the engine's thread.
    h.counts = <uint64_t*>PyMem_RawCalloc(h.counts_len, sizeof(uint64_t))
    if h.counts == NULL:
        h.counts_len = 0
        return HIST_ENOMEM
    return HIST_OK


cdef void hist_free(HistogramData* h) noexcept nogil:
    """Release the counters; the histogram must not be used afterwards."""
    PyMem_RawFree(h.counts)
    h.counts = NULL
    h.counts_len = 0


cdef inline void _hist_mul(uint64_t a, uint64_t b, uint64_t* hi, uint64_t* lo) noexcept nogil:
    # 64 x 64 -> 128-bit product from 32-bit halves (portable C, no __int128).
    cdef uint64_t a_lo = a & 0xFFFFFFFFu
    cdef uint64_t a_hi = a >> 32
    cdef uint64_t b_lo = b & 0xFFFFFFFFu
    cdef uint64_t b_hi = b >> 32
    cdef uint64_t low = a_lo * b_lo
    cdef uint64_t cross1 = a_hi * b_lo
    cdef uint64_t cross2 = a_lo * b_hi
    cdef uint64_t middle = (low >> 32) + (cross1 & 0xFFFFFFFFu) + (cross2 & 0xFFFFFFFFu)
    lo[0] = (middle << 32) | (low & 0xFFFFFFFFu)
    hi[0] = a_hi * b_hi + (cross1 >> 32) + (cross2 >> 32) + (middle >> 32)


cdef inline void _hist_sum_store(HistogramData* h, uint64_t hi, uint64_t lo) noexcept nogil:
    # Both words change: make readers on other threads retry (see "Threads" above).
    h.sum_seq += 1
    flux_hist_release_fence()
    h.sum_lo = lo
    h.sum_hi = hi
    flux_hist_release_fence()
    h.sum_seq += 1


cdef inline void _hist_sum_add(HistogramData* h, uint64_t add_hi, uint64_t add_lo) noexcept nogil:
    cdef uint64_t lo = h.sum_lo + add_lo
    cdef uint64_t carry = lo < add_lo
    if carry == 0 and add_hi == 0:
        # The usual case: one word changes, no reader can see a torn sum.
        h.sum_lo = lo
    else:
        _hist_sum_store(h, h.sum_hi + add_hi + carry, lo)


cdef void hist_read_sum(const HistogramData* h, uint64_t* hi, uint64_t* lo) noexcept nogil:
    """Consistent read of the 128-bit sum, safe against the owner thread recording."""
    cdef uint64_t before, after
    while True:
        before = h.sum_seq
        flux_hist_acquire_fence()
        hi[0] = h.sum_hi
        lo[0] = h.sum_lo
        flux_hist_acquire_fence()
        after = h.sum_seq
        if before == after and (before & 1) == 0:
            return


cdef inline int hist_record_n(HistogramData* h, uint64_t value, uint64_t count) noexcept nogil:
    """Record `value` `count` times in O(1); returns 1 if it was clamped to highest, else 0."""
    cdef uint64_t recorded = value
    cdef uint64_t product_hi, product_lo
    cdef int clamped = 0
    if count == 0:
        return 0
    if value > h.highest:
        recorded = h.highest
        clamped = 1
        h.clamped += count
    # Counter before total: a reader that takes the total first never finds fewer samples in
    # the counters than the total promised (barring reordering; see hist_quantiles).
    h.counts[hist_index(h, recorded)] += count
    h.total_count += count
    if value < h.min_value:
        h.min_value = value
    if value > h.max_value:
        h.max_value = value
    if count == 1:
        _hist_sum_add(h, 0, value)
    else:
        _hist_mul(value, count, &product_hi, &product_lo)
        _hist_sum_add(h, product_hi, product_lo)
    return clamped


cdef inline int hist_record(HistogramData* h, uint64_t value) noexcept nogil:
    """Record one `value` in O(1) without the GIL; returns 1 if it was clamped, else 0."""
    return hist_record_n(h, value, 1)


cdef void hist_reset(HistogramData* h) noexcept nogil:
    """Empty the histogram, keeping its configuration and memory (owner thread only)."""
    memset(h.counts, 0, h.counts_len * sizeof(uint64_t))
    h.total_count = 0
    h.clamped = 0
    h.min_value = UINT64_MAX
    h.max_value = 0
    _hist_sum_store(h, 0, 0)


cdef inline bint hist_same_config(const HistogramData* a, const HistogramData* b) noexcept nogil:
    """Whether `a` and `b` share lowest, highest and digits, so their counters line up."""
    return (a.lowest == b.lowest and a.highest == b.highest
            and a.significant_digits == b.significant_digits)


cdef int hist_add(HistogramData* dst, const HistogramData* src) noexcept nogil:
    """Merge `src` into `dst` (dst may be src); -1 if their configurations differ, else 0."""
    cdef uint64_t sum_hi, sum_lo, c
    cdef uint64_t total = 0
    cdef size_t i
    if not hist_same_config(dst, src):
        return -1
    hist_read_sum(src, &sum_hi, &sum_lo)
    # The total is what the counters actually held when read, so dst stays self-consistent
    # even when src is being recorded into.  Branch-free so the compiler can vectorise it.
    for i in range(src.counts_len):
        c = src.counts[i]
        dst.counts[i] += c
        total += c
    dst.total_count += total
    dst.clamped += src.clamped
    if src.min_value < dst.min_value:
        dst.min_value = src.min_value
    if src.max_value > dst.max_value:
        dst.max_value = src.max_value
    _hist_sum_add(dst, sum_hi, sum_lo)
    return 0


cdef inline uint64_t _hist_rank(double q, uint64_t total) noexcept nogil:
    # HdrHistogram's arithmetic step for step: percentile * count / 100, plus a half, truncated,
    # at least 1.  Past 2**53 samples the double can exceed the count; cap it there.
    cdef double rank = (q * 100.0) * <double>total / 100.0 + 0.5
    if rank >= <double>total:
        return total
    if rank < 1.0:
        return 1
    return <uint64_t>rank


cdef void hist_quantiles(const HistogramData* h, const double* sorted_qs, uint64_t* out,
                         size_t n) noexcept nogil:
    """Values at the `n` ascending quantiles `sorted_qs` (each in [0, 1]), in one pass."""
    cdef uint64_t total = h.total_count
    cdef uint64_t seen = 0
    cdef uint64_t target, c
    cdef size_t i
    cdef size_t j = 0
    cdef size_t last = 0
    cdef bint any_seen = False
    if n == 0:
        return
    if total == 0:
        for j in range(n):
            out[j] = 0
        return
    target = _hist_rank(sorted_qs[0], total)
    for i in range(h.counts_len):
        c = h.counts[i]
        if c == 0:
            continue
        seen += c
        last = i
        any_seen = True
        while seen >= target:
            if sorted_qs[j] == 0.0:
                out[j] = hist_lowest_at(h, i)
            else:
                out[j] = hist_highest_at(h, i)
            j += 1
            if j == n:
                return
            target = _hist_rank(sorted_qs[j], total)
    # Only reached when a concurrent record had bumped the total but not yet its counter.
    while j < n:
        if not any_seen:
            out[j] = 0
        elif sorted_qs[j] == 0.0:
            out[j] = hist_lowest_at(h, last)
        else:
            out[j] = hist_highest_at(h, last)
        j += 1


cdef object _hist_int_arg(str name, object value):
    try:
        return PyNumber_Index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


cdef object _hist_uint64_arg(str name, object value):
    cdef object number = _hist_int_arg(name, value)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    if number > UINT64_MAX:
        raise ValueError(f"{name} must be below 2**64, got {number}")
    return number


cdef double _hist_quantile_arg(object q) except? -1.0:
    cdef double value
    try:
        value = q
    except TypeError:
        raise TypeError(f"quantile must be a number, got {q!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"quantile must be between 0 and 1, got {q!r}")
    return value


cdef class Histogram:
    """HDR-style log-linear histogram of non-negative integers (latencies, in any unit).

    `lowest` is the resolution (values below it still count, at that resolution), `highest`
    the largest value kept apart (larger ones are clamped to it and counted in `clamped`),
    `significant_digits` (1..5) the relative precision 10**-digits of every answer.  Memory is
    allocated once; recording is O(1).  Quantiles follow HdrHistogram's
    get_value_at_percentile.  See the theory of operation in _histogram.pyx for threads.
    """

    cdef HistogramData _data

    def __cinit__(self, lowest=1, highest=3_600_000_000, significant_digits=3):
        low = _hist_int_arg("lowest", lowest)
        high = _hist_int_arg("highest", highest)
        digits = _hist_int_arg("significant_digits", significant_digits)
        if not HIST_MIN_DIGITS <= digits <= HIST_MAX_DIGITS:
            raise ValueError(
                f"significant_digits must be between {HIST_MIN_DIGITS} and {HIST_MAX_DIGITS}, "
                f"got {digits}"
            )
        if low < 1:
            raise ValueError(f"lowest must be at least 1, got {low}")
        if high > INT64_MAX:
            raise ValueError(f"highest must be at most 2**63 - 1, got {high}")
        if high < 2 * low:
            raise ValueError(f"highest must be at least 2 * lowest = {2 * low}, got {high}")
        magnitude = _hist_sub_bucket_count_magnitude(digits)
        if low.bit_length() - 1 + magnitude > 63:
            raise ValueError(
                f"lowest must be below 2**{64 - magnitude} for {digits} significant digits, "
                f"got {low}"
            )
        status = hist_init(&self._data, low, high, digits)
        if status == HIST_ENOMEM:
            raise MemoryError(f"no memory for a histogram of {self._config()}")
        if status != HIST_OK:
            raise ValueError(f"invalid histogram configuration {self._config()}")

    def __dealloc__(self):
        hist_free(&self._data)

    cdef str _config(self):
        return (f"lowest={self._data.lowest}, highest={self._data.highest}, "
                f"significant_digits={self._data.significant_digits}")

    def __repr__(self):
        return f"<Histogram {self._config()}, count={self._data.total_count}>"

    @property
    def lowest(self):
        """The `lowest` the histogram was created with."""
        return self._data.lowest

    @property
    def highest(self):
        """The `highest` the histogram was created with."""
        return self._data.highest

    @property
    def significant_digits(self):
        """The `significant_digits` the histogram was created with."""
        return self._data.significant_digits

    @property
    def count(self):
        """Number of values recorded, clamped ones included."""
        return self._data.total_count

    @property
    def clamped(self):
        """Number of values above `highest`, recorded as `highest`."""
        return self._data.clamped

    @property
    def sum(self):
        """Exact sum of the raw values recorded (before clamping)."""
        cdef uint64_t hi, lo
        hist_read_sum(&self._data, &hi, &lo)
        return (int(hi) << 64) | int(lo)

    @property
    def min(self):
        """Smallest raw value recorded; 0 when empty."""
        return self._data.min_value if self._data.total_count else 0

    @property
    def max(self):
        """Largest raw value recorded (before clamping); 0 when empty."""
        return self._data.max_value if self._data.total_count else 0

    @property
    def memory_bytes(self):
        """Native memory held: the counters plus the bookkeeping struct."""
        return sizeof(HistogramData) + self._data.counts_len * sizeof(uint64_t)

    def record(self, value, count=1):
        """Record `value` (an integer in [0, 2**64)) `count` times.

        Values above `highest` are recorded as `highest` and counted in `clamped`; `sum`,
        `min` and `max` still see the raw value.
        """
        cdef uint64_t c_value, c_count
        # Exact ints convert directly (C conversion would also truncate floats); anything
        # else, or an out-of-range int, takes the path that says what is wrong.
        if type(value) is not int or type(count) is not int:
            value = _hist_uint64_arg("histogram value", value)
            count = _hist_uint64_arg("histogram count", count)
        try:
            c_value = value
            c_count = count
        except OverflowError:
            _hist_uint64_arg("histogram value", value)
            _hist_uint64_arg("histogram count", count)
            raise
        hist_record_n(&self._data, c_value, c_count)

    def record_many(self, list values not None):
        """Record each of `values` (a list of ints in [0, 2**64)) once: one call per batch."""
        cdef object value
        cdef uint64_t c_value
        for value in values:
            if type(value) is not int:
                value = _hist_uint64_arg("histogram value", value)
            try:
                c_value = value
            except OverflowError:
                _hist_uint64_arg("histogram value", value)
                raise
            hist_record_n(&self._data, c_value, 1)

    def add(self, Histogram other not None):
        """Merge `other`, which must have the same lowest, highest and significant digits."""
        if not hist_same_config(&self._data, &other._data):
            raise ValueError(
                f"cannot add a histogram with {other._config()} "
                f"to one with {self._config()}"
            )
        with nogil:
            hist_add(&self._data, &other._data)

    def reset(self):
        """Forget every value recorded, keeping the configuration and the memory."""
        with nogil:
            hist_reset(&self._data)

    def copy(self):
        """A new histogram with the same configuration and contents (a snapshot)."""
        cdef Histogram clone = Histogram(
            self._data.lowest, self._data.highest, self._data.significant_digits
        )
        with nogil:
            hist_add(&clone._data, &self._data)
        return clone

    def quantiles(self, qs):
        """Values at the quantiles `qs` (each in [0, 1], any order), in the order given.

        Each answer is the highest value equivalent to the counter holding the q-th value
        (the lowest for q = 0), as HdrHistogram's get_value_at_percentile(100 * q); 0 when
        the histogram is empty.  One pass over the counters for all of them.
        """
        cdef list wanted
        cdef Py_ssize_t n, k
        cdef double* sorted_qs = NULL
        cdef uint64_t* out = NULL
        if isinstance(qs, (int, float)):
            raise TypeError(f"quantiles takes a sequence of quantiles, got {qs!r}")
        wanted = [_hist_quantile_arg(q) for q in qs]
        n = len(wanted)
        if n == 0:
            return []
        order = sorted(range(n), key=wanted.__getitem__)
        try:
            sorted_qs = <double*>PyMem_Malloc(n * sizeof(double))
            out = <uint64_t*>PyMem_Malloc(n * sizeof(uint64_t))
            if sorted_qs == NULL or out == NULL:
                raise MemoryError(f"no memory for {n} quantiles")
            for k in range(n):
                sorted_qs[k] = wanted[order[k]]
            with nogil:
                hist_quantiles(&self._data, sorted_qs, out, n)
            result = [0] * n
            for k in range(n):
                result[order[k]] = out[k]
            return result
        finally:
            PyMem_Free(sorted_qs)
            PyMem_Free(out)

    def value_at_quantile(self, q):
        """The value at one quantile `q` in [0, 1]; see `quantiles`."""
        return self.quantiles((q,))[0]

    def counts(self):
        """Non-empty counters, ascending, as (highest equivalent value, count) pairs."""
        cdef list pairs = []
        cdef size_t i
        cdef uint64_t c
        for i in range(self._data.counts_len):
            c = self._data.counts[i]
            if c:
                pairs.append((hist_highest_at(&self._data, i), c))
        return pairs
