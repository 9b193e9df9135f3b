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
the state at one revision, built without reading etcd again.  A record that fails to decode (not
JSON, wrong types, a bad address, bigger than :data:`~flux.model.MAX_RECORD_BYTES`) is logged
on the ``flux.store`` logger in one line naming its key and the problem, and then treated as
absent; a service directory without a valid spec is not a service.  :class:`Problems` (one per
store) remembers what was logged, so each bad record is named once, not again at every new
snapshot or read, until it changes.  A tree that follows host records too (fluxd's balancer,
``fluxctl info`` and ``query``) also holds back instances whose host is not registered.

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
    shown,
    validate_name,
)
from flux.store.base import NotFound, ServiceUpdate

__all__ = [
    "HOSTS",
    "PREFIX",
    "PROMETHEUS_TARGETS",
    "SERVICES",
    "Follow",
    "KeyEvent",
    "Problems",
    "ServiceTree",
    "ServiceWatch",
    "decode_host",
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
            f"invalid instance ID {shown(instance_id)}: use 1-128 letters, digits, '_', '.' or '-'"
        )
    return instance_id


def normalise_host(address: str) -> str:
    """A host's IP in canonical text form; raise :class:`RecordError` if it is not an IP."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise RecordError(f"invalid host address {shown(address)}: not an IP address") from None


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
    raise RecordError(f"{key}: {shown(address)} is not a host address in canonical form")


def decode_host(key: str, value: str | bytes) -> Host:
    """A host record under ``host/``; raise :class:`RecordError` naming ``key``."""
    address = parse_host_key(key, HOSTS)
    host = decode_record(Host, value, key)
    if host.address != address:
        raise RecordError(f"{key}: address {shown(host.address)} does not match the key")
    return host


def decode_hosts(
    pairs: Iterable[tuple[str | bytes, str | bytes]], problems: Problems | None = None
) -> dict[str, Host]:
    """Host records from the (key, value) pairs under ``host/``, keyed by address."""
    problems = problems if problems is not None else Problems()
    hosts: dict[str, Host] = {}
    for raw_key, value in pairs:
        key = _text(raw_key)
        try:
            host = decode_host(key, value)
        except RecordError as exc:
            problems.report(key, value, str(exc))
            continue
        problems.clear(key)
        hosts[host.address] = host
    return hosts


def decode_targets(
    pairs: Iterable[tuple[str | bytes, str | bytes]], problems: Problems | None = None
) -> dict[str, str]:
    """Metrics endpoints from the (key, value) pairs under ``prometheus-targets/``."""
    problems = problems if problems is not None else Problems()
    targets: dict[str, str] = {}
    for raw_key, value in pairs:
        key = _text(raw_key)
        try:
            targets[parse_host_key(key, PROMETHEUS_TARGETS)] = decode_target(value, key)
        except RecordError as exc:
            problems.report(key, value, str(exc))
            continue
        problems.clear(key)
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
    """One change to one key: ``value`` is None when the key was deleted.

    ``created`` is the revision at which the key was created (etcd's ``create_revision``; it
    stays the same while the key is rewritten), 0 when unknown.
    """

    key: str
    value: str | bytes | None
    created: int = 0


_LINE_LIMIT = 400
_RECENT = 4  # bad values remembered per key


class Problems:
    """The bad records this process has logged, so that each one is logged once.

    A record is named (one warning line: its key and what is wrong) when it is first seen bad,
    and again only after its value changes to a bad value not among its last four, or after it
    became valid or was deleted and then turned bad again.  Re-reading it (a watch's new
    snapshot, the agent's reconcile, a second watch over the same keys) says nothing new.  One
    object serves a whole store, so fluxd's watches and reads share it.  It keeps hashes of bad
    values, never the values (which may be huge).  ``aspect`` tells apart problems of one key
    that come and go on their own: the record itself, and (for an instance) its host not being
    registered.
    """

    def __init__(self) -> None:
        # The last few bad values' hashes per key: two watches over the same keys may see a
        # quick series of values interleaved (A B from one, then A B from the other), and with
        # only the latest remembered the second watch's A and B were logged again.
        self._seen: dict[tuple[str, str], tuple[int, ...]] = {}

    def report(self, key: str, value: object, problem: str, aspect: str = "record") -> None:
        """Log ``problem`` about ``key`` unless it was logged already for this ``value``."""
        digest = hash(value)
        recent = self._seen.get((key, aspect), ())
        if digest in recent:
            return
        self._seen[(key, aspect)] = (*recent[-(_RECENT - 1) :], digest)
        if len(problem) > _LINE_LIMIT:  # a key can be as big as a value
            problem = f"{problem[: _LINE_LIMIT - 30]}...({len(problem)} characters)"
        log.warning("skipping %s", problem)

    def clear(self, key: str, aspect: str = "record") -> None:
        """``key`` is valid (or gone): a later problem with it is news again."""
        self._seen.pop((key, aspect), None)

    def retain(self, prefix: str, present: Iterable[str]) -> None:
        """Forget problems under ``prefix`` with keys not in ``present`` (a new snapshot)."""
        keep = set(present)
        for seen in [s for s in self._seen if s[0].startswith(prefix) and s[0] not in keep]:
            del self._seen[seen]

    def __len__(self) -> int:
        return len(self._seen)


# What Problems hashes for a service directory without a spec, and for an instance whose host
# is not registered (the value itself may be fine).
_NO_SPEC = "no spec"
_NO_HOST = "host not registered"


def _host_of(instance: Instance) -> str:
    try:
        return normalise_host(instance.host.address)
    except RecordError:
        return instance.host.address


@dataclass(frozen=True, slots=True)
class Follow:
    """What a tree keeps besides specs: rules, instances, and (for instances) host records."""

    rules: bool = False
    instances: bool = False
    hosts: bool = False

    @classmethod
    def of(cls, *, rules: bool, instances: bool, known_hosts: bool) -> Follow:
        """What a read or watch asked for (host records matter only with instances)."""
        return cls(rules, instances, known_hosts and instances)


class ServiceTree:
    """Decoded service records, filled from key-values and kept current by events.

    Rules (instances) are kept only when ``follow.rules`` (``instances``) is set; changes to them
    are then reported by :meth:`apply`, otherwise ignored.  With ``hosts`` the tree also follows
    the host records (``host/`` keys in its input) and holds back every instance whose host is
    not registered: an instance lives on its writer's lease together with that host record, so
    one without it was written by hand or left by a bug, and its address may by now belong to
    another container.  Such an instance is logged once and served again as soon as its host
    registers.
    """

    def __init__(self, follow: Follow = Follow(), problems: Problems | None = None) -> None:
        self.with_rules = follow.rules
        self.with_instances = follow.instances
        self.with_hosts = follow.hosts
        self.problems = problems if problems is not None else Problems()
        self._specs: dict[str, Service] = {}
        self._created: dict[str, int] = {}
        self._rules: dict[str, dict[str, Rule]] = {}
        self._instances: dict[str, dict[str, Instance]] = {}
        self._hosts: set[str] = set()
        # For reads that report broken services: the problem with a spec that did not decode,
        # and, per service, the keys below it other than the spec.
        self.spec_problems: dict[str, str] = {}
        self._spec_keys: set[str] = set()
        self._other_keys: dict[str, set[str]] = {}

    @classmethod
    def from_events(
        cls, events: Iterable[KeyEvent], follow: Follow = Follow(), problems: Problems | None = None
    ) -> ServiceTree:
        """A tree holding the key-values of a range read (given as put events)."""
        tree = cls(follow, problems)
        for event in events:
            tree.apply(event)
        for name in list(tree._other_keys):
            tree.check_spec(name)
        return tree

    def apply(self, event: KeyEvent) -> list[str]:
        """Apply one change; return the services it affects, of those this tree cares about."""
        if event.key.startswith(HOSTS):
            return self._apply_host(event) if self.with_hosts else []
        try:
            parsed = parse_service_key(event.key)
        except RecordError as exc:
            if event.value is None:
                self.problems.clear(event.key)
            else:
                self.problems.report(event.key, event.value, str(exc))
            return []
        if parsed is None:
            return []
        service, kind, item = parsed
        if kind == "spec":
            return [self._apply_spec(service, event)]
        keys = self._other_keys.setdefault(service, set())
        if event.value is None:
            keys.discard(event.key)
            if not keys:
                del self._other_keys[service]
        else:
            keys.add(event.key)
        if kind == "rules":
            if not self.with_rules:
                return []
            return [self._apply_item(self._rules, Rule, service, item, event)]
        if not self.with_instances:
            return []
        return [self._apply_item(self._instances, Instance, service, item, event)]

    def _apply_host(self, event: KeyEvent) -> list[str]:
        try:
            address = parse_host_key(event.key, HOSTS)
        except RecordError as exc:
            if event.value is not None:
                self.problems.report(event.key, event.value, str(exc))
            return []
        was = address in self._hosts
        self._hosts.discard(address)
        if event.value is None:
            self.problems.clear(event.key)
        else:
            try:
                decode_host(event.key, event.value)
            except RecordError as exc:
                self.problems.report(event.key, event.value, str(exc))
            else:
                self.problems.clear(event.key)
                self._hosts.add(address)
        if was == (address in self._hosts):
            return []
        return [
            service
            for service, records in self._instances.items()
            if any(_host_of(instance) == address for instance in records.values())
        ]

    def _apply_spec(self, service: str, event: KeyEvent) -> str:
        self._specs.pop(service, None)
        self._created.pop(service, None)
        self.spec_problems.pop(service, None)
        if event.value is None:
            self._spec_keys.discard(service)
            self.problems.clear(event.key)
            return service
        self._spec_keys.add(service)
        try:
            self._specs[service] = decode_record(Service, event.value, event.key)
        except RecordError as exc:
            self.problems.report(event.key, event.value, f"service {service!r}: {exc}")
            self.spec_problems[service] = str(exc)
        else:
            self._created[service] = event.created
            self.problems.clear(event.key)
        return service

    def _apply_item(
        self,
        table: dict[str, dict[str, _Item]],
        cls: type[_Item],
        service: str,
        item: str,
        event: KeyEvent,
    ) -> str:
        records = table.setdefault(service, {})
        records.pop(item, None)
        if event.value is None:
            self.problems.clear(event.key)
        else:
            try:
                records[item] = decode_record(cls, event.value, event.key)
            except RecordError as exc:
                self.problems.report(event.key, event.value, str(exc))
            else:
                self.problems.clear(event.key)
        if not records:
            del table[service]
        return service

    def check_spec(self, name: str) -> None:
        """Log (once) a service directory that holds records but no spec key."""
        directory = f"{SERVICES}{name}/"
        if name in self._other_keys and name not in self._spec_keys:
            self.problems.report(
                directory, _NO_SPEC, f"service {name!r}: {directory} has no spec"
            )
        else:
            self.problems.clear(directory)

    def _served_instances(self, name: str) -> dict[str, Instance]:
        records = self._instances.get(name, {})
        if not self.with_hosts:
            return dict(records)
        served: dict[str, Instance] = {}
        for instance_id, instance in records.items():
            key = f"{SERVICES}{name}/instances/{instance_id}"
            host = _host_of(instance)
            if host in self._hosts:
                served[instance_id] = instance
                self.problems.clear(key, _NO_HOST)
                continue
            problem = (
                f"{key}: its host {host} is not registered (no {HOSTS}{host} record)"
                if host
                else f"{key}: it names no host"
            )
            self.problems.report(key, host, problem, _NO_HOST)
        return served

    def service(self, name: str) -> ServiceInfo | None:
        """The service as this tree sees it, or None if it has no valid spec."""
        spec = self._specs.get(name)
        if spec is None:
            return None
        return ServiceInfo(
            name=name,
            spec=spec,
            created=self._created.get(name, 0),
            rules=dict(self._rules.get(name, {})),
            instances=self._served_instances(name),
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
        """Every valid service, by name."""
        result: dict[str, ServiceInfo] = {}
        for name in sorted(self._specs):
            info = self.service(name)
            if info is not None:
                result[name] = info
        return result


def _present(events: Iterable[KeyEvent]) -> set[str]:
    """The keys of a snapshot, with the service directories they are in."""
    present: set[str] = set()
    for event in events:
        present.add(event.key)
        if event.key.startswith(SERVICES):
            name = event.key[len(SERVICES) :].split("/", 1)[0]
            present.add(f"{SERVICES}{name}/")
    return present


class ServiceWatch:
    """Turns key-value snapshots and events into the updates a service watch yields."""

    def __init__(self, follow: Follow = Follow(), problems: Problems | None = None) -> None:
        self._follow = follow
        self._problems = problems if problems is not None else Problems()
        self._tree = ServiceTree(problems=self._problems)
        self._reported: dict[str, ServiceInfo] = {}

    def reset(self, events: Iterable[KeyEvent]) -> ServiceUpdate:
        """Start again from a snapshot; the update to yield is flagged ``reset``.

        Problems already logged for records that are still there, unchanged, are not logged
        again; those whose records went away while the watch was broken are forgotten.
        """
        snapshot = list(events)
        self._problems.retain(SERVICES, _present(snapshot))
        if self._follow.hosts:
            self._problems.retain(HOSTS, _present(snapshot))
        self._tree = ServiceTree.from_events(snapshot, self._follow, self._problems)
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
            for service in self._tree.apply(event):
                changed[service] = None
        services: dict[str, ServiceInfo | None] = {}
        for name in changed:
            self._tree.check_spec(name)
            info = self._tree.service(name)
            if info == self._reported.get(name):
                continue
            if info is None:
                del self._reported[name]
            else:
                self._reported[name] = info
            services[name] = info
        return ServiceUpdate(services=services) if services else None
