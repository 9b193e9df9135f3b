"""Paired runs (``python -m benchmarks --pair A B``): two subjects up at once, short runs
alternating (A then B, then B then A, ...), and for each workload the median of the per-pair
ratios A ÷ B with its interquartile range.

On a shared 2-core machine a saturated rate moves by 8 to 15 % between runs of the same build,
so two unpaired medians of 3 cannot show a 5 % effect: the same pair measured twice that way
has come out 7 % up and 9 % down.  Runs next to each other see the same machine, so their ratio
is steady where the rates are not.  Writes ``paired.md`` (and ``paired.raw``, the samples) in
the results directory; the full run's ``latest.*`` are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import report, workloads
from benchmarks.subjects import SUBJECTS, start_backends, start_subject
from benchmarks.suite import Settings, _progress, check_tools, run_once, sysctls_on

# The figures compared, per workload: (values key, label, higher is better).
_FIGURES = {
    "bulk1": [("gbit_s", "Gbit/s", True), ("cpu_s_per_gb", "proxy CPU per GB", False)],
    "bulk4": [("gbit_s", "Gbit/s", True), ("cpu_s_per_gb", "proxy CPU per GB", False)],
}
_WRK = [("rate", "rate", True), ("cpu_ms_per_1k", "proxy CPU per request", False),
        ("p99_ms", "p99", False)]  # fmt: skip


@dataclass(frozen=True)
class PairedRow:
    """One workload's figure: A ÷ B per pair, summarised; and each side's median."""

    workload: str
    figure: str
    median: float
    low: float  # the first quartile of the ratios
    high: float  # the third
    pairs: int
    a: float
    b: float


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    if len(ordered) < 2:
        return ordered[0], ordered[0]
    low, _, high = statistics.quantiles(ordered, n=4, method="inclusive")
    return low, high


def summarise_pairs(samples: Sequence[dict[str, Any]], a: str, b: str) -> list[PairedRow]:
    """Rows per workload and figure from paired samples (``pair`` numbers which runs go
    together); a pair missing either side, or a figure either lacks, is left out."""
    rows = []
    workloads_seen = list(dict.fromkeys(s["workload"] for s in samples))
    for workload in workloads_seen:
        by_pair: dict[int, dict[str, dict[str, Any]]] = {}
        for sample in samples:
            if sample["workload"] == workload:
                by_pair.setdefault(sample["pair"], {})[sample["subject"]] = sample["values"]
        for key, label, _higher in _FIGURES.get(workload, _WRK):
            both = [
                (sides[a][key], sides[b][key])
                for _, sides in sorted(by_pair.items())
                if a in sides and b in sides and key in sides[a] and key in sides[b]
                and sides[b][key]
            ]  # fmt: skip
            if not both:
                continue
            ratios = [x / y for x, y in both]
            low, high = _quartiles(ratios)
            rows.append(
                PairedRow(
                    workload,
                    label,
                    statistics.median(ratios),
                    low,
                    high,
                    len(both),
                    statistics.median(x for x, _ in both),
                    statistics.median(y for _, y in both),
                )
            )
    return rows


def render_pairs(rows: Sequence[PairedRow], a: str, b: str, described: dict[str, Any]) -> str:
    """The paired report in Markdown."""
    x = report.TIMES
    lines = [
        f"# Paired runs: {SUBJECTS.get(a, a)} ÷ {SUBJECTS.get(b, b)}",
        "",
        "Both up at once, short runs alternating; the median of the per-pair ratios and its"
        " interquartile range.",
        "",
        *(f"- {key}: {value}" for key, value in described.items()),
        "",
        f"| workload | figure | {a} ÷ {b} | IQR | pairs | {a} | {b} |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {report.WORKLOADS.get(row.workload, row.workload)} | {row.figure}"
            f" | {row.median:.3f}{x} | {row.low:.3f}\N{EN DASH}{row.high:.3f} | {row.pairs}"
            f" | {row.a:,.2f} | {row.b:,.2f} |"
        )
    return "\n".join(lines) + "\n"


async def measure_pairs(
    settings: Settings, a: str, b: str, workdir: Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """Start both subjects, then ``settings.repeat`` pairs of each workload; samples carry
    their pair number.  A failed run is a note, and its pair is left out."""
    samples: list[dict[str, Any]] = []
    notes: list[str] = []
    async with AsyncExitStack() as stack:
        backends = await start_backends(stack, workdir)
        running = {}
        for name in (a, b):
            _progress(f"starting {name}")
            running[name] = await start_subject(stack, name, workdir, backends, settings.baseline)
            with contextlib.suppress(workloads.RunError):
                await workloads.keepalive(
                    running[name], workdir, 1, settings.connections, settings.threads
                )
        for pair in range(settings.repeat):
            for workload in settings.workloads:
                for name in (a, b) if pair % 2 == 0 else (b, a):
                    values = await run_once(
                        workload, running[name], backends, settings, workdir, notes,
                        f"pair {pair + 1}", f"pair {pair + 1}/{settings.repeat}",
                    )  # fmt: skip
                    if values is not None:
                        samples.append(
                            {"subject": name, "workload": workload, "pair": pair, "values": values}
                        )
                    await asyncio.sleep(0.5)  # let the last connections close
    return samples, notes


def run_pairs(settings: Settings, a: str, b: str) -> int:
    """The paired mode; exit status 0 when every run produced a figure."""
    import uvloop

    check_tools(settings)
    began = time.monotonic()
    with sysctls_on() as changed, tempfile.TemporaryDirectory(prefix="flux-pair-") as tmp:
        try:
            samples, notes = uvloop.run(measure_pairs(settings, a, b, Path(tmp)))
        except RuntimeError as exc:  # a subject or backend that would not start
            _progress(f"benchmarks: {exc}")
            return 1
    described = {
        **{k: v for k, v in settings.described().items() if not k.startswith(("idle", "h2load"))},
        **{f"kernel setting for the run: {k}": v for k, v in changed.items()},
        "whole run": f"{(time.monotonic() - began) / 60:.1f} minutes",
    }
    described["repeats"] = f"{settings.repeat} pairs"
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "paired.raw").write_text(
        json.dumps({"a": a, "b": b, "settings": described, "notes": notes, "samples": samples})
    )
    markdown = render_pairs(summarise_pairs(samples, a, b), a, b, described)
    if notes:
        markdown += "\n## Notes\n" + "".join(f"- {note}\n" for note in notes)
    (settings.out / "paired.md").write_text(markdown)
    print(markdown)
    _progress(f"wrote {settings.out / 'paired.md'} (raw samples: {settings.out / 'paired.raw'})")
    return 1 if notes else 0
