"""The instance pool: the original's pool tests, the SPEC's changes, and properties."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from flux.balancer.pool import BACKOFF_CAP, Choice, Pool, backoff


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_pool(clock: FakeClock | None = None, seed: int = 1, **kwargs: object) -> Pool:
    return Pool(now=clock or FakeClock(), rng=random.Random(seed), **kwargs)  # type: ignore[arg-type]


def names_of(pool: Pool, picks: int = 20) -> set[str]:
    chosen = set()
    for _ in range(picks):
        choice = pool.pick()
        assert choice is not None
        chosen.add(choice.name)
    return chosen


def test_pool_of_one() -> None:
    pool = make_pool()
    assert pool.pick() is None
    pool.update({})
    assert pool.pick() is None

    pool.update({"inst1": "10.0.0.1:80"})
    assert pool.pick() == Choice("inst1", "10.0.0.1:80")
    pool.succeeded("inst1")
    assert pool.pick() == Choice("inst1", "10.0.0.1:80")

    pool.failed("inst1")
    assert pool.ready == frozenset()
    # Nothing is ready, yet the service is still attempted, from the retry queue.
    assert pool.pick() == Choice("inst1", "10.0.0.1:80")

    pool.update({})
    assert pool.pick() is None
    assert pool.names == frozenset()


def test_fail_and_retry_instance() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    pool.update({"inst1": "10.0.0.1:80"})
    pool.failed("inst1")
    assert pool.next_retry() == clock.now + 1

    pool.update({"inst1": "10.0.0.1:80", "inst2": "10.0.0.2:80"})
    assert "inst1" in pool.queued, "an update mentioning a failed instance keeps it failed"
    assert names_of(pool) == {"inst2"}

    clock.advance(1)
    pool.failed("inst2")
    assert pool.process_retries() == ["inst1"]
    # inst1 is on probation: it is picked once, and goes straight back to the queue.
    assert pool.pick() == Choice("inst1", "10.0.0.1:80")
    assert pool.queued == {"inst1", "inst2"}

    pool.update({"inst1": "10.0.0.1:80", "inst2": "10.0.0.2:80", "inst3": "10.0.0.3:80"})
    assert names_of(pool) == {"inst3"}

    pool.succeeded("inst1")
    pool.update({"inst1": "10.0.0.1:80", "inst2": "10.0.0.2:80"})
    assert names_of(pool) == {"inst1"}


def test_retry_backoff_doubles_then_caps_at_30_seconds() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    pool.update({"inst": "10.0.0.1:80"})
    delays = []
    for _ in range(8):
        pool.failed("inst")
        due = pool.next_retry()
        assert due is not None
        delays.append(due - clock.now)
        # Not due a moment before its time...
        clock.advance(delays[-1] - 0.001)
        assert pool.process_retries() == []
        assert pool.ready == frozenset()
        # ...and back in the ready set at its time.
        clock.advance(0.001)
        assert pool.process_retries() == ["inst"]
        assert pool.ready == {"inst"}
    assert delays == pytest.approx([1, 2, 4, 8, 16, 30, 30, 30])


def test_backoff_function() -> None:
    assert [backoff(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff(10_000) == BACKOFF_CAP
    with pytest.raises(ValueError, match="negative"):
        backoff(-1)


def test_probe_success_clears_failures() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    pool.update({"a": "10.0.0.1:80", "b": "10.0.0.2:80"})
    pool.failed("a")
    clock.advance(1)
    pool.process_retries()
    # a is ready on probation; pick until the probe lands on it.
    for _ in range(100):
        choice = pool.pick()
        assert choice is not None
        if choice.name == "a":
            break
    else:
        pytest.fail("the instance on probation was never picked")
    assert pool.queued == {"a"}, "a probe goes back to the queue while it is in flight"
    pool.succeeded("a")
    assert pool.ready == {"a", "b"}
    assert [h.failures for h in pool.health()] == [0, 0]
    # Healthy again: failing it now starts the backoff from 1 s.
    pool.failed("a")
    assert pool.next_retry() == clock.now + 1


def test_failed_while_queued_is_not_counted_twice() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    pool.update({"a": "10.0.0.1:80"})
    pool.failed("a")
    due = pool.next_retry()
    # Picked from the queue (nothing ready) and failed again: the schedule stands.
    assert pool.pick() == Choice("a", "10.0.0.1:80")
    pool.failed("a")
    assert pool.next_retry() == due
    assert pool.health()[0].failures == 1


def test_pick_runs_due_retries_itself() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    pool.update({"a": "10.0.0.1:80", "b": "10.0.0.2:80"})
    pool.failed("a")
    clock.advance(1)
    # No explicit process_retries(): pick moves a back to ready first.
    seen = {choice.name for choice in (pool.pick() for _ in range(50)) if choice}
    assert seen == {"a", "b"}


def test_address_change_gives_the_new_address_and_a_fresh_start() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    pool.update({"a": "10.0.0.1:80", "b": "10.0.0.2:80"})
    pool.failed("a")
    pool.update({"a": "10.0.0.1:8080", "b": "10.0.0.2:80"})
    assert pool.address("a") == "10.0.0.1:8080"
    assert pool.ready == {"a", "b"}
    assert pool.next_retry() is None
    assert {c.address for c in (pool.pick() for _ in range(50)) if c} == {
        "10.0.0.1:8080",
        "10.0.0.2:80",
    }
    # Same address again: nothing about its state changes.
    pool.failed("b")
    pool.update({"a": "10.0.0.1:8080", "b": "10.0.0.2:80"})
    assert pool.queued == {"b"}


def test_pick_excludes_instances_already_tried() -> None:
    pool = make_pool()
    pool.update({f"i{n}": f"10.0.0.{n}:80" for n in range(1, 6)})
    tried: set[str] = set()
    for _ in range(5):
        choice = pool.pick(exclude=tried)
        assert choice is not None and choice.name not in tried
        tried.add(choice.name)
    assert tried == pool.names
    assert pool.pick(exclude=tried) is None


def test_pick_excludes_from_the_retry_queue_too() -> None:
    pool = make_pool()
    pool.update({"a": "10.0.0.1:80", "b": "10.0.0.2:80"})
    pool.failed("a")
    pool.failed("b")
    assert pool.pick(exclude={"a"}) == Choice("b", "10.0.0.2:80")
    assert pool.pick(exclude={"a", "b"}) is None


def test_random_balance_is_roughly_uniform() -> None:
    pool = make_pool(seed=7)
    pool.update({name: f"10.0.0.{n}:80" for n, name in enumerate("abcd", 1)})
    counts = Counter(c.name for c in (pool.pick() for _ in range(4000)) if c)
    assert set(counts) == set("abcd")
    assert all(800 < count < 1200 for count in counts.values()), counts


def test_p2c_prefers_the_less_loaded_instance() -> None:
    pool = make_pool(seed=3, balance="p2c")
    pool.update({"busy": "10.0.0.1:80", "idle": "10.0.0.2:80"})
    for _ in range(10):
        pool.acquired("busy")
    # With two instances both are always compared: the idle one always wins.
    assert {c.name for c in (pool.pick() for _ in range(50)) if c} == {"idle"}
    for _ in range(10):
        pool.released("busy")
    assert pool.active("busy") == 0
    assert {c.name for c in (pool.pick() for _ in range(50)) if c} == {"busy", "idle"}


def test_p2c_balances_active_connections() -> None:
    # Connections that stay open: p2c keeps the spread tight where uniform random would not.
    pool = make_pool(seed=11, balance="p2c")
    names = [f"i{n}" for n in range(10)]
    pool.update({name: f"10.0.0.{n}:80" for n, name in enumerate(names, 1)})
    for _ in range(1000):
        choice = pool.pick()
        assert choice is not None
        pool.acquired(choice.name)
    loads = [pool.active(name) for name in names]
    assert sum(loads) == 1000
    assert max(loads) - min(loads) <= 6, loads


def test_p2c_never_picks_the_most_loaded_of_three() -> None:
    pool = make_pool(seed=5, balance="p2c")
    pool.update({"a": "10.0.0.1:80", "b": "10.0.0.2:80", "c": "10.0.0.3:80"})
    for name, load in (("a", 0), ("b", 5), ("c", 9)):
        for _ in range(load):
            pool.acquired(name)
    counts = Counter(c.name for c in (pool.pick() for _ in range(3000)) if c)
    # a wins both pairs it is in (2/3), b wins the pair (b, c) (1/3), c never wins.
    assert counts["c"] == 0
    assert 1800 < counts["a"] < 2200 and 800 < counts["b"] < 1200, counts


def test_released_never_goes_negative_and_survives_removal() -> None:
    pool = make_pool(balance="p2c")
    pool.update({"a": "10.0.0.1:80"})
    pool.acquired("a")
    pool.update({})
    pool.update({"a": "10.0.0.1:80"})
    assert pool.active("a") == 1, "connections outlive the instance's membership"
    pool.released("a")
    pool.released("a")
    assert pool.active("a") == 0


def test_health_for_status() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    pool.update({"b": "10.0.0.2:80", "a": "10.0.0.1:80"})
    pool.failed("b")
    pool.acquired("a")
    health = pool.health()
    assert [h.name for h in health] == ["a", "b"]
    assert (health[0].ready, health[0].failures, health[0].retry_at, health[0].active) == (
        True,
        0,
        None,
        1,
    )
    assert (health[1].ready, health[1].failures, health[1].retry_at) == (False, 1, clock.now + 1)


def test_unknown_names_are_ignored() -> None:
    pool = make_pool()
    pool.failed("ghost")
    pool.succeeded("ghost")
    assert pool.names == frozenset()
    assert pool.pick() is None


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="balance mode 'round-robin'"):
        make_pool(balance="round-robin")
    with pytest.raises(ValueError, match="backoff"):
        make_pool(backoff_base=0)


def test_heap_stays_bounded_under_churn() -> None:
    clock = FakeClock()
    pool = make_pool(clock)
    pool.update({"a": "10.0.0.1:80", "b": "10.0.0.2:80"})
    for _ in range(10_000):
        pool.failed("a")
        pool.succeeded("a")
    assert len(pool._heap) < 40
    assert pool.next_retry() is None


# -- properties ---------------------------------------------------------------------------

NAMES = st.sampled_from([f"i{n}" for n in range(6)])
ADDRESSES = st.sampled_from([f"10.0.0.{n}:80" for n in range(1, 4)])


class PoolMachine(RuleBasedStateMachine):
    """Random sequences of pool operations against the invariants of the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.pool = Pool(now=self.clock, rng=random.Random(0), balance="random")
        self.pooled: dict[str, str] = {}

    @rule(instances=st.dictionaries(NAMES, ADDRESSES, max_size=6))
    def update(self, instances: dict[str, str]) -> None:
        self.pool.update(instances)
        self.pooled = dict(instances)

    @rule(name=NAMES)
    def failed(self, name: str) -> None:
        was_ready = name in self.pool.ready
        self.pool.failed(name)
        if was_ready:
            assert name in self.pool.queued
            due = self.pool.health()
            retry_at = next(h.retry_at for h in due if h.name == name)
            assert retry_at is not None and self.clock.now < retry_at <= self.clock.now + 30
            # While others are ready and its retry is not due, it is not picked.  (One pick
            # only: picking an instance on probation sends it back to the queue, and with
            # nothing ready a pick may then come from the queue, this one included.)
            if self.pool.ready:
                choice = self.pool.pick()
                assert choice is not None and choice.name != name

    @rule(name=NAMES)
    def succeeded(self, name: str) -> None:
        self.pool.succeeded(name)
        if name in self.pooled:
            assert name in self.pool.ready

    @rule(exclude=st.frozensets(NAMES, max_size=3))
    def pick(self, exclude: frozenset[str]) -> None:
        choice = self.pool.pick(exclude)
        candidates = set(self.pooled) - exclude
        if choice is None:
            assert not candidates
        else:
            assert choice.name in candidates
            assert choice.address == self.pooled[choice.name]

    @rule(seconds=st.floats(min_value=0, max_value=40))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def process(self) -> None:
        self.pool.process_retries()
        due = self.pool.next_retry()
        assert due is None or due > self.clock.now

    @invariant()
    def ready_and_queued_partition_the_pool(self) -> None:
        ready, queued = self.pool.ready, self.pool.queued
        assert not ready & queued
        assert ready | queued == set(self.pooled) == self.pool.names

    @invariant()
    def next_retry_is_the_earliest_queued(self) -> None:
        times = [h.retry_at for h in self.pool.health() if not h.ready]
        assert all(t is not None for t in times)
        expected = min(t for t in times if t is not None) if times else None
        assert self.pool.next_retry() == expected


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(
    names=st.lists(NAMES, min_size=1, max_size=6, unique=True),
    seed=st.integers(0, 2**32),
    balance=st.sampled_from(["random", "p2c"]),
    loads=st.lists(st.integers(0, 5), min_size=6, max_size=6),
)
def test_pick_only_returns_pooled_ready_names(
    names: list[str], seed: int, balance: str, loads: list[int]
) -> None:
    pool = Pool(now=FakeClock(), rng=random.Random(seed), balance=balance)  # type: ignore[arg-type]
    pool.update({name: "10.0.0.1:80" for name in names})
    for name, load in zip(names, loads, strict=False):
        for _ in range(load):
            pool.acquired(name)
    for _ in range(20):
        choice = pool.pick()
        assert choice is not None and choice.name in names
