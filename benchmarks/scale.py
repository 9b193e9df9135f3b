"""``python -m benchmarks.scale``: how fluxd's control plane copes with 100 to 5,000 services.

A real fluxd (``-host-ip 127.0.0.1 -bridge lo``, a random chain, ``-listen-prometheus`` on
loopback) runs against a private etcd on loopback.  Every service has one instance of *another
host* (127.0.0.2, on its own lease, written straight to etcd the way a remote fluxd's agent
writes it), so no container is involved; instances point at a small TCP server on 127.0.0.1.
Services have addresses in 127.50.0.0/16 and probe services in 127.51.0.0/16, both inside
127.0.0.0/8, which is local on ``lo``: no packet can leave the machine even without a rule.

For each size (services with one instance each) it measures, repeated ``--repeat`` times:

- **one change**, from just before the etcd write to the kernel acting on it: an instance added
  to a rejecting service (REJECT -> DNAT), that instance removed (DNAT -> REJECT), an instance
  moved to another address (no rule change: the pool alone), a new service without instances
  (a REJECT rule appears) and that service removed.  The kernel is asked directly, by
  connecting to the service address in a loop: refused means REJECT (or nothing listening),
  accepted means DNAT to fluxd's listener, or, for the new-service probe, a sentinel socket
  the benchmark listens on at that address until the REJECT rule hides it.  The time includes
  the etcd commit, the watch delivery, fluxd's decode and state machine, the iptables sync and
  the probe's resolution (a connect every millisecond: REJECT's ICMP errors are rate-limited
  to 1,000 a second, and probes that reach fluxd must not starve it).  The iptables sync time
  per change is the change in fluxd's ``flux_iptables_sync_seconds`` histogram (sum over
  count); iptables-restore and iptables-save processes are counted by wrappers first in
  fluxd's PATH (each a ``/bin/sh`` that logs and execs the real binary: about a millisecond
  more per process).
- **full resync**: fluxd killed, its chain removed, and a new fluxd started against etcd holding
  every service: the time from the process start to every rule being in the kernel (polling
  ``iptables-save``), which includes the interpreter start and imports; and the part after the
  chain was installed (fluxd's log line), i.e. the snapshot read, decode, listeners and sync.
- **watch re-snapshot**: etcd restarted on the same ports and data; the time from etcd being
  healthy again to fluxd's next sync (its watch retries with backoff, reads a fresh snapshot
  and syncs; nothing changed, so that sync should run no iptables-restore at all).
- **fluxd's RSS** once every service is in place.

Writes ``benchmarks/results/scale.md`` (also printed) and ``scale.raw`` (every sample as JSON).
The chain, the processes and the data directory are removed at the end, also on failure or
Ctrl-C.  Needs root (iptables) and etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the test helpers: the private etcd, fluxd, the other host

from tests.support.etcd_server import EtcdServer  # noqa: E402
from tests.support.fluxd_process import Fluxd, http_get  # noqa: E402
from tests.support.other_host import OtherHost  # noqa: E402

from benchmarks.system import describe_machine, free_port, rss_kib  # noqa: E402
from flux.balancer.iptables import IPTables  # noqa: E402
from flux.model import HostRef, Instance, InstanceState, Service  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZES = (100, 1000, 5000)
PORT = 80
WAIT = 20.0  # the longest one change may take to show
START_WAIT = 120.0  # the longest a full resync may take
# Between probes: under the kernel's ICMP error rate limit (1,000 a second), or, for probes
# that reach fluxd, often enough without starving it.
FAST_POLL = 0.001
SLOW_POLL = 0.001
PROBE_TIMEOUT = 0.02
WRITERS = 32  # concurrent etcd writes while filling
CHANGES = ("instance added", "instance removed", "instance moved", "service added",
           "service removed")  # fmt: skip
CHANGE_TARGET = 0.100  # one change at 1,000 services
RESYNC_TARGET = 1.0  # a full resync of 1,000 services


def vip(index: int, net: str = "127.50") -> str:
    """The address of population service ``index`` (250 per /24, never .0 or .255)."""
    return f"{net}.{index // 250}.{index % 250 + 1}"


# -- things that answer on loopback -------------------------------------------------------


class Backend:
    """A TCP server on 127.0.0.1 that writes its one-letter name to each client and closes."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.name)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)


class Sentinel:
    """A listener on a service address itself: it answers only while no rule hides it."""

    def __init__(self, address: str) -> None:
        self._sock = socket.create_server((address, PORT), backlog=4096)
        self._sock.setblocking(False)

    def drain(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return
            conn.close()

    def close(self) -> None:
        self.drain()
        self._sock.close()


def accepted(address: str) -> bool | None:
    """Connect to ``address``:80: True when something accepted, False when refused.

    None when nothing answered within :data:`PROBE_TIMEOUT`: the kernel rate-limits the ICMP
    errors REJECT sends (``net.ipv4.icmp_msgs_per_sec``), and a SYN whose error was dropped
    would only be sent again a second later, after the rule may well have changed.
    """
    with socket.socket() as sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            sock.connect((address, PORT))
        except ConnectionRefusedError:
            return False
        except TimeoutError:
            return None
        return True


def answer(address: str) -> bytes:
    """What a connection to ``address``:80 reads before the peer closes (b"" if refused)."""
    with socket.socket() as sock:
        sock.settimeout(2.0)
        try:
            sock.connect((address, PORT))
            return sock.recv(16)
        except (ConnectionRefusedError, ConnectionResetError):
            return b""


def until(predicate: Callable[[], bool], started: float, poll: float, limit: float) -> float:
    """Seconds from ``started`` (perf_counter) until ``predicate`` holds; bounded by ``limit``."""
    deadline = time.perf_counter() + limit
    while True:
        before = time.perf_counter()
        if predicate():
            break
        if time.perf_counter() - before > 0.5:
            progress(f"  (one poll took {time.perf_counter() - before:.2f} s)")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no change within {limit:g} s")
        time.sleep(poll)
    if time.perf_counter() - before > 0.5:
        progress(f"  (the last poll took {time.perf_counter() - before:.2f} s)")
    return time.perf_counter() - started


# -- what fluxd did ------------------------------------------------------------------------


class Exec:
    """Wrappers for iptables-restore and iptables-save that count every run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._logs: dict[str, Path] = {}
        for name in ("iptables-restore", "iptables-save"):
            real = shutil.which(name)
            if real is None:
                raise RuntimeError(f"{name} is not installed")
            log = directory / f"{name}.log"
            log.touch()
            script = directory / name
            script.write_text(f'#!/bin/sh\necho "$$" >>{log}\nexec {real} "$@"\n')
            script.chmod(0o755)
            self._logs[name] = log

    def count(self, name: str) -> int:
        return len(self._logs[name].read_text().splitlines())

    def counts(self) -> tuple[int, int]:
        """(iptables-restore runs, iptables-save runs) so far."""
        return self.count("iptables-restore"), self.count("iptables-save")


def sync_histogram(metrics_port: int) -> tuple[float, int]:
    """fluxd's ``flux_iptables_sync_seconds`` (sum, count)."""
    total, count = 0.0, 0
    for line in http_get(f"http://127.0.0.1:{metrics_port}/metrics").splitlines():
        if line.startswith("flux_iptables_sync_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("flux_iptables_sync_seconds_count"):
            count = int(float(line.split()[-1]))
    return total, count


def kernel_rules(chain: str) -> tuple[int, int]:
    """(DNAT rules, REJECT rules) in ``chain`` now, read with one iptables-save."""
    out = subprocess.run(
        ["iptables-save"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    prefix = f"-A {chain} "
    dnat = reject = 0
    for line in out.splitlines():
        if line.startswith(prefix):
            if "-j DNAT" in line:
                dnat += 1
            elif "-j REJECT" in line:
                reject += 1
    return dnat, reject


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One measured change."""

    size: int
    change: str
    seconds: float
    sync_seconds: float | None  # mean of the syncs it caused (None: no sync)
    syncs: int
    restores: int
    saves: int


@dataclass
class Resync:
    """One full resync or watch re-snapshot."""

    size: int
    kind: str  # "start" or "re-snapshot"
    seconds: float
    after_chain: float | None
    sync_seconds: float | None
    restores: int
    saves: int


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    resyncs: list[Resync] = field(default_factory=list)
    rss_kib: dict[int, int] = field(default_factory=dict)


class Bench:
    """The private etcd, the other host, the backends and one fluxd at a time."""

    def __init__(self, workdir: Path, repeat: int, resyncs: int) -> None:
        self.workdir = workdir
        self.repeat = repeat
        self.resyncs = resyncs
        self.chain = "FLUXS" + secrets.token_hex(3).upper()
        self.etcd = EtcdServer(workdir / "etcd")
        self.exec = Exec(workdir)
        self.metrics_port = free_port()
        self.backends: list[Backend] = []
        self.host: OtherHost | None = None
        self.fluxd: Fluxd | None = None
        self.population = 0
        self.results = Results()

    # plumbing

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self.host is not None
        return self.host.call(coro, timeout=600)

    def instance(self, address: str) -> Instance:
        assert self.host is not None
        return Instance(
            host=HostRef(address=self.host.address), address=address, state=InstanceState.LIVE
        )

    def start_fluxd(self) -> Fluxd:
        daemon = Fluxd(
            self.etcd.endpoint, "-listen-prometheus", f"127.0.0.1:{self.metrics_port}",
            chain=self.chain,
        )  # fmt: skip
        daemon.env["PATH"] = f"{self.exec.directory}:{daemon.env.get('PATH', os.defpath)}"
        self.fluxd = daemon.start()
        return daemon

    def stop_fluxd(self) -> None:
        if self.fluxd is not None:
            self.fluxd.stop()  # kill, then `fluxd cleanup` of the chain
            self.fluxd = None

    def __enter__(self) -> Bench:
        self.etcd.start()
        self.backends = [Backend(b"A"), Backend(b"B")]
        self.host = OtherHost(self.etcd.endpoint)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_fluxd()
        finally:
            # `fluxd cleanup` (run by Fluxd.stop) does not say whether it worked: make sure,
            # since a chain of thousands of rules left behind slows every later iptables call.
            if asyncio.run(IPTables(self.chain).cleanup()):
                progress(f"removed iptables chain {self.chain}, which fluxd's cleanup left")
            try:
                if self.host is not None:
                    self.host.close()
            finally:
                for backend in self.backends:
                    backend.close()
                self.etcd.stop()

    # filling etcd

    def grow(self, size: int) -> None:
        """Add services (one instance each) until there are ``size``; wait for the kernel."""
        assert self.host is not None
        store, backend = self.host.store, self.backends[0].address

        async def one(index: int, slots: asyncio.Semaphore) -> None:
            async with slots:
                name = f"s{index:05d}"
                await store.add_service(name, Service(address=f"{vip(index)}:{PORT}"))
                await store.add_instance(name, f"{name}-1", self.instance(backend))

        async def fill(first: int) -> None:
            slots = asyncio.Semaphore(WRITERS)
            await asyncio.gather(*(one(i, slots) for i in range(first, size)))

        self.call(fill(self.population))
        self.population = size
        # The probe services: "p" (rejecting, gets an instance), "m" (an instance that moves).
        self.call(store.add_service("p", Service(address=f"{vip(0, '127.51')}:{PORT}")))
        self.call(store.add_service("m", Service(address=f"{vip(1, '127.51')}:{PORT}")))
        self.call(store.add_instance("m", "m-1", self.instance(self.backends[0].address)))
        self.wait_rules(size + 1, 1, START_WAIT)

    def wait_rules(self, dnat: int, reject: int, limit: float) -> float:
        started = time.perf_counter()
        return until(lambda: kernel_rules(self.chain) == (dnat, reject), started, 0.01, limit)

    # one change

    def measure(self, size: int, change: str, write: Coroutine[Any, Any, Any],
                done: Callable[[], bool], poll: float) -> None:  # fmt: skip
        before_sum, before_count = sync_histogram(self.metrics_port)
        restores, saves = self.exec.counts()
        started = time.perf_counter()
        self.call(write)
        seconds = until(done, started, poll, WAIT)
        time.sleep(0.05)  # the sync's metric lands right after its iptables-restore returns
        after_sum, after_count = sync_histogram(self.metrics_port)
        restores_after, saves_after = self.exec.counts()
        syncs = after_count - before_count
        self.results.samples.append(
            Sample(
                size,
                change,
                seconds,
                (after_sum - before_sum) / syncs if syncs else None,
                syncs,
                restores_after - restores,
                saves_after - saves,
            )
        )
        progress(f"{size:>5} services, {change}: {seconds * 1000:.1f} ms, {syncs} sync(s), "
                 f"{restores_after - restores} iptables-restore")  # fmt: skip

    def changes(self, size: int) -> None:
        assert self.host is not None
        store = self.host.store
        probe, moving = vip(0, "127.51"), vip(1, "127.51")
        a, b = self.backends
        for round_ in range(self.repeat):
            self.measure(size, "instance added",
                         store.add_instance("p", "p-1", self.instance(a.address)),
                         lambda: accepted(probe) is True, FAST_POLL)  # fmt: skip
            self.measure(size, "instance removed", store.remove_instance("p", "p-1"),
                         lambda: accepted(probe) is False, SLOW_POLL)  # fmt: skip
            target = b if round_ % 2 == 0 else a
            self.measure(size, "instance moved",
                         store.add_instance("m", "m-1", self.instance(target.address)),
                         lambda t=target: answer(moving) == t.name, SLOW_POLL)  # fmt: skip
            address = vip(2 + round_, "127.51")
            sentinel = Sentinel(address)
            try:

                def hidden(s: Sentinel = sentinel, address: str = address) -> bool:
                    s.drain()
                    return accepted(address) is False

                name = f"new{round_}"
                self.measure(size, "service added",
                             store.add_service(name, Service(address=f"{address}:{PORT}")),
                             hidden, FAST_POLL)  # fmt: skip
                self.measure(size, "service removed", store.remove_service(name),
                             lambda s=sentinel, a=address: (s.drain(), accepted(a))[1] is True,
                             FAST_POLL)  # fmt: skip
            finally:
                sentinel.close()

    # resyncs

    def restart(self, size: int) -> None:
        """Kill fluxd, remove its chain, start a new one: time until every rule is back."""
        self.stop_fluxd()
        restores, saves = self.exec.counts()
        started = time.perf_counter()
        daemon = self.start_fluxd()
        after_chain: float | None = None
        deadline = started + START_WAIT
        while kernel_rules(self.chain) != (size + 1, 1):
            if after_chain is None and daemon.logged(f"iptables chain {self.chain} installed"):
                after_chain = time.perf_counter()
            if time.perf_counter() > deadline or daemon.process.poll() is not None:
                raise RuntimeError("fluxd did not install every rule:\n" + "\n".join(
                    daemon.lines[-20:]))  # fmt: skip
            time.sleep(0.005)
        done = time.perf_counter()
        restores_after, saves_after = self.exec.counts()
        sync_sum, sync_count = self.wait_metrics()
        self.results.resyncs.append(
            Resync(
                size,
                "start",
                done - started,
                None if after_chain is None else done - after_chain,
                sync_sum / sync_count if sync_count else None,
                restores_after - restores,
                saves_after - saves,
            )
        )
        progress(f"{size:>5} services, full resync: {done - started:.2f} s from start, "
                 f"{restores_after - restores} iptables-restore")  # fmt: skip

    def wait_metrics(self) -> tuple[float, int]:
        deadline = time.monotonic() + 30
        while True:
            try:
                return sync_histogram(self.metrics_port)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def resnapshot(self, size: int) -> None:
        """Restart etcd under fluxd: time from etcd healthy to fluxd's next sync."""
        before_sum, before_count = sync_histogram(self.metrics_port)
        restores, saves = self.exec.counts()
        self.etcd.stop()
        self.etcd.start()
        started = time.perf_counter()
        seconds = until(lambda: sync_histogram(self.metrics_port)[1] > before_count, started,
                        0.005, START_WAIT)  # fmt: skip
        time.sleep(0.05)
        after_sum, after_count = sync_histogram(self.metrics_port)
        restores_after, saves_after = self.exec.counts()
        syncs = after_count - before_count
        sync_seconds = (after_sum - before_sum) / syncs
        restored, saved = restores_after - restores, saves_after - saves
        self.results.resyncs.append(
            Resync(size, "re-snapshot", seconds, None, sync_seconds, restored, saved)
        )
        assert kernel_rules(self.chain) == (size + 1, 1), "rules changed over a re-snapshot"
        progress(f"{size:>5} services, watch re-snapshot: {seconds * 1000:.0f} ms, "
                 f"{restores_after - restores} iptables-restore")  # fmt: skip

    def run(self, sizes: list[int]) -> Results:
        self.start_fluxd()
        for size in sizes:
            progress(f"filling etcd to {size:,} services ...")
            self.grow(size)
            time.sleep(1)  # let fluxd settle after the burst
            self.changes(size)
            assert self.fluxd is not None and self.fluxd.process is not None
            self.results.rss_kib[size] = rss_kib([self.fluxd.process.pid])
            for _ in range(self.resyncs):
                self.resnapshot(size)
            for _ in range(self.resyncs):
                self.restart(size)
            time.sleep(1)
        return self.results


# -- the report ------------------------------------------------------------------------------


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def spread(values: list[float], scale: float = 1000.0, digits: int = 1) -> str:
    """Median (min-max), scaled (milliseconds by default)."""
    if not values:
        return "-"
    med, low, high = (scale * v for v in (statistics.median(values), min(values), max(values)))
    return f"{med:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def counts(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def report(results: Results, machine: dict[str, str], repeat: int, command: str) -> str:
    sizes = sorted({s.size for s in results.samples} | set(results.rss_kib))
    lines = [
        "# fluxd control plane at scale",
        "",
        f"`{command}` on {machine['date']}: {machine['cpus']} CPUs, kernel {machine['kernel']},"
        f" Python {machine['python']}, fluxd {machine['fluxd']}, {iptables_version()}.",
        "Every service has one instance (another host's record in etcd).  Figures are the"
        f" median (min-max) of {repeat} changes per row; see benchmarks/scale.py for what each"
        " time includes.",
        "",
        "## One change",
        "",
        "| services | change | etcd write → kernel (ms) | iptables sync (ms) | syncs"
        " | iptables-restore | iptables-save |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        for change in CHANGES:
            rows = [s for s in results.samples if s.size == size and s.change == change]
            if not rows:
                continue
            syncs = [s.sync_seconds for s in rows if s.sync_seconds is not None]
            lines.append(
                f"| {size:,} | {change} | {spread([s.seconds for s in rows])} | {spread(syncs)}"
                f" | {counts([s.syncs for s in rows])} | {counts([s.restores for s in rows])}"
                f" | {counts([s.saves for s in rows])} |"
            )
    lines += [
        "",
        "## Full resync and memory",
        "",
        "| services | fluxd start → every rule (s) | after the chain is installed (s)"
        " | its sync (ms) | iptables-restore | watch re-snapshot: etcd back → sync (ms)"
        " | its sync (ms) | iptables-restore | fluxd RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        starts = [r for r in results.resyncs if r.size == size and r.kind == "start"]
        snaps = [r for r in results.resyncs if r.size == size and r.kind == "re-snapshot"]
        rss = results.rss_kib.get(size)
        lines.append(
            f"| {size:,} | {spread([r.seconds for r in starts], 1, 2)}"
            f" | {spread([r.after_chain for r in starts if r.after_chain is not None], 1, 2)}"
            f" | {spread([r.sync_seconds for r in starts if r.sync_seconds is not None])}"
            f" | {counts([r.restores for r in starts]) if starts else '-'}"
            f" | {spread([r.seconds for r in snaps], digits=0)}"
            f" | {spread([r.sync_seconds for r in snaps if r.sync_seconds is not None])}"
            f" | {counts([r.restores for r in snaps]) if snaps else '-'}"
            f" | {'-' if rss is None else f'{rss / 1024:.0f}'} |"
        )
    lines += ["", "## Targets", ""]
    lines += targets(results)
    lines += [
        "",
        "A full resync's iptables-restore count includes the start-up batch that creates the"
        " chains and their jumps; the services' rules are the other one.  A re-snapshot that"
        " finds nothing changed reads the tables (one iptables-save) and restores nothing.",
        "",
    ]
    return "\n".join(lines)


def targets(results: Results) -> list[str]:
    out = []
    at = [s for s in results.samples if s.size == 1000 and s.syncs]
    if at:
        worst = max(statistics.median([s.seconds for s in at if s.change == c])
                    for c in CHANGES if any(s.change == c for s in at))  # fmt: skip
        one = all(s.restores == s.syncs for s in at)
        verdict = "PASS" if worst < CHANGE_TARGET and one else "MISS"
        out.append(
            f"- {verdict}: one change at 1,000 services under {CHANGE_TARGET * 1000:.0f} ms"
            f" (slowest median {worst * 1000:.1f} ms), one iptables-restore per sync"
            f" ({'yes' if one else 'no'})"
        )
    starts = [r for r in results.resyncs if r.size == 1000 and r.kind == "start"]
    if starts:
        med = statistics.median([r.after_chain or r.seconds for r in starts])
        total = statistics.median([r.seconds for r in starts])
        one = all(r.restores <= 2 for r in starts)
        verdict = "PASS" if med < RESYNC_TARGET and one else "MISS"
        out.append(
            f"- {verdict}: full resync of 1,000 services under {RESYNC_TARGET:g} s"
            f" ({med:.2f} s after the chain is installed, {total:.2f} s from process start),"
            f" one iptables-restore for the services' rules ({'yes' if one else 'no'})"
        )
    return out


def iptables_version() -> str:
    result = subprocess.run(["iptables", "--version"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


# -- the command -----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description="fluxd's control plane with 100 to 5,000 services: one change from etcd"
        " to the kernel, iptables sync time and processes, full resync, watch re-snapshot,"
        " RSS.  Writes benchmarks/results/scale.md and scale.raw.",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), metavar="N",
                        help="service counts, ascending (default 100 1000 5000)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5, metavar="N",
                        help="changes of each kind per size (default 5)")  # fmt: skip
    parser.add_argument("--resyncs", type=int, default=3, metavar="N",
                        help="full resyncs and re-snapshots per size (default 3)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help="where to write scale.md and scale.raw")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.resyncs < 1:
        parser.error("--repeat and --resyncs must be at least 1")
    if any(n < 1 or n > 12000 for n in args.sizes) or args.sizes != sorted(set(args.sizes)):
        parser.error(f"--sizes must be ascending, distinct, 1 to 12000: got {args.sizes}")
    return args


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="flux-scale-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if os.geteuid() != 0:
        print("benchmarks.scale needs root (fluxd installs iptables rules)", file=sys.stderr)
        return 1
    machine = describe_machine()
    with workdir() as path, Bench(path, args.repeat, args.resyncs) as bench:
        results = bench.run(args.sizes)
    command = " ".join(["python -m benchmarks.scale", *argv])
    text = report(results, machine, args.repeat, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text(text)
    raw = {"samples": [vars(s) for s in results.samples],
           "resyncs": [vars(r) for r in results.resyncs], "rss_kib": results.rss_kib}  # fmt: skip
    (args.out / "scale.raw").write_text(json.dumps(raw, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
