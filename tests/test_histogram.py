"""The HDR-style histogram of flux._histogram.

The `hdrhistogram` package is the oracle: same lowest, highest and significant digits must give
the same counters and the same answers as its `get_value_at_percentile(100 * q)`.  The edges
(empty, one value, q = 0 and 1, range boundaries, clamping, huge values, merging, reset, sums
past 2**64) are pinned down by hand.
"""

from __future__ import annotations

import math

import pytest
from hdrh.histogram import HdrHistogram
from hypothesis import given, settings
from hypothesis import strategies as st

from flux._histogram import Histogram

HOUR_US = 3_600_000_000
# Highest value equivalent to 3.6e9 at 3 digits: its counter is 2**21 wide.
TOP_OF_DEFAULT = 3_600_809_983
SOME_QUANTILES = [0.0, 0.001, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0]


def oracle_for(lowest: int, highest: int, digits: int, values: list[int]) -> HdrHistogram:
    oracle = HdrHistogram(lowest, highest, digits)
    for value in values:
        assert oracle.record_value(value)
    return oracle


def oracle_counts(oracle: HdrHistogram) -> list[tuple[int, int]]:
    return [
        (oracle.get_highest_equivalent_value(oracle.get_value_from_index(index)), count)
        for index, count in enumerate(oracle.counts)
        if count
    ]


def filled(values: list[int], **config: int) -> Histogram:
    histogram = Histogram(**config)
    for value in values:
        histogram.record(value)
    return histogram


def state(histogram: Histogram) -> tuple[object, ...]:
    return (
        histogram.count,
        histogram.sum,
        histogram.min,
        histogram.max,
        histogram.clamped,
        histogram.counts(),
        histogram.quantiles(SOME_QUANTILES),
    )


@st.composite
def configs(draw: st.DrawFn, max_digits: int = 3) -> tuple[int, int, int]:
    digits = draw(st.integers(1, max_digits))
    lowest = draw(st.integers(1, 10_000))
    highest = draw(st.integers(2 * lowest, min(lowest * 10**7, HOUR_US)))
    return lowest, highest, digits


def spread_values(highest: int) -> st.SearchStrategy[int]:
    """Values in [0, highest] spread over every order of magnitude, not just the top one."""
    return st.integers(0, highest.bit_length()).flatmap(
        lambda bits: st.integers(0, min(highest, 2**bits))
    )


@st.composite
def configs_and_values(draw: st.DrawFn) -> tuple[tuple[int, int, int], list[int]]:
    config = draw(configs())
    values = draw(st.lists(spread_values(config[1]), min_size=1, max_size=200))
    return config, values


quantile_lists = st.lists(st.floats(0.0, 1.0), max_size=6)


# -- agreement with the oracle -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(configs_and_values(), quantile_lists)
def test_quantiles_and_counters_equal_hdrhistogram(
    config_and_values: tuple[tuple[int, int, int], list[int]], extra_quantiles: list[float]
) -> None:
    (lowest, highest, digits), values = config_and_values
    histogram = filled(values, lowest=lowest, highest=highest, significant_digits=digits)
    oracle = oracle_for(lowest, highest, digits, values)
    quantiles = SOME_QUANTILES + extra_quantiles

    assert histogram.quantiles(quantiles) == [
        oracle.get_value_at_percentile(q * 100) for q in quantiles
    ]
    assert histogram.counts() == oracle_counts(oracle)
    assert histogram.count == len(values)
    assert histogram.sum == sum(values)
    assert histogram.min == min(values)
    assert histogram.max == max(values)
    assert histogram.clamped == 0


@pytest.mark.parametrize("digits", [4, 5])
def test_finest_precisions_equal_hdrhistogram(digits: int) -> None:
    # Fixed values: the oracle walks up to 10**5 counters in Python per quantile.
    values = [0, 1, 7, 999, 1_000, 12_345, 65_535, 65_536, 99_999, 100_000] + [
        (i * 7_919) % 100_001 for i in range(300)
    ]
    histogram = filled(values, lowest=1, highest=100_000, significant_digits=digits)
    oracle = oracle_for(1, 100_000, digits, values)
    assert histogram.quantiles(SOME_QUANTILES) == [
        oracle.get_value_at_percentile(q * 100) for q in SOME_QUANTILES
    ]
    assert histogram.counts() == oracle_counts(oracle)


def test_ranks_round_half_up_like_hdrhistogram() -> None:
    # 1..10 each in its own exact counter: the rank is max(1, int(q * 10 + 0.5)).
    histogram = filled(list(range(1, 11)))
    assert histogram.quantiles([0.05, 0.149, 0.15, 0.25, 0.5, 0.96]) == [1, 1, 2, 3, 5, 10]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_answers_are_within_the_promised_precision(data: st.DataObject) -> None:
    digits = data.draw(st.integers(1, 5))
    lowest = data.draw(st.integers(1, 1_000))
    highest = data.draw(st.integers(2 * lowest, 2**40))
    value = data.draw(spread_values(highest))
    histogram = filled([value], lowest=lowest, highest=highest, significant_digits=digits)
    [at_zero, at_one] = histogram.quantiles([0.0, 1.0])
    assert at_zero <= value <= at_one
    assert at_one - at_zero < max(lowest, value / 10**digits)


# -- edges ---------------------------------------------------------------------------------------


def test_empty_histogram_answers_zero() -> None:
    histogram = Histogram()
    assert histogram.quantiles([0.0, 0.5, 1.0]) == [0, 0, 0]
    assert histogram.value_at_quantile(0.99) == 0
    assert (histogram.count, histogram.sum, histogram.min, histogram.max) == (0, 0, 0, 0)
    assert histogram.clamped == 0
    assert histogram.counts() == []


def test_single_value_bounds_every_quantile_by_its_counter() -> None:
    # 5001 lies in [4096, 8192), where counters are 4 wide: it shares [5000, 5003].
    histogram = filled([5001])
    assert histogram.quantiles([0.0, 0.5, 1.0]) == [5000, 5003, 5003]
    assert histogram.counts() == [(5003, 1)]
    assert (histogram.min, histogram.max, histogram.sum, histogram.count) == (5001, 5001, 5001, 1)


def test_q0_is_the_lowest_equivalent_of_the_minimum_and_q1_the_highest_of_the_maximum() -> None:
    values = [5001, 2, 70_000_000]
    histogram = filled(values)
    oracle = oracle_for(1, HOUR_US, 3, values)
    assert histogram.value_at_quantile(0.0) == 2 == oracle.get_value_at_percentile(0)
    assert histogram.value_at_quantile(1.0) == oracle.get_value_at_percentile(100)
    assert histogram.value_at_quantile(1.0) == oracle.get_highest_equivalent_value(70_000_000)
    assert histogram.value_at_quantile(1.0) > 70_000_000


def test_quantiles_come_back_in_the_order_asked() -> None:
    histogram = filled(list(range(1, 1_001)))
    asked = [1.0, 0.5, 0.0, 0.5, 0.9]
    assert histogram.quantiles(asked) == [histogram.value_at_quantile(q) for q in asked]
    assert histogram.quantiles(asked) == [1_000, 500, 1, 500, 900]
    assert histogram.quantiles([]) == []
    assert histogram.quantiles(iter([0.5])) == [500]


def test_zero_is_recorded_exactly() -> None:
    histogram = filled([0])
    assert histogram.counts() == [(0, 1)]
    assert histogram.quantiles([0.0, 1.0]) == [0, 0]
    assert (histogram.count, histogram.min, histogram.max, histogram.clamped) == (1, 0, 0, 0)


def test_values_below_lowest_land_in_the_unit_wide_counters_unclamped() -> None:
    # lowest=1000 means a unit of 512: counters [0, 511], [512, 1023], ...
    values = [0, 511, 512, 999, 1_000]
    histogram = filled(values, lowest=1_000, highest=10**9)
    assert histogram.counts() == [(511, 2), (1_023, 3)]
    assert histogram.counts() == oracle_counts(oracle_for(1_000, 10**9, 3, values))
    assert histogram.clamped == 0
    assert histogram.value_at_quantile(0.0) == 0


def test_highest_is_kept_and_anything_above_it_is_clamped_into_its_counter() -> None:
    histogram = filled([HOUR_US])
    assert histogram.clamped == 0
    assert histogram.counts() == [(TOP_OF_DEFAULT, 1)]
    assert histogram.value_at_quantile(1.0) == TOP_OF_DEFAULT

    histogram.record(HOUR_US + 1)
    histogram.record(10 * HOUR_US, count=3)
    assert histogram.clamped == 4
    assert histogram.count == 5
    assert histogram.counts() == [(TOP_OF_DEFAULT, 5)]
    assert histogram.value_at_quantile(1.0) == TOP_OF_DEFAULT
    # The exact statistics keep the raw values.
    assert histogram.max == 10 * HOUR_US
    assert histogram.sum == HOUR_US + HOUR_US + 1 + 30 * HOUR_US


def test_lowest_boundary_is_exact() -> None:
    histogram = filled([1, 2], lowest=1, highest=2)
    assert histogram.counts() == [(1, 1), (2, 1)]
    assert histogram.quantiles([0.0, 0.5, 1.0]) == [1, 1, 2]


def test_huge_values_are_clamped_but_summed_exactly() -> None:
    histogram = filled([2**63, 2**64 - 1])
    assert histogram.clamped == 2
    assert (histogram.min, histogram.max) == (2**63, 2**64 - 1)
    assert histogram.sum == 2**63 + 2**64 - 1
    assert histogram.value_at_quantile(0.5) == TOP_OF_DEFAULT


def test_the_largest_highest_records_its_top_value_unclamped() -> None:
    histogram = filled([2**63 - 1, 1], lowest=1, highest=2**63 - 1)
    assert histogram.clamped == 0
    assert histogram.quantiles([0.0, 1.0]) == [1, 2**63 - 1]
    histogram.record(2**63)
    assert histogram.clamped == 1


@pytest.mark.parametrize(
    ("value", "count", "error", "fragment"),
    [
        (-1, 1, ValueError, "histogram value must not be negative, got -1"),
        (2**64, 1, ValueError, "histogram value must be below 2**64, got 18446744073709551616"),
        (1.5, 1, TypeError, "histogram value must be an integer, got 1.5"),
        ("7", 1, TypeError, "histogram value must be an integer, got '7'"),
        (1, -2, ValueError, "histogram count must not be negative, got -2"),
        (1, 2.0, TypeError, "histogram count must be an integer, got 2.0"),
    ],
)
def test_bad_values_are_refused_and_leave_the_histogram_alone(
    value: object, count: object, error: type[Exception], fragment: str
) -> None:
    histogram = filled([10])
    with pytest.raises(error, match=fragment.replace("*", r"\*")):
        histogram.record(value, count)  # type: ignore[arg-type]
    assert (histogram.count, histogram.sum, histogram.counts()) == (1, 10, [(10, 1)])


def test_count_zero_records_nothing() -> None:
    histogram = Histogram()
    histogram.record(123, count=0)
    assert state(histogram) == state(Histogram())


def test_sum_is_exact_past_2_to_the_64() -> None:
    histogram = Histogram()
    big_count = 10**12
    for _ in range(7):
        histogram.record(HOUR_US, count=big_count)  # 3.6e21 each, past 2**64 on the first
    histogram.record(2**64 - 1, count=2**40)
    assert histogram.sum == 7 * HOUR_US * big_count + (2**64 - 1) * 2**40
    assert histogram.count == 7 * big_count + 2**40
    assert histogram.value_at_quantile(0.5) == TOP_OF_DEFAULT


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**40)), max_size=20))
def test_sum_and_count_are_exact_for_any_values_and_counts(
    recordings: list[tuple[int, int]],
) -> None:
    histogram = Histogram()
    for value, count in recordings:
        histogram.record(value, count)
    assert histogram.sum == sum(value * count for value, count in recordings)
    assert histogram.count == sum(count for _, count in recordings)
    assert histogram.clamped == sum(count for value, count in recordings if value > HOUR_US)
    recorded = [value for value, count in recordings if count]
    assert histogram.min == min(recorded, default=0)
    assert histogram.max == max(recorded, default=0)


# -- merging, reset, copies ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 2 * HOUR_US), max_size=50),
    st.lists(st.integers(0, 2 * HOUR_US), max_size=50),
)
def test_add_is_the_same_as_recording_everything_in_one(left: list[int], right: list[int]) -> None:
    merged = filled(left)
    merged.add(filled(right))
    assert state(merged) == state(filled(left + right))


def test_add_to_itself_doubles_everything() -> None:
    histogram = filled([3, 5_000, 2 * HOUR_US])
    before = histogram.counts()
    histogram.add(histogram)
    assert histogram.counts() == [(value, 2 * count) for value, count in before]
    assert (histogram.count, histogram.clamped) == (6, 2)
    assert histogram.sum == 2 * (3 + 5_000 + 2 * HOUR_US)
    assert (histogram.min, histogram.max) == (3, 2 * HOUR_US)


def test_adding_an_empty_histogram_changes_nothing() -> None:
    histogram = filled([42, 4_200])
    before = state(histogram)
    histogram.add(Histogram())
    assert state(histogram) == before


@pytest.mark.parametrize(
    "other",
    [
        {"lowest": 2},
        {"highest": HOUR_US - 1},
        {"significant_digits": 2},
    ],
)
def test_add_refuses_a_different_configuration(other: dict[str, int]) -> None:
    histogram = filled([1])
    stranger = Histogram(**other)
    stranger.record(5)
    with pytest.raises(ValueError, match=r"cannot add a histogram with .* to one with lowest=1, "):
        histogram.add(stranger)
    assert histogram.counts() == [(1, 1)]


def test_add_refuses_what_is_not_a_histogram() -> None:
    with pytest.raises(TypeError):
        Histogram().add(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Histogram().add(HdrHistogram(1, HOUR_US, 3))  # type: ignore[arg-type]


def test_reset_empties_and_the_histogram_records_again() -> None:
    histogram = filled([1, 700, 3 * HOUR_US])
    histogram.record(HOUR_US, count=10**12)  # the sum's high word is in use
    histogram.reset()
    assert state(histogram) == state(Histogram())
    histogram.record(700)
    assert state(histogram) == state(filled([700]))


def test_copy_is_an_independent_snapshot() -> None:
    original = filled([1, 2, 3 * HOUR_US])
    snapshot = original.copy()
    assert state(snapshot) == state(original)
    assert (snapshot.lowest, snapshot.highest, snapshot.significant_digits) == (1, HOUR_US, 3)
    original.record(99)
    snapshot.reset()
    assert original.count == 4
    assert snapshot.count == 0


# -- arguments and footprint ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"lowest": 0}, ValueError, "lowest must be at least 1, got 0"),
        ({"lowest": -5}, ValueError, "lowest must be at least 1, got -5"),
        ({"lowest": 10, "highest": 19}, ValueError, "highest must be at least 2 * lowest = 20"),
        ({"highest": 2**63}, ValueError, "highest must be at most 2**63 - 1"),
        ({"significant_digits": 0}, ValueError, "significant_digits must be between 1 and 5"),
        ({"significant_digits": 6}, ValueError, "significant_digits must be between 1 and 5"),
        (
            {"lowest": 2**60, "highest": 2**62},
            ValueError,
            "lowest must be below 2**53 for 3 significant digits",
        ),
        ({"lowest": 1.0}, TypeError, "lowest must be an integer, got 1.0"),
        ({"significant_digits": "3"}, TypeError, "significant_digits must be an integer, got '3'"),
    ],
)
def test_bad_configurations_are_refused_with_a_clear_message(
    config: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        Histogram(**config)  # type: ignore[arg-type]
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    ("message", "bad"),
    [
        ("quantile must be between 0 and 1, got -0.1", -0.1),
        ("quantile must be between 0 and 1, got 1.1", 1.1),
        ("quantile must be between 0 and 1, got nan", math.nan),
        ("quantile must be a number, got '0.5'", "0.5"),
    ],
)
def test_bad_quantiles_are_refused(message: str, bad: object) -> None:
    histogram = filled([1])
    with pytest.raises((ValueError, TypeError)) as raised:
        histogram.quantiles([0.5, bad])  # type: ignore[list-item]
    assert str(raised.value) == message
    with pytest.raises(TypeError, match=r"quantiles takes a sequence of quantiles, got 0\.5"):
        histogram.quantiles(0.5)  # type: ignore[arg-type]


def test_memory_is_the_trimmed_hdr_layout_allocated_once() -> None:
    histogram = Histogram()
    # The counters end at the one holding `highest`: 23,221 of HdrHistogram's 23,552.
    counters = HdrHistogram(1, HOUR_US, 3)._counts_index_for(HOUR_US) + 1
    assert counters == 23_221
    assert counters * 8 < histogram.memory_bytes <= counters * 8 + 256
    for value in range(0, HOUR_US, HOUR_US // 1_000):
        histogram.record(value)
    assert histogram.memory_bytes <= counters * 8 + 256
    # Two digits (1% precision) over the same range fit in a few tens of KiB.
    assert Histogram(significant_digits=2).memory_bytes < 32 * 1024


def test_properties_and_repr_show_the_configuration() -> None:
    histogram = Histogram(lowest=10, highest=10**6, significant_digits=2)
    assert (histogram.lowest, histogram.highest, histogram.significant_digits) == (10, 10**6, 2)
    histogram.record(3)
    assert repr(histogram) == (
        "<Histogram lowest=10, highest=1000000, significant_digits=2, count=1>"
    )
