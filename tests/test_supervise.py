"""Supervision: failures restart with capped backoff, stop leaves nothing running."""

from __future__ import annotations

import asyncio
import logging

import pytest

from flux.supervise import Backoff, Supervisor


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(initial=1, maximum=30)
    assert [backoff.next() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    backoff.reset()
    assert backoff.next() == 1


class FakeTime:
    """A clock that only moves when the supervisor sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)


async def wait_for(predicate, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def test_failing_component_is_restarted_with_backoff_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    supervisor = Supervisor(
        initial_backoff=1, max_backoff=4, clock=fake.clock, sleep=fake.sleep
    )
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 5:
            raise ConnectionError(f"etcd unreachable at http://127.0.0.1:1 (attempt {runs})")
        await asyncio.Event().wait()

    with caplog.at_level(logging.WARNING, logger="flux.supervise"):
        supervisor.start("lease", flaky)
        await wait_for(lambda: runs == 6)
    assert fake.sleeps == [1, 2, 4, 4, 4]
    status = supervisor.status["lease"]
    assert (status.state, status.restarts) == ("running", 5)
    assert status.last_error == (
        "ConnectionError: etcd unreachable at http://127.0.0.1:1 (attempt 5)"
    )
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "component lease failed: ConnectionError: etcd unreachable at http://127.0.0.1:1 "
        "(attempt 1); restarting in 1.0 s"
    )
    await supervisor.stop()
    assert status.state == "stopped"


async def test_backoff_resets_after_a_long_run() -> None:
    fake = FakeTime()
    supervisor = Supervisor(
        initial_backoff=1, max_backoff=30, reset_after=60, clock=fake.clock, sleep=fake.sleep
    )
    runs = 0

    async def component() -> None:
        nonlocal runs
        runs += 1
        if runs == 4:
            fake.now += 100  # this run lasted long enough to count as healthy
        if runs < 6:
            raise RuntimeError("boom")
        await asyncio.Event().wait()

    supervisor.start("c", component)
    await wait_for(lambda: runs == 6)
    assert fake.sleeps == [1, 2, 4, 1, 2]
    await supervisor.stop()


async def test_component_that_returns_is_not_restarted() -> None:
    supervisor = Supervisor(sleep=FakeTime().sleep)
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    supervisor.start("once", once)
    await wait_for(lambda: supervisor.status["once"].state == "finished")
    await asyncio.sleep(0.01)
    assert runs == 1
    await supervisor.stop()
    assert supervisor.status["once"].state == "finished"


async def test_stop_cancels_everything_and_waits() -> None:
    supervisor = Supervisor()
    cleaned: list[str] = []

    def component(name: str):
        async def run() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0.01)  # cleanup that takes a moment must finish
                cleaned.append(name)

        return run

    before = asyncio.all_tasks()
    for name in ("a", "b", "c"):
        supervisor.start(name, component(name))
    await asyncio.sleep(0.01)
    await supervisor.stop()
    assert sorted(cleaned) == ["a", "b", "c"]
    assert asyncio.all_tasks() == before
    assert {s.state for s in supervisor.status.values()} == {"stopped"}


async def test_stop_during_backoff_and_stop_one() -> None:
    supervisor = Supervisor(initial_backoff=3600)

    async def failing() -> None:
        raise OSError("nope")

    async def forever() -> None:
        await asyncio.Event().wait()

    supervisor.start("failing", failing)
    supervisor.start("forever", forever)
    await wait_for(lambda: supervisor.status["failing"].state == "backing-off")
    await supervisor.stop_one("forever")
    assert not supervisor.running("forever")
    assert supervisor.running("failing")
    await asyncio.wait_for(supervisor.stop(), timeout=1)
    assert not supervisor.running("failing")


async def test_names_are_unique() -> None:
    supervisor = Supervisor()

    async def forever() -> None:
        await asyncio.Event().wait()

    supervisor.start("x", forever)
    with pytest.raises(ValueError, match="already supervised"):
        supervisor.start("x", forever)
    await supervisor.stop()


async def test_a_component_can_have_a_lower_backoff_cap() -> None:
    # The lease keeper: retried at least every keep-alive interval, whatever the default cap.
    fake = FakeTime()
    supervisor = Supervisor(
        initial_backoff=0.5, max_backoff=30, clock=fake.clock, sleep=fake.sleep
    )
    runs = {"lease": 0, "watch": 0}

    def failing(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            runs[name] += 1
            if runs[name] <= 6:
                raise ConnectionError("etcd unreachable")
            await asyncio.Event().wait()

        return run

    supervisor.start("lease", failing("lease"), max_backoff=1.0)
    await wait_for(lambda: runs["lease"] == 7)
    assert fake.sleeps == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    fake.sleeps.clear()
    supervisor.start("watch", failing("watch"))
    await wait_for(lambda: runs["watch"] == 7)
    assert fake.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    # A cap below the initial delay lowers that too.
    fake.sleeps.clear()
    runs["quick"] = 0
    supervisor.start("quick", failing("quick"), max_backoff=0.25)
    await wait_for(lambda: runs["quick"] == 7)
    assert fake.sleeps == [0.25] * 6
    await supervisor.stop()
