"""``python -m benchmarks``: fluxd against direct, HAProxy and nginx on this machine.

See benchmarks/README.md.  Needs root (fluxd installs iptables rules), wrk, iperf3, haproxy,
nginx with its stream module and etcd; ``make bench`` installs them and runs this.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.subjects import BASELINE_SUBJECTS, SUBJECTS  # light: no flux, no matplotlib

WORKLOADS = ["bulk1", "bulk4", "keepalive", "close", "close256", "idle", "http-keepalive",
             "http-close", "h2", "edge-keepalive", "edge-close", "sni-keepalive",
             "sni-close", "http-keepalive-page"]  # fmt: skip
H2_MAX_STREAMS = 100  # nghttpd's and HAProxy's concurrent streams per connection
# --pair: the tcp service's workloads, and the subjects that serve them.
PAIR_WORKLOADS = ["close", "close256", "keepalive", "bulk1", "bulk4"]
PAIR_SUBJECTS = [
    s for s in SUBJECTS
    if s not in ("fluxd-http", "fluxd-http-base")
    and not s.startswith(("haproxy-http", "haproxy-h2", "haproxy-edge", "haproxy-sni", "nginx-"))
]  # fmt: skip


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark fluxd (TCP service) against direct connections, HAProxy 2.6 "
        "(mode tcp, with and without splice) and nginx stream: iperf3 bulk, wrk keep-alive and "
        "Connection: close (64 and 256 connections), idle connections, HTTP services against "
        "HAProxy http and nginx proxy_pass, HTTP/2 (h2load) against HAProxy h2, and a published "
        "port shared by 20 services by Host and by TLS server name against HAProxy and nginx.  "
        "Writes "
        "benchmarks/results/latest.md, latest.png and latest.raw (the samples).",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 3-second loads")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help="runs of each workload per subject (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--bulk-seconds",
        type=float,
        default=None,
        metavar="S",
        help="iperf3 duration (default 6; 3 with --quick)",
    )
    parser.add_argument(
        "--wrk-seconds",
        type=float,
        default=None,
        metavar="S",
        help="wrk duration (default 6; 3 with --quick)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=64,
        metavar="N",
        help="wrk connections (default 64; the close256 workload always uses 256)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, metavar="N", help="wrk threads (default 2)"
    )
    parser.add_argument(
        "--h2-seconds",
        type=float,
        default=None,
        metavar="S",
        help="h2load duration on the h2 workload (default 6; 3 with --quick)",
    )
    parser.add_argument(
        "--h2-connections",
        type=int,
        default=32,
        metavar="N",
        help="h2load connections on the h2 workload (default 32)",
    )
    parser.add_argument(
        "--h2-streams",
        type=int,
        default=50,
        metavar="N",
        help="h2load requests in flight on each connection (-m) on the h2 workload (default 50, "
        f"at most {H2_MAX_STREAMS})",
    )
    parser.add_argument(
        "--idle",
        type=int,
        default=5000,
        metavar="N",
        help="idle connections to hold through each proxy (default 5000)",
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=WORKLOADS,
        default=WORKLOADS,
        metavar="W",
        help=f"workloads to run (default all: {' '.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--subjects",
        nargs="+",
        choices=list(SUBJECTS),
        default=None,
        metavar="S",
        help="what to measure (default all but the baseline build's, which --baseline adds: "
        f"{' '.join(SUBJECTS)})",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="DIR",
        help="another flux checkout with its engine built (e.g. a git worktree at the commit "
        "before a change): adds fluxd-base and fluxd-http-base, fluxd run from that tree, on "
        "bulk1, keepalive, close, http-keepalive, http-close and h2, so the report shows fluxd "
        "relative to that build in the same run",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where to write the results (default benchmarks/results)",
    )
    parser.add_argument(
        "--pair",
        nargs=2,
        choices=PAIR_SUBJECTS,
        default=None,
        metavar=("A", "B"),
        help="paired runs instead of the full suite: only A and B, both up at once, short runs "
        "alternating; per workload the median of the ratios A ÷ B and its interquartile range, "
        "in paired.md (--repeat pairs, default 8; 3-second loads; workloads "
        f"{' '.join(PAIR_WORKLOADS)}, default all but bulk4; subjects {' '.join(PAIR_SUBJECTS)})",
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG (no matplotlib)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild latest.md and latest.png from latest.raw, measuring nothing",
    )
    args = parser.parse_args(argv)
    if args.pair is not None:
        a, b = args.pair
        if a == b:
            parser.error(f"--pair needs two different subjects, got {a} twice")
        if args.workloads is WORKLOADS:
            args.workloads = [w for w in PAIR_WORKLOADS if w != "bulk4"]
        other = [w for w in args.workloads if w not in PAIR_WORKLOADS]
        if other:
            parser.error(f"--pair measures {' '.join(PAIR_WORKLOADS)}, not {' '.join(other)}")
    for name in ("repeat", "connections", "threads", "idle", "h2_connections", "h2_streams"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            flag = name.replace("_", "-")
            parser.error(f"--{flag} must be at least 1, got {getattr(args, name)}")
    if args.h2_streams > H2_MAX_STREAMS:
        parser.error(f"--h2-streams must be at most {H2_MAX_STREAMS}, got {args.h2_streams}")
    for name in ("bulk_seconds", "wrk_seconds", "h2_seconds"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 600:
            parser.error(f"--{name.replace('_', '-')} must be 1 to 600 seconds, got {value:g}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    # Heavy imports (flux, matplotlib) only once the arguments are known good.
    from benchmarks.suite import RESULTS, Settings, command_line, report_only, run

    quick = args.quick or args.pair is not None
    subjects = args.pair or args.subjects or [
        s for s in SUBJECTS if args.baseline is not None or s not in BASELINE_SUBJECTS
    ]
    if args.baseline is None and set(subjects) & set(BASELINE_SUBJECTS):
        raise SystemExit("benchmarks: the *-base subjects need --baseline DIR")
    settings = Settings(
        repeat=args.repeat or (8 if args.pair else 1 if quick else 3),
        bulk_seconds=args.bulk_seconds or (3.0 if quick else 6.0),
        wrk_seconds=args.wrk_seconds or (3.0 if quick else 6.0),
        h2_seconds=args.h2_seconds or (3.0 if quick else 6.0),
        h2_connections=args.h2_connections,
        h2_streams=args.h2_streams,
        connections=args.connections,
        threads=args.threads,
        idle_count=args.idle,
        workloads=list(dict.fromkeys(args.workloads)),
        subjects=list(dict.fromkeys(subjects)),
        baseline=args.baseline.resolve() if args.baseline else None,
        out=args.out or RESULTS,
        chart=not args.no_chart,
        command=command_line(argv),
    )
    if args.report_only:
        return report_only(settings)
    if args.pair is not None:
        from benchmarks.paired import run_pairs

        settings.chart = False
        return run_pairs(settings, *args.pair)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
