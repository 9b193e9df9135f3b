# cython: language_level=3
"""Types of the HDR-style histogram (flux._histogram); the code is in _histogram.pyx.

Ownership (see "Threads" in _histogram.pyx): one owner thread mutates a histogram, the only
one that writes any field below after hist_init; other threads only read, without a lock.
"""

from libc.stdint cimport uint64_t


cdef enum:
    HIST_MIN_DIGITS = 1
    HIST_MAX_DIGITS = 5
    # hist_init's results
    HIST_OK = 0
    HIST_EINVAL = -1
    HIST_ENOMEM = -2


cdef struct HistogramData:
    # The layout: written once by hist_init, read-only afterwards.
    uint64_t* counts            # the counters (the array is fixed; the owner bumps its cells)
    size_t counts_len
    uint64_t lowest
    uint64_t highest
    int significant_digits
    int unit_magnitude
    int sub_bucket_half_count_magnitude
    uint64_t sub_bucket_half_count
    uint64_t sub_bucket_mask
    # The totals: written by the owner thread (hist_record*, hist_reset, hist_add into it).
    uint64_t total_count
    uint64_t clamped
    uint64_t min_value          # UINT64_MAX while empty
    uint64_t max_value
    uint64_t sum_lo             # the 128-bit sum; read it with hist_read_sum
    uint64_t sum_hi
    uint64_t sum_seq            # odd while sum_hi/sum_lo are being changed together
