"""SpreadWatch, the pure part of fluxd's guard on steering by CPU: when one engine thread takes
far more than its share of new connections, or does far more than its share of the work, for
several windows running, steering stops.  (The relay's side, on real sockets and threads, is in
test_engine_steer.)"""

from __future__ import annotations

import pytest

from flux.relay.spread import SpreadWatch


def _feed(watch: SpreadWatch, windows: list[list[int]]) -> list[str | None]:
    """Feed per-window new-connection counts as the cumulative counts the relay reads."""
    total = [0] * watch.shards
    said = [watch.observe(total)]
    for window in windows:
        total = [t + n for t, n in zip(total, window, strict=True)]
        said.append(watch.observe(total))
    return said


def _feed_busy(watch: SpreadWatch, windows: list[list[float]]) -> list[str | None]:
    """The same with per-window CPU seconds per thread, and no new connections at all."""
    idle = [0] * watch.shards
    busy = [0.0] * watch.shards
    said = [watch.observe(idle, busy)]
    for window in windows:
        busy = [t + n for t, n in zip(busy, window, strict=True)]
        said.append(watch.observe(idle, busy))
    return said


def test_an_even_spread_never_stops_steering() -> None:
    watch = SpreadWatch(2)
    assert _feed(watch, [[5000, 5100], [4800, 5300], [7400, 2600]] * 5) == [None] * 16


def test_three_lopsided_windows_running_stop_it_and_say_why() -> None:
    watch = SpreadWatch(2)
    said = _feed(watch, [[9700, 300], [9800, 200], [9900, 100]])
    assert said[:3] == [None, None, None]
    assert said[3] == (
        "engine thread 0 took 98% of the last 15 s's 30,000 new connections"
        " (an even share is 50%)"
    )


def test_a_burst_does_not_stop_it_the_windows_must_run_on() -> None:
    watch = SpreadWatch(2)
    said = _feed(watch, [[100, 9000], [9000, 100], [5000, 5000], [9000, 100], [9000, 100]])
    assert said == [None] * 6


def test_a_quiet_window_says_nothing_and_breaks_the_run() -> None:
    watch = SpreadWatch(2)
    # 999 new connections: one thread copes with any spread of those.
    said = _feed(watch, [[999, 0]] * 4 + [[2000, 0], [2000, 0], [999, 0], [2000, 0]])
    assert said == [None] * 9


def test_the_busiest_thread_may_change_from_window_to_window() -> None:
    watch = SpreadWatch(2, windows=2)
    said = _feed(watch, [[1900, 100], [100, 1900]])
    assert said[-1] is not None and said[-1].startswith("the busiest engine thread took 95%")


def test_the_limit_is_a_multiple_of_an_even_share() -> None:
    # 4 threads: an even share is 25 %, the limit 37.5 %.
    watch = SpreadWatch(4, windows=1)
    assert _feed(watch, [[370, 210, 210, 210]]) == [None, None]
    assert _feed(watch, [[380, 210, 210, 200]])[-1] is not None
    # 2 threads: 75 %.
    two = SpreadWatch(2, windows=1)
    assert _feed(two, [[750, 250]]) == [None, None]
    assert _feed(two, [[760, 240]])[-1] is not None


def test_it_refuses_a_single_thread_and_a_count_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="2 or more threads, got 1"):
        SpreadWatch(1)
    with pytest.raises(ValueError, match="need 2 figures, got 3"):
        SpreadWatch(2).observe([1, 2, 3])
    with pytest.raises(ValueError, match="need 2 figures, got 1"):
        SpreadWatch(2).observe([1, 2], [0.5])


def test_one_thread_doing_most_of_the_work_stops_it_too() -> None:
    # One bulk stream: thread 1 busy a third of a core, thread 0 idle, three windows running.
    watch = SpreadWatch(2)
    said = _feed_busy(watch, [[0.01, 1.65], [0.02, 1.70], [0.0, 1.60]])
    assert said[:3] == [None, None, None]
    assert said[3] == (
        "engine thread 1 did 99% of the engine's work in the last 15 s (4.9 of 5.0 CPU"
        " seconds; an even share is 50%)"
    )


def test_work_spread_evenly_or_too_little_of_it_says_nothing() -> None:
    watch = SpreadWatch(2)
    assert _feed_busy(watch, [[1.0, 1.1], [2.0, 1.7], [0.6, 0.5]] * 3) == [None] * 10
    # Less than a quarter of a core in all (1.25 CPU seconds in 5 s): one thread copes.
    assert _feed_busy(SpreadWatch(2), [[1.2, 0.0]] * 5) == [None] * 6


def test_either_measure_may_stop_it_whichever_runs_long_enough_first() -> None:
    watch = SpreadWatch(2, windows=2)
    # Connections lopsided only in the first window, work in both: the work says why.
    assert watch.observe([0, 0], [0.0, 0.0]) is None
    assert watch.observe([2000, 0], [2.0, 0.1]) is None
    said = watch.observe([3000, 1000], [4.0, 0.2])
    assert said is not None and said.startswith("engine thread 0 did 95% of the engine's work")
