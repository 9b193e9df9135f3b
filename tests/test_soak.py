"""The soak run's verdict (benchmarks/soak_report.py) on synthetic series: growth is caught,
noise and warm-up are not, and failures are explained by the right faults only; and what its
load generator (benchmarks/soak.py) counts as a failed request, against loopback servers."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import pytest
from benchmarks.soak import one_request
from benchmarks.soak_report import (
    FD_TOLERANCE,
    RSS_TOLERANCE,
    Fault,
    Request,
    Sample,
    explain,
    growth,
    growth_checks,
    plan,
    render_markdown,
)

RUN = plan(30)  # warm-up 90 s, windows 180 s


def _series(values: list[float], step: float = 1.0) -> list[tuple[float, float]]:
    return [(i * step, v) for i, v in enumerate(values)]


def test_flat_noisy_series_does_not_grow() -> None:
    rng = random.Random(1)
    values = [60_000 + rng.gauss(0, 800) for _ in range(1800)]
    check = growth(_series(values), RUN.warmup, RUN.window, RSS_TOLERANCE)
    assert check is not None and not check.grew
    assert abs(check.final - check.base) < 500


def test_a_steady_leak_grows() -> None:
    # 10 bytes a second for half an hour is 18 KiB: below the tolerance; 10 KiB a second is
    # 18 MiB: a leak.
    slow = [60_000 + i * 0.01 for i in range(1800)]
    leak = [60_000 + i * 10.0 for i in range(1800)]
    assert not growth(_series(slow), RUN.warmup, RUN.window, RSS_TOLERANCE).grew  # type: ignore[union-attr]
    check = growth(_series(leak), RUN.warmup, RUN.window, RSS_TOLERANCE)
    assert check is not None and check.grew
    assert check.final > check.limit > check.base


def test_descriptors_leaking_one_per_minute_grow_and_bursts_do_not() -> None:
    leak = [30 + i // 60 for i in range(1800)]
    check = growth(_series(leak), RUN.warmup, RUN.window, FD_TOLERANCE)
    assert check is not None and check.grew
    # Connections in flight at a third of the samples, 200 at one: the median ignores them.
    bursts = [30 + (4 if i % 3 == 0 else 0) + (200 if i == 1790 else 0) for i in range(1800)]
    check = growth(_series(bursts), RUN.warmup, RUN.window, FD_TOLERANCE)
    assert check is not None and not check.grew


def test_warm_up_is_not_growth_but_growth_after_it_is() -> None:
    # Climbs for the first minute, then flat: the base is taken after the warm-up.
    warming = [30_000 + min(i, 60) * 500 for i in range(1800)]
    check = growth(_series(warming), RUN.warmup, RUN.window, RSS_TOLERANCE)
    assert check is not None and not check.grew and check.base == 60_000
    # The same with a step up of 20 MiB after the first window: caught.
    stepped = [v + (20 * 1024 if i > 600 else 0) for i, v in enumerate(warming)]
    check = growth(_series(stepped), RUN.warmup, RUN.window, RSS_TOLERANCE)
    assert check is not None and check.grew


def test_a_series_too_short_for_two_windows_is_not_compared() -> None:
    assert growth(_series([1.0] * 400), RUN.warmup, RUN.window, FD_TOLERANCE) is None
    assert growth([], RUN.warmup, RUN.window, FD_TOLERANCE) is None
    assert growth(_series([1.0] * 460), RUN.warmup, RUN.window, FD_TOLERANCE) is not None


def test_growth_is_checked_per_fluxd_process() -> None:
    # Two fluxd lives: a restart drops RSS, which must not hide growth in the second life.
    samples = [Sample(t, 100, 80_000, 30) for t in range(0, 300)]
    samples += [Sample(t, 200, 50_000 + (t - 300) * 20, 30) for t in range(300, 1800)]
    checks = growth_checks(samples, RUN)
    assert [(c.segment, c.metric, c.grew) for c in checks] == [
        (2, "RSS KiB", True),
        (2, "descriptors", False),
    ]


def test_plan_compresses_the_faults_with_the_run() -> None:
    short, full = plan(3), plan(30)
    assert [kind for _, kind in short.faults] == [kind for _, kind in full.faults]
    assert [kind for _, kind in full.faults].count("fluxd-kill") == 2
    for (at_short, _), (at_full, _) in zip(short.faults, full.faults, strict=True):
        assert at_full == pytest.approx(10 * at_short)
    assert all(0 < at < full.total for at, _ in full.faults)


KILL = Fault("fluxd-kill", 100.0, 104.0)
INSTANCE = Fault("instance-kill", 200.0, 200.1, "tcp slot 3")
DOCKERD = Fault("dockerd-restart", 300.0, 303.0)


def test_failures_are_explained_by_the_fault_they_overlap_only() -> None:
    faults = [KILL, INSTANCE, DOCKERD]
    # In flight at the kill, during the outage, just after it: explained by the kill.
    assert explain(Request("tcp", 99.9, 100.2, "reset"), faults) is KILL
    assert explain(Request("http", 102.0, 102.0, "refused"), faults) is KILL
    assert explain(Request("http", 104.5, 104.6, "refused"), faults) is KILL
    # Long after the restart: unexpected.
    assert explain(Request("http", 110.0, 110.1, "refused"), faults) is None
    # An exchange cut by the instance kill is expected; a refused connection is not (fluxd
    # tries the next instance), nor is a reset long after.
    assert explain(Request("tcp", 199.99, 200.05, "reset"), faults) is INSTANCE
    assert explain(Request("tcp", 200.0, 200.3, "truncated"), faults) is INSTANCE
    assert explain(Request("tcp", 200.0, 200.01, "refused"), faults) is None
    assert explain(Request("tcp", 205.0, 205.1, "reset"), faults) is None
    # A dockerd restart explains nothing.
    assert explain(Request("tcp", 301.0, 301.1, "timeout"), faults) is None


def test_the_report_fails_on_unexpected_failures_and_on_growth() -> None:
    run = plan(30)
    samples = [Sample(float(t), 7, 60_000, 30) for t in range(1800)]
    ok = [Request("tcp", t / 10, t / 10 + 0.01) for t in range(18_000)]
    header, settings = {"date": "today"}, {"command": "soak"}
    _, passed = render_markdown(run, ok, [KILL], samples, header, settings)
    assert passed
    lost = [*ok, Request("http", 101.0, 101.0, "refused")]
    text, passed = render_markdown(run, lost, [KILL], samples, header, settings)
    assert passed and "1 expected" in text
    stray = [*ok, Request("http", 500.0, 500.0, "timeout")]
    text, passed = render_markdown(run, stray, [KILL], samples, header, settings)
    assert not passed and "**1 unexpected**" in text and "500.00" in text
    leaking = [Sample(s.t, s.pid, s.rss_kib, 30 + int(s.t) // 60) for s in samples]
    text, passed = render_markdown(run, ok, [KILL], leaking, header, settings)
    assert not passed and "GREW" in text
    text, passed = render_markdown(run, ok, [KILL], samples, header, settings, ["etcd stuck"],
                                   ["after the run: 9 running, 9 live"])  # fmt: skip
    assert not passed and "etcd stuck" in text and "9 running, 9 live" in text


# -- what the load generator counts as a failure (real loopback sockets) ------------------------


async def _outcome(
    reply: bytes | None, kind: str = "tcp", reset: bool = False, timeout: float = 10.0
) -> str:
    """one_request against a server that reads the request, then sends ``reply`` and closes
    (None: sends nothing and keeps the connection; ``reset``: closes with an RST)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if reply is None:
            await asyncio.sleep(10 * timeout)
        elif reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            writer.write(reply)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        return await one_request(kind, ("127.0.0.1", port), timeout=timeout)


def test_one_request_tells_success_from_each_failure() -> None:
    ok = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\nsoak tcp slot 3\n"
    assert asyncio.run(_outcome(ok)) == ""
    assert asyncio.run(_outcome(ok, kind="http")).startswith("bad body soak tcp slot 3")
    assert asyncio.run(_outcome(b"")) == "truncated"
    assert asyncio.run(_outcome(b"HTTP/1.0 200 OK\r\n\r\n")) == "truncated"
    assert asyncio.run(_outcome(b"HTTP/1.0 503 Busy\r\n\r\n")) == "bad status HTTP/1.0 503 Busy"
    assert asyncio.run(_outcome(None, timeout=0.2)) == "timeout"
    assert asyncio.run(_outcome(b"", reset=True)) == "reset"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        assert asyncio.run(one_request("tcp", ("127.0.0.1", port))) == "refused"
