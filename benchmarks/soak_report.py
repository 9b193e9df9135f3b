"""The soak run's pure half: its schedule, which failed requests a fault explains, the growth
check on fluxd's memory and descriptors, and the report (Markdown and a chart).

Nothing here touches a process or a socket, so the verdict can be tested on synthetic series
(tests/test_soak.py) and rebuilt from a run's saved samples.

What counts as a failed request: a request is one new connection to a service address, one
HTTP/1.x request written, and the response read to EOF within :data:`REQUEST_TIMEOUT`; it
failed if the connection was refused or reset, nothing came back in time, or the response was
not ``200`` with one of the instances' pages as its body.  A failure is *expected* when a fault
explains it:

- **fluxd SIGKILL**: fluxd is the proxy, so everything in flight when it dies and everything
  sent before the restarted fluxd serves again is lost (its DNAT rules survive a crash and send
  clients to listeners that are gone): any failure of a request that overlaps the outage, from
  the kill until both services answered again, plus :data:`FLUXD_GRACE`;
- **instance kill**: an exchange the killed container was serving is cut (``reset`` or
  ``truncated``), for a request that overlaps the ``docker kill`` plus :data:`KILL_SLACK`.
  New connections must not fail: fluxd retries the next instance when a connect is refused.

Everything else is *unexpected* and fails the run: a dockerd or etcd member restart must cost
no request (fluxd keeps serving from what it knows), nor may the container churn beyond the
cut exchanges (two instances of each service are never churned, so there is always one).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import machine_lines

__all__ = [
    "FAULT_KINDS",
    "FD_TOLERANCE",
    "RSS_TOLERANCE",
    "Fault",
    "Growth",
    "Plan",
    "Request",
    "Sample",
    "explain",
    "growth",
    "growth_checks",
    "plan",
    "render_chart",
    "render_markdown",
    "segments",
]

DASH = "\N{EN DASH}"
REQUEST_TIMEOUT = 5.0
FLUXD_GRACE = 1.0
KILL_SLACK = 1.0
# Cut exchanges: errors seen on a connection the proxy had accepted.
CUT_ERRORS = frozenset({"reset", "truncated"})

# Tolerances on growth, (absolute, relative to the base median): the end of a run may be above
# the level after warm-up by the larger of the two.  RSS in KiB; Python's allocator keeps a few
# arenas more after a burst, and a leak of even 100 bytes per request at the soak's rate is
# 15 MiB in half an hour.  Descriptors: a few connections in flight at a sample, or a second
# etcd connection after a member restart, are not a leak; one per request or per instance is.
RSS_TOLERANCE = (8 * 1024.0, 0.10)
FD_TOLERANCE = (8.0, 0.10)

FAULT_KINDS = {
    "fluxd-kill": "fluxd SIGKILL and restart",
    "dockerd-restart": "dockerd restart",
    "etcd-restart": "etcd member restart",
    "instance-kill": "instance killed",
    "instance-start": "instance started",
}

# When each fault happens, as a fraction of the run.  Both fluxd kills come early so that the
# last fluxd runs for most of the run, through the dockerd and etcd restarts, and its memory
# and descriptors can be compared between the start and the end of a long life.
_SCHEDULE = (
    (0.15, "fluxd-kill"),
    (0.30, "fluxd-kill"),
    (0.50, "dockerd-restart"),
    (0.70, "etcd-restart"),
)


@dataclass(frozen=True, slots=True)
class Request:
    """One request: its service kind, when it started and ended (s into the run), its error
    (``""`` when it succeeded)."""

    kind: str
    start: float
    end: float
    error: str = ""


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault injected: ``start`` to ``end`` is the action (for a fluxd kill, until the new
    fluxd served both services again); ``detail`` says what exactly."""

    kind: str
    start: float
    end: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Sample:
    """fluxd's resident memory (KiB) and open descriptors at ``t`` (s into the run)."""

    t: float
    pid: int
    rss_kib: int
    fds: int


@dataclass(frozen=True)
class Plan:
    """A run's length, warm-up and comparison window (seconds), and its faults ``(at, kind)``;
    instances are started and killed every ``churn_interval`` throughout."""

    total: float
    warmup: float
    window: float
    churn_interval: float
    faults: tuple[tuple[float, str], ...]


def plan(minutes: float, churn_interval: float = 3.0) -> Plan:
    """The schedule of a ``minutes``-long run: the same faults at the same fractions of any
    length, so a short run is the long one compressed."""
    total = minutes * 60.0
    return Plan(
        total=total,
        warmup=max(20.0, 0.05 * total),
        window=max(20.0, 0.10 * total),
        churn_interval=churn_interval,
        faults=tuple((fraction * total, kind) for fraction, kind in _SCHEDULE),
    )


def explain(request: Request, faults: Iterable[Fault]) -> Fault | None:
    """The fault that explains ``request``'s failure, or None (an unexpected failure)."""
    for fault in faults:
        if fault.kind == "fluxd-kill":
            if request.start <= fault.end + FLUXD_GRACE and request.end >= fault.start:
                return fault
        elif (
            fault.kind == "instance-kill"
            and request.error in CUT_ERRORS
            and request.start <= fault.end + KILL_SLACK
            and request.end >= fault.start
        ):
            return fault
    return None


@dataclass(frozen=True)
class Growth:
    """One metric over one fluxd's life: the median of the first window after warm-up
    (``base``), the median of the last window (``final``), the most ``final`` may be."""

    metric: str
    segment: int
    base: float
    final: float
    limit: float
    base_window: tuple[float, float]
    final_window: tuple[float, float]

    @property
    def grew(self) -> bool:
        return self.final > self.limit


def growth(
    series: Sequence[tuple[float, float]],
    warmup: float,
    window: float,
    tolerance: tuple[float, float],
    metric: str = "",
    segment: int = 0,
) -> Growth | None:
    """Compare the end of ``series`` ((t, value), in time order) with its level after warm-up.

    The base is the median over ``[t0 + warmup, t0 + warmup + window]``, the final level the
    median over the last ``window``; medians, so a burst of connections at one sample or a
    short spike is not growth, while a steady climb moves the whole last window.  None when
    the series is too short for two windows that do not overlap.
    """
    if not series:
        return None
    first, last = series[0][0], series[-1][0]
    base_window = (first + warmup, first + warmup + window)
    final_window = (last - window, last)
    if base_window[1] > final_window[0]:
        return None
    base_values = [v for t, v in series if base_window[0] <= t <= base_window[1]]
    final_values = [v for t, v in series if final_window[0] <= t <= final_window[1]]
    if not base_values or not final_values:
        return None
    base = statistics.median(base_values)
    absolute, relative = tolerance
    return Growth(
        metric=metric,
        segment=segment,
        base=base,
        final=statistics.median(final_values),
        limit=base + max(absolute, relative * base),
        base_window=base_window,
        final_window=final_window,
    )


def segments(samples: Sequence[Sample]) -> list[list[Sample]]:
    """The samples split into one list per fluxd process (a restart changes the pid)."""
    out: list[list[Sample]] = []
    for sample in samples:
        if not out or out[-1][-1].pid != sample.pid:
            out.append([])
        out[-1].append(sample)
    return out


def growth_checks(samples: Sequence[Sample], run: Plan) -> list[Growth]:
    """RSS and descriptor growth of every fluxd that lived long enough to be compared."""
    checks = []
    for index, segment in enumerate(segments(samples), start=1):
        for metric, values, tolerance in (
            ("RSS KiB", [(s.t, float(s.rss_kib)) for s in segment], RSS_TOLERANCE),
            ("descriptors", [(s.t, float(s.fds)) for s in segment], FD_TOLERANCE),
        ):
            check = growth(values, run.warmup, run.window, tolerance, metric, index)
            if check is not None:
                checks.append(check)
    return checks


# -- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Counts:
    requests: int = 0
    failed: int = 0
    expected: int = 0

    @property
    def unexpected(self) -> int:
        return self.failed - self.expected


def _count(requests: Iterable[Request], causes: dict[int, Fault | None]) -> _Counts:
    total = failed = expected = 0
    for request in requests:
        total += 1
        if request.error:
            failed += 1
            expected += causes.get(id(request)) is not None
    return _Counts(total, failed, expected)


def _phases(run: Plan, faults: Sequence[Fault]) -> list[tuple[str, float, float]]:
    """The run cut at each big fault's start: (name, start, end)."""
    big = [f for f in faults if f.kind not in ("instance-kill", "instance-start")]
    cuts = [0.0, *(f.start for f in big), float("inf")]
    names = ["start", *(f"{FAULT_KINDS[f.kind]} ({f.detail})" if f.detail else FAULT_KINDS[f.kind]
                        for f in big)]  # fmt: skip
    return [(f"from {name}", cuts[i], cuts[i + 1]) for i, name in enumerate(names)]


def _latencies(seconds: list[float]) -> tuple[str, str, str]:
    """p50, p99 and the maximum, in milliseconds (dashes when there is nothing)."""
    if len(seconds) < 2:
        return (DASH, DASH, DASH)
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    p50, p99, top = cuts[49], cuts[98], max(seconds)
    return (f"{1000 * p50:.1f}", f"{1000 * p99:.1f}", f"{1000 * top:.1f}")


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def render_markdown(
    run: Plan,
    requests: Sequence[Request],
    faults: Sequence[Fault],
    samples: Sequence[Sample],
    header: dict[str, str],
    settings: dict[str, str],
    problems: Sequence[str] = (),
    enrolment: Sequence[str] = (),
) -> tuple[str, bool]:
    """The report and whether the run passed (no unexpected failure, no growth, no problem
    running it: ``problems`` are lines saying what went wrong, e.g. a fault that did not
    complete or instances fluxd failed to enrol; ``enrolment`` are lines saying what was checked
    and held)."""
    failed = [r for r in requests if r.error]
    causes = {id(r): explain(r, faults) for r in failed}
    unexpected = [r for r in failed if causes[id(r)] is None]
    growths = growth_checks(samples, run)
    grew = [g for g in growths if g.grew]
    passed = not unexpected and not grew and not problems and bool(growths)
    total = _count(requests, causes)
    lines = [
        "# flux soak run",
        "",
        f"Run {header.get('date', '?')}: `{settings.get('command', 'python -m benchmarks.soak')}`"
        f" — **{'PASS' if passed else 'FAIL'}**",
        "",
        *machine_lines(header, settings),
        f"{total.requests:,} requests, {total.failed:,} failed: {total.expected:,} expected "
        f"(explained by a fault), **{total.unexpected:,} unexpected**.",
        "",
    ]
    if problems:
        lines += ["## Problems", "", *(f"- {p}" for p in problems), ""]
    lines += [
        "## Faults",
        "",
        "| at (s) | fault | took (s) | requests failed around it (expected / unexpected) |",
        "|---:|---|---:|---|",
    ]
    for fault in faults:
        if fault.kind in ("instance-kill", "instance-start"):
            continue
        near = [r for r in failed if fault.start - 10 <= r.start <= fault.end + 10]
        explained = sum(causes[id(r)] is fault for r in near)
        others = sum(causes[id(r)] is None for r in near)
        detail = f" ({fault.detail})" if fault.detail else ""
        lines.append(
            f"| {fault.start:.1f} | {FAULT_KINDS[fault.kind]}{detail} | "
            f"{fault.end - fault.start:.1f} | {explained} / {others} |"
        )
    kills = [f for f in faults if f.kind == "instance-kill"]
    starts = [f for f in faults if f.kind == "instance-start"]
    cut = sum(causes[id(r)] is not None and causes[id(r)].kind == "instance-kill" for r in failed)
    lines += [
        f"| — | container churn: {len(starts)} instances started, {len(kills)} killed "
        f"(every {run.churn_interval:g} s) | — | {cut} cut exchanges / (counted in the phases) |",
        "",
        "## Requests by phase",
        "",
        "Latency: from connecting to the response's end, of the requests that succeeded.",
        "",
        "| phase | kind | requests | failed | expected | unexpected | p50 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kinds = sorted({r.kind for r in requests})
    for name, start, end in _phases(run, faults):
        for kind in kinds:
            phase = [r for r in requests if r.kind == kind and start <= r.start < end]
            counts = _count(phase, causes)
            p50, p99, top = _latencies([r.end - r.start for r in phase if not r.error])
            lines.append(
                f"| {name} | {kind} | {counts.requests:,} | {counts.failed:,} | "
                f"{counts.expected:,} | {counts.unexpected:,} | {p50} | {p99} | {top} |"
            )
    if enrolment:
        lines += ["", "Enrolment (fluxd's live instances in etcd against the containers "
                  "running, churn paused):", "", *(f"- {line}" for line in enrolment)]  # fmt: skip
    if unexpected:
        lines += ["", "Unexpected failures (first 20):", ""]
        lines += [
            f"- {r.start:.2f}{DASH}{r.end:.2f} s, {r.kind}: {r.error}" for r in unexpected[:20]
        ]
    lines += [
        "",
        "## fluxd memory and descriptors",
        "",
        f"Sampled from /proc every second. Growth compares the median of the last "
        f"{run.window:g} s of a fluxd's life with the median of its first {run.window:g} s after "
        f"a {run.warmup:g} s warm-up; the end may exceed the base by the larger of "
        f"{_mib(RSS_TOLERANCE[0])} MiB and {RSS_TOLERANCE[1]:.0%} (RSS), of "
        f"{FD_TOLERANCE[0]:g} and {FD_TOLERANCE[1]:.0%} (descriptors). A fluxd that lived less "
        "than warm-up plus two windows is not compared.",
        "",
        "| fluxd | from (s) | to (s) | RSS MiB min / median / max | descriptors min / median / "
        "max |",
        "|---:|---:|---:|---|---|",
    ]
    for index, segment in enumerate(segments(samples), start=1):
        rss = [s.rss_kib for s in segment]
        fds = [s.fds for s in segment]
        lines.append(
            f"| {index} | {segment[0].t:.0f} | {segment[-1].t:.0f} | {_mib(min(rss))} / "
            f"{_mib(statistics.median(rss))} / {_mib(max(rss))} | {min(fds)} / "
            f"{statistics.median(fds):g} / {max(fds)} |"
        )
    lines += [
        "",
        "| fluxd | metric | base window (s) | base median | final window (s) | final median "
        "| limit | verdict |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for check in growths:
        as_mib = check.metric.startswith("RSS")
        value = _mib if as_mib else (lambda v: f"{v:g}")
        lines.append(
            f"| {check.segment} | {'RSS MiB' if as_mib else check.metric} | "
            f"{check.base_window[0]:.0f}{DASH}{check.base_window[1]:.0f} | "
            f"{value(check.base)} | "
            f"{check.final_window[0]:.0f}{DASH}{check.final_window[1]:.0f} | "
            f"{value(check.final)} | {value(check.limit)} | {'GREW' if check.grew else 'ok'} |"
        )
    if not growths:
        lines.append("| — | — | no fluxd lived long enough to compare | | | | | FAIL |")
    lines += [
        "",
        "![fluxd RSS, descriptors and requests over the run](soak.png)",
        "",
        "What counts as a failure, and which failures are expected: see the docstring of "
        "benchmarks/soak_report.py (fluxd SIGKILL: requests overlapping the outage; instance "
        "kill: exchanges cut in flight; nothing else).",
        "",
    ]
    return "\n".join(lines), passed


def render_chart(
    run: Plan,
    requests: Sequence[Request],
    faults: Sequence[Fault],
    samples: Sequence[Sample],
    path: Path,
    title: str,
) -> None:
    """RSS, descriptors and requests per second (failures marked) over the run, faults as
    vertical lines, the compared windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rss_axis, fd_axis, req_axis) = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    for index, segment in enumerate(segments(samples), start=1):
        minutes = [s.t / 60 for s in segment]
        label = f"fluxd {index} (pid {segment[0].pid})"
        rss_axis.plot(minutes, [s.rss_kib / 1024 for s in segment], linewidth=0.8, label=label)
        fd_axis.plot(minutes, [s.fds for s in segment], linewidth=0.8, label=label)
    for check in growth_checks(samples, run):
        axis = rss_axis if check.metric.startswith("RSS") else fd_axis
        scale = 1024 if check.metric.startswith("RSS") else 1
        for window in (check.base_window, check.final_window):
            axis.axvspan(window[0] / 60, window[1] / 60, color="0.9")
        axis.hlines(check.limit / scale, check.final_window[0] / 60, check.final_window[1] / 60,
                    colors="red", linestyles="dashed", linewidth=0.8)  # fmt: skip
    rss_axis.set_ylabel("fluxd RSS MiB")
    fd_axis.set_ylabel("fluxd descriptors")
    fd_axis.legend(fontsize=8, loc="lower right")

    seconds = int(run.total)  # whole seconds only: the last, partial one would look like a dip
    ok = [0] * seconds
    for request in requests:
        if not request.error and 0 <= int(request.start) < seconds:
            ok[int(request.start)] += 1
    req_axis.plot([i / 60 for i in range(seconds)], ok, linewidth=0.6, color="tab:blue",
                  label="succeeded / s")  # fmt: skip
    failed = [r for r in requests if r.error]
    expected = [r for r in failed if explain(r, faults) is not None]
    unexpected = [r for r in failed if explain(r, faults) is None]
    top = max(ok, default=1)
    for group, colour, label in ((expected, "orange", "failed, expected"),
                                 (unexpected, "red", "failed, unexpected")):  # fmt: skip
        if group:
            req_axis.scatter([r.start / 60 for r in group], [top * 1.05] * len(group), s=8,
                             color=colour, label=f"{label} ({len(group)})", marker="|")  # fmt: skip
    req_axis.set_ylabel("requests / s")
    req_axis.set_xlabel("minutes into the run")
    req_axis.legend(fontsize=8, loc="lower right")
    for fault in faults:
        if fault.kind in ("instance-kill", "instance-start"):
            continue
        for axis in (rss_axis, fd_axis, req_axis):
            axis.axvline(fault.start / 60, color="0.4", linewidth=0.7, linestyle=":")
        rss_axis.annotate(FAULT_KINDS[fault.kind], (fault.start / 60, 1.0),
                          xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                          va="top", ha="right")  # fmt: skip
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
