"""fluxd's Prometheus metrics: counters fed by hooks, collectors built at scrape time, the
``/metrics``, ``/healthz`` and ``/status`` endpoint with its history, and the target's
advertisement in etcd.

- :mod:`flux.metrics.summary`: sliding-window latency summaries on HDR histograms (pure);
- :mod:`flux.metrics.counters`: :class:`Metrics` (the hooks) and :class:`FluxCollector`;
- :mod:`flux.metrics.history`: the ring of samples behind ``/status/history`` and the figures
  of ``/status`` (pure);
- :mod:`flux.metrics.status`: the ``services`` rows of ``/status`` (pure);
- :mod:`flux.metrics.cluster`: ``?scope=cluster``, every advertised fluxd's answer merged;
- :mod:`flux.metrics.server`: :class:`MetricsPlugin`, the daemon plugin serving the endpoint.
"""

from flux.metrics.counters import FluxCollector, Metrics
from flux.metrics.server import MetricsListenError, MetricsPlugin, build_registry
from flux.metrics.summary import SlidingSummary

__all__ = [
    "FluxCollector",
    "Metrics",
    "MetricsListenError",
    "MetricsPlugin",
    "SlidingSummary",
    "build_registry",
]
