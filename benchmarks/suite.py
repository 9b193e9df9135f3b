"""The run: start backends and subjects once, measure in rotating order, write the report.

All subjects run side by side for the whole suite (an idle proxy costs nothing measurable), so a
repeat is a pass over every workload and every subject, and the order of subjects rotates from
one repeat to the next: drift on the machine (another process waking up, the page cache, the
conntrack table filling) spreads over all of them instead of landing on one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import report, workloads
from benchmarks.subjects import (
    BASELINE_SUBJECTS,
    EDGE_ONLY,
    H2_ONLY,
    NGINX_STREAM_MODULE,
    SUBJECTS,
    Backends,
    Subject,
    start_backends,
    start_subject,
)
from benchmarks.system import Counters, describe_machine, raise_nofile, sysctls

__all__ = [
    "WORKLOAD_SUBJECTS",
    "Measured",
    "Settings",
    "check_tools",
    "engine_threads_line",
    "report_only",
    "run",
]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Which subjects each workload measures: HAProxy with two threads is the churn target's peer
# only; "direct" has no proxy to hold idle connections in.  fluxd with one engine thread runs
# where a second thread could matter (churn, small messages) and on one bulk stream, next to
# fluxd on its default; "close256" (churn with 4x the connections) runs through the TCP proxies
# whose connection rates are compared, not through the Python relay or the single-thread
# HAProxy variant with splice (its churn path is HAProxy tcp's).
# A baseline build (--baseline) runs where the engine's per-byte, per-message, per-connection and
# per-exchange paths are measured.
_ALL = ["direct", "fluxd", "fluxd-python", "haproxy-tcp", "haproxy-splice", "nginx"]
WORKLOAD_SUBJECTS: dict[str, list[str]] = {
    "bulk1": [*_ALL, "fluxd-1t", "fluxd-base"],
    "bulk4": _ALL,
    "keepalive": [*_ALL, "fluxd-1t", "fluxd-base"],
    "close": [*_ALL, "haproxy-tcp-2t", "fluxd-1t", "fluxd-hash", "fluxd-base"],
    "close256": [
        "direct", "fluxd", "fluxd-1t", "fluxd-hash", "haproxy-tcp", "haproxy-tcp-2t", "nginx",
    ],
    "idle": [s for s in _ALL if s != "direct"],
    # HTTP services: fluxd with the service marked http (framing and metrics), the same traffic
    # through fluxd's tcp service (what the metrics cost), and the HTTP-aware peers.
    "http-keepalive": [
        "direct", "fluxd", "fluxd-http", "haproxy-http", "nginx-http", "fluxd-http-base",
    ],
    "http-close": [
        "direct", "fluxd", "fluxd-http", "haproxy-http", "haproxy-http-2t", "nginx-http",
        "fluxd-http-base",
    ],
    # HTTP/2 (h2c, many streams per connection): the same backend through fluxd's tcp service
    # (relayed as bytes) and its http service (observed), and HAProxy with HTTP/2 on both sides.
    "h2": ["direct", "fluxd", "fluxd-http", "haproxy-h2", "fluxd-base", "fluxd-http-base"],
    # At the edge (issue 18): a port shared by 20 services, by Host (fluxd-http's published
    # http services) and by TLS server name (fluxd's published tcp services, passthrough).
    # A baseline build from before published ports has no edge front and is left out.
    "edge-keepalive": ["direct", "fluxd-http", "haproxy-edge", "nginx-edge", "fluxd-http-base"],
    "edge-close": [
        "direct", "fluxd-http", "haproxy-edge", "haproxy-edge-2t", "nginx-edge",
        "fluxd-http-base",
    ],
    "sni-keepalive": ["direct", "fluxd", "haproxy-sni", "fluxd-base"],
    "sni-close": ["direct", "fluxd", "haproxy-sni", "haproxy-sni-2t", "fluxd-base"],
    # The status page's cost (issue 19): HTTP keep-alive through fluxd's http service while its
    # /status and /status/history are fetched every 2 s, as an open page does.
    "http-keepalive-page": ["fluxd-http"],
}
EDGE_WORKLOADS = ("edge-keepalive", "edge-close", "sni-keepalive", "sni-close")

# Kernel settings for the run, put back afterwards.  Under connection churn TIME_WAIT fills the
# ephemeral port range; tcp_tw_reuse=2 (loopback only) lets connects reuse those ports.
_SYSCTLS_IF_OFF = {"net.ipv4.tcp_tw_reuse": "2"}


@dataclass
class Settings:
    """What to run and for how long (see ``python -m benchmarks --help``)."""

    repeat: int = 3
    bulk_seconds: float = 6.0
    wrk_seconds: float = 6.0
    connections: int = 64
    wide_connections: int = 256  # the close256 workload's
    threads: int = 2
    idle_count: int = 5000
    h2_seconds: float = 6.0
    h2_connections: int = 32
    h2_streams: int = 50  # requests in flight on each connection (h2load -m)
    workloads: list[str] = field(default_factory=lambda: list(WORKLOAD_SUBJECTS))
    subjects: list[str] = field(
        default_factory=lambda: [s for s in SUBJECTS if s not in BASELINE_SUBJECTS]
    )
    baseline: Path | None = None  # another checkout, built: the *-base subjects run its fluxd
    out: Path = RESULTS
    chart: bool = True
    command: str = "python -m benchmarks"

    def described(self) -> dict[str, Any]:
        baseline = {} if self.baseline is None else {"baseline build": describe_tree(self.baseline)}
        return {
            "command": self.command,
            **baseline,
            "repeats": self.repeat,
            "iperf3 seconds": f"{self.bulk_seconds:g}",
            "wrk seconds": f"{self.wrk_seconds:g}",
            "wrk connections": self.connections,
            "wrk connections (close256)": self.wide_connections,
            "wrk threads": self.threads,
            "idle connections": self.idle_count,
            "h2load seconds": f"{self.h2_seconds:g}",
            "h2load connections": self.h2_connections,
            "h2load streams per connection": self.h2_streams,
        }


def describe_tree(tree: Path) -> str:
    """A checkout as the report names it: its path and commit (``+`` when it has changes)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "describe", "--always", "--dirty=+"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        head = "not a git checkout"
    return f"{tree} ({head})"


def check_baseline(tree: Path) -> None:
    """Fail at once unless ``tree`` is a flux checkout with its engine compiled."""
    package = tree / "src" / "flux"
    if not (package / "__init__.py").exists():
        raise SystemExit(f"benchmarks: --baseline {tree} is not a flux checkout (no src/flux)")
    if not any(package.glob("_splice*.so")):
        raise SystemExit(
            f"benchmarks: --baseline {tree} has no compiled engine (src/flux/_splice*.so): "
            f"build it there first (cd {tree} && python setup.py build_ext --inplace)"
        )


def check_tools(settings: Settings) -> None:
    """Fail at once, with one line, when something the run needs is missing."""
    tools = ["wrk", "iperf3", "haproxy", "nginx", "etcd", "iptables"]
    if "h2" in settings.workloads:
        tools += ["h2load", "nghttpd"]
    if set(EDGE_WORKLOADS) & set(settings.workloads):
        tools.append("openssl")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            f"benchmarks: missing tools: {', '.join(missing)} "
            "(make bench installs them: FLUX_BENCH_TOOLS=1 scripts/setup-system.sh)"
        )
    if "nginx" in settings.subjects and not Path(NGINX_STREAM_MODULE).exists():
        raise SystemExit(
            f"benchmarks: nginx stream module {NGINX_STREAM_MODULE} is missing "
            "(install libnginx-mod-stream; make bench does)"
        )
    if settings.baseline is not None:
        check_baseline(settings.baseline)
    if settings.chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(
                "benchmarks: matplotlib is missing for the chart (pip install -e '.[bench]'; "
                "make bench does), or pass --no-chart"
            ) from None
    # Each wrk connection is one descriptor in wrk and two in a proxy.
    need = max(settings.idle_count, 2 * settings.wide_connections) + 200
    limit = raise_nofile()
    if limit < need:
        raise SystemExit(f"benchmarks: descriptor limit {limit} is below the {need} needed")


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _brief(workload: str, values: dict[str, Any]) -> str:
    parts = []
    for metric in report.METRICS[workload]:
        if metric.key in values:
            parts.append(f"{metric.label} {values[metric.key]:.{metric.digits}f}")
    return ", ".join(parts)


async def _measure(
    workload: str, subject: Subject, backends: Backends, settings: Settings, workdir: Path
) -> dict[str, Any]:
    if workload in ("bulk1", "bulk4"):
        streams = 1 if workload == "bulk1" else 4
        return await workloads.bulk(subject, backends, streams, settings.bulk_seconds)
    if workload == "idle":
        return await workloads.idle(subject, backends, settings.idle_count)
    if workload == "http-keepalive-page":
        return await _with_page_open(subject, workdir, settings)
    # The HTTP loads: fluxd's metrics are scraped around each, to check what they counted.
    before = await _http_counted(subject)
    if workload == "h2":
        values = await workloads.h2(
            subject, workdir, settings.h2_seconds, settings.h2_connections, settings.h2_streams,
            settings.threads,
        )  # fmt: skip
    else:
        run = workloads.keepalive if workload.endswith("keepalive") else workloads.close
        connections = settings.wide_connections if workload == "close256" else settings.connections
        kind = workload.split("-")[0] if workload in EDGE_WORKLOADS else "http"
        values = await run(
            subject, workdir, settings.wrk_seconds, connections, settings.threads, kind
        )
    if before is not None:
        after = await _http_counted(subject)
        if after is not None:
            values["counted"] = after - before
    return values


PAGE_REFRESH = 2.0  # seconds between the status page's fetches (its own refresh)


async def _with_page_open(subject: Subject, workdir: Path, settings: Settings) -> dict[str, Any]:
    """HTTP keep-alive while ``/status`` and ``/status/history?since=`` are fetched every
    ``PAGE_REFRESH`` seconds (what an open status page does); adds the fetches made, the bytes
    they read and the fetches that failed."""
    if subject.metrics is None:
        raise workloads.RunError(f"{subject.name} serves no status page (no metrics listener)")
    base = subject.metrics.removesuffix("/metrics")
    fetched = {"fetches": 0, "bytes": 0, "errors": 0}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(url: str) -> None:
        try:
            with opener.open(url, timeout=5) as response:
                fetched["bytes"] += len(response.read())
                fetched["fetches"] += 1
        except OSError:
            fetched["errors"] += 1

    async def poll() -> None:
        since = 0.0
        while True:
            await asyncio.to_thread(fetch, f"{base}/status")
            await asyncio.to_thread(fetch, f"{base}/status/history?since={since:.3f}")
            since = time.time()
            await asyncio.sleep(PAGE_REFRESH)

    poller = asyncio.create_task(poll())
    try:
        values = await workloads.keepalive(
            subject, workdir, settings.wrk_seconds, settings.connections, settings.threads
        )
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await poller
    values["page_fetches"] = fetched["fetches"]
    values["page_kib"] = fetched["bytes"] / 1024
    values["page_errors"] = fetched["errors"]
    return values


async def _http_counted(subject: Subject) -> float | None:
    """The exchanges fluxd's metrics count for the HTTP service (None without metrics)."""
    if subject.metrics is None:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> float:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            subject.metrics, timeout=10  # type: ignore[arg-type]
        ) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "flux_http_total"
        )

    try:
        return await asyncio.to_thread(scrape)
    except OSError:
        return None


async def _wait_quiet(threshold: float = 0.25, patience: float = 5.0) -> float:
    """Wait (at most ``patience`` s) until other work on the machine uses < ``threshold`` cores.

    Between runs the suite's own processes are idle, so what keeps the machine busy is someone
    else's; a burst of it (a compiler, a test run) would land on whichever subject runs next.
    Returns the cores in use by others when the run starts.
    """
    deadline = time.monotonic() + patience
    while True:
        counters = Counters()
        await asyncio.sleep(0.3)
        cores = counters.read()["other_cpu_s"] / 0.3
        if cores < threshold or time.monotonic() > deadline:
            return max(0.0, cores)


def _has_front(subject: Subject, workload: str) -> bool:
    """Whether ``subject`` can take ``workload`` (a baseline build may have no edge front)."""
    if workload not in EDGE_WORKLOADS:
        return True
    return getattr(subject, workload.split("-")[0]) is not None


def _rotated(names: Sequence[str], by: int) -> list[str]:
    if not names:
        return []
    by %= len(names)
    return [*names[by:], *names[:by]]


@dataclass
class Measured:
    """What :func:`measure_all` gathered."""

    samples: list[dict[str, Any]]
    notes: list[str]
    # fluxd subject -> the engine threads its configuration report gave (None: not reported)
    engine_threads: dict[str, int | None]


def engine_threads_line(reported: dict[str, int | None]) -> str:
    """The machine table's line saying how many engine threads each fluxd subject ran."""
    parts = []
    for name, threads in reported.items():
        if threads is None:
            from flux.config import usable_cpus

            parts.append(
                f"{SUBJECTS[name]}: {usable_cpus()} (assumed: fluxd's configuration report has "
                "no engine-threads, its default is the usable CPUs)"
            )
        else:
            how = {"fluxd-1t": "-engine-threads 1", "fluxd-hash": "-engine-steer hash"}.get(
                name, "the default"
            )
            parts.append(f"{SUBJECTS[name]}: {threads} ({how}, as fluxd reported it)")
    return "; ".join(parts)


async def run_once(
    workload: str,
    subject: Subject,
    backends: Backends,
    settings: Settings,
    workdir: Path,
    notes: list[str],
    which: str,
    step: str,
) -> dict[str, Any] | None:
    """One run of ``workload`` through ``subject`` once the machine is quiet, with the engine's
    counters and a progress line; a run that fails is a note (``which`` names it) and None."""
    started = time.monotonic()
    if workload == "idle" and subject.restart is not None:
        await subject.restart()  # memory pooled by earlier runs would hide growth
    quiet = await _wait_quiet()
    counters = Counters()
    try:
        values = await _measure(workload, subject, backends, settings, workdir)
    except workloads.RunError as exc:
        note = f"{workload} through {subject.name} ({which}) failed: {exc}"
        _progress(note)
        notes.append(note)
        return None
    values.update(counters.read())
    values["other_cores_before"] = quiet
    _progress(
        f"[{step}] {workload:9} {subject.name:15} "
        f"{_brief(workload, values)}  ({time.monotonic() - started:.1f} s)"
    )
    return values


async def measure_all(settings: Settings, workdir: Path) -> Measured:
    """Start everything, run every workload ``repeat`` times; the samples and any notes."""
    samples: list[dict[str, Any]] = []
    notes: list[str] = []
    wanted = {s for w in settings.workloads for s in WORKLOAD_SUBJECTS[w]} & set(settings.subjects)
    async with AsyncExitStack() as stack:
        backends = await start_backends(
            stack,
            workdir,
            h2="h2" in settings.workloads,
            edge=bool(set(EDGE_WORKLOADS) & set(settings.workloads)),
        )
        running: dict[str, Subject] = {}
        for name in SUBJECTS:
            if name in wanted:
                _progress(f"starting {name}")
                running[name] = await start_subject(
                    stack, name, workdir, backends, settings.baseline
                )
        # One short keep-alive run each first (h2load for an HTTP/2-only subject): connection
        # pools, page cache, CPU frequency.
        for subject in running.values():
            with contextlib.suppress(workloads.RunError):
                if subject.name in H2_ONLY:
                    await workloads.h2(
                        subject, workdir, 1, settings.h2_connections, settings.h2_streams,
                        settings.threads,
                    )  # fmt: skip
                elif subject.name in EDGE_ONLY:
                    await workloads.keepalive(
                        subject, workdir, 1, settings.connections, settings.threads,
                        EDGE_ONLY[subject.name],
                    )  # fmt: skip
                else:
                    await workloads.keepalive(
                        subject, workdir, 1, settings.connections, settings.threads
                    )
        for repeat in range(settings.repeat):
            for workload in settings.workloads:
                names = [
                    s
                    for s in WORKLOAD_SUBJECTS[workload]
                    if s in running and _has_front(running[s], workload)
                ]
                for name in _rotated(names, repeat):
                    values = await run_once(
                        workload, running[name], backends, settings, workdir, notes,
                        f"repeat {repeat + 1}", f"{repeat + 1}/{settings.repeat}",
                    )  # fmt: skip
                    if values is not None:
                        samples.append(
                            {"subject": name, "workload": workload, "repeat": repeat,
                             "values": values}
                        )  # fmt: skip
                    await asyncio.sleep(0.5)  # let the last connections close
    threads = {
        name: subject.engine_threads
        for name, subject in running.items()
        if name in ("fluxd", "fluxd-1t", "fluxd-hash", "fluxd-http", *BASELINE_SUBJECTS)
    }
    return Measured(samples, notes, threads)


def write_report(
    samples: list[dict[str, Any]],
    notes: list[str],
    machine: dict[str, str],
    settings: Settings,
) -> str:
    """Write latest.md (and latest.png) under ``settings.out``; return the Markdown."""
    settings.out.mkdir(parents=True, exist_ok=True)
    table = report.summarise(samples)
    markdown = report.render_markdown(
        table, machine, settings.described(), [*notes, *report.noise(samples)]
    )
    (settings.out / "latest.md").write_text(markdown)
    if settings.chart:
        report.render_chart(
            table,
            settings.out / "latest.png",
            f"fluxd and peers relative to HAProxy tcp — {machine['date']}",
        )
    return markdown


def sysctls_on() -> contextlib.AbstractContextManager[dict[str, str]]:
    """The kernel settings a run needs (``_SYSCTLS_IF_OFF``), set while it runs where off."""
    changes = {k: v for k, v in _SYSCTLS_IF_OFF.items()
               if Path("/proc/sys", *k.split(".")).read_text().strip() == "0"}  # fmt: skip
    return sysctls(changes)


def run(settings: Settings) -> int:
    """The whole suite; exit status 0 when every run produced a figure."""
    check_tools(settings)
    machine = describe_machine()
    began = time.monotonic()
    with sysctls_on() as changed, tempfile.TemporaryDirectory(prefix="flux-bench-") as tmp:
        notes = [f"kernel setting for the run: {k} {v}" for k, v in changed.items()]
        import uvloop

        try:
            measured = uvloop.run(measure_all(settings, Path(tmp)))
        except RuntimeError as exc:  # a subject or backend that would not start
            _progress(f"benchmarks: {exc}")
            return 1
    samples, failures = measured.samples, measured.notes
    if measured.engine_threads:
        machine["fluxd engine threads"] = engine_threads_line(measured.engine_threads)
    notes += failures
    notes.append(f"whole run took {(time.monotonic() - began) / 60:.1f} minutes")
    raw = settings.out / "latest.raw"
    settings.out.mkdir(parents=True, exist_ok=True)
    raw.write_text(
        json.dumps(
            {
                "machine": machine,
                "settings": settings.described(),
                "notes": notes,
                "samples": samples,
            },
            indent=1,
        )
    )
    markdown = write_report(samples, notes, machine, settings)
    print(markdown)
    _progress(
        f"wrote {settings.out / 'latest.md'}"
        + (" and latest.png" if settings.chart else "")
        + f" (raw samples: {raw})"
    )
    return 1 if failures else 0


def report_only(settings: Settings) -> int:
    """Rebuild latest.md / latest.png from latest.raw without measuring."""
    path = settings.out / "latest.raw"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"benchmarks: no samples to report at {path} (a full run writes them)"
        ) from None
    settings.command = raw["settings"].get("command", settings.command)
    described = raw["settings"]

    class Saved(Settings):
        def described(self) -> dict[str, Any]:
            return described

    saved = Saved(out=settings.out, chart=settings.chart)
    print(write_report(raw["samples"], raw["notes"], raw["machine"], saved))
    return 0


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "benchmarks", *argv])
