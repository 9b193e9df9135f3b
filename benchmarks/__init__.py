"""Benchmarks for flux: ``python -m benchmarks`` (the suite, ``make bench``) and probes.

The suite's parts: :mod:`benchmarks.system` (what /proc says), :mod:`benchmarks.subjects` (the
backends and proxies as processes), :mod:`benchmarks.workloads` (iperf3, wrk, idle
connections), :mod:`benchmarks.report` (medians, ratios, targets, Markdown, chart) and
:mod:`benchmarks.suite` (the run).
"""
