"""The workloads: one bounded run each, returning a flat dict of numbers.

- ``bulk``: ``iperf3 -c`` for a fixed time with 1 or N parallel streams (client to server);
  Gbit/s as the receiver counted it, and the proxy's CPU seconds per GB moved.
- ``keepalive``: ``wrk`` over keep-alive connections for a fixed time, 100-byte responses;
  requests/s, p50 and p99 latency (from wrk's own histogram, printed by a ``done`` hook), the
  proxy's CPU milliseconds per 1,000 requests.
- ``close``: the same with ``Connection: close``, so every request is a new connection
  (through a proxy: two handshakes); connections/s.
- both also at the edge (``kind`` "edge": plain HTTP to a port shared by 20 services, asking
  for ``EDGE_NAME`` by Host; "sni": HTTPS, asking for it by TLS server name, the TLS ending at
  the backend): wrk's URL names ``EDGE_NAME`` and a ``wrk.resolve`` of its script sends the
  connections to the subject's front, so the name needs no resolver entry.
- ``h2``: ``h2load`` over h2c (HTTP/2 with prior knowledge) for a fixed time, many streams in
  flight on each connection, 300-byte responses; requests/s, p50 and p99 latency (from
  h2load's per-request log), the proxy's CPU milliseconds per 1,000 requests.
- ``idle``: N connections opened through the proxy and held; once the proxy has an upstream
  connection for each (counted in ``/proc/net/tcp``), the proxy's RSS growth per connection is
  taken (``kib_per_conn_open``: never used), then one request is exchanged on every one of them
  (so each is known to work end to end) and the RSS growth is taken again while they sit idle
  (``kib_per_conn``: what a connection that has carried traffic costs at rest, the figure the
  report leads with).  Every connect, wait and exchange has a timeout.

CPU and RSS are those of the proxy's processes only (``Subject.pids``); the direct subject has
none, so those figures are absent for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import time
from pathlib import Path
from typing import Any

from benchmarks.subjects import BODY, EDGE_NAME, Backends, Subject
from benchmarks.system import cpu_seconds, rss_kib, tcp_established

__all__ = ["bulk", "close", "h2", "h2load_figures", "idle", "keepalive"]

# Printed by wrk when the run ends: wrk's own figures, with latency percentiles in microseconds.
WRK_DONE = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, " ..
    "\\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class RunError(RuntimeError):
    """A load generator failed or produced no result."""


async def _run(argv: list[str], timeout: float) -> str:
    """Run a load generator to completion (killed after ``timeout`` s); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise RunError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (out + err).decode(errors="replace")[-400:]
        raise RunError(f"{argv[0]} exited with status {proc.returncode}: {tail}")
    return out.decode(errors="replace")


async def bulk(
    subject: Subject, backends: Backends, streams: int, seconds: float
) -> dict[str, Any]:
    """iperf3 through the subject for ``seconds`` with ``streams`` parallel streams."""
    host, port = subject.front("bulk")
    pids = subject.pids()
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-P", str(streams), "-J"]
    cpu0, wall0 = cpu_seconds(pids), time.monotonic()
    try:
        report = json.loads(await _run(argv, seconds + 30))
    except (RunError, json.JSONDecodeError):
        await backends.restart_bulk()  # a failed test can leave the server waiting
        raise
    cpu, wall = cpu_seconds(pids) - cpu0, time.monotonic() - wall0
    if "error" in report:
        await backends.restart_bulk()
        raise RunError(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    gbytes = received["bytes"] / 1e9
    result: dict[str, Any] = {
        "gbit_s": received["bits_per_second"] / 1e9,
        "gbytes": gbytes,
        "wall_s": wall,
        "retransmits": report["end"].get("sum_sent", {}).get("retransmits", 0),
    }
    if pids:
        result["proxy_cpu_s"] = cpu
        result["cpu_s_per_gb"] = cpu / gbytes if gbytes > 0 else float("nan")
    return result


# Connect to the front whatever the URL's host name says (the edge workloads' URLs name the
# service, for its Host header and TLS server name).
WRK_RESOLVE = """\
wrk.resolve = function(host, service)
  wrk.addrs = wrk.lookup("{host}", "{port}")
end
"""


async def _wrk(
    subject: Subject,
    workdir: Path,
    seconds: float,
    connections: int,
    threads: int,
    close: bool,
    kind: str = "http",
) -> dict[str, Any]:
    host, port = subject.front(kind)
    url = f"http://{host}:{port}/"
    script = workdir / "wrk-done.lua"
    if kind != "http":
        script = workdir / f"wrk-{kind}-{port}.lua"
        url = f"{'https' if kind == 'sni' else 'http'}://{EDGE_NAME}:{port}/"
    if not script.exists():
        resolve = "" if kind == "http" else WRK_RESOLVE.format(host=host, port=port)
        script.write_text(resolve + WRK_DONE)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s",
            "-s", str(script)]  # fmt: skip
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    pids = subject.pids()
    cpu0 = cpu_seconds(pids)
    out = await _run(argv, seconds + 30)
    cpu = cpu_seconds(pids) - cpu0
    match = re.search(r"^WRKJSON (\{.*\})$", out, re.MULTILINE)
    if match is None:
        raise RunError(f"wrk printed no summary: {out[-400:]}")
    raw = json.loads(match.group(1))
    duration = raw["duration_us"] / 1e6
    requests = raw["requests"]
    errors = sum(raw[key] for key in ("connect", "read", "write", "status", "timeout"))
    result: dict[str, Any] = {
        "rate": requests / duration,
        "requests": requests,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": errors,
        "error_detail": {k: raw[k] for k in ("connect", "read", "write", "status", "timeout")},
    }
    if pids:
        result["proxy_cpu_s"] = cpu
        result["cpu_ms_per_1k"] = 1e6 * cpu / requests if requests else float("nan")
    return result


async def keepalive(
    subject: Subject,
    workdir: Path,
    seconds: float,
    connections: int,
    threads: int,
    kind: str = "http",
) -> dict[str, Any]:
    """wrk over keep-alive connections: small responses, requests/s and latency."""
    return await _wrk(subject, workdir, seconds, connections, threads, close=False, kind=kind)


async def close(
    subject: Subject,
    workdir: Path,
    seconds: float,
    connections: int,
    threads: int,
    kind: str = "http",
) -> dict[str, Any]:
    """wrk with ``Connection: close``: one new connection per request."""
    return await _wrk(subject, workdir, seconds, connections, threads, close=True, kind=kind)


# h2load's summary: "finished in 6.00s, 41200.00 req/s, ..." and
# "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout".
_H2LOAD_RATE = re.compile(r"^finished in \S+, ([\d.]+) req/s", re.MULTILINE)
_H2LOAD_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.MULTILINE,
)


def _percentile(ordered: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def h2load_figures(summary: str, log: str) -> dict[str, Any]:
    """h2load's figures from its summary and its ``--log-file`` (start µs, status, µs taken).

    The rate is h2load's own (requests that succeeded per second of the run); p50 and p99 are
    over the requests that got a 2xx, from the log.  ``errors`` is h2load's "failed" (any
    request without a 2xx or 3xx, errored and timed-out ones included).
    """
    rate, counts = _H2LOAD_RATE.search(summary), _H2LOAD_REQUESTS.search(summary)
    if rate is None or counts is None:
        raise RunError(f"h2load printed no summary: {summary[-400:]}")
    _total, started, done, succeeded, failed, errored, timeout = map(int, counts.groups())
    times = sorted(
        int(fields[2])
        for fields in (line.split("\t") for line in log.splitlines())
        if len(fields) >= 3 and fields[1].startswith("2")
    )
    result: dict[str, Any] = {
        "rate": float(rate.group(1)),
        "requests": succeeded,
        "errors": failed,
        "error_detail": {"failed": failed, "errored": errored, "timeout": timeout,
                         "unfinished": started - done},
    }  # fmt: skip
    if times:
        result["p50_ms"] = _percentile(times, 0.50) / 1000
        result["p99_ms"] = _percentile(times, 0.99) / 1000
    return result


async def h2(
    subject: Subject,
    workdir: Path,
    seconds: float,
    connections: int,
    streams: int,
    threads: int,
) -> dict[str, Any]:
    """h2load over h2c: ``streams`` requests in flight on each connection, 300-byte responses."""
    host, port = subject.front("h2")
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    # -N: a connection silent for 5 s is closed and its streams count as failed (wrk's
    # --timeout); the run itself is killed 30 s after its duration.
    argv = ["h2load", "-c", str(connections), "-m", str(streams),
            "-t", str(min(threads, connections)), "-D", f"{round(seconds * 1000)}ms", "-N", "5s",
            f"--log-file={log}", f"http://{host}:{port}/"]  # fmt: skip
    pids = subject.pids()
    cpu0 = cpu_seconds(pids)
    try:
        out = await _run(argv, seconds + 30)
        cpu = cpu_seconds(pids) - cpu0
        result = h2load_figures(out, log.read_text() if log.exists() else "")
    finally:
        log.unlink(missing_ok=True)
    if pids:
        requests = result["requests"]
        result["proxy_cpu_s"] = cpu
        result["cpu_ms_per_1k"] = 1e6 * cpu / requests if requests else float("nan")
    return result


_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


async def _exchange(sock: socket.socket, timeout: float) -> None:
    """One request and its whole response on an open connection."""
    loop = asyncio.get_running_loop()

    async def go() -> None:
        await loop.sock_sendall(sock, _REQUEST)
        data = b""
        while True:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise ConnectionError("closed before the whole response")
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and len(body) >= len(BODY):
                if not head.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError(f"unexpected status {head[:20]!r}")
                return

    await asyncio.wait_for(go(), timeout)


async def idle(
    subject: Subject, backends: Backends, count: int, timeout: float = 10.0
) -> dict[str, Any]:
    """Hold ``count`` connections through the subject; RSS per connection and errors."""
    loop = asyncio.get_running_loop()
    pids = subject.pids()
    backend_port = backends.http[1]
    upstream0 = tcp_established(backend_port)
    rss0 = rss_kib(pids)
    errors: dict[str, int] = {}
    socks: list[socket.socket] = []
    gate = asyncio.Semaphore(256)  # connects in flight at once: stay inside every backlog

    def failed(what: str, exc: BaseException) -> None:
        key = f"{what}: {type(exc).__name__}"
        errors[key] = errors.get(key, 0) + 1

    async def open_one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        async with gate:
            try:
                await asyncio.wait_for(loop.sock_connect(sock, subject.front("http")), timeout)
            except (OSError, TimeoutError) as exc:
                sock.close()
                failed("connect", exc)
                return
        socks.append(sock)

    started = time.monotonic()
    try:
        await asyncio.gather(*(open_one() for _ in range(count)))
        opened = time.monotonic() - started
        # A connect returns once the proxy's kernel accepted it; wait until the proxy itself has
        # an upstream connection for each (bounded), so the memory of all of them is counted.
        deadline = time.monotonic() + timeout
        while tcp_established(backend_port) - upstream0 < len(socks):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        upstream = tcp_established(backend_port) - upstream0
        if upstream < len(socks):
            errors["upstream missing"] = len(socks) - upstream
        await asyncio.sleep(0.5)
        rss_open = rss_kib(pids)

        async def use(sock: socket.socket) -> None:
            async with gate:
                try:
                    await _exchange(sock, timeout)
                except (OSError, TimeoutError) as exc:
                    failed("exchange", exc)

        await asyncio.gather(*(use(sock) for sock in socks))
        await asyncio.sleep(1.0)  # let the proxy return buffers and pipes it lent for the request
        rss1 = rss_kib(pids)
        alive = tcp_established(backend_port) - upstream0
    finally:
        for sock in socks:
            sock.close()
    result: dict[str, Any] = {
        "requested": count,
        "held": min(len(socks), alive),
        "errors": sum(errors.values()),
        "error_detail": errors,
        "open_s": opened,
    }
    if pids:
        result["rss_before_kib"] = rss0
        result["rss_open_kib"] = rss_open
        result["rss_after_kib"] = rss1
        result["kib_per_conn_open"] = (rss_open - rss0) / max(1, len(socks))
        result["kib_per_conn"] = (rss1 - rss0) / max(1, len(socks))
    # Let the proxy close its side before the next run measures anything.
    deadline = time.monotonic() + timeout
    while tcp_established(backend_port) > upstream0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return result
