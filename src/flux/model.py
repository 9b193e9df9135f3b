"""Records kept in etcd: services, rules, instances and hosts; and a proxied connection as the
metrics see it (:class:`ConnectionInfo`, never stored).

Theory of operation
-------------------
Every record that crosses the store boundary is one of the frozen pydantic models below.  The
JSON field names are exactly the original flux's (``address``, ``instancePort``, ``protocol``,
``selector``, ``containerRule``, ``labels``, ``host``), so records written by either can be read
by the other.  Two rules from the original are kept on output:

- empty fields are omitted (``instancePort`` of 0, an empty ``protocol``, an absent address), and
- readers tolerate unknown fields (a newer writer may add some).

Validation happens here and only here: a name, an address or a port that reaches the store,
iptables or a log line has passed through one of these models.  Decoding a record from etcd
raises :class:`RecordError` with one line that names the record and what is wrong, so a bad
record can be logged and skipped without stopping anything else.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
import re
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "MAX_RECORD_BYTES",
    "NAME_PATTERN",
    "Address",
    "ConnectionInfo",
    "Host",
    "HostRef",
    "Instance",
    "InstanceState",
    "Protocol",
    "ProxyProtocol",
    "RecordError",
    "Rule",
    "Service",
    "ServiceInfo",
    "decode_record",
    "encode_record",
    "format_address",
    "normalise_hostname",
    "parse_address",
    "shown",
    "validate_name",
]

# Names become key segments in etcd (``/weave-flux/service/<S>/rules/<R>``), so `/` is out
# (the original accepted it and broke its own key parsing); a leading letter or digit keeps
# names from looking like flags on a command line.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

Protocol = Literal["tcp", "http"]
# The PROXY protocol versions a tcp service's instances may be sent (HAProxy's text v1 and
# binary v2 headers; see flux.relay.proxy_protocol).
ProxyProtocol = Literal["v1", "v2"]

# The largest record value a reader decodes.  flux's own records are well under 1 KiB (an
# instance carries its container's labels and environment, rarely more than a few KiB); a value
# this size is not one of them, and every fluxd would hold and re-decode it on every change.
MAX_RECORD_BYTES = 256 * 1024


class RecordError(ValueError):
    """A record or a value that fails validation; the message is one line for people."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a log line, cut short: bad input may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid service or rule name, else raise :class:`RecordError`."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise RecordError(
            f"invalid {what} {shown(name)}: use 1-63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def _check_port(port: int, text: str) -> int:
    if not 1 <= port <= 65535:
        raise RecordError(f"invalid address {shown(text)}: port must be 1-65535")
    return port


def parse_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Parse ``IP:port`` (IPv6 as ``[IP]:port``) into an address and a port.

    The IP must be a literal and not unspecified (a floating service address names one
    destination; ``0.0.0.0:80`` would match nothing useful).
    """
    if not isinstance(text, str):
        raise RecordError(f"invalid address {shown(text)}: expected text of the form IP:port")
    return _parse_address_text(text)


# A snapshot of thousands of services parses thousands of addresses, most of them seen before
# (every instance of one host, every service again at every snapshot): ipaddress is slow enough
# that this was the largest part of decoding one.  Errors are not cached (they raise).
@functools.lru_cache(maxsize=1 << 16)
def _parse_address_text(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise RecordError(f"invalid address {shown(text)}: expected IP:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise RecordError(f"invalid address {shown(text)}: write IPv6 addresses as [IP]:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise RecordError(
            f"invalid address {shown(text)}: {shown(host)} is not an IP address"
        ) from None
    if ip.is_unspecified:
        raise RecordError(f"invalid address {shown(text)}: the IP must not be unspecified")
    if not port_text.isdigit():
        raise RecordError(
            f"invalid address {shown(text)}: port {shown(port_text)} is not a number"
        )
    return ip, _check_port(int(port_text), text)


def format_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str, port: int) -> str:
    """Render an address the way the original did: ``IP:port``, IPv6 in brackets."""
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _normalise_address(text: str) -> str:
    ip, port = parse_address(text)
    return format_address(ip, port)


def _normalise_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise RecordError(f"invalid host address {shown(text)}: not an IP address") from None


# An ``IP:port`` kept as its canonical text form: that is what goes to etcd and iptables.
Address = Annotated[str, AfterValidator(_normalise_address)]
IPText = Annotated[str, AfterValidator(_normalise_ip)]
Port = Annotated[int, Field(ge=0, le=65535)]
# A published port as written in a record: a JSON number, never text or a boolean (a
# record written by another tool with "publish": "80" or true is refused, not guessed at).
PublishedPort = Annotated[int, Field(strict=True, ge=0, le=65535)]


# A host name a service answers to on a shared published port (``--hostname``): DNS labels of
# letters, digits and '-', case-insensitive (kept in lower case, a trailing dot dropped);
# ``*.`` first matches exactly one label (``*.example.com``: ``a.example.com``, not
# ``example.com`` nor ``a.b.example.com``), as TLS certificates' wildcards do.
_LABEL = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"
_HOSTNAME_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
MAX_HOSTNAME = 253


def normalise_hostname(text: str) -> str:
    """``text`` as a service's host name (lower case, no trailing dot), else raise
    :class:`RecordError` naming it."""
    if not isinstance(text, str):
        raise RecordError(f"invalid host name {shown(text)}: expected text")
    name = text.lower().removesuffix(".")
    if len(name) > MAX_HOSTNAME or _HOSTNAME_PATTERN.fullmatch(name) is None:
        raise RecordError(
            f"invalid host name {shown(text)}: use DNS labels of letters, digits and '-'"
            " separated by '.', optionally starting with '*.' (one label), at most"
            f" {MAX_HOSTNAME} characters"
        )
    return name


def _normalise_hostnames(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({normalise_hostname(name) for name in names}))


HostNames = Annotated[tuple[str, ...], AfterValidator(_normalise_hostnames)]


class _Record(BaseModel):
    # extra="ignore": readers tolerate fields added by newer writers (SPEC §2).
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Service(_Record):
    """A service's definition (``service/<S>/spec``).

    ``publish`` (beyond the original, omitted when 0) is the port every fluxd listens on for
    the service's clients from outside, at its ``-publish-ip``; a service may have an address,
    a published port, or both.  ``hostnames`` (``fluxctl --hostname``, omitted when empty)
    let several services share one published port: each connection goes to the service
    named by its first request's ``Host`` (http) or by its TLS server name (tcp; see
    :mod:`flux.balancer.entrypoints`).
    ``proxyProtocol`` (``v1`` or ``v2``, omitted when empty; tcp services only) makes fluxd
    send the instance a PROXY protocol header naming the client before the client's bytes, on
    VIP and published connections alike.  ``forwarded`` (``true``, omitted when false; http
    services only) makes fluxd add the client's address to every request head's
    ``X-Forwarded-For`` and set ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (see
    :mod:`flux.relay.forwarded`), likewise on both.
    """

    address: Address | None = None
    instance_port: Port = Field(default=0, alias="instancePort")
    protocol: Protocol | Literal[""] = ""
    publish: PublishedPort = 0
    hostnames: HostNames = ()
    proxy_protocol: ProxyProtocol | Literal[""] = Field(default="", alias="proxyProtocol")
    # strict: a record written by another tool with "forwarded": "yes" or 1 is refused, not
    # guessed at.
    forwarded: bool = Field(default=False, strict=True)

    @model_validator(mode="after")
    def _client_address_options_fit_protocol(self) -> Service:
        # An http service's instances read HTTP from the first byte; the client's address
        # reaches them in X-Forwarded-For instead (fluxctl --forwarded), which a tcp
        # service's bytes have no place for.
        if self.proxy_protocol and self.effective_protocol != "tcp":
            raise ValueError(
                f"proxyProtocol {self.proxy_protocol} is for tcp services, not"
                f" {self.protocol} ones"
            )
        if self.forwarded and self.effective_protocol != "http":
            raise ValueError(
                "forwarded (X-Forwarded-For) is for http services, not"
                f" {self.effective_protocol} ones"
            )
        return self

    @property
    def effective_protocol(self) -> Protocol:
        """The protocol to proxy with: the original treated an empty protocol as TCP."""
        return "http" if self.protocol == "http" else "tcp"


class Rule(_Record):
    """A named selector attached to a service (``service/<S>/rules/<R>``)."""

    selector: dict[str, str] = Field(default_factory=dict)
    instance_port: Port = Field(default=0, alias="instancePort")

    @field_validator("selector")
    @classmethod
    def _keys_non_empty(cls, selector: dict[str, str]) -> dict[str, str]:
        for key in selector:
            if not key:
                raise ValueError("selector keys must not be empty")
        return selector


class InstanceState(enum.StrEnum):
    """Where an instance is in its lifecycle; only ``live`` instances get new connections."""

    LIVE = "live"
    NO_ADDRESS = "no address"
    PAUSED = "paused"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class HostRef(_Record):
    """The ``host`` field of an instance: which fluxd enrolled it."""

    address: str = ""


class Instance(_Record):
    """A container enrolled in a service (``service/<S>/instances/<container ID>``)."""

    host: HostRef = Field(default_factory=HostRef)
    container_rule: str = Field(default="", alias="containerRule")
    address: Address | None = None
    labels: dict[str, str] | None = None
    state: InstanceState | None = None

    @property
    def effective_state(self) -> InstanceState:
        """The state, derived as the original did when a record carries none."""
        if self.state is not None:
            return self.state
        return InstanceState.LIVE if self.address else InstanceState.NO_ADDRESS

    @property
    def receives_connections(self) -> bool:
        return self.address is not None and self.effective_state is InstanceState.LIVE


class Host(_Record):
    """A running fluxd (``host/<HOST_IP>``)."""

    address: IPText
    version: str = ""
    started: str = ""


class ServiceInfo(_Record):
    """A service with, as asked for, its rules and its instances.

    ``created`` is the store revision at which the spec key was created (0 when unknown): the
    same on every host, it orders services that claim one address (the first one keeps it).
    """

    name: str
    spec: Service
    created: int = 0
    rules: dict[str, Rule] = Field(default_factory=dict)
    instances: dict[str, Instance] = Field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        # ``created`` orders claims on an address; it is not part of what the service is (a
        # spec rewritten in place keeps it, and a spec can only be re-created after a delete,
        # which every watcher sees on its own).
        if not isinstance(other, ServiceInfo):
            return NotImplemented
        return (self.name, self.spec, self.rules, self.instances) == (
            other.name,
            other.spec,
            other.rules,
            other.instances,
        )


_R = TypeVar("_R", bound=BaseModel)


class ConnectionInfo(NamedTuple):
    """A proxied connection, as the metrics see it when it starts and ends (the listener makes
    one per connection it hands to the relay; a NamedTuple, cheap to build).  ``entry`` is how
    the client came in: ``vip`` (the service address) or ``published:PORT``."""

    service: str
    protocol: str
    instance: str
    instance_address: str
    client_address: str
    entry: str = "vip"


def encode_record(record: BaseModel) -> str:
    """Serialise a record as compact JSON with the original's field names, empties omitted."""
    data = record.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if isinstance(record, Instance):
        # The original always wrote these three, even when empty.
        data.setdefault("host", {"address": record.host.address})
        data["host"].setdefault("address", "")
        data.setdefault("containerRule", record.container_rule)
        data.setdefault("labels", record.labels)
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    # Only the field's own name: pydantic appends union/literal branch names after it.
    where = str(first["loc"][0]) if first["loc"] else "record"
    message = str(first["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{where}: {message}"


def decode_record(cls: type[_R], text: str | bytes, key: str = "record") -> _R:
    """Parse a record from JSON; raise :class:`RecordError` naming ``key`` on any problem."""
    if len(text) > MAX_RECORD_BYTES:
        raise RecordError(
            f"{key}: the value is {len(text)} bytes, more than the {MAX_RECORD_BYTES} a record"
            " may hold"
        )
    try:
        data: Any = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{key}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{key}: expected a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise RecordError(f"{key}: {_describe(exc)}") from None

