"""Steering new connections by CPU (-engine-steer cpu): each engine thread is pinned to CPUs of
its own, and a BPF program on the port's SO_REUSEPORT group sends a new connection to the
thread owning the CPU it arrived on.  A loopback client's SYN is processed on the client's own
CPU, so a client pinned to a CPU must reach exactly the shard that owns it (through the real
listener, kernel and engine; the shards' own accept counts say which)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from flux.balancer.listener import ConnectionBudget, Listener
from flux.balancer.pool import Pool
from flux.relay.engine import SpliceRelay, cpu_plan
from flux.relay.spread import SpreadWatch

LOCAL = "127.0.0.1"


def test_cpu_plan_deals_the_cpus_out_in_turn() -> None:
    assert cpu_plan(2, {0, 1}) == [[0], [1]]
    assert cpu_plan(2, {0, 1, 2, 3, 4}) == [[0, 2, 4], [1, 3]]
    assert cpu_plan(3, {7, 2, 5}) == [[2], [5], [7]]  # by number, whatever the set's order
    assert cpu_plan(1, {0, 1}) is None  # one shard: nothing to steer
    assert cpu_plan(3, {0, 1}) is None  # a shard without a CPU of its own would starve


def _connect_from(cpu: int, port: int, count: int) -> None:
    """``count`` connections to ``port`` from a thread pinned to ``cpu``, each echoed once."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            os.sched_setaffinity(0, {cpu})  # this thread only
            for i in range(count):
                with socket.create_connection((LOCAL, port), timeout=5) as client:
                    client.sendall(b"%d" % i)
                    assert client.recv(16) == b"%d" % i
        except BaseException as error:  # re-raised in the caller
            failure.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and not failure, failure


def _echo_server() -> tuple[socket.socket, threading.Event]:
    server = socket.create_server((LOCAL, 0), backlog=256)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = conn.recv(16)
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, stop


@contextlib.asynccontextmanager
async def _serving(relay: SpliceRelay) -> AsyncIterator[Callable[[], int]]:
    """Start ``relay`` and an echo server; yields what opens another port (a listener in the
    relay, the echo server its one instance) and returns its number.  Closes it all."""
    await relay.start()
    server, stop = _echo_server()
    loop = asyncio.get_running_loop()
    pool = Pool(now=loop.time, rng=random.Random(3))
    pool.update({"i0": f"{LOCAL}:{server.getsockname()[1]}"})
    listeners: list[Listener] = []

    def open_port() -> int:
        listener = Listener(f"steered{len(listeners)}", "tcp", LOCAL, pool, relay,
                            connect_timeout=5.0, budget=ConnectionBudget())  # fmt: skip
        listeners.append(listener)
        return listener.open()

    try:
        yield open_port
    finally:
        for listener in listeners:
            listener.close()
        await relay.close(1.0)
        stop.set()
        server.close()


async def _split(relay: SpliceRelay, port: int, cpu: int, count: int) -> list[int]:
    """How many of ``count`` connections from ``cpu`` to ``port`` each shard accepted."""
    before = relay.engine_counters().shard_accepted
    await asyncio.to_thread(_connect_from, cpu, port, count)
    after = relay.engine_counters().shard_accepted
    return [b - a for a, b in zip(before, after, strict=True)]


async def _steered_counts(relay: SpliceRelay, clients: list[tuple[int, int]]) -> list[list[int]]:
    """Per client CPU (cpu, count): how many of its connections each shard accepted."""
    async with _serving(relay) as open_port:
        port = open_port()
        return [await _split(relay, port, cpu, count) for cpu, count in clients]


def _usable() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, f"steering needs 2 CPUs to show anything; this process may use {cpus}"
    return cpus


async def test_a_connection_goes_to_the_shard_that_owns_the_cpu_it_arrived_on() -> None:
    cpus = _usable()[:2]
    relay = SpliceRelay(shards=2, steer=True)
    plan = relay.steering
    assert plan is not None and sorted(c for shard in plan for c in shard) == sorted(
        os.sched_getaffinity(0)
    )
    owner = {cpu: index for index, shard in enumerate(plan) for cpu in shard}
    clients = [(cpus[0], 30), (cpus[1], 30), (cpus[0], 10)]
    seen = await _steered_counts(relay, clients)
    for (cpu, count), counts in zip(clients, seen, strict=True):
        expected = [0, 0]
        expected[owner[cpu]] = count
        assert counts == expected, (cpu, counts, plan)


async def test_the_engine_threads_are_pinned_to_their_cpus() -> None:
    _usable()
    relay = SpliceRelay(shards=2, steer=True)
    plan = relay.steering
    assert plan is not None
    own = set(os.listdir("/proc/self/task"))
    await relay.start()
    try:
        new = set(os.listdir("/proc/self/task")) - own
        assert len(new) == 2, new

        def pinned() -> list[list[int]]:
            return sorted(sorted(os.sched_getaffinity(int(tid))) for tid in new)

        # Each thread pins itself as it starts: give them a moment.
        for _ in range(500):
            if pinned() == sorted(plan):
                break
            await asyncio.sleep(0.01)
        assert pinned() == sorted(plan), (pinned(), plan)
    finally:
        await relay.close(1.0)


async def test_without_steering_the_hash_spreads_one_cpus_clients_over_both_shards() -> None:
    cpus = _usable()
    relay = SpliceRelay(shards=2, steer=False)
    assert relay.steering is None
    [counts] = await _steered_counts(relay, [(cpus[0], 60)])
    assert sum(counts) == 60 and min(counts) > 0, counts


def test_steering_applies_only_with_two_shards_and_a_cpu_for_each() -> None:
    assert SpliceRelay(shards=1, steer=True).steering is None
    too_many = len(os.sched_getaffinity(0)) + 1
    assert SpliceRelay(shards=too_many, steer=True).steering is None


@pytest.mark.parametrize("cpus", [[], [-1], [1024], [0, 5000]])
def test_an_engine_refuses_cpus_it_cannot_pin_to(cpus: list[int]) -> None:
    from flux._splice import SpliceEngine

    with pytest.raises(ValueError, match="cpus must name CPUs"):
        SpliceEngine(cpus=cpus)


def test_fluxd_says_at_start_how_the_threads_share_new_connections(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from types import SimpleNamespace

    from flux.daemon import _log_steering

    cpus = _usable()
    caplog.set_level(logging.INFO, logger="flux.daemon")
    _log_steering(SpliceRelay(shards=2, steer=True), SimpleNamespace(engine_steer="cpu"))
    plan = cpu_plan(2)
    assert plan is not None
    expected = " | ".join(",".join(map(str, shard)) for shard in plan)
    assert f"engine: 2 threads pinned to CPUs {expected};" in caplog.text
    caplog.clear()
    threads = len(cpus) + 1
    _log_steering(SpliceRelay(shards=threads, steer=True), SimpleNamespace(engine_steer="cpu"))
    assert (
        f"engine: {threads} threads for {len(cpus)} CPUs: -engine-steer cpu needs at most one"
        " thread per CPU" in caplog.text
    )
    caplog.clear()
    _log_steering(SpliceRelay(shards=2), SimpleNamespace(engine_steer="hash"))
    assert caplog.text == ""  # the default says nothing


async def test_when_one_thread_takes_most_new_connections_steering_stops_for_good(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every client on one CPU (one NIC queue, one client process): steered, one pinned thread
    would take them all.  The watch sees it, and the relay takes the program off the port and
    unpins the threads: the same clients are then spread by the hash, on any port."""
    cpus = _usable()
    caplog.set_level(logging.WARNING, logger="flux.relay")
    watch = SpreadWatch(2, window=0.2, min_connections=20, min_busy=1000.0, windows=2)
    relay = SpliceRelay(shards=2, steer=True, spread=watch)
    plan = relay.steering
    assert plan is not None and relay.steering_off is None
    owner = next(index for index, shard in enumerate(plan) if cpus[0] in shard)
    async with _serving(relay) as open_port:
        port = open_port()
        assert await _split(relay, port, cpus[0], 20) == [20 if i == owner else 0 for i in (0, 1)]
        assert relay.engine_counters().events["steering_stopped"] == 0
        deadline = asyncio.get_running_loop().time() + 10.0  # 3 windows of 0.2 s are enough
        while relay.steering is not None and asyncio.get_running_loop().time() < deadline:
            await _split(relay, port, cpus[0], 10)
        assert relay.steering is None
        reason = relay.steering_off
        assert reason is not None and reason.startswith(f"engine thread {owner} took 100% of"), (
            reason
        )
        assert relay.engine_counters().events["steering_stopped"] == 1
        assert f"engine: steering new connections by CPU stopped: {reason};" in caplog.text
        assert "not undone" not in caplog.text
        for engine in relay.engines:
            assert engine.thread_id > 0
            assert os.sched_getaffinity(engine.thread_id) == set(cpus)
        # One CPU's clients now reach both threads, on the steered port and on a new one.
        for target in (port, open_port()):
            counts = await _split(relay, target, cpus[0], 60)
            assert sum(counts) == 60 and min(counts) > 0, (target, counts)
        assert relay.engine_counters().events["steering_stopped"] == 1


def test_a_relay_that_does_not_steer_has_nothing_to_stop() -> None:
    relay = SpliceRelay(shards=2, steer=False)
    assert relay.steering is None and relay.steering_off is None
    assert relay.engine_counters().events["steering_stopped"] == 0


async def test_a_thread_that_cannot_pin_itself_is_counted_and_named_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU gone between the plan and the thread's start (here: CPU 1023, which this machine
    has not got): the thread runs unpinned, `pin_failures` counts it, one line names it."""
    import flux.relay.engine as engine_module

    cpus = _usable()
    monkeypatch.setattr(engine_module, "cpu_plan", lambda shards: [[cpus[0]], [1023]])
    caplog.set_level(logging.WARNING, logger="flux.relay")
    relay = SpliceRelay(shards=2, steer=True, spread=SpreadWatch(2, window=0.05))
    await relay.start()
    try:
        for _ in range(100):  # the first window's check, a few hundredths of a second away
            if "could not pin" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert relay.engine_counters().events["pin_failures"] == 1
        expected = (
            "engine: thread 1 could not pin itself to CPUs 1023 (this process may use CPUs"
            f" {','.join(map(str, cpus))} now); it runs wherever the scheduler puts it, still"
            " taking the new connections that arrive on CPUs 1023"
        )
        assert caplog.text.count("could not pin") == 1 and expected in caplog.text
        assert os.sched_getaffinity(relay.engines[0].thread_id) == {cpus[0]}
        await asyncio.sleep(0.2)  # more windows: said once
        assert caplog.text.count("could not pin") == 1
    finally:
        await relay.close(1.0)


async def test_when_one_thread_does_most_of_the_work_steering_stops_for_good(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One long connection carrying most of the bytes (a bulk stream): its thread is busy while
    the other idles, and pinned it cannot move off its CPU.  The watch sees the threads' CPU
    time and gives the connections back to the hash, the threads unpinned."""
    cpus = _usable()
    caplog.set_level(logging.WARNING, logger="flux.relay")
    watch = SpreadWatch(2, window=0.2, min_connections=10**9, min_busy=0.05, windows=2)
    relay = SpliceRelay(shards=2, steer=True, spread=watch)
    plan = relay.steering
    assert plan is not None
    owner = next(index for index, shard in enumerate(plan) if cpus[0] in shard)
    sink = socket.create_server((LOCAL, 0))
    stop = threading.Event()
    received = [0]

    def drain() -> None:
        conn, _ = sink.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                received[0] += len(chunk)

    def pump(port: int) -> None:
        os.sched_setaffinity(0, {cpus[0]})  # this thread only: its SYN arrives on cpus[0]
        chunk = b"x" * (1 << 20)
        with socket.create_connection((LOCAL, port), timeout=10) as client:
            for _ in range(20_000):  # at most about 20 GB, and at most as long as the test waits
                if stop.is_set():
                    return
                client.sendall(chunk)

    loop = asyncio.get_running_loop()
    pool = Pool(now=loop.time, rng=random.Random(3))
    pool.update({"i0": f"{LOCAL}:{sink.getsockname()[1]}"})
    threading.Thread(target=drain, daemon=True).start()
    await relay.start()
    listener = Listener("bulk", "tcp", LOCAL, pool, relay, connect_timeout=5.0,
                        budget=ConnectionBudget())  # fmt: skip
    port = listener.open()
    pumping = threading.Thread(target=pump, args=(port,), daemon=True)
    pumping.start()
    try:
        deadline = loop.time() + 15.0
        while relay.steering is not None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        reason = relay.steering_off
        assert reason is not None and reason.startswith(f"engine thread {owner} did"), reason
        assert "% of the engine's work in the last 0.4 s (" in reason, reason
        assert relay.engine_counters().events["steering_stopped"] == 1
        assert f"engine: steering new connections by CPU stopped: {reason};" in caplog.text
        for engine in relay.engines:
            assert os.sched_getaffinity(engine.thread_id) == set(cpus)
        assert relay.engine_counters().shard_accepted[owner] == 1
    finally:
        stop.set()
        pumping.join(10)
        listener.close()
        await relay.close(1.0)
        sink.close()
