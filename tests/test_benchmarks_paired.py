"""The benchmarks' paired mode (``python -m benchmarks --pair A B``): its arithmetic on made-up
samples and its command line.  (The runs themselves need the machine; benchmarks/README.md.)"""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks.__main__ import PAIR_WORKLOADS, main, parse
from benchmarks.paired import render_pairs, summarise_pairs


def _samples(rows: list[tuple[int, str, str, dict[str, float]]]) -> list[dict[str, Any]]:
    return [
        {"pair": pair, "subject": subject, "workload": workload, "values": values}
        for pair, subject, workload, values in rows
    ]


def test_each_figure_is_the_median_of_the_per_pair_ratios_with_its_quartiles() -> None:
    # Rates drift (the machine), ratios hold: 1.10, 1.00, 1.20, 1.05, 0.90 -> median 1.05.
    pairs = [(1100, 1000), (2000, 2000), (600, 500), (1050, 1000), (900, 1000)]
    samples = _samples(
        [(i, "fluxd", "close", {"rate": a, "cpu_ms_per_1k": 100.0, "p99_ms": 10.0})
         for i, (a, _) in enumerate(pairs)]
        + [(i, "haproxy-tcp-2t", "close", {"rate": b, "cpu_ms_per_1k": 125.0, "p99_ms": 8.0})
           for i, (_, b) in enumerate(pairs)]
    )  # fmt: skip
    rows = {row.figure: row for row in summarise_pairs(samples, "fluxd", "haproxy-tcp-2t")}
    rate = rows["rate"]
    assert rate.median == pytest.approx(1.05) and rate.pairs == 5
    assert (rate.low, rate.high) == (pytest.approx(1.0), pytest.approx(1.1))
    # The sides' own medians, beside the ratio (a median of ratios is not a ratio of medians).
    assert (rate.a, rate.b) == (1050, 1000)
    assert rows["proxy CPU per request"].median == pytest.approx(0.8)
    assert rows["p99"].median == pytest.approx(1.25)


def test_a_pair_missing_a_side_or_a_figure_is_left_out() -> None:
    samples = _samples([
        (0, "fluxd", "bulk1", {"gbit_s": 10.0, "cpu_s_per_gb": 0.3}),
        (0, "haproxy-splice", "bulk1", {"gbit_s": 8.0, "cpu_s_per_gb": 1.0}),
        (1, "fluxd", "bulk1", {"gbit_s": 12.0}),  # its CPU figure missing
        (1, "haproxy-splice", "bulk1", {"gbit_s": 6.0, "cpu_s_per_gb": 1.2}),
        (2, "fluxd", "bulk1", {"gbit_s": 99.0, "cpu_s_per_gb": 9.9}),  # its partner failed
    ])  # fmt: skip
    rows = {row.figure: row for row in summarise_pairs(samples, "fluxd", "haproxy-splice")}
    assert rows["Gbit/s"].pairs == 2 and rows["Gbit/s"].median == pytest.approx(1.625)
    assert rows["proxy CPU per GB"].pairs == 1
    assert rows["proxy CPU per GB"].median == pytest.approx(0.3)
    text = render_pairs(list(rows.values()), "fluxd", "haproxy-splice", {"command": "c"})
    x, dash = "\N{MULTIPLICATION SIGN}", "\N{EN DASH}"
    assert (
        f"| iperf3 bulk, 1 stream | Gbit/s | 1.625{x} | 1.438{dash}1.812 | 2 | 11.00 | 7.00 |"
        in text
    )


def test_the_command_line_takes_two_different_tcp_subjects_and_tcp_workloads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse(["--pair", "fluxd", "fluxd-hash"])
    assert args.pair == ["fluxd", "fluxd-hash"]
    assert args.workloads == [w for w in PAIR_WORKLOADS if w != "bulk4"]
    for argv, said in (
        (["--pair", "fluxd", "fluxd"], "--pair needs two different subjects, got fluxd twice"),
        (["--pair", "fluxd", "haproxy-h2"], "invalid choice: 'haproxy-h2'"),
        (["--pair", "fluxd", "nginx", "--workloads", "close", "h2"],
         "--pair measures close close256 keepalive bulk1 bulk4, not h2"),
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            parse(argv)
        assert said in capsys.readouterr().err, argv
    with pytest.raises(SystemExit, match="the \\*-base subjects need --baseline DIR"):
        main(["--pair", "fluxd", "fluxd-base"])
