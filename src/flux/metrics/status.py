"""The ``services`` list of ``/status``: every service this fluxd knows, with its instances.

Theory of operation
-------------------
:func:`service_rows` is pure: it joins what the parts of fluxd already hold, at the moment
``/status`` is asked for, into one row per service (the JSON contract in the README's "Status
JSON"):

- the balancer's status (:meth:`~flux.balancer.balancer.Balancer.status`): the service's state
  on this host (forwarding, rejecting, conflict, published), its published entry points, and
  its pools' health (per instance: ready or backing off until when, consecutive failed
  connects, connections open);
- the balancer's watch (:attr:`~flux.balancer.balancer.Balancer.infos`): the spec, and every
  host's instance records in every state (host, address, state, the image labels);
- the agent's view of this host's instances, which is newer than the records it wrote, and the
  images of the containers Docker reported;
- the history (:class:`~flux.metrics.history.History`): the figures over the last 10 s and
  5 min, and the request rate per instance; and each instance's p99 over the sliding window
  of its summaries (:meth:`~flux.metrics.counters.Metrics.instance_quantile`).

An instance's state is its record's, except that a live instance one of whose pools holds it
back after failed connects is ``backoff`` (with the time of its next try, Unix seconds).
Figures measured by this fluxd are this host's share: an instance on another host shows the
connections and requests this host sent it.  What nothing here knows is null, never guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flux.balancer.services import why_ignored
from flux.metrics.history import History
from flux.model import Instance, InstanceState, ServiceInfo

__all__ = ["INSTANCE_STATES", "instance_state_name", "service_rows"]

# The instance states /status counts, in the order a reader wants them.
INSTANCE_STATES = ("live", "no-address", "paused", "unhealthy", "draining", "backoff")

# Why an instance in a state other than live gets no connection, for people.
_REASONS = {
    InstanceState.NO_ADDRESS: "no address other hosts can reach (no port, or the port not"
    " published on the host)",
    InstanceState.PAUSED: "the container is paused",
    InstanceState.UNHEALTHY: "Docker reports the container unhealthy",
    InstanceState.DRAINING: "the container is stopping: no new connections",
}


def instance_state_name(state: InstanceState) -> str:
    """A record's state as ``/status`` spells it (``no address`` -> ``no-address``)."""
    return str(state).replace(" ", "-")


def _image(instance: Instance, container_image: str | None) -> str | None:
    """``image:tag`` from the labels the record carries, else the container's own."""
    labels = instance.labels or {}
    image = labels.get("image")
    if image:
        tag = labels.get("tag")
        return f"{image}:{tag}" if tag else image
    return container_image or None


def _pool_health(entry: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """Each instance's health in every pool of a balancer status entry (the VIP's, the
    published port's)."""
    health: dict[str, list[Mapping[str, Any]]] = {}
    pools: list[Iterable[Mapping[str, Any]]] = [entry.get("instances") or ()]
    published = entry.get("published")
    if published:
        pools.append(published.get("instances") or ())
    for pool in pools:
        for row in pool:
            health.setdefault(str(row["name"]), []).append(row)
    return health


def _service_reason(
    state: str, entry: Mapping[str, Any], info: ServiceInfo | None
) -> str | None:
    if state == "conflict":
        return str(entry.get("conflict") or "") or None
    if state == "rejecting":
        return "no live instance: connections are refused"
    if state == "absent":
        if info is None:
            return "not in etcd"
        return why_ignored(info) or "not served by this host's balancer"
    return None


def _published(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    published = entry.get("published")
    if not published:
        return []
    return [
        {
            "port": published["port"],
            "hostnames": list(published.get("hostnames") or []),
            "state": published["state"],
            "reason": published.get("error") or published.get("conflict"),
        }
    ]


def _instance_row(
    name: str,
    instance: Instance,
    health: list[Mapping[str, Any]],
    *,
    image: str | None,
    http: bool,
    rates: Mapping[str, float] | None,
    p99: float | None,
    now: float,
) -> dict[str, Any]:
    state = instance.effective_state
    shown = instance_state_name(state)
    reason = _REASONS.get(state)
    retry_at = None
    failures = max((int(h["failures"]) for h in health), default=0)
    waiting = [float(h["retry_in"]) for h in health if not h["ready"] and h["retry_in"] is not None]
    if state is InstanceState.LIVE and waiting:
        shown = "backoff"
        retry_at = now + min(waiting)
        reason = f"{failures} failed connects in a row; tried again at the time given"
    return {
        "name": name,
        "host": instance.host.address or None,
        "address": instance.address,
        "state": shown,
        "reason": reason,
        "retry_at": retry_at,
        "container_id": name,
        "image": image,
        "active": sum(int(h["active"]) for h in health),
        "failures": failures,
        "req_rate": (rates.get(name, 0.0) if rates is not None else None) if http else None,
        "p99": p99 if http else None,
    }


def service_rows(
    balancer: Mapping[str, Mapping[str, Any]],
    infos: Mapping[str, ServiceInfo],
    local: Mapping[tuple[str, str], Instance],
    container_images: Mapping[str, str],
    history: History,
    instance_p99: Mapping[tuple[str, str], float],
    *,
    now: float,
) -> list[dict[str, Any]]:
    """One row per service known to the balancer's watch, its state, or the agent, sorted
    by name (see the module docstring).  ``balancer``: the ``services`` of the balancer's
    status; ``local``: this host's instances by (service, instance); ``container_images``:
    image by container ID; ``instance_p99``: seconds by (service, instance); ``now``: Unix
    time."""
    mine: dict[str, dict[str, Instance]] = {}
    for (service, name), instance in local.items():
        mine.setdefault(service, {})[name] = instance
    rows = []
    for service in sorted(set(balancer) | set(infos) | set(mine)):
        entry = balancer.get(service, {})
        info = infos.get(service)
        state = str(entry.get("state") or "absent")
        protocol = entry.get("protocol") or (
            str(info.spec.effective_protocol) if info is not None else None
        )
        http = protocol == "http"
        records = dict(info.instances) if info is not None else {}
        records.update(mine.get(service, {}))
        health = _pool_health(entry)
        rates = history.instance_rates(service)
        instances = [
            _instance_row(
                name,
                instance,
                health.get(name, []),
                image=_image(instance, container_images.get(name)),
                http=http,
                rates=rates,
                p99=instance_p99.get((service, name)),
                now=now,
            )
            for name, instance in sorted(records.items())
        ]
        by_state = dict.fromkeys(INSTANCE_STATES, 0)
        for row in instances:
            by_state[row["state"]] = by_state.get(row["state"], 0) + 1
        rows.append(
            {
                "name": service,
                "address": entry.get("address")
                or (info.spec.address if info is not None else None),
                "protocol": protocol,
                "published": _published(entry),
                "state": state,
                "reason": _service_reason(state, entry, info),
                "instances_by_state": by_state,
                "connections_open": sum(row["active"] for row in instances),
                "figures": history.figures(service),
                "instances": instances,
            }
        )
    return rows
