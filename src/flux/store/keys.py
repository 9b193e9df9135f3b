"""Where records live under ``/weave-flux/``, and how services are read back from key-values.

Theory of operation
-------------------
Both stores (etcd and memory) keep the same flat key space (SPEC §2)::

    /weave-flux/service/<S>/spec            service definition
    /weave-flux/service/<S>/rules/<R>       rule
    /weave-flux/service/<S>/instances/<ID>  instance (on its host's lease)
    /weave-flux/host/<HOST_IP>              host record (on its lease)
    /weave-flux/prometheus-targets/<HOST_IP> metrics endpoint, a JSON string (on its lease)

so they share everything here: building keys from validated names, parsing keys back, and
turning key-values into :class:`~flux.model.ServiceInfo` records.

:class:`ServiceTree` holds the decoded records below ``service/``.  A read fills one from a range
of key-values; a watch keeps one up to date from put/delete events, so every update it yields is
the state at one revision, built without reading etcd again.  A record that fails to decode is
logged once, when it arrives, on the ``flux.store`` logger with its key and the problem, and then
treated as absent; a service directory without a valid spec is not a service.

:class:`ServiceWatch` adds the consumer's side of the "reset then deltas" protocol: it remembers
what it has reported, so only real changes are yielded: a service that stops being valid is
reported as removed (``None``) once, junk that never was a service (say an instance written
under a service that ``fluxctl rm`` just removed) is not reported at all, and rewriting
identical records yields nothing.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

from flux.model import (
    Host,
    Instance,
    RecordError,
    Rule,
    Service,
    ServiceInfo,
    decode_record,
    format_address,
    parse_address,
    validate_name,
)
from flux.store.base import NotFound, ServiceUpdate

__all__ = [
    "HOSTS",
    "PREFIX",
    "PROMETHEUS_TARGETS",
    "SERVICES",
    "KeyEvent",
    "ServiceTree",
    "ServiceWatch",
    "decode_hosts",
    "decode_target",
    "decode_targets",
    "encode_target",
    "host_key",
    "instance_key",
    "normalise_host",
    "parse_host_key",
    "parse_service_key",
    "prometheus_key",
    "rule_key",
    "service_dir",
    "spec_key",
    "validate_instance_id",
]

log = logging.getLogger("flux.store")

PREFIX = "/weave-flux/"
SERVICES = PREFIX + "service/"
HOSTS = PREFIX + "host/"
PROMETHEUS_TARGETS = PREFIX + "prometheus-targets/"

# Docker container IDs are 64 hex digits; other runtimes (and tests) use other short names.
# What matters is that an ID is a single key segment.
_INSTANCE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")

Kind = Literal["spec", "rules", "instances"]
_Item = TypeVar("_Item", Rule, Instance)


def validate_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it can be a key segment, else raise :class:`RecordError`."""
    if not isinstance(instance_id, str) or _INSTANCE_ID.fullmatch(instance_id) is None:
        raise RecordError(
            f"invalid instance ID {instance_id!r}: use 1-128 letters, digits, '_', '.' or '-'"
        )
    return instance_id


def normalise_host(address: str) -> str:
    """A host's IP in canonical text form; raise :class:`RecordError` if it is not an IP."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise RecordError(f"invalid host address {address!r}: not an IP address") from None


def service_dir(service: str) -> str:
    """The directory holding a service's spec, rules and instances (ends with ``/``)."""
    return f"{SERVICES}{validate_name(service, 'service name')}/"


def spec_key(service: str) -> str:
    return service_dir(service) + "spec"


def rule_key(service: str, rule: str) -> str:
    return f"{service_dir(service)}rules/{validate_name(rule, 'rule name')}"


def instance_key(service: str, instance_id: str) -> str:
    return f"{service_dir(service)}instances/{validate_instance_id(instance_id)}"


def host_key(address: str) -> str:
    return HOSTS + normalise_host(address)


def prometheus_key(address: str) -> str:
    return PROMETHEUS_TARGETS + normalise_host(address)


def encode_target(target: str) -> str:
    """A metrics endpoint as stored: a JSON string holding ``IP:port``."""
    return json.dumps(format_address(*parse_address(target)))


def decode_target(text: str | bytes, key: str) -> str:
    """Parse a stored metrics endpoint; raise :class:`RecordError` naming ``key``."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{key}: not valid JSON ({exc})") from None
    if not isinstance(value, str):
        raise RecordError(f"{key}: expected a JSON string, got {type(value).__name__}")
    try:
        return format_address(*parse_address(value))
    except RecordError as exc:
        raise RecordError(f"{key}: {exc}") from None


def parse_host_key(key: str, prefix: str) -> str:
    """The host address at the end of a ``host/`` or ``prometheus-targets/`` key."""
    address = key[len(prefix) :]
    try:
        if normalise_host(address) == address:
            return address
    except RecordError:
        pass
    raise RecordError(f"{key}: {address!r} is not a host address in canonical form")


def decode_hosts(pairs: Iterable[tuple[str | bytes, str | bytes]]) -> dict[str, Host]:
    """Host records from the (key, value) pairs under ``host/``, keyed by address."""
    hosts: dict[str, Host] = {}
    for raw_key, value in pairs:
        key = _text(raw_key)
        try:
            address = parse_host_key(key, HOSTS)
            host = decode_record(Host, value, key)
            if host.address != address:
                raise RecordError(f"{key}: address {host.address!r} does not match the key")
        except RecordError as exc:
            log.warning("skipping %s", exc)
            continue
        hosts[address] = host
    return hosts


def decode_targets(pairs: Iterable[tuple[str | bytes, str | bytes]]) -> dict[str, str]:
    """Metrics endpoints from the (key, value) pairs under ``prometheus-targets/``."""
    targets: dict[str, str] = {}
    for raw_key, value in pairs:
        key = _text(raw_key)
        try:
            targets[parse_host_key(key, PROMETHEUS_TARGETS)] = decode_target(value, key)
        except RecordError as exc:
            log.warning("skipping %s", exc)
    return targets


def parse_service_key(key: str) -> tuple[str, Kind, str] | None:
    """Split a key under ``service/`` into (service, kind, rule name or instance ID).

    The third element is empty for ``spec``.  Keys of kinds this version does not know (the
    original's ``ingress-instances``, or anything newer) give None: they are tolerated and
    ignored.  A key with a bad name in it raises :class:`RecordError`.
    """
    if not key.startswith(SERVICES):
        return None
    parts = key[len(SERVICES) :].split("/", 2)
    try:
        service = validate_name(parts[0], "service name")
        if len(parts) == 1:
            raise RecordError("a value where a service directory belongs")
        if parts[1] == "spec" and len(parts) == 2:
            return service, "spec", ""
        if len(parts) == 3 and parts[1] == "rules":
            return service, "rules", validate_name(parts[2], "rule name")
        if len(parts) == 3 and parts[1] == "instances":
            return service, "instances", validate_instance_id(parts[2])
    except RecordError as exc:
        raise RecordError(f"{key}: {exc}") from None
    return None


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One change to one key: ``value`` is None when the key was deleted."""

    key: str
    value: str | bytes | None


class ServiceTree:
    """Decoded service records, filled from key-values and kept current by events.

    Rules (instances) are kept only when ``rules`` (``instances``) is set; changes to them are
    then reported by :meth:`apply`, otherwise ignored.
    """

    def __init__(self, *, rules: bool = False, instances: bool = False) -> None:
        self.with_rules = rules
        self.with_instances = instances
        self._specs: dict[str, Service] = {}
        self._rules: dict[str, dict[str, Rule]] = {}
        self._instances: dict[str, dict[str, Instance]] = {}
        # For reads that report broken services: the problem with a spec that did not decode,
        # and the services that have records but no spec key at all.
        self.spec_problems: dict[str, str] = {}
        self._spec_keys: set[str] = set()
        self._other_keys: set[str] = set()

    @classmethod
    def from_pairs(
        cls,
        pairs: Iterable[tuple[str | bytes, str | bytes]],
        *,
        rules: bool = False,
        instances: bool = False,
    ) -> ServiceTree:
        """A tree holding the (key, value) pairs of a range read."""
        tree = cls(rules=rules, instances=instances)
        for key, value in pairs:
            tree.apply(KeyEvent(_text(key), value))
        return tree

    def apply(self, event: KeyEvent) -> str | None:
        """Apply one change; return the service it affects, if this tree cares about it."""
        try:
            parsed = parse_service_key(event.key)
        except RecordError as exc:
            if event.value is not None:
                log.warning("skipping %s", exc)
            return None
        if parsed is None:
            return None
        service, kind, item = parsed
        if kind == "spec":
            return self._apply_spec(service, event)
        if event.value is not None:
            self._other_keys.add(service)
        if kind == "rules":
            if not self.with_rules:
                return None
            return self._apply_item(self._rules, Rule, service, item, event)
        if not self.with_instances:
            return None
        return self._apply_item(self._instances, Instance, service, item, event)

    def _apply_spec(self, service: str, event: KeyEvent) -> str:
        self._specs.pop(service, None)
        self.spec_problems.pop(service, None)
        if event.value is None:
            self._spec_keys.discard(service)
            return service
        self._spec_keys.add(service)
        try:
            self._specs[service] = decode_record(Service, event.value, event.key)
        except RecordError as exc:
            log.warning("skipping service %r: %s", service, exc)
            self.spec_problems[service] = str(exc)
        return service

    @staticmethod
    def _apply_item(
        table: dict[str, dict[str, _Item]],
        cls: type[_Item],
        service: str,
        item: str,
        event: KeyEvent,
    ) -> str:
        records = table.setdefault(service, {})
        records.pop(item, None)
        if event.value is not None:
            try:
                records[item] = decode_record(cls, event.value, event.key)
            except RecordError as exc:
                log.warning("skipping %s", exc)
        if not records:
            del table[service]
        return service

    def service(self, name: str) -> ServiceInfo | None:
        """The service as this tree sees it, or None if it has no valid spec."""
        spec = self._specs.get(name)
        if spec is None:
            return None
        return ServiceInfo(
            name=name,
            spec=spec,
            rules=dict(self._rules.get(name, {})),
            instances=dict(self._instances.get(name, {})),
        )

    def require(self, name: str) -> ServiceInfo:
        """The service; raise :class:`NotFound` saying why when there is no valid one."""
        info = self.service(name)
        if info is not None:
            return info
        problem = self.spec_problems.get(name)
        if problem is not None:
            raise NotFound(f"service {name!r} has an invalid spec: {problem}")
        raise NotFound(f"service {name!r} does not exist")

    def services(self) -> dict[str, ServiceInfo]:
        """Every valid service; logs each service directory that has records but no spec."""
        for name in sorted(self._other_keys - self._spec_keys):
            log.warning("skipping service %r: %s%s/ has no spec", name, SERVICES, name)
        result: dict[str, ServiceInfo] = {}
        for name in sorted(self._specs):
            info = self.service(name)
            if info is not None:
                result[name] = info
        return result



class ServiceWatch:
    """Turns key-value snapshots and events into the updates a service watch yields."""

    def __init__(self, *, rules: bool = False, instances: bool = False) -> None:
        self._rules = rules
        self._instances = instances
        self._tree = ServiceTree(rules=rules, instances=instances)
        self._reported: dict[str, ServiceInfo] = {}

    def reset(self, pairs: Iterable[tuple[str | bytes, str | bytes]]) -> ServiceUpdate:
        """Start again from a snapshot; the update to yield is flagged ``reset``."""
        self._tree = ServiceTree.from_pairs(pairs, rules=self._rules, instances=self._instances)
        services = self._tree.services()
        self._reported = dict(services)
        return ServiceUpdate(services=services, reset=True)

    def apply(self, events: Iterable[KeyEvent]) -> ServiceUpdate | None:
        """Apply the events of one revision; the update to yield, if anything changed.

        A service is in the update only if it differs from what was last reported, so a
        rewrite of identical records (a lease keeper catching up) or a bad record that was
        never valid yields nothing.
        """
        changed: dict[str, None] = {}  # insertion-ordered set
        for event in events:
            service = self._tree.apply(event)
            if service is not None:
                changed[service] = None
        services: dict[str, ServiceInfo | None] = {}
        for name in changed:
            info = self._tree.service(name)
            if info == self._reported.get(name):
                continue
            if info is None:
                del self._reported[name]
            else:
                self._reported[name] = info
            services[name] = info
        return ServiceUpdate(services=services) if services else None
