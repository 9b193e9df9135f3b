"""From samples to the report: medians with spreads, ratios, targets, Markdown and a chart.

Pure functions over a list of samples (``{"subject", "workload", "repeat", "values"}``), so the
report can be rebuilt from a saved ``latest.raw`` without measuring again
(``python -m benchmarks --report-only``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.subjects import SUBJECTS

__all__ = [
    "METRICS",
    "WORKLOADS",
    "Summary",
    "Target",
    "machine_lines",
    "render_chart",
    "render_markdown",
    "summarise",
    "targets",
]

# workload -> what the report calls it
WORKLOADS: dict[str, str] = {
    "bulk1": "iperf3 bulk, 1 stream",
    "bulk4": "iperf3 bulk, 4 streams",
    "keepalive": "wrk keep-alive, 100-byte responses",
    "close": "wrk `Connection: close` (new connection per request)",
    "close256": "wrk `Connection: close`, 256 connections",
    "idle": "idle connections held",
    "http-keepalive": "HTTP service, wrk keep-alive",
    "http-close": "HTTP service, wrk `Connection: close`",
    "h2": "HTTP/2 (h2c), h2load, many streams per connection",
    "edge-keepalive": "published port, 20 http services by Host, wrk keep-alive",
    "edge-close": "published port, 20 http services by Host, wrk `Connection: close`",
    "sni-keepalive": "published port, 20 TLS services by server name, wrk keep-alive",
    "sni-close": "published port, 20 TLS services by server name, `Connection: close`",
    "http-keepalive-page": "HTTP service, wrk keep-alive, status page open (fetched every 2 s)",
}


TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    digits: int


_NEW_CONNECTIONS = [
    Metric("rate", "connections/s", True, 0),
    Metric("p99_ms", "p99 ms", False, 3),
    Metric("cpu_ms_per_1k", "proxy CPU ms/1k conn", False, 1),
    Metric("errors", "socket errors", False, 0),
]
_REQUESTS = [
    Metric("rate", "req/s", True, 0),
    Metric("p50_ms", "p50 ms", False, 3),
    Metric("p99_ms", "p99 ms", False, 3),
    Metric("cpu_ms_per_1k", "proxy CPU ms/1k req", False, 1),
    Metric("errors", "socket errors", False, 0),
]
_CONNECTIONS = [
    Metric("rate", "connections/s", True, 0),
    Metric("p50_ms", "p50 ms", False, 3),
    Metric("p99_ms", "p99 ms", False, 3),
    Metric("cpu_ms_per_1k", "proxy CPU ms/1k conn", False, 1),
    Metric("errors", "socket errors", False, 0),
]
METRICS: dict[str, list[Metric]] = {
    "bulk1": [
        Metric("gbit_s", "Gbit/s", True, 2),
        Metric("cpu_s_per_gb", "proxy CPU s/GB", False, 3),
    ],
    "bulk4": [
        Metric("gbit_s", "Gbit/s", True, 2),
        Metric("cpu_s_per_gb", "proxy CPU s/GB", False, 3),
    ],
    "keepalive": _REQUESTS,
    "close": _NEW_CONNECTIONS,
    "close256": _NEW_CONNECTIONS,  # the same run with 4x the connections in flight
    "http-keepalive": _REQUESTS,
    "http-close": _CONNECTIONS,
    "h2": [
        Metric("rate", "req/s", True, 0),
        Metric("p50_ms", "p50 ms", False, 3),
        Metric("p99_ms", "p99 ms", False, 3),
        Metric("cpu_ms_per_1k", "proxy CPU ms/1k req", False, 1),
        Metric("errors", "failed requests", False, 0),
    ],
    "idle": [
        Metric("held", "connections held", True, 0),
        Metric("kib_per_conn", "proxy RSS KiB/conn (after one request)", False, 2),
        Metric("kib_per_conn_open", "proxy RSS KiB/conn (never used)", False, 2),
        Metric("errors", "errors", False, 0),
    ],
    "edge-keepalive": _REQUESTS,
    "edge-close": _CONNECTIONS,
    "sni-keepalive": _REQUESTS,
    "sni-close": _CONNECTIONS,
    "http-keepalive-page": [
        *_REQUESTS,
        Metric("page_fetches", "status fetches", True, 0),
        Metric("page_kib", "status KiB read", True, 0),
        Metric("page_errors", "status fetches failed", False, 0),
    ],
}


@dataclass(frozen=True)
class Summary:
    """One metric of one subject on one workload, over the repeats."""

    median: float
    low: float
    high: float
    n: int


Table = dict[tuple[str, str, str], Summary]  # (workload, subject, metric key) -> summary


def summarise(samples: Sequence[dict[str, Any]]) -> Table:
    """Medians and min-max spreads of every numeric value, per workload, subject and metric."""
    grouped: dict[tuple[str, str, str], list[float]] = {}
    for sample in samples:
        for key, value in sample["values"].items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if numeric and math.isfinite(value):
                grouped.setdefault((sample["workload"], sample["subject"], key), []).append(
                    float(value)
                )
    return {
        key: Summary(statistics.median(values), min(values), max(values), len(values))
        for key, values in grouped.items()
    }


def _fmt(value: float, digits: int) -> str:
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _cell(summary: Summary | None, digits: int) -> str:
    if summary is None:
        return "—"
    text = _fmt(summary.median, digits)
    if summary.n > 1 and summary.low != summary.high:
        text += f" ({_fmt(summary.low, digits)}{DASH}{_fmt(summary.high, digits)})"
    return text


def _ratio(table: Table, workload: str, metric: str, a: str, b: str) -> float | None:
    top, bottom = table.get((workload, a, metric)), table.get((workload, b, metric))
    if top is None or bottom is None or bottom.median == 0:
        return None
    return top.median / bottom.median


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, checked on the medians of this run."""

    name: str
    measured: str
    threshold: str
    met: bool | None  # None: not measured in this run, or informational
    informational: bool = False  # a figure to read, with no threshold to meet


def _better_peer(
    table: Table, workload: str, metric: str, peers: Sequence[str], lowest: bool = False
) -> str | None:
    """The peer with the highest median (``lowest``: the lowest), of those measured."""
    present = [p for p in peers if (workload, p, metric) in table]
    if not present:
        return None
    pick = min if lowest else max
    return pick(present, key=lambda p: table[(workload, p, metric)].median)


_HAPROXY_TCP = ["haproxy-tcp", "haproxy-splice", "haproxy-tcp-2t"]
_TCP_PEERS = ["haproxy-tcp", "haproxy-splice", "nginx"]


# "The Cython engine beats the pure-Python fallback relay on every workload."
ENGINE_CHECKS = [
    ("bulk1", "gbit_s", "bulk 1 stream Gbit/s", True),
    ("bulk4", "gbit_s", "bulk 4 streams Gbit/s", True),
    ("keepalive", "rate", "keep-alive req/s", True),
    ("close", "rate", "new connections/s", True),
    ("idle", "kib_per_conn", "RSS per idle connection", False),
]


def targets(table: Table, idle_count: int) -> list[Target]:
    """The issues' targets (and a few figures to read), as ratios of medians from this run."""
    out: list[Target] = []

    def ratio_target(
        name: str,
        workload: str,
        metric: str,
        peer: str | None,
        bound: float,
        at_least: bool,
        subject: str = "fluxd",
    ) -> None:
        value = None if peer is None else _ratio(table, workload, metric, subject, peer)
        sign = "≥" if at_least else "≤"
        threshold = f"{sign} {bound:.2f}{TIMES} {SUBJECTS.get(peer or '', peer or '?')}"
        if value is None:
            out.append(Target(name, "not measured", threshold, None))
        else:
            met = value >= bound if at_least else value <= bound
            out.append(Target(name, f"{value:.2f}{TIMES}", threshold, met))

    # The multi-threaded engine issue's targets (issue 11).
    ratio_target("new connection per request: conn/s", "close", "rate", "haproxy-tcp-2t", 1.0, True)
    leanest = _better_peer(table, "close", "cpu_ms_per_1k", _HAPROXY_TCP, lowest=True)
    ratio_target(
        "new connection per request: proxy CPU per connection vs the leanest HAProxy tcp variant"
        " (1 thread, splice, 2 threads)",
        "close", "cpu_ms_per_1k", leanest, 1.0, False,
    )  # fmt: skip
    # The accept path issue's (issue 20): 4x the connections in flight.
    ratio_target(
        "new connection per request, 256 connections: conn/s", "close256", "rate",
        "haproxy-tcp-2t", 1.0, True,
    )  # fmt: skip
    ratio_target(
        "new connection per request, 256 connections: p99", "close256", "p99_ms",
        "haproxy-tcp-2t", 1.1, False,
    )  # fmt: skip
    ratio_target(
        "HTTP keep-alive: req/s", "http-keepalive", "rate", "haproxy-http", 1.0, True, "fluxd-http"
    )
    ratio_target(
        "HTTP Connection: close: conn/s", "http-close", "rate", "haproxy-http-2t", 1.0, True,
        "fluxd-http",
    )  # fmt: skip
    ratio_target("bulk 1 stream: Gbit/s", "bulk1", "gbit_s", "haproxy-splice", 1.35, True)
    ratio_target(
        "bulk 1 stream: proxy CPU per GB", "bulk1", "cpu_s_per_gb", "haproxy-splice", 0.35, False
    )
    best = _better_peer(table, "keepalive", "rate", _TCP_PEERS)
    ratio_target(
        "keep-alive: req/s vs the best TCP peer (HAProxy tcp, HAProxy splice, nginx stream)",
        "keepalive",
        "rate",
        best,
        1.0,
        True,
    )
    held = table.get(("idle", "fluxd", "held"))
    errors = table.get(("idle", "fluxd", "errors"))
    per_conn = table.get(("idle", "fluxd", "kib_per_conn"))
    if held is None or errors is None:
        out.append(Target(f"{idle_count:,} idle connections", "not measured", "", None))
    else:
        rss = "" if per_conn is None else f", {per_conn.median:.1f} KiB/conn"
        out.append(
            Target(
                f"{idle_count:,} idle connections held, no errors",
                f"{held.low:,.0f} held (worst run), {errors.high:.0f} errors{rss}",
                f"{idle_count:,} held, 0 errors",
                held.low >= idle_count and errors.high == 0,
            )
        )
    if per_conn is None:
        out.append(Target(f"{idle_count:,} idle connections: RSS", "not measured", "", None))
    else:
        out.append(
            Target(
                f"{idle_count:,} idle connections: proxy RSS per connection (after one request)",
                f"{per_conn.median:.2f} KiB",
                "≤ 1.00 KiB",
                per_conn.median <= 1.0,
            )
        )
    # HTTP/2 services (issue 17): what observing the streams costs, and HAProxy h2 as the peer.
    ratio_target(
        "HTTP/2 observing cost: req/s, http service vs the same traffic through a tcp service",
        "h2", "rate", "fluxd", 0.90, True, "fluxd-http",
    )  # fmt: skip
    ratio_target(
        "HTTP/2 through an http service: req/s", "h2", "rate", "haproxy-h2", 1.0, True, "fluxd-http"
    )
    # At the edge (issue 18): 20 http services on one published port by Host against HAProxy's
    # host map, the published path against the VIP path of the same fluxd, and TLS
    # passthrough by server name against HAProxy's req.ssl_sni (figures, no threshold).
    ratio_target(
        "published port, 20 services by Host, keep-alive: req/s", "edge-keepalive", "rate",
        "haproxy-edge", 1.0, True, "fluxd-http",
    )  # fmt: skip
    ratio_target(
        "published port, 20 services by Host, Connection: close: conn/s", "edge-close", "rate",
        "haproxy-edge-2t", 1.0, True, "fluxd-http",
    )  # fmt: skip
    for edge, vip, label in (
        ("edge-keepalive", "http-keepalive", "keep-alive req/s"),
        ("edge-close", "http-close", "Connection: close conn/s"),
    ):
        published, floating = (
            table.get((edge, "fluxd-http", "rate")),
            table.get((vip, "fluxd-http", "rate")),
        )
        name = f"published path vs VIP path, same fluxd (http service): {label}"
        if published is None or floating is None or floating.median == 0:
            out.append(Target(name, "not measured", f"≥ 0.95{TIMES}", None))
        else:
            value = published.median / floating.median
            out.append(Target(name, f"{value:.2f}{TIMES}", f"≥ 0.95{TIMES}", value >= 0.95))
    # The status page (issue 19): keep-alive with it open against without, the same fluxd.
    opened = table.get(("http-keepalive-page", "fluxd-http", "rate"))
    closed = table.get(("http-keepalive", "fluxd-http", "rate"))
    out.append(
        Target(
            "status page open (fetched every 2 s): HTTP keep-alive req/s, with vs without",
            "not measured"
            if opened is None or closed is None or closed.median == 0
            else f"{opened.median / closed.median:.2f}{TIMES}",
            "no target; within the run's noise",
            None,
            informational=True,
        )
    )
    for workload, peer, label in (
        ("sni-keepalive", "haproxy-sni", "keep-alive req/s"),
        ("sni-close", "haproxy-sni", "Connection: close conn/s"),
        ("sni-close", "haproxy-sni-2t", "Connection: close conn/s"),
    ):
        value = _ratio(table, workload, "rate", "fluxd", peer)
        out.append(
            Target(
                f"TLS passthrough by server name, 20 services: {label}",
                "not measured" if value is None else f"{value:.2f}{TIMES}",
                f"no target; fluxd ÷ {SUBJECTS[peer]}",
                None,
                informational=True,
            )
        )
    # Earlier issues' targets, still checked: the data path and HTTP services.
    ratio_target("bulk 4 streams: Gbit/s", "bulk4", "gbit_s", "haproxy-splice", 1.35, True)
    ratio_target("keep-alive: p99 vs the best TCP peer", "keepalive", "p99_ms", best, 1.0, False)
    best_http = _better_peer(table, "http-keepalive", "rate", ["haproxy-http", "nginx-http"])
    ratio_target(
        "HTTP keep-alive: p99 vs the better of HAProxy http and nginx proxy_pass",
        "http-keepalive", "p99_ms", best_http, 1.0, False, "fluxd-http",
    )  # fmt: skip
    ratio_target(
        "HTTP metrics cost: http service vs the same traffic through a tcp service",
        "http-keepalive", "rate", "fluxd", 0.95, True, "fluxd-http",
    )  # fmt: skip
    for workload, metric, label, higher in ENGINE_CHECKS:
        name = f"engine vs Python relay: {label}"
        value = _ratio(table, workload, metric, "fluxd", "fluxd-python")
        if value is None:
            out.append(Target(name, "not measured", "", None))
            continue
        met = value > 1.0 if higher else value < 1.0
        out.append(
            Target(
                name, f"{value:.2f}{TIMES}", f"> 1.00{TIMES}" if higher else f"< 1.00{TIMES}", met
            )
        )
    for name, workload, peer in SCALING_FIGURES:
        value = _ratio(table, workload, "rate", "fluxd", peer)
        measured = "not measured" if value is None else f"{value:.2f}{TIMES}"
        wanted = f"no target; fluxd ÷ {SUBJECTS[peer]}"
        out.append(Target(name, measured, wanted, None, informational=True))
    return out


# Figures to read beside the targets: what the default engine threads gain over one, and what
# steering by CPU (the default) gains over the kernel's hash.
SCALING_FIGURES = [
    ("engine threads: new connections/s, fluxd on its default vs 1 engine thread", "close",
     "fluxd-1t"),
    ("engine threads steered by CPU: new connections/s, fluxd on its default vs"
     " -engine-steer hash", "close", "fluxd-hash"),
    ("engine threads steered by CPU, 256 connections: conn/s, fluxd on its default vs"
     " -engine-steer hash", "close256", "fluxd-hash"),
]  # fmt: skip


def noise(samples: Sequence[dict[str, Any]]) -> list[str]:
    """What the machine did besides the suite, as notes for the report."""
    notes = []
    other = [
        (s["values"]["other_cpu_s"], s["workload"], s["subject"])
        for s in samples
        if "other_cpu_s" in s["values"]
    ]
    if other:
        worst = max(other)
        notes.append(
            "CPU used by anything but the suite's processes during a run (other work on the "
            "machine, kernel threads such as ksoftirqd): median "
            f"{statistics.median(o[0] for o in other):.2f} CPU s per run, most "
            f"{worst[0]:.2f} s ({worst[1]} through {worst[2]})"
        )
    counted = [
        (s["values"]["counted"], s["values"].get("requests", 0), s["workload"])
        for s in samples
        if s["subject"] == "fluxd-http" and "counted" in s["values"]
    ]
    for workload in sorted({w for _c, _r, w in counted}):
        runs = [(c, r) for c, r, w in counted if w == workload]
        # wrk stops counting at its deadline with up to one request per connection in flight;
        # h2load with up to its streams per connection.
        tool, in_flight = ("h2load", "its streams") if workload == "h2" else ("wrk", "one request")
        notes.append(
            f"fluxd (http service) metrics, {workload}: flux_http_total grew by "
            + ", ".join(f"{c:,.0f}" for c, _r in runs)
            + f" while {tool} counted "
            + ", ".join(f"{r:,.0f}" for _c, r in runs)
            + f" requests ({tool} stops counting at its deadline with up to {in_flight} per"
            " connection in flight)"
        )
    # wrk counts no error for a connection that never answers within its run (its 5 s timeout
    # outlasts a short run): a stalled proxy shows as a 0 rate with 0 errors, so name it.
    stalled = [
        f"{s['workload']} through {s['subject']} (repeat {s['repeat'] + 1})"
        for s in samples
        if s["values"].get("requests", 1) == 0
    ]
    if stalled:
        notes.append("no request completed in: " + ", ".join(stalled))
    drops = [
        (s["values"]["conntrack_drops"], s["workload"], s["subject"])
        for s in samples
        if s["values"].get("conntrack_drops")
    ]
    if drops:
        runs = ", ".join(f"{w} through {n}: {d:.0f}" for d, w, n in drops)
        notes.append(f"connection tracking dropped packets (table full?) in: {runs}")
    return notes


def _subjects_present(table: Table) -> list[str]:
    present = {subject for (_w, subject, _m) in table}
    return [name for name in SUBJECTS if name in present]


def machine_lines(machine: dict[str, str], settings: dict[str, Any]) -> list[str]:
    """A report's machine table and settings line (the date and command go in its title)."""
    return [
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in machine.items() if key != "date"),
        "",
        "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items() if k != "command") + ".",
        "",
    ]


def render_markdown(
    table: Table,
    machine: dict[str, str],
    settings: dict[str, Any],
    notes: Sequence[str] = (),
) -> str:
    """The whole report as Markdown (``notes`` should include :func:`noise`)."""
    subjects = _subjects_present(table)
    lines = [
        "# flux benchmarks",
        "",
        f"Run {machine.get('date', '?')}: `{settings.get('command', 'python -m benchmarks')}`",
        "",
        *machine_lines(machine, settings),
        f"Every figure is the median of the repeats, with the spread (min{DASH}max) in brackets. "
        "CPU and RSS are the proxy's own processes (fluxd: the whole process, engine threads "
        "included); load generators and backends share the same cores for every subject.",
        "",
        "## Results",
        "",
        "| workload | metric | " + " | ".join(SUBJECTS[s] for s in subjects) + " |",
        "|---|---|" + "---:|" * len(subjects),
    ]
    for workload, metrics in METRICS.items():
        for metric in metrics:
            if not any((workload, s, metric.key) in table for s in subjects):
                continue
            cells = [_cell(table.get((workload, s, metric.key)), metric.digits) for s in subjects]
            lines.append(f"| {WORKLOADS[workload]} | {metric.label} | " + " | ".join(cells) + " |")
    peers = [s for s in subjects if s != "fluxd"]
    lines += [
        "",
        "## fluxd relative to each peer (ratio of medians)",
        "",
        "Above 1 is better for rates; below 1 is better for CPU, latency and memory.",
        "",
        "| workload | metric | " + " | ".join(f"÷ {SUBJECTS[p]}" for p in peers) + " |",
        "|---|---|" + "---:|" * len(peers),
    ]
    for workload, metrics in METRICS.items():
        for metric in metrics:
            if metric.key in ("errors", "held"):
                continue
            if (workload, "fluxd", metric.key) not in table:
                continue
            cells = []
            for peer in peers:
                value = _ratio(table, workload, metric.key, "fluxd", peer)
                cells.append("—" if value is None else f"{value:.2f}{TIMES}")
            lines.append(f"| {WORKLOADS[workload]} | {metric.label} | " + " | ".join(cells) + " |")
    http_peers = [s for s in subjects if s != "fluxd-http"]
    http_rows = [
        (workload, metric)
        for workload in ("http-keepalive", "http-close", "h2", "edge-keepalive", "edge-close")
        for metric in METRICS[workload]
        if metric.key != "errors" and (workload, "fluxd-http", metric.key) in table
    ]
    if http_rows:
        lines += [
            "",
            "## fluxd with an http service relative to each peer (ratio of medians)",
            "",
            "| workload | metric | " + " | ".join(f"÷ {SUBJECTS[p]}" for p in http_peers) + " |",
            "|---|---|" + "---:|" * len(http_peers),
        ]
        for workload, metric in http_rows:
            cells = []
            for peer in http_peers:
                value = _ratio(table, workload, metric.key, "fluxd-http", peer)
                cells.append("—" if value is None else f"{value:.2f}{TIMES}")
            lines.append(f"| {WORKLOADS[workload]} | {metric.label} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", "| target | measured | wanted | |", "|---|---:|---|---|"]
    for target in targets(table, int(settings.get("idle connections", 5000))):
        mark = {True: "PASS", False: "MISS", None: "—"}[target.met]
        if target.informational:
            mark = "figure"
        lines.append(f"| {target.name} | {target.measured} | {target.threshold} | {mark} |")
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    lines.append("")
    return "\n".join(lines)


CHART_CAP = 4.0  # ratios above this are drawn clipped, labelled with their value


def render_chart(table: Table, path: Path, title: str) -> None:
    """A grouped bar chart of every subject relative to HAProxy tcp, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = "haproxy-tcp"
    subjects = [s for s in _subjects_present(table) if s != reference]
    panels: list[tuple[str, list[tuple[str, str, str]]]] = [
        (
            "throughput ÷ HAProxy tcp (higher is better)",
            [
                ("bulk1", "gbit_s", "bulk 1 stream"),
                ("bulk4", "gbit_s", "bulk 4 streams"),
                ("keepalive", "rate", "keep-alive req/s"),
                ("close", "rate", "new conn/s"),
                ("close256", "rate", "new conn/s, 256 conns"),
            ],
        ),
        (
            "cost ÷ HAProxy tcp (lower is better)",
            [
                ("bulk1", "cpu_s_per_gb", "CPU/GB, 1 stream"),
                ("bulk4", "cpu_s_per_gb", "CPU/GB, 4 streams"),
                ("keepalive", "cpu_ms_per_1k", "CPU/req, keep-alive"),
                ("keepalive", "p99_ms", "p99, keep-alive"),
                ("close", "cpu_ms_per_1k", "CPU/conn, close"),
                ("close256", "cpu_ms_per_1k", "CPU/conn, 256 conns"),
                ("idle", "kib_per_conn", "RSS/idle conn"),
            ],
        ),
    ]
    figure, axes = plt.subplots(2, 1, figsize=(12, 9))
    colours = plt.get_cmap("tab10")
    for axis, (panel_title, groups) in zip(axes, panels, strict=True):
        width = 0.8 / max(1, len(subjects))
        for index, subject in enumerate(subjects):
            xs, ys = [], []
            for position, (workload, metric, _label) in enumerate(groups):
                value = _ratio(table, workload, metric, subject, reference)
                if value is not None:
                    xs.append(position + (index - (len(subjects) - 1) / 2) * width)
                    ys.append(value)
            # An outlier (a p99 hit by a stall) would flatten every other bar: clip, keep label.
            shown = [min(value, CHART_CAP) for value in ys]
            bars = axis.bar(xs, shown, width, label=SUBJECTS[subject], color=colours(index))
            for bar, value in zip(bars, ys, strict=True):
                axis.annotate(
                    f"{value:.2f}" + ("+" if value > CHART_CAP else ""),
                    (bar.get_x() + bar.get_width() / 2, min(value, CHART_CAP)),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                )
        axis.set_ylim(0, CHART_CAP * 1.12)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(groups)), [label for _w, _m, label in groups])
        axis.set_title(panel_title)
        axis.set_ylabel("ratio")
        axis.legend(fontsize=8, ncol=3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
