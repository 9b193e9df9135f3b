"""fluxctl: define services, select containers into them, and see what is enrolled.

Theory of operation
-------------------
fluxctl talks to etcd directly (``ETCD_ADDRESS``) through the :class:`~flux.store.base.Store`
interface.  Each invocation runs in three steps, so that refused input never touches the store
and a failure never leaves half an answer on the screen:

1. **Parse and validate** (no I/O): argparse, then names (:func:`~flux.model.validate_name`),
   addresses (:func:`~flux.model.parse_address`), ports, selectors and ``--format`` strings.
   Anything wrong here is a *usage error*: one line on stderr, exit status 2, nothing written.
   ``version`` and ``--help`` finish here, so they work without etcd.
2. **Run** against the store, opened by :func:`_open_store` only now.  Store failures (etcd
   unreachable, a service or rule that does not exist) are *runtime errors*: one line on stderr,
   exit status 1.
3. **Print** the whole output at once.

Decisions where the original (reference §5) was silent, buggy or contradictory:

- Output is sorted everywhere: services, rules and instances by name (code-point order), hosts
  by IP address (numerically, so ``10.0.0.9`` comes before ``10.0.0.10``).
- ``--env k=v`` builds ``env.k`` selectors (the original bound it to ``--labels``); ``info``
  prints each instance's state after its address; ``deselect`` ends its line; ``rm --all`` is
  a real flag.
- ``query``: ``--quiet``, ``--format`` and ``-o json`` choose the output and are mutually
  exclusive (a usage error), instead of ``--quiet`` silently beating ``--format`` as in the
  original, whose help claimed the opposite.  Likewise ``list`` refuses ``-o json`` together
  with ``--format``/``--format-rule``.
- ``--format`` is a Python format string (:meth:`str.format`) over the record's fields, named
  as in the store's JSON:

  - ``list``: ``{name} {address} {instancePort} {protocol} {rules} {instances}``
  - ``list --format-rule``: ``{service} {name} {selector} {instancePort}``
  - ``query``: ``{service} {name} {state} {host} {containerRule} {address} {labels}``

  An absent address renders as the empty string; ``query``'s ``{host}`` is the host's IP.  Map
  fields (``selector``, ``labels``, ``rules``, ``instances``) render as compact JSON with sorted
  keys; ``{labels[app]}`` picks one entry (a missing entry renders as the empty string); the
  extra conversion ``!j`` renders any field as JSON (``{address!j}`` gives ``"10.0.0.1:80"``).
  An unknown field, a positional field or a malformed format is a usage error naming it.  Each
  rendered record is followed by a newline unless it already ends with one.
- ``-o json`` (``list``, ``info``, ``query``) prints one JSON document with sorted keys.  Records
  appear exactly as they are stored in etcd (original field names, empty fields omitted), except
  that instances always carry ``state`` (derived as the original did when a record has none):

  - ``list``: ``{"services": {S: {"spec": {...}, "rules": {R: {...}}}}}``
  - ``info``: ``{"hosts": {IP: {...}}, "services": {S: {"spec", "rules", "instances"}}}``
  - ``query``: ``{"instances": [{"service": S, "name": ID, <instance record>}, ...]}``
- Invalid input values (names, addresses, ports, an empty selector) are usage errors (exit 2),
  like argparse's own; a service or rule that does not exist is a runtime error (exit 1).
  Every error is exactly one line; argparse's terse ones end with ``(try 'fluxctl CMD --help')``.
- Ports given on the command line are 1-65535 (the original took ``--instance-port 0`` to mean
  "not set"; here that is simply leaving the flag out).
- ``service NAME`` with selector flags makes two writes, the spec then rule ``default``; if the
  second fails the service exists without the rule, and running the command again completes it.
- A record the store skips (not JSON, failing validation, bigger than 256 KiB, a service
  without a spec) is shown as one ``fluxctl: warning: skipping <key>: <problem>`` line on
  stderr; the command still succeeds (exit status 0) with the rest, since what it shows is
  right.  ``rm`` removes such a service directory like any other.
- ``info`` and ``query`` leave out instances whose host has no ``host/<IP>`` record, with such
  a warning line each, because fluxd does not forward to them (see flux.store.keys).
- ``service NAME --address A`` refuses an address another service already has (exit status 1,
  naming it): two services cannot share one, and fluxd would serve only the older one.  The
  check is a read before the write, so fluxd still resolves claims made at the same moment or
  written by other tools: of the services claiming an address the one whose spec was created
  first keeps it, and ``info`` shows each other one with ``State: conflict: address A is also
  used by service S`` (``"conflict"`` in ``-o json``).
- Published ports (``service --publish PORT``, ``publish NAME PORT``, ``unpublish NAME``) are
  checked the same way: a port another service already publishes is refused (exit status 1,
  naming it), and of specs that still claim one port the first created keeps it; ``info`` shows
  each other one with ``State: conflict: port P is also published by service S``
  (``"publishConflict"`` in ``-o json``).  ``service`` without ``--address`` takes the
  published port as the default instance port.  ``publish`` and ``unpublish`` rewrite the
  spec with only that field changed (``service`` replaces the whole definition, so a service
  redefined without ``--publish`` is no longer published); ``unpublish`` on a service that
  publishes nothing changes nothing and succeeds.
- ``--hostname NAME`` (repeatable, with ``--publish``) lets services share a port, each chosen
  by its host names (``"hostnames"`` in the spec): http services by the ``Host`` of a
  connection's first request, tcp services by the server name (SNI) of the client's TLS
  ClientHello (TLS passthrough: the instance holds the certificate); ``service`` and
  ``publish`` refuse what fluxd would refuse (exit status 1): a host name another service on
  the port has, a tcp and an http service on one port, two services without host names on
  one port.  ``info`` shows ``Host names:`` and, for one refused, its conflict.
- ``service --proxy-protocol v1|v2`` (tcp services only: refused with ``-p http``) stores
  ``proxyProtocol`` in the spec; ``info`` and ``list -v`` show it as ``PROXY protocol: v1``,
  ``list -f {proxyProtocol}`` and ``-o json`` give it ("" when off).
- ``service --forwarded`` (http services only: refused without ``-p http``) stores
  ``"forwarded": true`` in the spec; ``info`` and ``list -v`` show ``Forwarded: X-Forwarded-For,
  X-Forwarded-Proto, X-Forwarded-Host``, ``list -f {forwarded}`` and ``-o json`` give it
  (false when off).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import re
import string
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

import flux
from flux.model import (
    Host,
    Instance,
    InstanceState,
    RecordError,
    Rule,
    Service,
    ServiceInfo,
    encode_record,
    normalise_hostname,
    parse_address,
    validate_name,
)
from flux.selector import instance_labels, make_selector, matches, parse_pairs
from flux.store.base import NotFound, Store, StoreError

if TYPE_CHECKING:
    from flux.balancer.entrypoints import PortConflict
    from flux.balancer.services import Conflict

__all__ = ["build_parser", "main"]

PROG = "fluxctl"
DEFAULT_ETCD_ADDRESS = "http://127.0.0.1:2379"
DEFAULT_RULE = "default"
# fluxctl is interactive: a dead etcd should be reported within seconds, not after the
# client's default retry budget.
CONNECT_TIMEOUT = 3.0
COMMAND_TIMEOUT = 30.0

_M = TypeVar("_M", bound=BaseModel)

_SERVICE_FIELDS = (
    "name", "address", "instancePort", "protocol", "publish", "hostnames", "proxyProtocol",
    "forwarded", "rules", "instances",
)
_RULE_FIELDS = ("service", "name", "selector", "instancePort")
_QUERY_FIELDS = ("service", "name", "state", "host", "containerRule", "address", "labels")


# -- errors -------------------------------------------------------------------------------------


class _UsageError(Exception):
    """The command line is wrong; exit status 2.  ``hint`` names the command for ``--help``."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class _CommandError(Exception):
    """The command could not be carried out; exit status 1."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exceptions, so main() owns every exit."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, hint=self.prog)


# -- selectors and validation --------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not a number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: must be 1-65535")
    return port


def _name(value: str, what: str) -> str:
    try:
        return validate_name(value, what)
    except RecordError as exc:
        raise _UsageError(str(exc)) from None


def _pairs(flag: str, text: str | None) -> None:
    """Refuse ``--labels``/``--env`` items with an empty key (they would select nothing)."""
    if text and "" in parse_pairs(text):
        raise _UsageError(f"{flag} {text!r}: every item needs a name before '='")


def _selector(args: argparse.Namespace) -> dict[str, str]:
    _pairs("--labels", args.labels)
    _pairs("--env", args.env)
    return make_selector(image=args.image, tag=args.tag, labels=args.labels, env=args.env)


def _hostnames(args: argparse.Namespace) -> tuple[str, ...]:
    """``--hostname`` values, checked: each a host name, and only for a published service
    (http: chosen by the Host of the first request; tcp: by the TLS server name)."""
    names: list[str] = args.hostname or []
    if not names:
        return ()
    for name in names:
        try:
            normalise_hostname(name)
        except RecordError as exc:
            raise _UsageError(f"--hostname: {exc}") from None
    if args.publish is None:
        raise _UsageError("--hostname needs --publish: host names choose a service on its port")
    return tuple(names)


def _record(cls: type[_M], what: str, **fields: Any) -> _M:
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise _UsageError(f"invalid {what}: {message}") from None


def _address(text: str) -> str:
    try:
        parse_address(text)
    except RecordError as exc:
        detail = str(exc).split(": ", 1)[-1]
        message = f'Did not understand the address supplied "{text}"; expected to be ipaddress:port'
        if not detail.startswith("expected"):
            message += f" ({detail})"
        raise _UsageError(message) from None
    return text


def _host_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _UsageError(f"invalid --host {text!r}: not an IP address") from None


# -- --format -----------------------------------------------------------------------------------


class _Blank(str):
    """What a missing map entry renders as: empty, and empty again however deep it is indexed
    (``{instances[gone][state]}``), so one record lacking an entry does not fail the output."""

    __slots__ = ()

    def __getitem__(self, key: Any) -> _Blank:
        return _BLANK


_BLANK = _Blank()


class _Entries(dict[str, Any]):
    """A map field inside a format: ``{labels[missing]}`` renders as the empty string."""

    def __missing__(self, key: str) -> _Blank:
        return _BLANK


def _lenient(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _Entries({k: _lenient(v) for k, v in value.items()})
    return value


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _RecordFormatter(string.Formatter):
    """str.format with maps rendered as JSON, ``None`` as empty, and the ``!j`` conversion."""

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion == "j":
            return _json(value)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        if isinstance(value, dict | list):
            value = _json(value)
        elif value is None:
            value = ""
        return super().format_field(value, format_spec)


_FORMATTER = _RecordFormatter()


def _head(field: str) -> str:
    """The record field a replacement field names: ``labels`` in ``{labels[app]}``."""
    return re.split(r"[.\[]", field, maxsplit=1)[0]


class _Template:
    """A validated ``--format``: fields checked up front, rendering errors become usage errors."""

    def __init__(self, flag: str, text: str, fields: Sequence[str], sample: Mapping[str, Any]):
        self.flag = flag
        self.text = text
        self.fields = fields
        self._heads: set[str] = set()
        self._check(text)
        # A trial run catches specs that fit no value of the field's type (`{name:d}`) before
        # etcd is asked; an index out of range depends on the data, so only real records tell.
        try:
            self.render(sample)
        except _UsageError as exc:
            if not isinstance(exc.__cause__, IndexError):
                raise

    def _check(self, text: str) -> None:
        try:
            parsed = list(_FORMATTER.parse(text))
        except ValueError as exc:
            raise _UsageError(f"{self.flag} {self.text!r}: {exc}") from None
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            head = _head(field)
            self._heads.add(head)
            if head not in self.fields:
                what = f'unknown field "{head}"' if head else "positional fields are not allowed"
                raise _UsageError(
                    f"{self.flag} {self.text!r}: {what}; fields are {', '.join(self.fields)}"
                )
            if conversion not in (None, "r", "s", "a", "j"):
                raise _UsageError(
                    f"{self.flag} {self.text!r}: unknown conversion !{conversion}; use !j, !r or !s"
                )
            if spec:
                self._check(spec)

    def uses(self, field: str) -> bool:
        """Whether the format names ``field`` (so it is worth reading from the store)."""
        return field in self._heads

    def render(self, values: Mapping[str, Any]) -> str:
        try:
            text = _FORMATTER.vformat(self.text, (), _lenient(values))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise _UsageError(f"{self.flag} {self.text!r}: {exc}") from exc
        return text if text.endswith("\n") else text + "\n"


_SAMPLE_SERVICE = {
    "name": "svc",
    "address": "10.0.0.1:80",
    "instancePort": 80,
    "protocol": "tcp",
    "publish": 8080,
    "hostnames": ["example.com"],
    "proxyProtocol": "v2",
    "forwarded": False,
    "rules": {},
    "instances": {},
}
_SAMPLE_RULE = {"service": "svc", "name": "rule", "selector": {}, "instancePort": 80}
_SAMPLE_INSTANCE = {
    "service": "svc",
    "name": "0123456789abcdef",
    "state": "live",
    "host": "10.0.0.2",
    "containerRule": "rule",
    "address": "10.0.0.2:32768",
    "labels": {},
}


def _template(
    flag: str, text: str | None, fields: Sequence[str], sample: Mapping[str, Any]
) -> _Template | None:
    return None if text is None else _Template(flag, text, fields, sample)


# -- record views -------------------------------------------------------------------------------


def _stored(record: BaseModel) -> dict[str, Any]:
    """The record as etcd holds it (original field names, empties omitted)."""
    data: dict[str, Any] = json.loads(encode_record(record))
    return data


def _instance_view(instance: Instance) -> dict[str, Any]:
    data = _stored(instance)
    data["state"] = str(instance.effective_state)
    return data


def _service_fields(info: ServiceInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "address": info.spec.address or "",
        "instancePort": info.spec.instance_port,
        "protocol": info.spec.protocol,
        "publish": info.spec.publish,
        "hostnames": list(info.spec.hostnames),
        "proxyProtocol": info.spec.proxy_protocol,
        "forwarded": info.spec.forwarded,
        "rules": {name: _stored(info.rules[name]) for name in sorted(info.rules)},
        "instances": {i: _instance_view(info.instances[i]) for i in sorted(info.instances)},
    }


def _rule_fields(service: str, name: str, rule: Rule) -> dict[str, Any]:
    return {
        "service": service,
        "name": name,
        "selector": dict(rule.selector),
        "instancePort": rule.instance_port,
    }


def _query_fields(service: str, name: str, instance: Instance) -> dict[str, Any]:
    return {
        "service": service,
        "name": name,
        "state": str(instance.effective_state),
        "host": instance.host.address,
        "containerRule": instance.container_rule,
        "address": instance.address or "",
        "labels": dict(instance.labels or {}),
    }


def _dump(document: Any) -> str:
    return json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _host_order(address: str) -> tuple[int, int, str]:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (99, 0, address)
    return (ip.version, int(ip), address)


def _target_order(target: str) -> tuple[tuple[int, int, str], int]:
    host, _, port = target.rpartition(":")
    return _host_order(host.strip("[]")), int(port) if port.isdigit() else 0


# -- rendering (pure) ---------------------------------------------------------------------------


def _render_service_verbose(info: ServiceInfo) -> str:
    lines = [info.name]
    if info.spec.address:
        lines.append(f"  Address: {info.spec.address}")
    if info.spec.instance_port:
        lines.append(f"  Instance port: {info.spec.instance_port}")
    if info.spec.protocol:
        lines.append(f"  Protocol: {info.spec.protocol}")
    if info.spec.publish:
        lines.append(f"  Published port: {info.spec.publish}")
    if info.spec.hostnames:
        lines.append(f"  Host names: {', '.join(info.spec.hostnames)}")
    if info.spec.proxy_protocol:
        lines.append(f"  PROXY protocol: {info.spec.proxy_protocol}")
    if info.spec.forwarded:
        lines.append("  Forwarded: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host")
    return "".join(line + "\n" for line in lines)


def _render_list(
    services: Mapping[str, ServiceInfo],
    *,
    verbose: bool = False,
    service_format: _Template | None = None,
    rule_format: _Template | None = None,
) -> str:
    """``fluxctl list`` output for ``services``."""
    out: list[str] = []
    for name in sorted(services):
        info = services[name]
        if service_format is not None:
            out.append(service_format.render(_service_fields(info)))
        elif verbose:
            out.append(_render_service_verbose(info))
        else:
            out.append(name + "\n")
        if not verbose:
            continue
        for rule_name in sorted(info.rules):
            rule = info.rules[rule_name]
            if rule_format is not None:
                out.append(rule_format.render(_rule_fields(name, rule_name, rule)))
            else:
                out.append(f"  Rule: {rule_name} {_json(rule.selector)}\n")
    return "".join(out)


def _conflicts(services: Mapping[str, ServiceInfo]) -> dict[str, Conflict]:
    """The services fluxd refuses their address, as every fluxd decides it."""
    # Imported here: the balancer package is not needed by the other commands' start-up.
    from flux.balancer.services import ServiceView, resolve_conflicts

    views = {name: ServiceView.from_info(info) for name, info in services.items()}
    return resolve_conflicts({name: view for name, view in views.items() if view is not None})[1]


def _port_conflicts(services: Mapping[str, ServiceInfo]) -> dict[str, PortConflict]:
    """The services fluxd refuses their published port, as every fluxd decides it."""
    from flux.balancer.entrypoints import PublishClaim, resolve_entry_points

    claims = {name: PublishClaim.from_info(info) for name, info in services.items()}
    return resolve_entry_points({n: claim for n, claim in claims.items() if claim is not None})[1]


def _render_info(
    hosts: Mapping[str, Host],
    services: Mapping[str, ServiceInfo],
    conflicts: Mapping[str, Conflict] | None = None,
    port_conflicts: Mapping[str, PortConflict] | None = None,
) -> str:
    """``fluxctl info`` output: live hosts, then each service with its rules and instances."""
    conflicts = conflicts or {}
    port_conflicts = port_conflicts or {}
    out = ["HOSTS\n"]
    out.extend(f"{hosts[h].address}\n" for h in sorted(hosts, key=_host_order))
    out.append("\nSERVICES\n")
    for name in sorted(services):
        info = services[name]
        out.append(_render_service_verbose(info))
        if name in conflicts:
            out.append(f"  State: conflict: {conflicts[name]}\n")
        if name in port_conflicts:
            out.append(f"  State: conflict: {port_conflicts[name]}\n")
        out.append("  RULES\n")
        for rule_name in sorted(info.rules):
            out.append(f"    {rule_name} {_json(info.rules[rule_name].selector)}\n")
        out.append("  INSTANCES\n")
        for instance_id in sorted(info.instances):
            instance = info.instances[instance_id]
            address = instance.address or "<nil>"
            out.append(f"    {instance_id} {address} {instance.effective_state}\n")
    return "".join(out)


def _render_table(rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell plus two spaces; the last column is not padded."""
    table = [list(row) for row in rows]
    if not table:
        return ""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = []
    for row in table:
        cells = [cell.ljust(width + 2) for cell, width in zip(row, widths, strict=False)]
        lines.append("".join(cells) + row[-1] + "\n")
    return "".join(lines)


# -- commands -----------------------------------------------------------------------------------

# A command either finishes without the store (its output, as text) or needs it: then it is an
# async function from the store to the output.  Everything that can refuse input runs before.
_Run = Callable[[Store], Awaitable[str]]


def _cmd_version(args: argparse.Namespace) -> str:
    return f"{PROG} version {flux.__version__}\n"


def _cmd_service(args: argparse.Namespace) -> _Run:
    name = _name(args.name, "service name")
    address = _address(args.address) if args.address is not None else None
    instance_port = args.instance_port or 0
    if not instance_port and address is not None:
        instance_port = parse_address(address)[1]
    if not instance_port and args.publish is not None:
        instance_port = args.publish
    spec = _record(
        Service,
        "service",
        address=address,
        instancePort=instance_port,
        protocol=args.protocol or "",
        publish=args.publish or 0,
        hostnames=_hostnames(args),
        proxyProtocol=args.proxy_protocol or "",
        forwarded=args.forwarded,
    )
    selector = _selector(args)
    rule: Rule | None = _record(Rule, "selector", selector=selector) if selector else None

    async def run(store: Store) -> str:
        if spec.address is not None:
            # Of several services with the address (written by other tools), name the one
            # fluxd serves: the first created.
            claims = sorted(
                (info.created, other)
                for other, info in (await store.get_all_services()).items()
                if other != name and info.spec.address == spec.address
            )
            if claims:
                other = claims[0][1]
                raise _CommandError(
                    f'address {spec.address} is already used by service "{other}": give'
                    f' "{name}" another address, or move or remove "{other}" first'
                )
        await _refuse_port_conflict(store, name, spec)
        await store.add_service(name, spec)
        if rule is not None:
            await store.set_rule(name, DEFAULT_RULE, rule)
        return name + "\n"

    return run


async def _refuse_port_conflict(store: Store, name: str, spec: Service) -> None:
    """Raise if fluxd would refuse ``name`` its published port with ``spec``: the port is
    another service's, or shared by host name and ``spec`` clashes with it (as every fluxd
    decides it, :func:`~flux.balancer.entrypoints.resolve_entry_points`)."""
    from flux.balancer.entrypoints import PublishClaim, resolve_entry_points

    if not spec.publish:
        return
    services = await store.get_all_services()
    claims = {
        other: claim
        for other, info in services.items()
        if other != name
        and (claim := PublishClaim.from_info(info)) is not None
        and claim.port == spec.publish
    }
    # A new service's spec will be created after every other one.
    created = (
        services[name].created
        if name in services
        else max((info.created for info in services.values()), default=0) + 1
    )
    claims[name] = PublishClaim(spec.publish, spec.effective_protocol, {}, created, spec.hostnames)
    conflict = resolve_entry_points(claims)[1].get(name)
    if conflict is None:
        return
    holder, port = conflict.holder, conflict.port
    if conflict.hostname is not None:
        raise _CommandError(
            f'host name {conflict.hostname} on port {port} is already claimed by service'
            f' "{holder}": give "{name}" other host names or another port, or remove the'
            f' name from "{holder}" first'
        )
    if conflict.protocol is not None:
        raise _CommandError(
            f'port {port} is published by {conflict.protocol} service "{holder}" (tcp and'
            f' http services cannot share a port): publish "{name}" on another port, or'
            f' unpublish or remove "{holder}" first'
        )
    raise _CommandError(
        f'port {port} is already published by service "{holder}": publish "{name}" on'
        f' another port, or unpublish or remove "{holder}" first'
    )


def _cmd_publish(args: argparse.Namespace) -> _Run:
    name = _name(args.name, "service name")
    port: int = args.port

    async def run(store: Store) -> str:
        info = await _get_service(store, name)
        spec = info.spec.model_copy(update={"publish": port})
        await _refuse_port_conflict(store, name, spec)
        if info.spec.publish != port:
            await store.add_service(name, spec)
        return f"{name} {port}\n"

    return run


def _cmd_unpublish(args: argparse.Namespace) -> _Run:
    name = _name(args.name, "service name")

    async def run(store: Store) -> str:
        info = await _get_service(store, name)
        if info.spec.publish:
            await store.add_service(name, info.spec.model_copy(update={"publish": 0}))
        return name + "\n"

    return run


def _cmd_select(args: argparse.Namespace) -> _Run:
    service = _name(args.service, "service name")
    rule_name = _name(args.rule, "rule name")
    selector = _selector(args)
    if not selector:
        raise _UsageError("Nothing will be selected by empty rule")
    rule = _record(Rule, "rule", selector=selector, instancePort=args.instance_port or 0)

    async def run(store: Store) -> str:
        try:
            await store.set_rule(service, rule_name, rule)
        except NotFound:
            raise _CommandError(f'no service named "{service}"') from None
        return rule_name + "\n"

    return run


def _cmd_deselect(args: argparse.Namespace) -> _Run:
    service = _name(args.service, "service name")
    rule_name = _name(args.rule, "rule name")

    async def run(store: Store) -> str:
        await _get_service(store, service)
        if not await store.remove_rule(service, rule_name):
            raise _CommandError(f'service "{service}" has no rule named "{rule_name}"')
        return rule_name + "\n"

    return run


def _cmd_rm(args: argparse.Namespace) -> _Run:
    if args.all:
        async def remove_all(store: Store) -> str:
            await store.remove_all_services()
            return ""

        return remove_all
    if args.service is None:
        raise _UsageError('Please supply either a service name, or "--all"', hint=args.prog)
    service = _name(args.service, "service name")

    async def remove(store: Store) -> str:
        if not await store.remove_service(service):
            raise _CommandError(f'no service named "{service}"')
        return ""

    return remove


def _cmd_list(args: argparse.Namespace) -> _Run:
    as_json = args.output == "json"
    if as_json and (args.format is not None or args.format_rule is not None):
        raise _UsageError("-o json cannot be combined with --format or --format-rule", args.prog)
    service_format = _template("--format", args.format, _SERVICE_FIELDS, _SAMPLE_SERVICE)
    rule_format = _template("--format-rule", args.format_rule, _RULE_FIELDS, _SAMPLE_RULE)
    verbose = args.verbose or rule_format is not None
    need_rules = as_json or verbose or bool(service_format and service_format.uses("rules"))
    need_instances = bool(service_format and service_format.uses("instances"))

    async def run(store: Store) -> str:
        services = await store.get_all_services(rules=need_rules, instances=need_instances)
        if as_json:
            return _dump(
                {
                    "services": {
                        name: {
                            "spec": _stored(info.spec),
                            "rules": {r: _stored(rule) for r, rule in info.rules.items()},
                        }
                        for name, info in services.items()
                    }
                }
            )
        return _render_list(
            services, verbose=verbose, service_format=service_format, rule_format=rule_format
        )

    return run


def _cmd_targets(args: argparse.Namespace) -> _Run:
    async def run(store: Store) -> str:
        targets = sorted(set((await store.get_prometheus_targets()).values()), key=_target_order)
        if args.output == "file-sd":
            # Prometheus's file-based discovery format: one group, the job's label left to
            # the scrape config.
            return _dump([{"targets": targets, "labels": {}}] if targets else [])
        return "".join(f"{target}\n" for target in targets)

    return run


async def _get_service(store: Store, name: str, **what: bool) -> ServiceInfo:
    try:
        return await store.get_service(name, **what)
    except NotFound:
        raise _CommandError(f'no service named "{name}"') from None


async def _services(store: Store, name: str | None, **what: bool) -> dict[str, ServiceInfo]:
    if name is None:
        return await store.get_all_services(**what)
    return {name: await _get_service(store, name, **what)}


def _cmd_info(args: argparse.Namespace) -> _Run:
    service = _name(args.service, "service name") if args.service is not None else None

    async def run(store: Store) -> str:
        # Instances of hosts that are not registered are left out, with a warning, as fluxd
        # leaves them out; conflicts are found over every service, even for one.
        services = await store.get_all_services(rules=True, instances=True, known_hosts=True)
        conflicts = _conflicts(services)
        port_conflicts = _port_conflicts(services)
        hosts = await store.get_hosts()
        if service is not None:
            if service not in services:
                await _get_service(store, service)  # the error saying why
            services = {service: services[service]}
        if args.output != "json":
            return _render_info(hosts, services, conflicts, port_conflicts)
        return _dump(
            {
                "hosts": {address: _stored(host) for address, host in hosts.items()},
                "services": {
                    name: {
                        "spec": _stored(info.spec),
                        "rules": {r: _stored(rule) for r, rule in info.rules.items()},
                        "instances": {
                            i: _instance_view(inst) for i, inst in info.instances.items()
                        },
                    }
                    | ({"conflict": str(conflicts[name])} if name in conflicts else {})
                    | (
                        {"publishConflict": str(port_conflicts[name])}
                        if name in port_conflicts
                        else {}
                    )
                    for name, info in services.items()
                },
            }
        )

    return run


def _cmd_query(args: argparse.Namespace) -> _Run:
    service = _name(args.service, "service name") if args.service is not None else None
    selector = _selector(args)
    if args.host is not None:
        selector["host"] = _host_ip(args.host)
    if args.state is not None:
        selector["state"] = args.state
    if args.rule is not None:
        selector["rule"] = _name(args.rule, "rule name")
    template = _template("--format", args.format, _QUERY_FIELDS, _SAMPLE_INSTANCE)

    async def run(store: Store) -> str:
        services = await _services(store, service, instances=True, known_hosts=True)
        found = [
            (name, instance_id, instance)
            for name in sorted(services)
            for instance_id, instance in sorted(services[name].instances.items())
            if matches(selector, instance_labels(instance))
        ]
        if args.output == "json":
            instances = [
                {"service": name, "name": iid, **_instance_view(inst)} for name, iid, inst in found
            ]
            return _dump({"instances": instances})
        if args.quiet:
            return "".join(f"{iid}\n" for _, iid, _ in found)
        if template is not None:
            return "".join(template.render(_query_fields(*row)) for row in found)
        header = ("SERVICE", "INSTANCE", "ADDRESS", "STATE")
        rows = [
            (name, iid, inst.address or "<nil>", str(inst.effective_state))
            for name, iid, inst in found
        ]
        return _render_table([header, *rows])

    return run


# -- the command line ---------------------------------------------------------------------------


def _add_selector_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selector")
    group.add_argument("--image", metavar="IMAGE", help="select on the image (no tag)")
    group.add_argument("--tag", metavar="TAG", help="select on the image tag")
    group.add_argument(
        "--labels", metavar="K=V,...", help="select on container labels (comma-separated)"
    )
    group.add_argument(
        "--env", metavar="K=V,...", help="select on environment entries (comma-separated)"
    )


def _fields(names: Iterable[str]) -> str:
    return " ".join(f"{{{name}}}" for name in names)


def build_parser() -> argparse.ArgumentParser:
    """The fluxctl argument parser (every subcommand and flag)."""
    parser = _Parser(
        prog=PROG,
        description="control flux: define services and enrol instances in them",
        epilog=(
            "fluxctl talks to etcd at $ETCD_ADDRESS (comma-separated endpoints, default "
            f"{DEFAULT_ETCD_ADDRESS}); TLS and authentication: ETCD_CA_FILE, ETCD_CERT_FILE, "
            "ETCD_KEY_FILE, ETCD_USERNAME, ETCD_PASSWORD."
        ),
        allow_abbrev=False,
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} version {flux.__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Callable[..., Any], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, allow_abbrev=False)
        sub.set_defaults(handler=handler, prog=sub.prog)
        return sub

    sub = command("service", _cmd_service, "define a service, or replace its definition")
    sub.add_argument("name", help="the service's name")
    sub.add_argument("--address", metavar="IP:PORT", help="the service's floating address")
    sub.add_argument("-p", "--protocol", choices=("tcp", "http"), help="tcp (default) or http")
    sub.add_argument(
        "--instance-port", type=_port, metavar="N",
        help="the port instances listen on (default: the address's port, else the published"
        " port)",
    )
    sub.add_argument(
        "--publish", type=_port, metavar="PORT",
        help="publish the service on this port of every fluxd host (its -publish-ip)",
    )
    sub.add_argument(
        "--hostname", action="append", metavar="NAME",
        help="with --publish: a host name this service answers to on its published port,"
        " which several services may then share: http by the request's Host, tcp by the TLS"
        " server name (SNI), passed through (repeatable; *.example.com matches one label)",
    )
    sub.add_argument(
        "--proxy-protocol", choices=("v1", "v2"),
        help="send instances a PROXY protocol header (v1: text, v2: binary) with the client's"
        " address before its bytes (tcp services only)",
    )
    sub.add_argument(
        "--forwarded", action="store_true",
        help="add the client's address to every request's X-Forwarded-For and set"
        " X-Forwarded-Proto and X-Forwarded-Host (http services only)",
    )
    _add_selector_flags(sub)

    sub = command("publish", _cmd_publish, "publish a service on a port of every fluxd host")
    sub.add_argument("name", help="the service's name")
    sub.add_argument("port", type=_port, help="the port (1-65535)")

    sub = command("unpublish", _cmd_unpublish, "stop publishing a service")
    sub.add_argument("name", help="the service's name")

    sub = command("select", _cmd_select, "add or replace a rule selecting containers")
    sub.add_argument("service", help="the service's name")
    sub.add_argument("rule", nargs="?", default=DEFAULT_RULE, help="the rule's name (default)")
    sub.add_argument("--instance-port", type=_port, metavar="N", help="port of these instances")
    _add_selector_flags(sub)

    sub = command("deselect", _cmd_deselect, "remove a rule from a service")
    sub.add_argument("service", help="the service's name")
    sub.add_argument("rule", nargs="?", default=DEFAULT_RULE, help="the rule's name (default)")

    sub = command("rm", _cmd_rm, "remove a service, or every service with --all")
    which = sub.add_mutually_exclusive_group()
    which.add_argument("service", nargs="?", help="the service's name")
    which.add_argument("--all", action="store_true", help="remove every service")

    sub = command("list", _cmd_list, "list services")
    sub.add_argument("-v", "--verbose", action="store_true", help="show definitions and rules")
    sub.add_argument(
        "-f", "--format", metavar="FMT",
        help="print each service with this Python format string, over " + _fields(_SERVICE_FIELDS),
    )
    sub.add_argument(
        "--format-rule", metavar="FMT",
        help="print each rule with this format string (implies -v), over " + _fields(_RULE_FIELDS),
    )
    sub.add_argument("-o", "--output", choices=("json",), help="print a JSON document")

    sub = command("info", _cmd_info, "show hosts, services, rules and instances")
    sub.add_argument("-s", "--service", metavar="NAME", help="show only this service")
    sub.add_argument("-o", "--output", choices=("json",), help="print a JSON document")

    sub = command("query", _cmd_query, "list instances matching a selector")
    sub.add_argument("-s", "--service", metavar="NAME", help="only instances of this service")
    sub.add_argument("--host", metavar="IP", help="only instances on this host")
    sub.add_argument(
        "--state", choices=[str(s) for s in InstanceState], help="only instances in this state"
    )
    sub.add_argument("--rule", metavar="NAME", help="only instances selected by this rule")
    _add_selector_flags(sub)
    output = sub.add_mutually_exclusive_group()
    output.add_argument(
        "-f", "--format", metavar="FMT",
        help="print each instance with this Python format string, over "
        + _fields(_QUERY_FIELDS),
    )
    output.add_argument("-q", "--quiet", action="store_true", help="print instance names only")
    output.add_argument("-o", "--output", choices=("json",), help="print a JSON document")

    sub = command(
        "targets", _cmd_targets, "list the metrics endpoints fluxd daemons advertise"
    )
    sub.add_argument(
        "-o", "--output", choices=("file-sd",),
        help="print them as a Prometheus file_sd_configs document (JSON)",
    )

    command("version", _cmd_version, "print the version")
    return parser


# -- the store ----------------------------------------------------------------------------------


def _endpoints(environ: Mapping[str, str]) -> list[str]:
    text = environ.get("ETCD_ADDRESS", "") or DEFAULT_ETCD_ADDRESS
    return [item.strip() for item in text.split(",") if item.strip()] or [DEFAULT_ETCD_ADDRESS]


def _open_store(environ: Mapping[str, str]) -> Store:
    """Build the etcd store from ``ETCD_ADDRESS`` and the ``ETCD_*`` TLS and auth variables."""
    from flux.store.etcd import EtcdStore  # imported late: version and --help need no client

    return EtcdStore(
        _endpoints(environ),
        ca_file=environ.get("ETCD_CA_FILE") or None,
        cert_file=environ.get("ETCD_CERT_FILE") or None,
        key_file=environ.get("ETCD_KEY_FILE") or None,
        username=environ.get("ETCD_USERNAME") or None,
        password=environ.get("ETCD_PASSWORD") or None,
        timeout=CONNECT_TIMEOUT,
    )


async def _run(run: _Run, environ: Mapping[str, str]) -> str:
    store = _open_store(environ)
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            return await run(store)
    finally:
        await store.close()


# -- main ---------------------------------------------------------------------------------------


def _fail(message: str, hint: str | None = None) -> None:
    # One line, always: the hint rides on it rather than adding a second.
    suffix = f" (try '{hint} --help')" if hint else ""
    print(f"{PROG}: {message}{suffix}", file=sys.stderr)


class _WarningLine(logging.Handler):
    """Shows the store's warnings (a record it skipped) as ``fluxctl: warning: ...`` lines."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        # sys.stderr is looked up per line: it is whatever stderr is when the warning happens.
        print(f"{PROG}: warning: {record.getMessage()}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run fluxctl with ``argv`` (default: the process's arguments); return the exit status."""
    handler = _WarningLine()
    logger = logging.getLogger("flux")
    logger.addHandler(handler)
    try:
        return _main(argv, os.environ)
    finally:
        logger.removeHandler(handler)


def _main(argv: Sequence[str] | None, environ: Mapping[str, str]) -> int:
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help and --version
            return exit_.code if isinstance(exit_.code, int) else 0
        if args.command is None:
            raise _UsageError(
                "missing command (service, select, deselect, rm, list, info, query, version)",
                hint=PROG,
            )
        prepared = args.handler(args)
        output = prepared if isinstance(prepared, str) else asyncio.run(_run(prepared, environ))
    except _UsageError as exc:
        _fail(str(exc), exc.hint)
        return 2
    except _CommandError as exc:
        _fail(str(exc))
        return 1
    except StoreError as exc:  # StoreUnavailable's message names each endpoint tried
        _fail(str(exc))
        return 1
    except TimeoutError:
        _fail(f"etcd at {','.join(_endpoints(environ))} did not answer in {COMMAND_TIMEOUT:g} s")
        return 1
    try:
        sys.stdout.write(output)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`fluxctl list | head -1`): not worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
